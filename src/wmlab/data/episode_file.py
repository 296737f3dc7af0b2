"""One episode per file (``.wmep``): a ZIP container whose members are stored, not deflated.

Members::

    meta.json                       the episode's metadata plus the format keys below
    actions.npy rewards.npy dones.npy   np.save format
    frames/000000.zst ...           ``chunk_frames`` frames each (the last one shorter), raw
                                    C-order uint8 bytes compressed alone by zstd, checksum on

ZIP is used for what it gives for free: a CRC per member, so a flipped byte is caught; a
central directory at the end, so a truncated file fails at open; seekable members, so one
chunk is read without touching the rest of the file; and ``unzip -l`` to look inside.
Everything takes an fsspec filesystem and a path, so it works on local disks, ``memory://``
and object stores alike.
"""

from __future__ import annotations

import io
import json
import math
import struct
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import IO, Any

import numpy as np
import zstandard
from fsspec import AbstractFileSystem

from wmlab.closing import Closing
from wmlab.errors import StoreError
from wmlab.version import __version__

FORMAT = "wmep/1"
EXTENSION = ".wmep"
CHUNK_FRAMES = 64
LEVEL = 3
META_MEMBER = "meta.json"
ARRAY_FIELDS = ("actions", "rewards", "dones")
_FORMAT_KEYS = ("format", "length", "frame_shape", "chunk_frames")
_VERIFY_HINT = "run `wmlab data verify` on its store"

# What a damaged file can raise from zipfile, numpy or zstd while being read: a flipped
# byte in a header or the directory surfaces as any of these, not only BadZipFile.
_DAMAGE = (zipfile.BadZipFile, zipfile.LargeZipFile, KeyError, ValueError, EOFError, OSError,
           struct.error, NotImplementedError, RuntimeError, OverflowError, zstandard.ZstdError)


class EpisodeFileError(StoreError):
    """An episode file that cannot be read; ``problem`` is the short reason verify lists."""

    def __init__(self, name: str, problem: str, hint: str = _VERIFY_HINT) -> None:
        super().__init__(f"episode file {name} {problem}: {hint}")
        self.name, self.problem = name, problem


@dataclass
class Episode:
    """One episode: T steps between T+1 observations.

    ``frames`` (T+1, 64, 64, 3) uint8 (the observation after reset, then after each step);
    ``actions`` (T, A) float32; ``rewards`` (T,) float32; ``dones`` (T,) bool, True only at a
    termination (not a truncation); ``meta`` a JSON-serialisable dict.
    """

    frames: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    dones: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return len(self.rewards)

    @property
    def action_dim(self) -> int:
        return int(self.actions.shape[1])

    def validate(self, frame_shape: tuple[int, ...] | None = None) -> None:
        """Raise one StoreError listing every shape/dtype problem (checked before writing)."""
        problems = _episode_problems(self, frame_shape)
        if problems:
            raise StoreError("invalid episode: " + "; ".join(problems)
                             + ": fix the arrays before writing")

    def canonical(self, frame_shape: tuple[int, ...] | None = None) -> Episode:
        """This episode validated, with every array in the file's exact dtype, C-ordered."""
        self.validate(frame_shape)
        return Episode(frames=np.ascontiguousarray(self.frames),
                       actions=np.ascontiguousarray(self.actions, dtype=np.float32),
                       rewards=np.ascontiguousarray(self.rewards, dtype=np.float32),
                       dones=np.ascontiguousarray(self.dones, dtype=bool),
                       meta=dict(self.meta))


def _is_real(array: np.ndarray) -> bool:
    return array.dtype.kind in "fiu"


def _episode_problems(episode: Episode, frame_shape: tuple[int, ...] | None) -> list[str]:
    arrays = {name: getattr(episode, name) for name in ("frames", *ARRAY_FIELDS)}
    not_arrays = [n for n, a in arrays.items() if not isinstance(a, np.ndarray)]
    if not_arrays:
        return [f"{', '.join(not_arrays)} must be numpy arrays"]
    problems = []
    frames, actions, rewards, dones = (arrays[n] for n in ("frames", *ARRAY_FIELDS))
    if rewards.ndim != 1 or not _is_real(rewards):
        problems.append(f"rewards must be (T,) float, got {rewards.shape} {rewards.dtype}")
    steps = len(rewards) if rewards.ndim == 1 else -1
    if frames.dtype != np.uint8 or frames.ndim != 4:
        problems.append(f"frames must be (T+1, H, W, C) uint8, got {frames.shape} {frames.dtype}")
    elif frame_shape is not None and tuple(frames.shape[1:]) != tuple(frame_shape):
        problems.append(f"frames must be {tuple(frame_shape)}, got {tuple(frames.shape[1:])}")
    elif steps >= 0 and len(frames) != steps + 1:
        problems.append(f"{len(frames)} frames for {steps} steps (want steps + 1)")
    if actions.ndim != 2 or actions.shape[0] != steps or not _is_real(actions):
        problems.append(f"actions must be (T, A) float with T={steps}, got {actions.shape} "
                        f"{actions.dtype}")
    if dones.shape != (steps,) or not (dones.dtype == bool or _is_real(dones)):
        problems.append(f"dones must be ({steps},) bool, got {dones.shape} {dones.dtype}")
    elif dones.dtype != bool and not np.isin(dones, (0, 1)).all():
        problems.append("dones must hold only True/False (or 0/1)")
    if not isinstance(episode.meta, dict):
        problems.append(f"meta must be a dict, got {type(episode.meta).__name__}")
    return problems


def _json_default(value: Any) -> Any:
    # numpy scalars and arrays creep into meta from env infos; store them as plain JSON
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def file_meta(episode: Episode, chunk_frames: int) -> dict[str, Any]:
    """The meta.json the writer records: the caller's meta plus what the arrays determine."""
    meta = dict(episode.meta)
    # these derive from the arrays, so they are always recomputed rather than trusted
    meta.update(format=FORMAT, frame_shape=[int(n) for n in episode.frames.shape[1:]],
                chunk_frames=int(chunk_frames), length=episode.length,
                action_dim=episode.action_dim)
    meta["return"] = float(np.sum(episode.rewards, dtype=np.float64))
    meta.setdefault("terminated", bool(episode.dones[-1]) if episode.length else False)
    meta.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    meta.setdefault("wmlab_version", __version__)
    return meta


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _check_settings(chunk_frames: int, level: int) -> None:
    if isinstance(chunk_frames, bool) or not isinstance(chunk_frames, int) or chunk_frames < 1:
        raise StoreError(f"chunk_frames must be an integer of at least 1, got {chunk_frames!r}")
    if isinstance(level, bool) or not isinstance(level, int) or not -7 <= level <= 22:
        raise StoreError(f"zstd level must be an integer from -7 to 22, got {level!r}")


def make_compressor(level: int = LEVEL) -> zstandard.ZstdCompressor:
    """The compressor the writer uses; reuse one per thread to skip its set-up per chunk."""
    return zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)


def encode_episode(episode: Episode, chunk_frames: int = CHUNK_FRAMES, level: int = LEVEL,
                   compressor: zstandard.ZstdCompressor | None = None) -> bytes:
    """The complete bytes of an episode file (what a worker process can hand back)."""
    _check_settings(chunk_frames, level)
    episode = episode.canonical()
    try:
        meta_json = json.dumps(file_meta(episode, chunk_frames), sort_keys=True,
                               default=_json_default)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"episode meta is not JSON-serialisable ({exc}): keep meta to "
                         "str/int/float/bool/list/dict values") from None
    compressor = compressor or make_compressor(level)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(META_MEMBER, meta_json)
        for name in ARRAY_FIELDS:
            archive.writestr(f"{name}.npy", _npy_bytes(getattr(episode, name)))
        frames = episode.frames
        for k, start in enumerate(range(0, len(frames), chunk_frames)):
            # a C-contiguous slice is compressed straight from its buffer, without a copy
            blob = compressor.compress(frames[start:start + chunk_frames])
            archive.writestr(chunk_member(k), blob)
    return buffer.getvalue()


def write_episode(fs: AbstractFileSystem, path: str, episode: Episode,
                  chunk_frames: int = CHUNK_FRAMES, level: int = LEVEL,
                  compressor: zstandard.ZstdCompressor | None = None) -> int:
    """Write an episode file at exactly ``path`` (not atomic: see EpisodeStore.write_tmp).

    Returns the number of bytes written.
    """
    data = encode_episode(episode, chunk_frames, level, compressor)
    try:
        with fs.open(path, "wb") as handle:
            handle.write(data)
    except OSError as exc:
        raise StoreError(f"cannot write episode file {display_path(fs, path)} "
                         f"({_reason(exc)}): check the location and its permissions") from None
    return len(data)


def chunk_member(k: int) -> str:
    return f"frames/{k:06d}.zst"


def display_path(fs: AbstractFileSystem, path: str) -> str:
    """The path as a user would type it: plain for local files, a URL otherwise."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return path if {"file", "local"} & set(protocols) else fs.unstrip_protocol(path)


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 100 else text[:97] + "..."


class EpisodeReader(Closing):
    """An open episode file: the directory and meta are read once, members on demand.

    Use as a context manager. Every read problem is an ``EpisodeFileError`` naming the file.
    """

    def __init__(self, handle: IO[bytes], name: str, hint: str = _VERIFY_HINT) -> None:
        self.name, self.hint = name, hint
        self._handle = handle
        try:
            self._size = handle.seek(0, io.SEEK_END)
            handle.seek(0)
            self._archive = zipfile.ZipFile(handle)
        except _DAMAGE as exc:
            raise self._error(f"is truncated or not an episode file ({_reason(exc)})") from None
        self.meta = self._read_meta()
        self.length = int(self.meta["length"])
        self.chunk_frames = int(self.meta["chunk_frames"])
        self.frame_shape = tuple(int(n) for n in self.meta["frame_shape"])

    @classmethod
    def open(cls, fs: AbstractFileSystem, path: str, hint: str = _VERIFY_HINT) -> EpisodeReader:
        name = display_path(fs, path)
        try:
            handle = fs.open(path, "rb")
        except FileNotFoundError:
            raise EpisodeFileError(name, "does not exist", "check the path or the store's "
                                   "episode list") from None
        except OSError as exc:
            raise EpisodeFileError(name, f"cannot be opened ({_reason(exc)})",
                                   "check the location and its permissions") from None
        try:
            return cls(handle, name, hint)
        except BaseException:
            handle.close()
            raise

    def close(self) -> None:
        self._handle.close()

    def _error(self, problem: str) -> EpisodeFileError:
        return EpisodeFileError(self.name, problem, self.hint)

    # -- members ---------------------------------------------------------------------------

    @property
    def num_frames(self) -> int:
        return self.length + 1

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.num_frames / self.chunk_frames)

    def chunk_length(self, k: int) -> int:
        return min(self.chunk_frames, self.num_frames - k * self.chunk_frames)

    def member(self, member: str) -> bytes:
        """The bytes of one member, CRC-checked by zipfile."""
        try:
            info = self._archive.getinfo(member)
        except KeyError:
            raise self._error(f"lacks member {member}") from None
        # a damaged directory can claim any size; refuse before allocating it
        if info.header_offset + info.compress_size > self._size:
            raise self._error(f"is truncated: member {member} runs past the end of the file")
        try:
            return self._archive.read(info)
        except _DAMAGE as exc:
            raise self._error(f"is corrupt in member {member} ({_reason(exc)})") from None

    def _read_meta(self) -> dict[str, Any]:
        try:
            meta = json.loads(self.member(META_MEMBER))
        except (ValueError, UnicodeDecodeError) as exc:
            raise self._error(f"has an unreadable {META_MEMBER} ({_reason(exc)})") from None
        problem = _meta_problem(meta)
        if problem:
            raise self._error(f"has a bad {META_MEMBER}: {problem}")
        return meta

    def array(self, name: str) -> np.ndarray:
        """``actions``, ``rewards`` or ``dones``, checked against the meta's length."""
        if name not in ARRAY_FIELDS:
            raise StoreError(f"no array '{name}' in an episode file: ask for one of "
                             f"{', '.join(ARRAY_FIELDS)}")
        data = self.member(f"{name}.npy")
        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)
        except _DAMAGE as exc:
            raise self._error(f"has an unreadable {name}.npy ({_reason(exc)})") from None
        problem = _array_problem(name, array, self.length)
        if problem:
            raise self._error(f"has a bad {name}.npy: {problem}")
        return array

    def read_chunk(self, k: int, decompressor: zstandard.ZstdDecompressor | None = None,
                   out: np.ndarray | None = None) -> np.ndarray:
        """Frames of chunk ``k`` as (n, H, W, C) uint8, decompressed into ``out`` if given."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not (
                0 <= k < self.num_chunks):
            raise StoreError(f"chunk {k!r} of {self.name} does not exist: it has chunks 0 to "
                             f"{self.num_chunks - 1}")
        count = self.chunk_length(int(k))
        expected = count * math.prod(self.frame_shape)
        member = chunk_member(int(k))
        blob = self.member(member)
        try:
            # checked before decompressing so that a wrong size never allocates
            size = zstandard.frame_content_size(blob)
            if size != expected:
                raise self._error(f"has a bad {member}: {size} bytes of frames, expected "
                                  f"{expected}")
            raw = (decompressor or zstandard.ZstdDecompressor()).decompress(blob)
        except zstandard.ZstdError as exc:
            raise self._error(f"has a corrupt {member} ({_reason(exc)})") from None
        if len(raw) != expected:
            raise self._error(f"has a bad {member}: {len(raw)} bytes, expected {expected}")
        frames = np.frombuffer(raw, dtype=np.uint8).reshape(count, *self.frame_shape)
        if out is None:
            return frames.copy()  # writable, like every other array handed out
        out[...] = frames
        return out

    def frames(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Frames ``start:stop`` (a copy), decompressing only the chunks they fall in."""
        begin, end, _ = slice(start, stop).indices(self.num_frames)
        end = max(begin, end)
        out = np.empty((end - begin, *self.frame_shape), dtype=np.uint8)
        if end == begin:
            return out
        decompressor = zstandard.ZstdDecompressor()
        first, last = begin // self.chunk_frames, (end - 1) // self.chunk_frames
        for k in range(first, last + 1):
            offset = k * self.chunk_frames
            chunk = self.read_chunk(k, decompressor)
            lo, hi = max(begin, offset), min(end, offset + len(chunk))
            out[lo - begin:hi - begin] = chunk[lo - offset:hi - offset]
        return out

    def episode(self) -> Episode:
        return Episode(frames=self.frames(), actions=self.array("actions"),
                       rewards=self.array("rewards"), dones=self.array("dones"),
                       meta=dict(self.meta))

    # -- verification ------------------------------------------------------------------------

    def problems(self) -> list[str]:
        """Everything wrong with the file, reading each member exactly once.

        Reading a member checks its CRC as ``testzip`` would, so the file is read once
        rather than twice (which matters on a 100 GB store); meta.json was checked at open.
        """
        found: list[str] = []
        expected_members = {f"{n}.npy" for n in ARRAY_FIELDS}
        expected_members |= {chunk_member(k) for k in range(self.num_chunks)}
        names = set(self._archive.namelist())
        found += [f"lacks member {m}" for m in sorted(expected_members - names)]
        extra_chunks = sorted(n for n in names - expected_members if n.startswith("frames/"))
        if extra_chunks:
            found.append(f"has {len(extra_chunks)} frame chunk(s) beyond its length "
                         f"{self.length} ({extra_chunks[0]}...)")
        decompressor = zstandard.ZstdDecompressor()
        frames_read = 0
        for name in sorted(names & expected_members):
            try:
                if name.startswith("frames/"):
                    k = int(name[len("frames/"):-len(".zst")])
                    frames_read += len(self.read_chunk(k, decompressor))
                else:
                    array = self.array(name[:-len(".npy")])
                    if name == "rewards.npy":
                        found += _return_problem(self.meta, array)
            except EpisodeFileError as exc:
                found.append(exc.problem)
        if not found and frames_read != self.num_frames:
            found.append(f"holds {frames_read} frames, expected length + 1 = {self.num_frames}")
        return found


def _meta_problem(meta: Any) -> str:
    if not isinstance(meta, dict):
        return "not a JSON object"
    missing = [k for k in _FORMAT_KEYS if k not in meta]
    if missing:
        return f"no {', '.join(missing)}"
    if meta["format"] != FORMAT:
        return f"format {meta['format']!r} is not {FORMAT!r} (a newer wmlab may read it)"
    length, chunk, shape = meta["length"], meta["chunk_frames"], meta["frame_shape"]
    if not _is_count(length, 0) or not _is_count(chunk, 1):
        return f"length {length!r} / chunk_frames {chunk!r} are not valid counts"
    if not isinstance(shape, list) or len(shape) != 3 or not all(_is_count(n, 1) for n in shape):
        return f"frame_shape {shape!r} is not [H, W, C]"
    return ""


def _is_count(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _array_problem(name: str, array: np.ndarray, steps: int) -> str:
    want = {"actions": np.float32, "rewards": np.float32, "dones": np.bool_}[name]
    if array.dtype != want:
        return f"dtype {array.dtype}, expected {np.dtype(want)}"
    if len(array) != steps or array.ndim != (2 if name == "actions" else 1):
        return f"shape {array.shape} does not fit length {steps}"
    return ""


def _return_problem(meta: dict[str, Any], rewards: np.ndarray) -> list[str]:
    recorded = meta.get("return")
    total = float(np.sum(rewards, dtype=np.float64))
    if isinstance(recorded, (int, float)) and not math.isclose(recorded, total, rel_tol=1e-6,
                                                                 abs_tol=1e-6):
        return [f"meta return {recorded} differs from the rewards' sum {total}"]
    return []


# -- one-call helpers ----------------------------------------------------------------------


def read_meta(fs: AbstractFileSystem, path: str) -> dict[str, Any]:
    """The meta.json of an episode file (reads the directory and that member only)."""
    with EpisodeReader.open(fs, path) as reader:
        return reader.meta


def read_episode(fs: AbstractFileSystem, path: str) -> Episode:
    with EpisodeReader.open(fs, path) as reader:
        return reader.episode()


def read_chunk(fs: AbstractFileSystem, path: str, k: int) -> np.ndarray:
    """Frames of chunk ``k`` (n, H, W, C); only that member of the file is read."""
    with EpisodeReader.open(fs, path) as reader:
        return reader.read_chunk(k)


def decode_episode(data: bytes, name: str = "<episode bytes>") -> Episode:
    """The inverse of ``encode_episode``."""
    with EpisodeReader(io.BytesIO(data), name) as reader:
        return reader.episode()


def verify_file(fs: AbstractFileSystem, path: str) -> list[str]:
    """Problems found in one episode file (empty when it is sound); never raises for damage."""
    try:
        with EpisodeReader.open(fs, path) as reader:
            return reader.problems()
    except EpisodeFileError as exc:
        return [exc.problem]
