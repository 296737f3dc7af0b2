"""One episode per file: a ZIP container of stored (not deflated) members.

Members: ``meta.json``; ``actions.npy``, ``rewards.npy``, ``dones.npy``; and the frames in
chunks of ``chunk_frames``, ``frames/000000.zst`` ..., each compressed alone with zstd
(content checksum on). ZIP gives a CRC per member and a directory at the end, so a truncated
file fails at open and a flipped byte fails its CRC; a chunk is read without touching the
others, which is what makes random frame batches cheap. ``unzip -l`` shows what is inside.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zstandard

from wmlab.errors import StoreError

FORMAT = "wmep/1"
FRAME_SHAPE = (64, 64, 3)
_ARRAYS = ("actions", "rewards", "dones")


@dataclass
class Episode:
    """frames (T+1, 64, 64, 3) uint8; actions (T, A) float32; rewards (T,); dones (T,)."""

    frames: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    dones: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return len(self.rewards)

    def validate(self) -> None:
        steps = len(self.rewards)
        problems = []
        if self.frames.dtype != np.uint8 or self.frames.ndim != 4 or self.frames.shape[-1] != 3:
            problems.append(f"frames must be (T+1, H, W, 3) uint8, got {self.frames.shape} "
                            f"{self.frames.dtype}")
        elif len(self.frames) != steps + 1:
            problems.append(f"{len(self.frames)} frames for {steps} steps (want steps + 1)")
        if self.actions.ndim != 2 or len(self.actions) != steps:
            problems.append(f"actions must be (T, A) with T={steps}, got {self.actions.shape}")
        if self.dones.shape != (steps,):
            problems.append(f"dones must be ({steps},), got {self.dones.shape}")
        if problems:
            raise StoreError("invalid episode: " + "; ".join(problems))


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def encode_episode(episode: Episode, chunk_frames: int = 64, level: int = 3,
                   compressor: zstandard.ZstdCompressor | None = None) -> bytes:
    """The bytes of an episode file (written in one piece by the store)."""
    episode.validate()
    frames = np.ascontiguousarray(episode.frames)
    compressor = compressor or zstandard.ZstdCompressor(level=level, write_checksum=True)
    meta = dict(episode.meta)
    meta.update(format=FORMAT, frame_shape=list(frames.shape[1:]), chunk_frames=chunk_frames,
                length=episode.length, action_dim=int(episode.actions.shape[1]))
    meta["return"] = float(np.sum(episode.rewards, dtype=np.float64))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("meta.json", json.dumps(meta, sort_keys=True))
        archive.writestr("actions.npy", _npy_bytes(episode.actions.astype(np.float32)))
        archive.writestr("rewards.npy", _npy_bytes(episode.rewards.astype(np.float32)))
        archive.writestr("dones.npy", _npy_bytes(episode.dones.astype(bool)))
        for k, start in enumerate(range(0, len(frames), chunk_frames)):
            blob = compressor.compress(frames[start:start + chunk_frames].tobytes())
            archive.writestr(f"frames/{k:06d}.zst", blob)
    return buffer.getvalue()


class EpisodeReader:
    """Random access to one episode file: meta, arrays and single chunks."""

    def __init__(self, handle, name: str) -> None:
        self.name = name
        try:
            self.archive = zipfile.ZipFile(handle)
            self.meta = json.loads(self.archive.read("meta.json"))
        except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, EOFError, OSError,
                zipfile.LargeZipFile) as exc:
            raise StoreError(f"episode file {name} is truncated or corrupt ({_reason(exc)}): "
                             "run `wmlab data verify` on the store") from None
        self.frame_shape = tuple(self.meta.get("frame_shape", FRAME_SHAPE))
        self.chunk_frames = int(self.meta.get("chunk_frames", 64))

    @property
    def num_frames(self) -> int:
        return int(self.meta["length"]) + 1

    @property
    def num_chunks(self) -> int:
        return -(-self.num_frames // self.chunk_frames)

    def chunk(self, k: int, decompressor: zstandard.ZstdDecompressor | None = None
              ) -> np.ndarray:
        try:
            blob = self.archive.read(f"frames/{k:06d}.zst")
            raw = (decompressor or zstandard.ZstdDecompressor()).decompress(blob)
        except (zipfile.BadZipFile, KeyError, zstandard.ZstdError, OSError, EOFError) as exc:
            raise StoreError(f"episode file {self.name}: frame chunk {k} is damaged "
                             f"({_reason(exc)}): run `wmlab data verify` on the store") from None
        frames = np.frombuffer(raw, dtype=np.uint8)
        per_frame = int(np.prod(self.frame_shape))
        expected = min(self.chunk_frames, self.num_frames - k * self.chunk_frames)
        if frames.size != expected * per_frame:
            raise StoreError(f"episode file {self.name}: frame chunk {k} holds "
                             f"{frames.size // per_frame} frames, expected {expected}: run "
                             "`wmlab data verify` on the store")
        return frames.reshape(expected, *self.frame_shape)

    def array(self, name: str) -> np.ndarray:
        try:
            return np.load(io.BytesIO(self.archive.read(f"{name}.npy")), allow_pickle=False)
        except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError) as exc:
            raise StoreError(f"episode file {self.name}: {name} is damaged ({_reason(exc)}): "
                             "run `wmlab data verify` on the store") from None

    def episode(self) -> Episode:
        decompressor = zstandard.ZstdDecompressor()
        frames = np.concatenate([self.chunk(k, decompressor) for k in range(self.num_chunks)])
        return Episode(frames=frames, actions=self.array("actions"),
                       rewards=self.array("rewards"), dones=self.array("dones"),
                       meta=dict(self.meta))

    def problems(self) -> list[str]:
        """Every inconsistency found by reading the whole file."""
        found = []
        try:
            bad = self.archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            return [f"unreadable ({_reason(exc)})"]
        if bad is not None:
            found.append(f"CRC mismatch in member {bad}")
        for key in ("length", "frame_shape", "chunk_frames", "format"):
            if key not in self.meta:
                found.append(f"meta.json lacks '{key}'")
        if found:
            return found
        steps = int(self.meta["length"])
        for name in _ARRAYS:
            try:
                if len(self.array(name)) != steps:
                    found.append(f"{name} has the wrong length for {steps} steps")
            except StoreError as exc:
                found.append(str(exc).split(": ", 1)[-1].split(": run")[0])
        chunks = [n for n in self.archive.namelist() if n.startswith("frames/")]
        if len(chunks) != self.num_chunks:
            found.append(f"{len(chunks)} frame chunks, expected {self.num_chunks}")
        decompressor = zstandard.ZstdDecompressor()
        for k in range(min(len(chunks), self.num_chunks)):
            try:
                self.chunk(k, decompressor)
            except StoreError as exc:
                found.append(str(exc).split(f"{self.name}: ", 1)[-1].split(": run")[0])
        return found


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 80 else text[:77] + "..."
