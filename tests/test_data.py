import uuid
import zipfile

import numpy as np
import pytest

from wmlab.data import Episode, EpisodeStore
from wmlab.errors import StoreError


def make_episode(index: int, steps: int, collection: str = "random", start: int = 0) -> Episode:
    """Frames whose first two pixels encode (index, frame number): every frame is unique."""
    rng = np.random.default_rng(index)
    frames = rng.integers(0, 256, (steps + 1, 64, 64, 3), dtype=np.uint8)
    frames[:, 0, 0, 0] = index % 256
    frames[:, 0, 0, 1] = (np.arange(steps + 1) + start) % 256
    frames[:, 0, 0, 2] = (np.arange(steps + 1) + start) // 256
    return Episode(frames=frames, actions=rng.uniform(-1, 1, (steps, 3)).astype(np.float32),
                   rewards=rng.normal(size=steps).astype(np.float32),
                   dones=np.arange(steps) == steps - 1,
                   meta={"collection": collection, "index": index, "env": "doom",
                         "backend": "vizdoom", "policy": "held", "seed": index})


def frame_key(frame: np.ndarray) -> tuple[int, int]:
    return int(frame[0, 0, 0]), int(frame[0, 0, 1]) + 256 * int(frame[0, 0, 2])


@pytest.fixture(params=["local", "memory"])
def store_url(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return f"memory://wmlab-test-{uuid.uuid4().hex}"


def new_store(url: str) -> EpisodeStore:
    return EpisodeStore.create_or_open(url, env="doom", backend="vizdoom", action_dim=3)


@pytest.mark.parametrize("steps", [0, 62, 63, 64, 130])
def test_round_trip_is_exact_across_chunk_boundaries(store_url, steps):
    store = new_store(store_url)
    episode = make_episode(1, steps)
    episode_id = store.append(episode)
    loaded = EpisodeStore.open(store_url).load(episode_id)
    np.testing.assert_array_equal(loaded.frames, episode.frames)
    np.testing.assert_array_equal(loaded.actions, episode.actions)
    np.testing.assert_array_equal(loaded.rewards, episode.rewards)
    np.testing.assert_array_equal(loaded.dones, episode.dones)
    assert loaded.meta["length"] == steps and loaded.meta["seed"] == 1
    assert loaded.meta["return"] == pytest.approx(float(episode.rewards.sum()), abs=1e-4)


def test_invalid_episode_is_refused_before_writing(tmp_path):
    store = new_store(str(tmp_path / "s"))
    bad = make_episode(0, 10)
    bad.frames = bad.frames[:-1]
    with pytest.raises(StoreError, match="10 frames for 10 steps"):
        store.append(bad)
    assert store.episode_ids() == []


def test_truncated_and_flipped_files_are_caught(tmp_path):
    url = str(tmp_path / "s")
    store = new_store(url)
    ids = [store.append(make_episode(i, 100)) for i in range(3)]
    files = {i: tmp_path / "s" / "episodes" / f"{i}.wmep" for i in ids}
    data = files[ids[0]].read_bytes()
    files[ids[0]].write_bytes(data[: len(data) // 2])  # truncated
    raw = bytearray(files[ids[1]].read_bytes())
    with zipfile.ZipFile(files[ids[1]]) as archive:
        info = archive.getinfo("frames/000001.zst")
    raw[info.header_offset + 30 + len(info.filename) + 10] ^= 0xFF  # flip a compressed byte
    files[ids[1]].write_bytes(bytes(raw))
    report = store.verify(progress=False)
    assert not report.ok and set(report.bad) == {ids[0], ids[1]}
    assert "CRC" in " ".join(report.bad[ids[1]]) or "damaged" in " ".join(report.bad[ids[1]])
    with pytest.raises(StoreError, match=f"{ids[0]}.wmep is truncated or corrupt"):
        store.load(ids[0])
    with pytest.raises(StoreError, match="damaged|verify"):
        store.load(ids[1])
    store.quarantine(sorted(report.bad))
    assert store.episode_ids() == [ids[2]]
    assert len(list((tmp_path / "s" / "bad").iterdir())) == 2
    assert store.verify(progress=False).ok


def test_frame_batches_visit_every_frame_once_per_epoch(store_url):
    store = new_store(store_url)
    for i in range(7):
        store.append(make_episode(i, 40 + 13 * i))
    expected = sorted((i, t) for i in range(7) for t in range(41 + 13 * i))
    seen = []
    for batch in store.frame_batches(batch_size=17, seed=3, epoch=0, pool_chunks=2):
        assert batch.shape[1:] == (64, 64, 3) and batch.dtype == np.uint8
        seen.extend(frame_key(f) for f in batch)
    assert sorted(seen) == expected
    again = [frame_key(f) for b in store.frame_batches(17, seed=3, epoch=0, pool_chunks=2)
             for f in b]
    assert again == seen
    other = [frame_key(f) for b in store.frame_batches(17, seed=3, epoch=1, pool_chunks=2)
             for f in b]
    assert other != seen and sorted(other) == expected


def test_batches_mix_episodes(tmp_path):
    store = new_store(str(tmp_path / "s"))
    for i in range(10):
        store.append(make_episode(i, 200))
    first = next(store.frame_batches(100, seed=0, pool_chunks=8))
    assert len({frame_key(f)[0] for f in first}) >= 5


@pytest.mark.parametrize("start", [1, 5, 9, 13])
def test_start_batch_resumes_with_exactly_the_remaining_batches(tmp_path, start):
    store = new_store(str(tmp_path / "s"))
    for i in range(6):
        store.append(make_episode(i, 70))
    full = [b.copy() for b in store.frame_batches(20, seed=1, epoch=2, pool_chunks=2)]
    resumed = list(store.frame_batches(20, seed=1, epoch=2, pool_chunks=2, start_batch=start,
                                       prefetch=False))
    assert len(resumed) == len(full) - start
    for a, b in zip(full[start:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)


def test_memory_stays_bounded_by_the_pool(tmp_path, monkeypatch):
    store = new_store(str(tmp_path / "s"))
    for i in range(12):
        store.append(make_episode(i, 150))
    loaded_at_once = []
    original = EpisodeStore._load_chunks

    def counting(self, table, entries):
        chunks = original(self, table, entries)
        loaded_at_once.append(sum(len(c) for c in chunks.values()))
        return chunks

    monkeypatch.setattr(EpisodeStore, "_load_chunks", counting)
    batches = list(store.frame_batches(32, seed=0, pool_chunks=3, prefetch=False))
    assert sum(len(b) for b in batches) == 12 * 151
    assert max(loaded_at_once) <= 3 * 64  # never more than the pool, whatever the store


def test_split_is_deterministic_and_stable_when_episodes_are_added(tmp_path):
    store = new_store(str(tmp_path / "s"))
    for i in range(40):
        store.append(make_episode(i, 3))
    train, val = store.split(0.2, seed=0)
    assert set(train).isdisjoint(val) and len(train) + len(val) == 40 and val
    assert store.split(0.2, seed=0) == (train, val)
    for i in range(40, 60):
        store.append(make_episode(i, 3))
    train2, val2 = store.split(0.2, seed=0)
    assert set(val) <= set(val2) and set(train) <= set(train2)


def test_split_keeps_one_episode_each_side(tmp_path):
    store = new_store(str(tmp_path / "s"))
    store.append(make_episode(0, 3))
    store.append(make_episode(1, 3))
    train, val = store.split(0.01)
    assert len(train) == len(val) == 1


def test_env_mismatch_empty_store_and_missing_store(tmp_path):
    url = str(tmp_path / "s")
    new_store(url)
    with pytest.raises(StoreError, match="holds episodes of 'doom', not 'carracing'"):
        EpisodeStore.create_or_open(url, env="carracing", backend="gymnasium", action_dim=3)
    with pytest.raises(StoreError, match="backend vizdoom, not 'other'"):
        EpisodeStore.create_or_open(url, env="doom", backend="other", action_dim=3)
    store = EpisodeStore.open(url)
    with pytest.raises(StoreError, match="has no episodes"):
        next(store.frame_batches(8))
    with pytest.raises(StoreError, match="no episode store"):
        EpisodeStore.open(str(tmp_path / "elsewhere"))


def test_commit_refuses_to_overwrite_and_clean_tmp(tmp_path):
    store = new_store(str(tmp_path / "s"))
    store.append(make_episode(0, 5))
    tmp = store.write_tmp("again", make_episode(0, 5))
    with pytest.raises(StoreError, match="already exists"):
        store.commit(tmp, "random", 0)
    assert store.clean_tmp() == 1 and store.clean_tmp() == 0


def test_index_cache_follows_files_added_and_removed_behind_its_back(tmp_path):
    url = str(tmp_path / "s")
    store = new_store(url)
    for i in range(3):
        store.append(make_episode(i, 5 + i))
    assert store.info()["episodes"] == 3
    (tmp_path / "s" / "episodes" / "random-0000001.wmep").unlink()
    other = EpisodeStore.create_or_open(str(tmp_path / "t"), "doom", "vizdoom", 3)
    other.append(make_episode(9, 20))
    (tmp_path / "t" / "episodes" / "random-0000009.wmep").rename(
        tmp_path / "s" / "episodes" / "random-0000009.wmep")
    info = EpisodeStore.open(url).info()
    assert info["episodes"] == 3 and info["steps"] == 5 + 7 + 20


def test_info_reports_statistics(tmp_path):
    store = new_store(str(tmp_path / "s"))
    for i in range(4):
        store.append(make_episode(i, 10 * (i + 1)))
    info = store.info()
    assert info["episodes"] == 4 and info["frames"] == 100 + 4
    assert info["length"]["mean"] == 25 and info["length"]["max"] == 40
    assert info["bytes_on_disk"] > 0 and info["collections"] == {"random": 4}


def test_sequences_are_windows_of_real_episodes(tmp_path):
    store = new_store(str(tmp_path / "s"))
    for i in range(3):
        store.append(make_episode(i, 30))
    batch = next(store.sequences(10, 4, seed=0, fields=("actions", "frames")))
    assert batch["actions"].shape == (4, 10, 3) and batch["frames"].shape == (4, 11, 64, 64, 3)
