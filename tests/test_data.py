"""The episode file format and the episode store, on tiny synthetic episodes."""

from __future__ import annotations

import io
import json
import uuid
import weakref
import zipfile
from pathlib import Path

import fsspec
import numpy as np
import pytest

from wmlab.data import (
    Episode,
    EpisodeReader,
    EpisodeStore,
    decode_episode,
    encode_episode,
    format_info,
    read_chunk,
    read_episode,
    read_meta,
    sampling,
    verify_file,
    write_episode,
)
from wmlab.errors import StoreError


def make_episode(index: int, steps: int, collection: str = "random", noise: bool = False,
                 action_dim: int = 3) -> Episode:
    """Frames marked in their first pixel with (episode index, frame number): all unique."""
    rng = np.random.default_rng(index)
    if noise:
        frames = rng.integers(0, 256, (steps + 1, 64, 64, 3), dtype=np.uint8)
    else:  # flat frames compress (and so test) fast
        frames = np.full((steps + 1, 64, 64, 3), index % 200, dtype=np.uint8)
        frames[:, 10:20, 10:20] = rng.integers(0, 256, (steps + 1, 1, 1, 3), dtype=np.uint8)
    t = np.arange(steps + 1)
    frames[:, 0, 0] = np.stack([np.full_like(t, index % 256), t % 256, t // 256], axis=1)
    return Episode(frames=frames,
                   actions=rng.uniform(-1, 1, (steps, action_dim)).astype(np.float32),
                   rewards=rng.normal(size=steps).astype(np.float32),
                   dones=np.arange(steps) == steps - 1,
                   meta={"collection": collection, "index": index, "env": "doom",
                         "backend": "vizdoom", "policy": "held", "seed": 100 + index,
                         "policy_seed": 200 + index, "truncated": False})


def frame_key(frame: np.ndarray) -> tuple[int, int]:
    return int(frame[0, 0, 0]), int(frame[0, 0, 1]) + 256 * int(frame[0, 0, 2])


def keys(batches) -> list[tuple[int, int]]:
    return [frame_key(f) for batch in batches for f in batch]


@pytest.fixture(params=["local", "memory"])
def store_url(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "store")
        return
    name = f"wmlab-test-{uuid.uuid4().hex}"
    yield f"memory://{name}"
    memory = fsspec.filesystem("memory")
    if memory.exists(f"/{name}"):  # the memory filesystem lives as long as the process
        memory.rm(f"/{name}", recursive=True)


def new_store(url: str | Path, **kwargs) -> EpisodeStore:
    return EpisodeStore.create_or_open(str(url), env="doom", backend="vizdoom", action_dim=3,
                                       **kwargs)


def filled_store(url: str | Path, lengths: list[int]) -> EpisodeStore:
    store = new_store(url)
    for i, steps in enumerate(lengths):
        store.append(make_episode(i, steps))
    return store


def assert_same_episode(a: Episode, b: Episode) -> None:
    for name in ("frames", "actions", "rewards", "dones"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        assert getattr(a, name).dtype == getattr(b, name).dtype


# -- the file format ---------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [0, 62, 63, 64, 127, 128])
def test_round_trip_is_exact_across_chunk_boundaries(store_url, steps):
    episode = make_episode(1, steps, noise=True)
    episode_id = new_store(store_url).append(episode)
    store = EpisodeStore.open(store_url)
    loaded = store.load(episode_id)
    assert_same_episode(loaded, episode)
    meta = loaded.meta
    for key, value in episode.meta.items():
        assert meta[key] == value
    assert meta["length"] == steps and meta["format"] == "wmep/1"
    assert meta["return"] == pytest.approx(float(episode.rewards.sum(dtype=np.float64)))
    assert meta["terminated"] is (steps > 0) and meta["wmlab_version"] and meta["created"]
    assert meta["frame_shape"] == [64, 64, 3] and meta["chunk_frames"] == 64
    # the frames are in ceil((T + 1) / 64) chunks, the last one shorter
    chunks = -(-(steps + 1) // 64)
    with store.reader(episode_id) as reader:
        assert reader.num_chunks == chunks
        sizes = [len(reader.read_chunk(k)) for k in range(chunks)]
    assert sizes == [64] * (chunks - 1) + [steps + 1 - 64 * (chunks - 1)]
    np.testing.assert_array_equal(
        read_chunk(store.fs, store.episode_path("random", 1), chunks - 1),
        episode.frames[64 * (chunks - 1):])


def test_file_is_a_plain_zip_of_stored_members(tmp_path):
    fs = fsspec.filesystem("file")
    path = str(tmp_path / "one.wmep")
    episode = make_episode(3, 130)
    write_episode(fs, path, episode, chunk_frames=50, level=1)
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        assert all(i.compress_type == zipfile.ZIP_STORED for i in archive.infolist())
        meta = json.loads(archive.read("meta.json"))
        actions = np.load(io.BytesIO(archive.read("actions.npy")))
    assert names[:4] == ["meta.json", "actions.npy", "rewards.npy", "dones.npy"]
    assert names[4:] == ["frames/000000.zst", "frames/000001.zst", "frames/000002.zst"]
    assert meta["chunk_frames"] == 50 and meta["length"] == 130
    np.testing.assert_array_equal(actions, episode.actions)
    assert read_meta(fs, path)["index"] == 3
    assert_same_episode(read_episode(fs, path), episode)
    assert_same_episode(decode_episode(encode_episode(episode, chunk_frames=7)), episode)
    assert verify_file(fs, path) == []


class CountingFile(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.bytes_read = 0

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self.bytes_read += len(data)
        return data


def test_reading_one_chunk_reads_only_that_member():
    data = encode_episode(make_episode(0, 64 * 10 - 1, noise=True))
    handle = CountingFile(data)
    with EpisodeReader(handle, "counted") as reader:
        opened = handle.bytes_read
        chunk = reader.read_chunk(5)
    assert len(chunk) == 64 and frame_key(chunk[0]) == (0, 5 * 64)
    chunk_bytes = len(data) / 10
    assert opened < 4096  # directory + meta.json
    assert handle.bytes_read - opened < 1.1 * chunk_bytes


def test_invalid_episodes_are_refused_before_anything_is_written(tmp_path):
    store = new_store(tmp_path / "s")
    cases = {
        "11 frames for 11 steps": lambda e: setattr(e, "frames", e.frames[:-1]),
        "frames must be .* uint8": lambda e: setattr(e, "frames", e.frames.astype(np.float32)),
        "frames must be \\(64, 64, 3\\)": lambda e: setattr(e, "frames", e.frames[:, :32]),
        "actions must be \\(T, A\\)": lambda e: setattr(e, "actions", e.actions[:, 0]),
        "dones must be \\(11,\\)": lambda e: setattr(e, "dones", e.dones[:-1]),
        "actions of size 2": lambda e: setattr(e, "actions", e.actions[:, :2]),
        "env 'carracing'": lambda e: e.meta.update(env="carracing"),
        "backend 'envpool'": lambda e: e.meta.update(backend="envpool"),
        "not JSON-serialisable": lambda e: e.meta.update(bad=object()),
        "needs 'collection' and 'index'": lambda e: e.meta.pop("index"),
    }
    for message, spoil in cases.items():
        episode = make_episode(0, 11)
        spoil(episode)
        with pytest.raises(StoreError, match=message):
            store.append(episode)
    with pytest.raises(StoreError, match="chunk_frames must be"):
        store.append(make_episode(0, 11), chunk_frames=0)
    assert store.episode_ids() == [] and store.clean_tmp() == 0


def _corruptions(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        chunk = archive.getinfo("frames/000001.zst")
        rewards = archive.getinfo("rewards.npy")

    def flip(offset: int) -> bytes:
        raw = bytearray(data)
        raw[offset] ^= 0x5A
        return bytes(raw)

    def payload(info: zipfile.ZipInfo) -> int:  # first byte after the local header
        return info.header_offset + 30 + len(info.filename) + len(info.extra)

    return {"truncated to half": data[:len(data) // 2], "last byte cut": data[:-1],
            "empty": b"", "not a zip": b"hello world",
            "flipped byte in a chunk": flip(payload(chunk) + 40),
            "flipped byte in rewards": flip(payload(rewards) + len(rewards.filename) + 100),
            "flipped local header": flip(chunk.header_offset + 1)}


def test_truncated_and_flipped_files_are_caught_by_verify_and_by_reading(tmp_path):
    store = filled_store(tmp_path / "s", [150, 150])
    good_id, bad_id = store.episode_ids()
    path = Path(store.episode_path("random", 1))
    original = path.read_bytes()
    for what, damaged in _corruptions(original).items():
        path.write_bytes(damaged)
        problems = verify_file(store.fs, str(path))
        assert problems, what
        report = store.verify(progress=False)
        assert list(report.bad) == [bad_id] and report.checked == 2, what
        assert "BAD random-0000001.wmep" in report.summary()
        reads = [lambda: store.load(bad_id)]
        if "rewards" not in what:  # batches read frames only
            reads.append(lambda: list(store.frame_batches(16, pool_chunks=1, prefetch=False)))
        for read in reads:
            with pytest.raises(StoreError) as caught:
                read()
            message = str(caught.value)
            assert "random-0000001.wmep" in message and "wmlab data verify" in message, what
            assert "\n" not in message
    path.write_bytes(original)
    assert store.verify(progress=False).ok


def test_no_damage_escapes_as_anything_but_store_error_or_goes_unnoticed():
    episode = make_episode(0, 40)
    data = encode_episode(episode, chunk_frames=16)
    damaged = [data[:cut] for cut in range(0, len(data), 11)]
    for position in range(0, len(data), 3):
        raw = bytearray(data)
        raw[position] ^= 0xFF
        damaged.append(bytes(raw))
    for blob in damaged:
        try:
            loaded = decode_episode(blob)
        except StoreError:
            continue
        # a flip the CRCs cannot see (a timestamp, a version field) must change nothing
        assert_same_episode(loaded, episode)


def test_quarantine_moves_bad_files_aside_without_deleting(tmp_path):
    store = filled_store(tmp_path / "s", [20, 20, 20])
    path = Path(store.episode_path("random", 0))
    path.write_bytes(path.read_bytes()[:100])
    report = store.verify(progress=False)
    moved = store.quarantine(sorted(report.bad))
    assert store.episode_ids() == ["random-0000001", "random-0000002"]
    assert store.existing_indices("random") == {1, 2}
    store.append(make_episode(0, 20))  # collection redoes it
    store.quarantine(["random-0000000"])  # a second copy does not overwrite the first
    assert sorted(p.name for p in (tmp_path / "s" / "bad").iterdir()) == [
        "random-0000000.1.wmep", "random-0000000.wmep"]
    assert Path(moved[0]).stat().st_size == 100
    assert store.verify(progress=False).ok


# -- frame batches -----------------------------------------------------------------------------


def test_frame_batches_visit_every_frame_once_per_epoch(store_url):
    store = filled_store(store_url, [40 + 23 * i for i in range(7)])
    expected = sorted((i, t) for i in range(7) for t in range(41 + 23 * i))
    batches = list(store.frame_batches(batch_size=17, seed=3, epoch=0, pool_chunks=2))
    assert all(b.shape[1:] == (64, 64, 3) and b.dtype == np.uint8 for b in batches)
    assert [len(b) for b in batches[:-1]] == [17] * (len(batches) - 1)
    assert len(batches) == store.num_batches(17) == -(-len(expected) // 17)
    seen = keys(batches)
    assert sorted(seen) == expected
    assert keys(store.frame_batches(17, seed=3, epoch=0, pool_chunks=2, prefetch=False)) == seen
    other = keys(store.frame_batches(17, seed=3, epoch=1, pool_chunks=2))
    assert other != seen and sorted(other) == expected
    reseeded = keys(store.frame_batches(17, seed=4, epoch=0, pool_chunks=2))
    assert reseeded != seen and sorted(reseeded) == expected
    some = ["random-0000001", "random-0000004"]
    assert sorted(keys(store.frame_batches(8, ids=some))) == sorted(
        k for k in expected if k[0] in (1, 4))


def test_frame_batches_depend_on_the_selection_not_its_order(tmp_path):
    store = filled_store(tmp_path / "s", [30, 70, 100])
    ids = store.episode_ids()
    expected = keys(store.frame_batches(16, seed=5, ids=ids, pool_chunks=1))
    assert keys(store.frame_batches(16, seed=5, ids=ids[::-1] + ids, pool_chunks=1)) == expected
    assert keys(store.frame_batches(16, seed=5, pool_chunks=1)) == expected


def test_batches_mix_episodes(tmp_path):
    store = filled_store(tmp_path / "s", [200] * 10)
    first = next(store.frame_batches(100, seed=0, pool_chunks=8))
    assert len({frame_key(f)[0] for f in first}) >= 5


@pytest.mark.parametrize("batch_size,pool_chunks", [(20, 2), (150, 1), (7, 3)])
def test_start_batch_resumes_with_exactly_the_remaining_batches(tmp_path, monkeypatch,
                                                                batch_size, pool_chunks):
    store = filled_store(tmp_path / "s", [70, 10, 130, 64, 5, 90])
    full = list(store.frame_batches(batch_size, seed=1, epoch=2, pool_chunks=pool_chunks))
    chunks = sum(-(-(m["length"] + 1) // 64) for m in store.metas())
    decompressed = []
    original = EpisodeReader.read_chunk

    def counting(self, k, *args, **kwargs):
        decompressed.append((self.name, k))
        return original(self, k, *args, **kwargs)

    monkeypatch.setattr(EpisodeReader, "read_chunk", counting)
    for start in sorted({0, 1, 2, len(full) // 2, len(full) - 1, len(full), len(full) + 5}):
        decompressed.clear()
        resumed = list(store.frame_batches(batch_size, seed=1, epoch=2, ids=None,
                                           pool_chunks=pool_chunks, start_batch=start,
                                           prefetch=start % 2 == 0))
        assert len(resumed) == max(0, len(full) - start)
        for a, b in zip(full[start:], resumed, strict=True):
            np.testing.assert_array_equal(a, b)
        if start == len(full) - 1:  # the last pool and the carried frames' chunks only
            assert len(decompressed) < chunks
        if start == 0:
            assert len(decompressed) == chunks
        if start >= len(full):
            assert decompressed == []


@pytest.mark.parametrize("prefetch", [False, True])
def test_memory_stays_bounded_by_the_pool(tmp_path, monkeypatch, prefetch):
    store = filled_store(tmp_path / "s", [150 + 9 * i for i in range(12)])
    pools: list[weakref.ref] = []
    sizes: list[int] = []
    allocate = sampling._new_pool

    def watched(frames, frame_shape):
        pool = allocate(frames, frame_shape)
        pools.append(weakref.ref(pool))
        sizes.append(frames)
        return pool

    monkeypatch.setattr(sampling, "_new_pool", watched)
    batch_size, pool_chunks = 40, 3
    total, live_most = 0, 0
    for batch in store.frame_batches(batch_size, seed=0, pool_chunks=pool_chunks,
                                     prefetch=prefetch):
        total += len(batch)
        live = [ref() for ref in pools if ref() is not None]
        live_most = max(live_most, len(live))
        assert sum(len(p) for p in live) <= (1 + prefetch) * (pool_chunks * 64 + batch_size)
        del live  # the test itself must not keep old pools alive
    assert total == store.num_frames() and len(sizes) > 10
    assert max(sizes) <= pool_chunks * 64 + batch_size - 1
    assert live_most == 1 + prefetch


def test_frame_batches_refuse_bad_arguments(tmp_path):
    store = filled_store(tmp_path / "s", [10])
    for kwargs, message in [({"batch_size": 0}, "batch_size"), ({"pool_chunks": 0}, "pool_chunks"),
                            ({"start_batch": -1}, "start_batch"), ({"seed": -2}, "seed"),
                            ({"ids": ["random-0000009"]}, "not in store"),
                            ({"ids": []}, "empty list")]:
        with pytest.raises(StoreError, match=message):
            store.frame_batches(**{"batch_size": 4, **kwargs})


# -- splitting, sequences, store checks --------------------------------------------------------


def test_split_is_deterministic_and_stable_when_episodes_are_added(tmp_path):
    store = filled_store(tmp_path / "s", [3] * 40)
    train, val = store.split(0.2, seed=0)
    assert set(train).isdisjoint(val) and sorted(train + val) == store.episode_ids()
    assert 2 <= len(val) <= 16
    assert store.split(0.2, seed=0) == (train, val)
    assert store.split(0.2, seed=1) != (train, val)
    for i in range(40, 70):
        store.append(make_episode(i, 3))
    train2, val2 = store.split(0.2, seed=0)
    assert set(val) <= set(val2) and set(train) <= set(train2)
    assert store.split(0.0) == (store.episode_ids(), [])
    with pytest.raises(StoreError, match="val_fraction"):
        store.split(1.5)


@pytest.mark.parametrize("fraction", [0.001, 0.999])
def test_split_keeps_one_episode_each_side(tmp_path, fraction):
    store = filled_store(tmp_path / "s", [3, 3])
    train, val = store.split(fraction)
    assert len(train) == len(val) == 1


def test_sequences_are_windows_of_real_episodes(tmp_path):
    store = filled_store(tmp_path / "s", [30, 80, 5])
    batches = store.sequences(20, 4, seed=0, fields=("frames", "actions", "rewards", "dones"))
    for _ in range(3):
        batch = next(batches)
        assert batch["actions"].shape == (4, 20, 3) and batch["rewards"].shape == (4, 20)
        assert batch["frames"].shape == (4, 21, 64, 64, 3) and batch["dones"].dtype == bool
        for frames, actions in zip(batch["frames"], batch["actions"], strict=True):
            index, start = frame_key(frames[0])
            assert index in (0, 1)  # episode 2 is too short
            episode = make_episode(index, [30, 80][index])
            np.testing.assert_array_equal(frames, episode.frames[start:start + 21])
            np.testing.assert_array_equal(actions, episode.actions[start:start + 20])
    with pytest.raises(StoreError, match="no episode .* has 81 steps"):
        store.sequences(81, 2)


def test_env_backend_and_size_mismatches_are_refused(tmp_path):
    url = str(tmp_path / "s")
    new_store(url)
    with pytest.raises(StoreError, match=f"store {url} holds episodes of 'doom', not "
                                         "'carracing': choose another --out"):
        EpisodeStore.create_or_open(url, env="carracing", backend="gymnasium", action_dim=3)
    with pytest.raises(StoreError, match="backend vizdoom, not 'other'"):
        EpisodeStore.create_or_open(url, env="doom", backend="other", action_dim=3)
    with pytest.raises(StoreError, match="actions of size 3, not 1"):
        EpisodeStore.create_or_open(url, env="doom", backend="vizdoom", action_dim=1)
    mixed = EpisodeStore.create_or_open(url, "doom", "other", 3, allow_mixed_backends=True)
    assert mixed.backends == ("vizdoom", "other")
    manifest = json.loads((tmp_path / "s" / "store.json").read_text())
    assert manifest["backends"] == ["vizdoom", "other"] and manifest["env"] == "doom"
    assert EpisodeStore.open(url).backends == ("vizdoom", "other")
    episode = make_episode(0, 4)
    episode.meta["backend"] = "other"
    assert mixed.append(episode) == "random-0000000"


def test_missing_empty_and_unwritable_stores(tmp_path):
    with pytest.raises(StoreError, match="no episode store at .*: run `wmlab collect` first"):
        EpisodeStore.open(str(tmp_path / "elsewhere"))
    store = new_store(tmp_path / "s")
    for use in (lambda: store.frame_batches(8), lambda: store.split(0.1),
                lambda: store.load("random-0000000"), lambda: store.sequences(2, 2)):
        with pytest.raises(StoreError, match=f"store {store.url} has no episodes: run `wmlab "
                                             "collect"):
            use()
    assert store.info()["episodes"] == 0 and "episodes     0" in format_info(store.info())
    store.append(make_episode(0, 3))
    for bad_id in ("random-0000001", "nonsense", "../store"):
        with pytest.raises(StoreError, match="not .*store|not an episode id"):
            store.load(bad_id)
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(StoreError, match="cannot create an episode store at .*file/store"):
        new_store(tmp_path / "file" / "store")
    (tmp_path / "s" / "store.json").write_text("{broken")
    with pytest.raises(StoreError, match="store.json is not valid JSON"):
        EpisodeStore.open(str(tmp_path / "s"))


def test_commit_refuses_to_overwrite_and_clean_tmp(store_url):
    store = new_store(store_url)
    first = store.append(make_episode(0, 5))
    tmp = store.write_tmp("again", make_episode(0, 6))
    with pytest.raises(StoreError, match="episode random-0000000 already exists"):
        store.commit(tmp, "random", 0)
    with pytest.raises(StoreError, match="holds episode random/0, not random/4"):
        store.commit(tmp, "random", 4)
    assert store.load(first).length == 5
    store.fs.pipe(store.tmp_path("killed"), b"half an episo")
    assert store.verify(progress=False).leftovers != []
    assert store.clean_tmp() == 2 and store.clean_tmp() == 0
    tmp = store.write_tmp("fine", make_episode(1, 5, collection="random-weights"))
    assert store.commit(tmp, "random-weights", 1) == "random-weights-0000001"
    assert store.episode_ids("random-weights") == ["random-weights-0000001"]
    assert store.existing_indices("random") == {0}


def test_index_cache_follows_files_added_and_removed_behind_its_back(tmp_path):
    store = filled_store(tmp_path / "s", [5, 6, 7])
    assert store.info()["episodes"] == 3 and (tmp_path / "s" / "index.json").exists()
    (tmp_path / "s" / "episodes" / "random-0000001.wmep").unlink()
    other = new_store(tmp_path / "t")
    other.append(make_episode(9, 20))
    other.append(make_episode(2, 50))  # same id as one in the store, another length
    for name in ("random-0000009.wmep", "random-0000002.wmep"):
        (tmp_path / "t" / "episodes" / name).replace(tmp_path / "s" / "episodes" / name)
    info = EpisodeStore.open(str(tmp_path / "s")).info()
    assert info["episodes"] == 3 and info["steps"] == 5 + 20 + 50
    cached = json.loads((tmp_path / "s" / "index.json").read_text())["episodes"]
    assert sorted(cached) == ["random-0000000", "random-0000002", "random-0000009"]
    (tmp_path / "s" / "index.json").write_text("garbage")
    assert [m["length"] for m in store.metas()] == [5, 50, 20]
    assert store.meta("random-0000009")["index"] == 9


def test_info_reports_statistics(tmp_path):
    store = filled_store(tmp_path / "s", [10, 20, 30, 40])
    (tmp_path / "s" / "series").mkdir()  # another module's folder is not episodes
    info = store.info()
    assert info["episodes"] == 4 and info["frames"] == 104 and info["steps"] == 100
    assert info["length"] == {"mean": 25.0, "std": pytest.approx(np.std([10, 20, 30, 40])),
                              "min": 10.0, "max": 40.0}
    assert info["collections"] == {"random": 4} and info["policies"] == ["held"]
    assert info["raw_bytes"] == 104 * 64 * 64 * 3 and info["compression_ratio"] > 5
    text = format_info(info)
    assert "episodes     4 (random: 4)" in text and "doom (backend vizdoom" in text
    assert [e.length for e in store.episodes()] == [10, 20, 30, 40]
    assert store.num_frames(["random-0000000"]) == 11
