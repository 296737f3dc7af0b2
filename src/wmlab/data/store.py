"""The episode store: a folder (or any fsspec URL) of episode files plus a small manifest.

Layout::

    store.json                  format, env, backend(s), frame shape, action size, created
    episodes/<collection>-<index:07d>.wmep
    tmp/                        files being written; a killed writer leaves them here only
    index.json                  cache of every episode's meta, rebuilt whenever it is stale
    bad/                        files moved aside by ``quarantine`` (nothing is deleted)
    series/                     encoded series (``wmlab.data.series``), not episodes

The files in ``episodes/`` are the only truth: the index is a cache keyed by file size, and
every listing goes to the filesystem. Nothing here loads the whole store; frames come out a
chunk at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import fsspec
import numpy as np

from wmlab.data.episode_file import (
    CHUNK_FRAMES,
    EXTENSION,
    FORMAT,
    LEVEL,
    Episode,
    EpisodeFileError,
    EpisodeReader,
    display_path,
    write_episode,
)
from wmlab.data.sampling import ChunkTable, EpochPlan, iterate_batches
from wmlab.envs.frames import FRAME_SHAPE
from wmlab.errors import StoreError
from wmlab.fsio import atomic_write_on
from wmlab.version import __version__

STORE_FORMAT = "wmlab-store/1"
MANIFEST = "store.json"
INDEX = "index.json"
INDEX_VERSION = 1
SEQUENCE_FIELDS = ("frames", "actions", "rewards", "dones")
_ID = re.compile(r"^(?P<collection>[A-Za-z0-9_.][A-Za-z0-9_.-]*)-(?P<index>\d{7,})$")
_COLLECTION = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.-]*$")
_REMOTE_READERS = 8  # parallel meta reads when the index is cold on an object store


def episode_id(collection: str, index: int) -> str:
    """``<collection>-<index:07d>``, the file name of an episode without its extension."""
    _check_collection(collection)
    _check_index(index)
    return f"{collection}-{int(index):07d}"


def parse_episode_id(name: str) -> tuple[str, int] | None:
    """(collection, index) of an episode id, or None for any other name."""
    match = _ID.match(name)
    return (match["collection"], int(match["index"])) if match else None


def _check_collection(collection: Any) -> None:
    if not isinstance(collection, str) or not _COLLECTION.match(collection):
        raise StoreError(f"collection name {collection!r} is not valid: use letters, digits, "
                         "'_', '.' and '-' (e.g. 'random')")


def _check_index(index: Any) -> None:
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise StoreError(f"episode index {index!r} is not valid: use an integer >= 0")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise StoreError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _reason(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


@dataclass(frozen=True)
class StoreManifest:
    """What store.json promises about every episode in the store."""

    env: str
    backends: tuple[str, ...]
    action_dim: int
    frame_shape: tuple[int, ...] = FRAME_SHAPE
    created: str = ""
    action_repeat: int = 1  # env frames per stored step (env.action_repeat)
    format: str = STORE_FORMAT
    episode_format: str = FORMAT
    wmlab_version: str = __version__

    def to_json(self) -> dict[str, Any]:
        data = {"format": self.format, "episode_format": self.episode_format, "env": self.env,
                "backend": self.backends[0], "backends": list(self.backends),
                "frame_shape": list(self.frame_shape), "action_dim": self.action_dim,
                "created": self.created, "wmlab_version": self.wmlab_version}
        # written only where it matters, so stores of every frame read as they always did
        return data if self.action_repeat == 1 else {**data, "action_repeat": self.action_repeat}

    @classmethod
    def from_json(cls, data: Any, name: str) -> StoreManifest:
        try:
            if data["format"] != STORE_FORMAT:
                raise StoreError(f"{name} is in format {data['format']!r}, which this wmlab "
                                 f"({__version__}) cannot read: upgrade wmlab")
            backends = data.get("backends") or [data["backend"]]
            return cls(env=str(data["env"]), backends=tuple(str(b) for b in backends),
                       action_dim=int(data["action_dim"]),
                       frame_shape=tuple(int(n) for n in data["frame_shape"]),
                       created=str(data.get("created", "")),
                       action_repeat=int(data.get("action_repeat", 1)),
                       episode_format=str(data.get("episode_format", FORMAT)),
                       wmlab_version=str(data.get("wmlab_version", "")))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise StoreError(f"{name} is damaged (bad or missing {_reason(exc)}): restore it "
                             "or collect into a new store") from None


@dataclass
class VerifyReport:
    """Result of ``EpisodeStore.verify``: bad files by episode id, and leftovers."""

    url: str
    checked: int = 0
    bad: dict[str, list[str]] = field(default_factory=dict)
    leftovers: list[str] = field(default_factory=list)  # unfinished files in tmp/
    strays: list[str] = field(default_factory=list)  # files in episodes/ that are no episode

    @property
    def ok(self) -> bool:
        return not self.bad

    def summary(self) -> str:
        verdict = "all good" if self.ok else f"{len(self.bad)} bad"
        lines = [f"checked {self.checked} episode files in {self.url}: {verdict}"]
        lines += [f"  BAD {episode}{EXTENSION}: {'; '.join(problems)}"
                  for episode, problems in sorted(self.bad.items())]
        if self.bad:
            lines.append(f"  `wmlab data verify {self.url} --quarantine` moves them to bad/ "
                         "and `wmlab collect` re-collects them")
        if self.leftovers:
            lines.append(f"  {len(self.leftovers)} unfinished file(s) in tmp/ from an "
                         "interrupted writer (the next `wmlab collect` removes them)")
        if self.strays:
            lines.append(f"  ignored {len(self.strays)} file(s) in episodes/ that are not "
                         f"episodes: {', '.join(self.strays[:3])}")
        return "\n".join(lines)


class EpisodeStore:
    """Episodes of one env under one URL; open with ``open`` or ``create_or_open``."""

    def __init__(self, url: str, manifest: StoreManifest) -> None:
        self.url = url.rstrip("/")
        self.fs, self.root = _url_to_fs(self.url)
        self.manifest = manifest

    # -- opening and creating ----------------------------------------------------------------

    @classmethod
    def open(cls, url: str) -> EpisodeStore:
        fs, root = _url_to_fs(url)
        name = f"{url.rstrip('/')}/{MANIFEST}"
        try:
            with fs.open(f"{root}/{MANIFEST}", "rb") as handle:
                data = json.loads(handle.read())
        except FileNotFoundError:
            raise StoreError(f"no episode store at {url}: run `wmlab collect` first (or check "
                             "the path)") from None
        except (ValueError, UnicodeDecodeError):
            raise StoreError(f"{name} is not valid JSON: restore it or collect into a new "
                             "store") from None
        except OSError as exc:
            raise StoreError(f"cannot read {name} ({_reason(exc)}): check the path and its "
                             "permissions") from None
        return cls(url, StoreManifest.from_json(data, name))

    @classmethod
    def create_or_open(cls, url: str, env: str, backend: str, action_dim: int,
                       allow_mixed_backends: bool = False,
                       action_repeat: int = 1) -> EpisodeStore:
        """The store at ``url``, created if absent; refused if it holds another env (or the
        same env stepped with another action repeat)."""
        for name, value in (("env", env), ("backend", backend)):
            if not isinstance(value, str) or not value:
                raise StoreError(f"{name} must be a non-empty string, got {value!r}")
        _check_int("action_dim", action_dim, 1)
        _check_int("action_repeat", action_repeat, 1)
        fs, root = _url_to_fs(url)
        if not fs.exists(f"{root}/{MANIFEST}"):
            manifest = StoreManifest(env=env, backends=(backend,), action_dim=int(action_dim),
                                     created=_now(), action_repeat=int(action_repeat))
            try:
                fs.makedirs(f"{root}/episodes", exist_ok=True)
                atomic_write_on(fs, f"{root}/{MANIFEST}", json.dumps(manifest.to_json(),
                                                                     indent=2).encode())
            except OSError as exc:
                raise StoreError(f"cannot create an episode store at {url} ({_reason(exc)}): "
                                 "choose a writable --out") from None
        # re-read even after creating: a concurrent creator may have won the rename
        store = cls.open(url)
        store._check_compatible(env, backend, int(action_dim), allow_mixed_backends,
                                int(action_repeat))
        return store

    def _check_compatible(self, env: str, backend: str, action_dim: int,
                          allow_mixed_backends: bool, action_repeat: int = 1) -> None:
        m = self.manifest
        if m.env != env:
            raise StoreError(f"store {self.url} holds episodes of '{m.env}', not '{env}': "
                             "choose another --out")
        if m.action_repeat != action_repeat:
            raise StoreError(f"store {self.url} holds steps of {m.action_repeat} env frames, "
                             f"not {action_repeat} (env.action_repeat): M would mix time "
                             "scales; choose another --out or the store's action repeat")
        if m.action_dim != action_dim:
            raise StoreError(f"store {self.url} holds actions of size {m.action_dim}, not "
                             f"{action_dim}: choose another --out")
        if backend in m.backends:
            return
        if not allow_mixed_backends:
            raise StoreError(f"store {self.url} holds frames of backend "
                             f"{', '.join(m.backends)}, not '{backend}' (their pixels differ): "
                             "choose another --out or set collect.allow_mixed_backends=true")
        self.manifest = dataclasses.replace(m, backends=(*m.backends, backend))
        try:
            atomic_write_on(self.fs, f"{self.root}/{MANIFEST}",
                            json.dumps(self.manifest.to_json(), indent=2).encode())
        except OSError as exc:
            raise StoreError(f"cannot update {self.url}/{MANIFEST} ({_reason(exc)}): check "
                             "its permissions") from None

    @property
    def env(self) -> str:
        return self.manifest.env

    @property
    def backends(self) -> tuple[str, ...]:
        return self.manifest.backends

    @property
    def frame_shape(self) -> tuple[int, ...]:
        return self.manifest.frame_shape

    @property
    def action_dim(self) -> int:
        return self.manifest.action_dim

    def __repr__(self) -> str:
        return f"EpisodeStore({self.url!r}, env={self.env!r})"

    # -- paths ----------------------------------------------------------------------------

    def episode_path(self, collection: str, index: int) -> str:
        """Filesystem path (for ``store.fs``) of an episode's file."""
        return self._path_of(episode_id(collection, index))

    def _path_of(self, episode: str) -> str:
        return f"{self.root}/episodes/{episode}{EXTENSION}"

    def tmp_path(self, name: str) -> str:
        if not isinstance(name, str) or not name or "/" in name or "\\" in name:
            raise StoreError(f"tmp file name {name!r} is not valid: use a plain file name")
        return f"{self.root}/tmp/{name}{EXTENSION}"

    def _verify_hint(self) -> str:
        return f"run `wmlab data verify {self.url}`"

    # -- writing ---------------------------------------------------------------------------

    def write_tmp(self, name: str, episode: Episode, chunk_frames: int = CHUNK_FRAMES,
                  level: int = LEVEL) -> str:
        """Write an episode under tmp/ and return the path to hand to ``commit``.

        Workers call this; a kill mid-write leaves a file in tmp/ only, never in episodes/.
        """
        path = self.tmp_path(name)
        self._check_fits(episode)
        try:
            self.fs.makedirs(f"{self.root}/tmp", exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot write into {self.url}/tmp ({_reason(exc)}): check the "
                             "store's permissions") from None
        write_episode(self.fs, path, episode, chunk_frames, level)
        return path

    def _check_fits(self, episode: Episode) -> None:
        """Refuse an episode this store cannot hold, before anything is written."""
        episode.validate(self.frame_shape)
        meta = episode.meta
        if episode.action_dim != self.action_dim:
            raise StoreError(f"episode has actions of size {episode.action_dim}, store "
                             f"{self.url} holds size {self.action_dim}: write it elsewhere")
        if "env" in meta and meta["env"] != self.env:
            raise StoreError(f"episode of env '{meta['env']}' cannot go into store {self.url} "
                             f"of '{self.env}': write it elsewhere")
        if "backend" in meta and meta["backend"] not in self.backends:
            raise StoreError(f"episode of backend '{meta['backend']}' cannot go into store "
                             f"{self.url} of backend {', '.join(self.backends)}: open it with "
                             "allow_mixed_backends=True or write it elsewhere")

    def commit(self, tmp_path: str, collection: str, index: int) -> str:
        """Move a finished tmp file into episodes/ and return its episode id.

        Refuses to overwrite an existing episode. The move is a rename on local disks (atomic)
        and a copy-then-delete on object stores (each object appears whole). Commits are
        expected from one process (the collector); two racing for one id is not guarded.
        """
        episode = episode_id(collection, index)
        target = self._path_of(episode)
        hint = "write the episode again with write_tmp before committing it"
        with EpisodeReader.open(self.fs, tmp_path, hint) as reader:
            meta = reader.meta
        index = int(index)
        recorded = (meta.get("collection", collection), meta.get("index", index))
        if recorded != (collection, index):
            raise StoreError(f"{display_path(self.fs, tmp_path)} holds episode "
                             f"{recorded[0]}/{recorded[1]}, not {collection}/{index}: commit "
                             "it under its own collection and index")
        if self.fs.exists(target):
            raise StoreError(f"episode {episode} already exists in {self.url}: refusing to "
                             "overwrite it (quarantine it first to replace it)")
        try:
            self.fs.makedirs(f"{self.root}/episodes", exist_ok=True)
            self.fs.mv(tmp_path, target)
        except OSError as exc:
            raise StoreError(f"cannot move {display_path(self.fs, tmp_path)} into "
                             f"{self.url}/episodes ({_reason(exc)}): check the store's "
                             "permissions") from None
        return episode

    def append(self, episode: Episode, chunk_frames: int = CHUNK_FRAMES,
               level: int = LEVEL) -> str:
        """Write and commit one episode under its meta's ``collection`` and ``index``."""
        collection, index = episode.meta.get("collection"), episode.meta.get("index")
        if collection is None or index is None:
            raise StoreError("episode meta needs 'collection' and 'index' to be appended: set "
                             "them (e.g. collection='random', index=0)")
        name = f"{episode_id(collection, index)}-{uuid.uuid4().hex[:8]}"
        tmp = self.write_tmp(name, episode, chunk_frames, level)
        try:
            return self.commit(tmp, collection, int(index))
        except StoreError:
            with contextlib.suppress(OSError):
                self.fs.rm(tmp)
            raise

    def clean_tmp(self) -> int:
        """Remove what killed writers left in tmp/; returns how many files went.

        Only call it when no writer is running on this store.
        """
        leftovers = self._tmp_files()
        for path in leftovers:
            with contextlib.suppress(FileNotFoundError):  # gone meanwhile is as good
                self.fs.rm(path)
        return len(leftovers)

    def _tmp_files(self) -> list[str]:
        folder = f"{self.root}/tmp"
        self.fs.invalidate_cache(folder)
        if not self.fs.exists(folder):
            return []
        return sorted(self.fs.ls(folder, detail=False))

    # -- listing ---------------------------------------------------------------------------

    def _listing(self) -> dict[str, int]:
        """Every episode file now in episodes/, as id -> size in bytes."""
        folder = f"{self.root}/episodes"
        self.fs.invalidate_cache(folder)  # object stores cache listings; files come and go
        try:
            entries = self.fs.ls(folder, detail=True)
        except FileNotFoundError:
            return {}
        found = {}
        for entry in entries:
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if name.endswith(EXTENSION) and parse_episode_id(name[:-len(EXTENSION)]):
                found[name[:-len(EXTENSION)]] = int(entry.get("size") or 0)
        return found

    def episode_ids(self, collection: str | None = None) -> list[str]:
        """Sorted ids of the episodes in the store (of one collection if given)."""
        ids = sorted(self._listing())
        if collection is None:
            return ids
        return [i for i in ids if parse_episode_id(i)[0] == collection]

    def existing_indices(self, collection: str) -> set[int]:
        return {parse_episode_id(i)[1] for i in self.episode_ids(collection)}

    def _require(self, ids: list[str] | None, listing: dict[str, int] | None = None,
                 what: str = "this") -> list[str]:
        """``ids`` (default: all) after checking the store has them; never empty."""
        listing = self._listing() if listing is None else listing
        if not listing:
            raise StoreError(f"store {self.url} has no episodes: run `wmlab collect ... --out "
                             f"{self.url}` first")
        if ids is None:
            return sorted(listing)
        if isinstance(ids, str):
            raise StoreError(f"give {what} a list of episode ids, not the string {ids!r}")
        missing = [i for i in ids if i not in listing]
        if missing:
            raise StoreError(f"episode {missing[0]} is not in store {self.url}"
                             + (f" (nor {len(missing) - 1} more)" if len(missing) > 1 else "")
                             + ": see `wmlab data info`")
        if not ids:
            raise StoreError(f"{what} was given an empty list of episode ids: select at least "
                             "one episode")
        return list(ids)

    # -- metadata (through the index cache) ---------------------------------------------------

    def meta(self, episode: str) -> dict[str, Any]:
        return self.metas([episode])[0]

    def metas(self, ids: list[str] | None = None) -> list[dict[str, Any]]:
        """Metas of ``ids`` (default all, sorted), from the index cache where it is fresh."""
        listing = self._listing()
        if ids is None:
            ids = sorted(listing)
        elif ids:
            ids = self._require(ids, listing, "metas")
        return [entry["meta"] for entry in self._index(listing, ids)]

    def _selected_metas(self, ids: list[str] | None, what: str
                        ) -> tuple[list[str], list[dict[str, Any]]]:
        """(ids, their metas) for a reader of episodes: the store and selection non-empty."""
        listing = self._listing()
        ids = self._require(ids, listing, what)
        return ids, [entry["meta"] for entry in self._index(listing, ids)]

    def _index(self, listing: dict[str, int], ids: list[str]) -> list[dict[str, Any]]:
        """Index entries ({"size", "meta"}) of ``ids``; reads only files the cache lacks."""
        cache = self._read_index()
        # a cached entry counts only for a file of the same size: a re-collected episode
        # under the same id (after quarantine) is read again
        stale = [i for i in listing if cache.get(i, {}).get("size") != listing[i]]
        fresh = {i: cache[i] for i in listing if i not in stale}
        for episode, meta in zip(stale, self._read_metas(stale), strict=True):
            fresh[episode] = {"size": listing[episode], "meta": meta}
        if stale or set(cache) != set(listing):
            self._write_index(fresh)
        return [fresh[i] for i in ids]

    def _read_metas(self, ids: list[str]) -> list[dict[str, Any]]:
        def read(episode: str) -> dict[str, Any]:
            with self._reader(episode) as reader:
                return reader.meta

        if len(ids) > 1 and not _is_local(self.fs):
            # object stores: latency, not bandwidth, is the cost of many small reads
            with ThreadPoolExecutor(max_workers=_REMOTE_READERS) as pool:
                return list(pool.map(read, ids))
        return [read(i) for i in ids]

    def _read_index(self) -> dict[str, Any]:
        try:
            with self.fs.open(f"{self.root}/{INDEX}", "rb") as handle:
                data = json.loads(handle.read())
            if data.get("version") == INDEX_VERSION and isinstance(data.get("episodes"), dict):
                return data["episodes"]
        except (OSError, ValueError, AttributeError):
            pass  # missing or damaged: it is only a cache, rebuild it
        return {}

    def _write_index(self, entries: dict[str, Any]) -> None:
        payload = json.dumps({"version": INDEX_VERSION, "episodes": entries}).encode()
        # a read-only store still reads; the cache is rebuilt next time
        with contextlib.suppress(OSError):
            atomic_write_on(self.fs, f"{self.root}/{INDEX}", payload)

    def num_frames(self, ids: list[str] | None = None) -> int:
        return sum(int(m["length"]) + 1 for m in self.metas(ids))

    # -- reading episodes ------------------------------------------------------------------

    def _reader(self, episode: str) -> EpisodeReader:
        return EpisodeReader.open(self.fs, self._path_of(episode), self._verify_hint())

    def _open(self, episode: str, what: str) -> EpisodeReader:
        # one stat rather than a listing per episode; the listing only explains a miss
        if not isinstance(episode, str) or not parse_episode_id(episode) or not self.fs.exists(
                self._path_of(episode)):
            self._require([episode], what=what)
            raise StoreError(f"{episode!r} is not an episode id of {self.url}: see "
                             "`wmlab data info`")
        return self._reader(episode)

    def reader(self, episode: str) -> EpisodeReader:
        """An open episode file, for reading single chunks or arrays (a context manager)."""
        return self._open(episode, "reader")

    def load(self, episode: str) -> Episode:
        with self._open(episode, "load") as reader:
            return reader.episode()

    def episodes(self, ids: list[str] | None = None) -> Iterator[Episode]:
        """Episodes one at a time (only one is in memory while the caller holds it)."""
        for episode in self._require(ids, what="episodes"):
            with self._reader(episode) as reader:
                loaded = reader.episode()
            yield loaded

    # -- splitting and sampling ------------------------------------------------------------

    def split(self, val_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
        """(train ids, validation ids), by whole episodes, each sorted.

        An episode goes to validation when a hash of (seed, its id) falls below
        ``val_fraction``, so adding episodes never moves old ones from one side to the other.
        With at least two episodes and a positive fraction, each side gets at least one.
        """
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not (
                0 <= val_fraction < 1):
            raise StoreError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        ids = self._require(None)
        score = {i: _unit_hash(f"{seed}:{i}") for i in ids}
        val = [i for i in ids if score[i] < val_fraction]
        train = [i for i in ids if score[i] >= val_fraction]
        if val_fraction > 0 and len(ids) >= 2:
            if not val:  # too few episodes for the fraction to pick any
                lowest = min(ids, key=score.__getitem__)
                val, train = [lowest], [i for i in ids if i != lowest]
            elif not train:
                highest = max(ids, key=score.__getitem__)
                train, val = [highest], [i for i in ids if i != highest]
        return train, val

    def _chunk_table(self, ids: list[str] | None, what: str) -> ChunkTable:
        ids, metas = self._selected_metas(ids, what)
        # sorted and de-duplicated, so the epoch does not depend on how ids were listed
        by_id = dict(zip(ids, metas, strict=True))
        ids = sorted(by_id)
        metas = [by_id[i] for i in ids]
        return ChunkTable.build(ids, [int(m["length"]) + 1 for m in metas],
                                [int(m["chunk_frames"]) for m in metas])

    def frame_batches(self, batch_size: int, seed: int = 0, epoch: int = 0,
                      ids: list[str] | None = None, pool_chunks: int = 32,
                      start_batch: int = 0, prefetch: bool = True) -> Iterator[np.ndarray]:
        """Shuffled (B, 64, 64, 3) uint8 batches visiting every frame once per epoch.

        The same (seed, epoch, ids, batch_size, pool_chunks) always give the same batches;
        ``start_batch`` skips that many of them without decompressing the skipped chunks, so
        a killed run resumes with exactly the batches it had left. Memory: about
        ``pool_chunks * chunk_frames`` frames plus a batch (twice the pool with
        ``prefetch``), whatever the store's size. The last batch may be smaller.
        """
        _check_int("batch_size", batch_size, 1)
        _check_int("pool_chunks", pool_chunks, 1)
        _check_int("seed", seed, 0)
        _check_int("epoch", epoch, 0)
        _check_int("start_batch", start_batch, 0)
        table = self._chunk_table(ids, "frame_batches")
        plan = EpochPlan.build(table, int(batch_size), int(pool_chunks), int(seed), int(epoch))
        return iterate_batches(plan, self._reader, self.frame_shape, int(start_batch),
                               bool(prefetch))

    def num_batches(self, batch_size: int, ids: list[str] | None = None) -> int:
        """Batches per epoch of ``frame_batches`` (every frame once, the last batch partial)."""
        _check_int("batch_size", batch_size, 1)
        return -(-self.num_frames(ids) // int(batch_size))

    def sequences(self, length: int, batch_size: int, seed: int = 0,
                  ids: list[str] | None = None,
                  fields: tuple[str, ...] = ("actions", "rewards", "dones")
                  ) -> Iterator[dict[str, np.ndarray]]:
        """Endless batches of random windows of ``length`` steps, as {field: array}.

        From episodes of at least ``length`` steps: ``actions`` (B, L, A), ``rewards`` and
        ``dones`` (B, L), ``frames`` (B, L + 1, 64, 64, 3) (the observations around those
        steps; only the chunks covering the window are decompressed).
        """
        _check_int("length", length, 1)
        _check_int("batch_size", batch_size, 1)
        _check_int("seed", seed, 0)
        unknown = [f for f in fields if f not in SEQUENCE_FIELDS]
        if unknown or not fields or isinstance(fields, str):
            raise StoreError(f"sequence fields must be a tuple drawn from "
                             f"{', '.join(SEQUENCE_FIELDS)}, got {fields!r}")
        ids, metas = self._selected_metas(ids, "sequences")
        lengths = {i: int(m["length"]) for i, m in zip(ids, metas, strict=True)}
        usable = sorted(i for i in ids if lengths[i] >= length)
        if not usable:
            raise StoreError(f"no episode in {self.url} has {length} steps (the longest has "
                             f"{max(lengths.values())}): ask for shorter sequences")
        return self._sequences(usable, lengths, int(length), int(batch_size), int(seed),
                               tuple(fields))

    def _sequences(self, usable: list[str], lengths: dict[str, int], length: int,
                   batch_size: int, seed: int, fields: tuple[str, ...]
                   ) -> Iterator[dict[str, np.ndarray]]:
        rng = np.random.default_rng(seed)
        while True:
            rows: dict[str, list[np.ndarray]] = {f: [] for f in fields}
            for pick in rng.integers(0, len(usable), batch_size):
                episode = usable[pick]
                start = int(rng.integers(0, lengths[episode] - length + 1))
                with self._reader(episode) as reader:
                    for name in fields:
                        if name == "frames":
                            rows[name].append(reader.frames(start, start + length + 1))
                        else:
                            rows[name].append(reader.array(name)[start:start + length])
            yield {name: np.stack(rows[name]) for name in fields}

    # -- summaries and checks ----------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """Counts and statistics of the whole store (from the index cache; see format_info)."""
        listing = self._listing()
        entries = self._index(listing, sorted(listing))
        metas = [e["meta"] for e in entries]
        lengths = np.array([int(m["length"]) for m in metas], dtype=np.float64)
        returns = np.array([float(m["return"]) for m in metas], dtype=np.float64)
        collections: dict[str, int] = {}
        for episode in listing:
            name = parse_episode_id(episode)[0]
            collections[name] = collections.get(name, 0) + 1
        frames = int((lengths + 1).sum())
        raw = frames * int(np.prod(self.frame_shape))
        disk = sum(listing.values())
        return {"url": self.url, "env": self.env, "backends": list(self.backends),
                "action_dim": self.action_dim, "frame_shape": list(self.frame_shape),
                "policies": sorted({str(m.get("policy", "?")) for m in metas}),
                "episodes": len(metas), "frames": frames, "steps": int(lengths.sum()),
                "collections": dict(sorted(collections.items())),
                "length": _stats(lengths), "return": _stats(returns),
                "bytes_on_disk": disk, "raw_bytes": raw,
                "compression_ratio": raw / disk if disk else 0.0}

    def verify(self, progress: bool = True) -> VerifyReport:
        """Read every episode file in full and list the bad ones (and tmp/ leftovers)."""
        from tqdm.auto import tqdm

        report = VerifyReport(url=self.url)
        folder = f"{self.root}/episodes"
        listing = self._listing()
        if self.fs.exists(folder):
            names = (p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(folder, detail=False))
            report.strays = sorted(n for n in names if n[:-len(EXTENSION)] not in listing)
        for episode in tqdm(sorted(listing), desc="verify", unit="ep", disable=not progress,
                            dynamic_ncols=True):
            report.checked += 1
            problems = self._file_problems(episode)
            if problems:
                report.bad[episode] = problems
        report.leftovers = [display_path(self.fs, p) for p in self._tmp_files()]
        return report

    def _file_problems(self, episode: str) -> list[str]:
        try:
            with self._reader(episode) as reader:
                problems = reader.problems()
                meta = reader.meta
        except EpisodeFileError as exc:
            return [exc.problem]
        collection, index = parse_episode_id(episode)
        if (meta.get("collection"), meta.get("index")) != (collection, index):
            problems.append(f"meta says collection {meta.get('collection')!r} index "
                            f"{meta.get('index')!r}, its name says {collection!r} {index}")
        if meta.get("env", self.env) != self.env:
            problems.append(f"an episode of env {meta['env']!r} in a store of {self.env!r}")
        if tuple(meta["frame_shape"]) != tuple(self.frame_shape):
            problems.append(f"frames of shape {tuple(meta['frame_shape'])}, the store's are "
                            f"{tuple(self.frame_shape)}")
        return problems

    def quarantine(self, ids: list[str]) -> list[str]:
        """Move episode files into bad/ (never deleting) so that collection redoes them.

        Returns their new paths.
        """
        ids = self._require(list(ids), what="quarantine") if ids else []
        moved = []
        for episode in ids:
            target = f"{self.root}/bad/{episode}{EXTENSION}"
            copy = 1
            while self.fs.exists(target):  # an earlier quarantine of the same id
                target = f"{self.root}/bad/{episode}.{copy}{EXTENSION}"
                copy += 1
            try:
                self.fs.makedirs(f"{self.root}/bad", exist_ok=True)
                self.fs.mv(self._path_of(episode), target)
            except OSError as exc:
                raise StoreError(f"cannot move {episode}{EXTENSION} into {self.url}/bad "
                                 f"({_reason(exc)}): check the store's permissions") from None
            moved.append(target)
        return moved


def _url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    if not isinstance(url, str) or not url.strip():
        raise StoreError(f"store location must be a path or URL, got {url!r}")
    try:
        fs, root = fsspec.core.url_to_fs(url.rstrip("/"))
    except (ImportError, ValueError) as exc:
        raise StoreError(f"cannot open {url} ({_reason(exc)}): install the filesystem's "
                         "package (e.g. pip install 'wmlab[s3]') or check the URL") from None
    return fs, root.rstrip("/")


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return bool({"file", "local", "memory"} & set(protocols))


def _unit_hash(text: str) -> float:
    """A number in [0, 1) fixed by ``text`` alone (stable across runs and Python versions)."""
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _stats(values: np.ndarray) -> dict[str, float]:
    if not len(values):
        return {"mean": 0.0, "std": 0.0, "min": 0.0, "max": 0.0}
    return {"mean": float(values.mean()), "std": float(values.std()),
            "min": float(values.min()), "max": float(values.max())}


def format_info(info: dict[str, Any]) -> str:
    """``EpisodeStore.info()`` as the lines ``wmlab data info`` prints."""
    length, ret = info["length"], info["return"]
    collections = ", ".join(f"{k}: {v}" for k, v in info["collections"].items())
    ratio = f"compressed {info['compression_ratio']:.1f}x" if info["bytes_on_disk"] else "empty"
    return "\n".join([
        f"store        {info['url']}",
        f"env          {info['env']} (backend {', '.join(info['backends'])}; policy "
        f"{', '.join(info['policies']) or '-'})",
        f"episodes     {info['episodes']} ({collections or 'none'})",
        f"frames       {info['frames']} ({info['steps']} steps)",
        f"length       {length['mean']:.1f} +- {length['std']:.1f} "
        f"(min {length['min']:.0f}, max {length['max']:.0f})",
        f"return       {ret['mean']:.2f} +- {ret['std']:.2f} "
        f"(min {ret['min']:.2f}, max {ret['max']:.2f})",
        f"disk         {info['bytes_on_disk'] / 1e6:.1f} MB for {info['raw_bytes'] / 1e6:.1f} "
        f"MB of raw frames ({ratio})",
    ])
