"""The episode store: a folder (or fsspec URL) of episode files plus a small manifest.

Layout::

    store.json                  env, backend(s), frame shape, action size, format
    episodes/<collection>-<index:07d>.wmep
    tmp/                        files being written (a kill leaves them here, never above)
    index.json                  cache of every episode's meta (rebuilt when stale)
    series/                     encoded (mu, logvar) series, see ``wmlab.data.series``
    bad/                        files moved aside by ``wmlab data verify --quarantine``

Nothing here ever loads the whole store: frames come out a chunk at a time.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import fsspec
import numpy as np
import zstandard

from wmlab.data.episode_file import FORMAT, Episode, EpisodeReader, encode_episode
from wmlab.errors import StoreError
from wmlab.fsio import atomic_write_bytes

EXTENSION = ".wmep"


def episode_name(collection: str, index: int) -> str:
    return f"{collection}-{index:07d}"


def _parse_name(episode_id: str) -> tuple[str, int] | None:
    collection, _, index = episode_id.rpartition("-")
    return (collection, int(index)) if collection and index.isdigit() else None


@dataclass
class VerifyReport:
    checked: int = 0
    bad: dict[str, list[str]] = field(default_factory=dict)
    leftovers: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bad

    def summary(self) -> str:
        lines = [f"checked {self.checked} episode files: "
                 + ("all good" if self.ok else f"{len(self.bad)} bad")]
        for episode_id, problems in sorted(self.bad.items()):
            lines.append(f"  BAD {episode_id}{EXTENSION}: {'; '.join(problems)}")
        if self.leftovers:
            lines.append(f"  {len(self.leftovers)} unfinished file(s) in tmp/ from an "
                         "interrupted collection (removed by the next `wmlab collect`)")
        return "\n".join(lines)


class EpisodeStore:
    def __init__(self, url: str, manifest: dict[str, Any]) -> None:
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.manifest = manifest

    # -- opening -------------------------------------------------------------------------

    @classmethod
    def open(cls, url: str) -> EpisodeStore:
        fs, root = fsspec.core.url_to_fs(url.rstrip("/"))
        try:
            with fs.open(f"{root}/store.json", "rb") as handle:
                manifest = json.load(handle)
        except FileNotFoundError:
            raise StoreError(f"no episode store at {url}: run `wmlab collect` first (or check "
                             "the path)") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise StoreError(f"{url}/store.json is corrupt: restore it or collect into a new "
                             "store") from None
        return cls(url, manifest)

    @classmethod
    def create_or_open(cls, url: str, env: str, backend: str, action_dim: int,
                       allow_mixed_backends: bool = False) -> EpisodeStore:
        fs, root = fsspec.core.url_to_fs(url.rstrip("/"))
        if fs.exists(f"{root}/store.json"):
            store = cls.open(url)
            store._check_compatible(env, backend, action_dim, allow_mixed_backends)
            return store
        manifest = {"format": FORMAT, "env": env, "backends": [backend],
                    "frame_shape": [64, 64, 3], "action_dim": action_dim,
                    "created": _now()}
        try:
            fs.makedirs(f"{root}/episodes", exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create an episode store at {url}: "
                             f"{exc.strerror or exc}; choose a writable --out") from None
        atomic_write_bytes(f"{url.rstrip('/')}/store.json",
                           json.dumps(manifest, indent=2).encode())
        return cls(url, manifest)

    def _check_compatible(self, env: str, backend: str, action_dim: int,
                          allow_mixed_backends: bool) -> None:
        if self.manifest.get("env") != env:
            raise StoreError(f"store {self.url} holds episodes of '{self.manifest.get('env')}', "
                             f"not '{env}': choose another --out")
        if int(self.manifest.get("action_dim", action_dim)) != action_dim:
            raise StoreError(f"store {self.url} holds actions of size "
                             f"{self.manifest.get('action_dim')}, not {action_dim}: choose "
                             "another --out")
        backends = list(self.manifest.get("backends", []))
        if backend not in backends:
            if not allow_mixed_backends:
                raise StoreError(
                    f"store {self.url} holds frames of backend {', '.join(backends)}, not "
                    f"'{backend}': frames of different backends differ; choose another --out "
                    "or set collect.allow_mixed_backends=true")
            self.manifest["backends"] = [*backends, backend]
            atomic_write_bytes(f"{self.url}/store.json",
                               json.dumps(self.manifest, indent=2).encode())

    # -- writing ---------------------------------------------------------------------------

    def _episode_path(self, episode_id: str) -> str:
        return f"{self.root}/episodes/{episode_id}{EXTENSION}"

    def write_tmp(self, name: str, episode: Episode, chunk_frames: int = 64,
                  level: int = 3) -> str:
        """Write an episode under tmp/; returns the path to hand to ``commit``."""
        data = encode_episode(episode, chunk_frames=chunk_frames, level=level)
        path = f"{self.root}/tmp/{name}{EXTENSION}"
        self.fs.makedirs(f"{self.root}/tmp", exist_ok=True)
        with self.fs.open(path, "wb") as handle:
            handle.write(data)
        return path

    def commit(self, tmp_path: str, collection: str, index: int) -> str:
        """Move a finished tmp file into episodes/ (atomic on local disks)."""
        episode_id = episode_name(collection, index)
        target = self._episode_path(episode_id)
        if self.fs.exists(target):
            raise StoreError(f"episode {episode_id} already exists in {self.url}: refusing to "
                             "overwrite it")
        self.fs.mv(tmp_path, target)
        return episode_id

    def append(self, episode: Episode, chunk_frames: int = 64) -> str:
        collection, index = str(episode.meta["collection"]), int(episode.meta["index"])
        tmp = self.write_tmp(f"{episode_name(collection, index)}-append", episode, chunk_frames)
        return self.commit(tmp, collection, index)

    def clean_tmp(self) -> int:
        tmp = f"{self.root}/tmp"
        if not self.fs.exists(tmp):
            return 0
        leftovers = self.fs.ls(tmp, detail=False)
        for path in leftovers:
            self.fs.rm(path)
        return len(leftovers)

    # -- listing and reading ---------------------------------------------------------------

    def episode_ids(self, collection: str | None = None) -> list[str]:
        folder = f"{self.root}/episodes"
        if not self.fs.exists(folder):
            return []
        names = (p.rsplit("/", 1)[-1] for p in self.fs.ls(folder, detail=False))
        ids = sorted(n[:-len(EXTENSION)] for n in names if n.endswith(EXTENSION))
        if collection is not None:
            ids = [i for i in ids if (_parse_name(i) or ("", 0))[0] == collection]
        return ids

    def existing_indices(self, collection: str) -> set[int]:
        return {_parse_name(i)[1] for i in self.episode_ids(collection)}

    def _require_episodes(self, ids: list[str]) -> None:
        if not ids:
            raise StoreError(f"store {self.url} has no episodes: run `wmlab collect` first")

    def reader(self, episode_id: str) -> EpisodeReader:
        path = self._episode_path(episode_id)
        try:
            with self.fs.open(path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            raise StoreError(f"episode {episode_id} is not in {self.url}") from None
        return EpisodeReader(io.BytesIO(data), f"{self.url}/episodes/{episode_id}{EXTENSION}")

    def load(self, episode_id: str) -> Episode:
        return self.reader(episode_id).episode()

    def episodes(self, ids: list[str] | None = None) -> Iterator[Episode]:
        for episode_id in self.episode_ids() if ids is None else ids:
            yield self.load(episode_id)

    def meta(self, episode_id: str) -> dict[str, Any]:
        return self._index([episode_id])[episode_id]

    def metas(self, ids: list[str] | None = None) -> list[dict[str, Any]]:
        ids = self.episode_ids() if ids is None else ids
        index = self._index(ids)
        return [index[i] for i in ids]

    def _index(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        """Metas of ``ids`` from index.json, reading only episodes it does not know yet."""
        path = f"{self.root}/index.json"
        cache: dict[str, dict[str, Any]] = {}
        if self.fs.exists(path):
            try:
                with self.fs.open(path, "rb") as handle:
                    cache = json.load(handle)
            except (json.JSONDecodeError, UnicodeDecodeError):
                cache = {}  # a cache: rebuild rather than fail
        missing = [i for i in ids if i not in cache]
        for episode_id in missing:
            cache[episode_id] = self.reader(episode_id).meta
        if missing:
            present = set(self.episode_ids())
            cache = {k: v for k, v in cache.items() if k in present}
            with contextlib.suppress(Exception):  # a read-only store still reads
                atomic_write_bytes(f"{self.url}/index.json", json.dumps(cache).encode())
        return cache

    def num_frames(self, ids: list[str] | None = None) -> int:
        return sum(int(m["length"]) + 1 for m in self.metas(ids))

    # -- splitting and sampling ------------------------------------------------------------

    def split(self, val_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
        """(train, validation) by whole episodes, each decided by a hash of its id: adding
        episodes never moves old ones from one side to the other."""
        ids = self.episode_ids()
        self._require_episodes(ids)
        scores = {i: zlib.crc32(f"{seed}:{i}".encode()) / 2**32 for i in ids}
        val = [i for i in ids if scores[i] < val_fraction]
        train = [i for i in ids if scores[i] >= val_fraction]
        if len(ids) >= 2 and val_fraction > 0:
            ranked = sorted(ids, key=scores.get)
            if not val:
                val, train = [ranked[0]], [i for i in ids if i != ranked[0]]
            elif not train:
                train, val = [ranked[-1]], [i for i in ids if i != ranked[-1]]
        return train, val

    def _chunk_table(self, ids: list[str]) -> list[tuple[str, int, int]]:
        table = []
        for episode_id, meta in zip(ids, self.metas(ids), strict=True):
            frames, per_chunk = int(meta["length"]) + 1, int(meta.get("chunk_frames", 64))
            for k in range(-(-frames // per_chunk)):
                table.append((episode_id, k, min(per_chunk, frames - k * per_chunk)))
        return table

    def _load_chunks(self, table: list[tuple[str, int, int]], entries: np.ndarray
                     ) -> dict[int, np.ndarray]:
        """Decompress the chunks ``entries`` (indices into table), each file opened once."""
        by_episode: dict[str, list[int]] = {}
        for entry in entries:
            by_episode.setdefault(table[entry][0], []).append(int(entry))
        decompressor = zstandard.ZstdDecompressor()
        loaded = {}
        for episode_id, group in by_episode.items():
            reader = self.reader(episode_id)
            for entry in group:
                loaded[entry] = reader.chunk(table[entry][1], decompressor)
        return loaded

    def frame_batches(self, batch_size: int, seed: int = 0, epoch: int = 0,
                      ids: list[str] | None = None, pool_chunks: int = 32, start_batch: int = 0,
                      prefetch: bool = True) -> Iterator[np.ndarray]:
        """Shuffled (B, 64, 64, 3) uint8 batches visiting every frame once per epoch.

        Chunks are taken in a permutation fixed by (seed, epoch), ``pool_chunks`` at a time;
        each pool (with the frames left over from the previous one) is shuffled and cut into
        batches. Memory stays about pool_chunks * chunk_frames frames, whatever the store.
        ``start_batch`` resumes inside the epoch: the skipped pools are planned from frame
        references alone, without decompressing them.
        """
        if batch_size < 1 or pool_chunks < 1:
            raise StoreError("batch_size and pool_chunks must be at least 1")
        ids = self.episode_ids() if ids is None else ids
        self._require_episodes(ids)
        table = self._chunk_table(ids)
        order = np.random.default_rng([seed, epoch]).permutation(len(table))
        groups = [order[i:i + pool_chunks] for i in range(0, len(order), pool_chunks)]
        return self._batches(table, groups, batch_size, seed, epoch, start_batch, prefetch)

    def _batches(self, table, groups, batch_size, seed, epoch, start_batch, prefetch):
        carried_refs = np.zeros((0, 2), np.int64)  # (chunk entry, frame offset)
        carried_frames: np.ndarray | None = np.zeros((0, 64, 64, 3), np.uint8)
        produced = 0
        pool = ThreadPoolExecutor(max_workers=1) if prefetch else None
        pending = None
        try:
            for g, group in enumerate(groups):
                refs = np.concatenate([carried_refs] + [
                    np.stack([np.full(table[e][2], e), np.arange(table[e][2])], axis=1)
                    for e in group])
                shuffle = np.random.default_rng([seed, epoch, g + 1]).permutation(len(refs))
                last = g == len(groups) - 1
                full = len(refs) // batch_size
                count = -(-len(refs) // batch_size) if last else full
                if produced + count <= start_batch:  # nothing of this pool is wanted
                    produced += count
                    carried_refs = refs[shuffle][full * batch_size:]
                    carried_frames = None
                    continue
                new = pending.result() if pending else self._load_chunks(table, group)
                if pool is not None and not last:
                    pending = pool.submit(self._load_chunks, table, groups[g + 1])
                if carried_frames is None:  # after a skip: fetch the carried frames once
                    chunks = self._load_chunks(table, np.unique(carried_refs[:, 0]))
                    carried_frames = _gather(chunks, carried_refs)
                frames = np.concatenate([carried_frames, _gather(new, refs[len(carried_refs):])])
                frames, refs = frames[shuffle], refs[shuffle]
                for b in range(count):
                    if produced >= start_batch:
                        yield frames[b * batch_size:(b + 1) * batch_size]
                    produced += 1
                carried_refs = refs[full * batch_size:]
                carried_frames = frames[full * batch_size:] if not last else None
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def sequences(self, length: int, batch_size: int, seed: int = 0,
                  ids: list[str] | None = None,
                  fields: tuple[str, ...] = ("actions", "rewards", "dones")
                  ) -> Iterator[dict[str, np.ndarray]]:
        """Endless random windows of ``length`` steps from episodes at least that long."""
        ids = self.episode_ids() if ids is None else ids
        self._require_episodes(ids)
        long_enough = [m for m in self.metas(ids) if int(m["length"]) >= length]
        if not long_enough:
            raise StoreError(f"no episode in {self.url} has {length} steps: ask for shorter "
                             "sequences")
        rng = np.random.default_rng(seed)
        names = [episode_name(m["collection"], int(m["index"])) for m in long_enough]
        while True:
            rows: dict[str, list[np.ndarray]] = {f: [] for f in fields}
            for pick in rng.integers(0, len(names), batch_size):
                episode = self.load(names[pick])
                start = int(rng.integers(0, episode.length - length + 1))
                for name in fields:
                    array = getattr(episode, name)
                    stop = start + length + (1 if name == "frames" else 0)
                    rows[name].append(array[start:stop])
            yield {name: np.stack(rows[name]) for name in fields}

    # -- summaries and checks ----------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        ids = self.episode_ids()
        metas = self.metas(ids)
        lengths = np.array([int(m["length"]) for m in metas], dtype=np.float64)
        returns = np.array([float(m["return"]) for m in metas], dtype=np.float64)
        collections: dict[str, int] = {}
        for m in metas:
            collections[m.get("collection", "?")] = collections.get(m.get("collection", "?"), 0) + 1
        disk = sum(self.fs.size(self._episode_path(i)) for i in ids) if ids else 0
        frames = int((lengths + 1).sum())

        def stats(values: np.ndarray) -> dict[str, float]:
            if not len(values):
                return {"mean": 0.0, "std": 0.0, "min": 0.0, "max": 0.0}
            return {"mean": float(values.mean()), "std": float(values.std()),
                    "min": float(values.min()), "max": float(values.max())}

        return {"url": self.url, "env": self.manifest.get("env"),
                "backends": self.manifest.get("backends"),
                "policies": sorted({m.get("policy", "?") for m in metas}),
                "episodes": len(ids), "frames": frames, "steps": int(lengths.sum()),
                "collections": collections, "length": stats(lengths),
                "return": stats(returns), "bytes_on_disk": int(disk),
                "raw_frame_bytes": frames * 64 * 64 * 3,
                "compression_ratio": (frames * 64 * 64 * 3 / disk) if disk else 0.0}

    def verify(self, progress: bool = True) -> VerifyReport:
        from tqdm.auto import tqdm

        report = VerifyReport()
        for episode_id in tqdm(self.episode_ids(), desc="verify", unit="ep",
                               disable=not progress):
            report.checked += 1
            try:
                problems = self.reader(episode_id).problems()
            except StoreError as exc:
                problems = [str(exc).split(": run")[0].split(f"{EXTENSION} ", 1)[-1]]
            if problems:
                report.bad[episode_id] = problems
        if self.fs.exists(f"{self.root}/tmp"):
            report.leftovers = self.fs.ls(f"{self.root}/tmp", detail=False)
        return report

    def quarantine(self, ids: list[str]) -> None:
        """Move episode files aside into bad/ (nothing is deleted)."""
        self.fs.makedirs(f"{self.root}/bad", exist_ok=True)
        for episode_id in ids:
            stamp = hashlib.sha1(f"{episode_id}{time.time()}".encode()).hexdigest()[:6]
            self.fs.mv(self._episode_path(episode_id),
                       f"{self.root}/bad/{episode_id}-{stamp}{EXTENSION}")


def _gather(chunks: dict[int, np.ndarray], refs: np.ndarray) -> np.ndarray:
    if not len(refs):
        return np.zeros((0, 64, 64, 3), np.uint8)
    return np.stack([chunks[int(e)][int(o)] for e, o in refs])


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def format_info(info: dict[str, Any]) -> str:
    mb = info["bytes_on_disk"] / 1e6
    length, ret = info["length"], info["return"]
    collections = ", ".join(f"{k}: {v}" for k, v in sorted(info["collections"].items()))
    return "\n".join([
        f"store       {info['url']}",
        f"env         {info['env']} (backend {', '.join(info['backends'] or [])}; "
        f"policy {', '.join(info['policies'])})",
        f"episodes    {info['episodes']} ({collections or 'none'})",
        f"frames      {info['frames']} ({info['steps']} steps)",
        f"length      {length['mean']:.1f} +- {length['std']:.1f} "
        f"(min {length['min']:.0f}, max {length['max']:.0f})",
        f"return      {ret['mean']:.1f} +- {ret['std']:.1f} "
        f"(min {ret['min']:.1f}, max {ret['max']:.1f})",
        f"disk        {mb:.1f} MB ({info['compression_ratio']:.1f}x smaller than raw frames)",
    ])
