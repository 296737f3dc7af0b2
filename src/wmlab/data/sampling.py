"""Shuffled frame batches from chunked episode files, in bounded memory and resumable.

An epoch is planned from the chunk table alone: every (episode, chunk) pair is permuted by
a generator seeded with (seed, epoch) and cut into pools of ``pool_chunks`` chunks. Each
pool, together with the frames the previous pool left over, is shuffled by its own seeded
generator and cut into batches; what does not fill a batch is carried on. Frame counts are
known without reading anything, so the batches of every pool are known in advance: resuming
at batch N replays only the permutations of the skipped pools (integers, no frames) and
decompresses just the chunks that hold the frames carried into the first wanted pool.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import zstandard

from wmlab.data.episode_file import EpisodeReader
from wmlab.errors import StoreError

OpenReader = Callable[[str], EpisodeReader]


@dataclass(frozen=True)
class ChunkTable:
    """Every chunk of a selection of episodes, as parallel arrays (one row per chunk)."""

    episode_ids: list[str]
    episode: np.ndarray  # row -> index into episode_ids
    chunk: np.ndarray  # row -> chunk number inside its episode
    frames: np.ndarray  # row -> frames in that chunk
    starts: np.ndarray  # row -> number of the chunk's first frame in the whole selection

    @classmethod
    def build(cls, episode_ids: list[str], num_frames: list[int], chunk_frames: list[int]
              ) -> ChunkTable:
        totals = np.asarray(num_frames, dtype=np.int64)
        sizes = np.asarray(chunk_frames, dtype=np.int64)
        counts = -(-totals // sizes)  # chunks per episode
        episode = np.repeat(np.arange(len(totals)), counts)
        # chunk k of an episode is the k-th row since that episode's first row
        chunk = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        frames = np.minimum(sizes[episode], totals[episode] - sizes[episode] * chunk)
        starts = np.cumsum(frames) - frames
        return cls(episode_ids=list(episode_ids), episode=episode, chunk=chunk, frames=frames,
                   starts=starts)

    @property
    def num_chunks(self) -> int:
        return len(self.frames)

    def refs(self, rows: np.ndarray) -> np.ndarray:
        """Selection-wide frame numbers of every frame of ``rows``, in row order."""
        if not len(rows):
            return np.zeros(0, np.int64)
        counts = self.frames[rows]
        # frame j of the concatenation belongs to row r and sits at start[r] + (j - first[r])
        first = np.repeat(np.cumsum(counts) - counts, counts)
        return np.repeat(self.starts[rows], counts) + np.arange(counts.sum()) - first

    def locate(self, refs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, offset in that chunk) of selection-wide frame numbers."""
        rows = np.searchsorted(self.starts, refs, side="right") - 1
        return rows, refs - self.starts[rows]


@dataclass(frozen=True)
class EpochPlan:
    """Which chunks form each pool, and how many frames and batches each pool yields."""

    table: ChunkTable
    batch_size: int
    pool_chunks: int
    seed: int
    epoch: int
    order: np.ndarray  # the epoch's permutation of chunk rows
    new_frames: np.ndarray  # pool -> frames read from its chunks
    carry_in: np.ndarray  # pool -> frames left over from the pools before it
    batches: np.ndarray  # pool -> batches it yields
    first_batch: np.ndarray  # pool -> epoch-wide number of its first batch

    @classmethod
    def build(cls, table: ChunkTable, batch_size: int, pool_chunks: int, seed: int,
              epoch: int) -> EpochPlan:
        order = np.random.default_rng([seed, epoch]).permutation(table.num_chunks)
        pools = math.ceil(len(order) / pool_chunks)
        per_row = table.frames[order]
        new_frames = np.add.reduceat(per_row, np.arange(pools) * pool_chunks) if pools else (
            np.zeros(0, np.int64))
        carry_in = np.zeros(pools, np.int64)
        batches = np.zeros(pools, np.int64)
        carry = 0
        for g in range(pools):
            carry_in[g] = carry
            total = carry + int(new_frames[g])
            last = g == pools - 1
            batches[g] = math.ceil(total / batch_size) if last else total // batch_size
            carry = 0 if last else total - int(batches[g]) * batch_size
        first_batch = np.concatenate([[0], np.cumsum(batches)[:-1]]).astype(np.int64)
        return cls(table=table, batch_size=batch_size, pool_chunks=pool_chunks, seed=seed,
                   epoch=epoch, order=order, new_frames=new_frames, carry_in=carry_in,
                   batches=batches, first_batch=first_batch[:pools])

    @property
    def num_pools(self) -> int:
        return len(self.new_frames)

    @property
    def num_batches(self) -> int:
        return int(self.batches.sum())

    def rows(self, g: int) -> np.ndarray:
        return self.order[g * self.pool_chunks:(g + 1) * self.pool_chunks]

    def shuffle(self, g: int) -> np.ndarray:
        """The order of pool ``g``'s frames: carried frames first, then its chunks in order."""
        # the extra 1 keeps these streams apart from the epoch's chunk permutation
        rng = np.random.default_rng([self.seed, self.epoch, 1, g])
        return rng.permutation(int(self.carry_in[g] + self.new_frames[g]))

    def carried_refs(self, g: int) -> np.ndarray:
        """Frame numbers carried into pool ``g``, found without reading any frame."""
        carried = np.zeros(0, np.int64)
        for h in range(g):
            refs = np.concatenate([carried, self.table.refs(self.rows(h))])
            carried = refs[self.shuffle(h)][int(self.batches[h]) * self.batch_size:]
        return carried


def _new_pool(frames: int, frame_shape: tuple[int, ...]) -> np.ndarray:
    """The one allocation of a pool's frames (kept apart so tests can watch it)."""
    return np.empty((frames, *frame_shape), dtype=np.uint8)


def load_pool(plan: EpochPlan, g: int, open_reader: OpenReader,
              frame_shape: tuple[int, ...]) -> np.ndarray:
    """Pool ``g``'s buffer: room for the carried frames, then its chunks decompressed in."""
    table, rows = plan.table, plan.rows(g)
    carry = int(plan.carry_in[g])
    pool = _new_pool(carry + int(plan.new_frames[g]), frame_shape)
    offsets = carry + np.concatenate([[0], np.cumsum(table.frames[rows])[:-1]])
    by_episode: dict[int, list[int]] = {}
    for position, row in enumerate(rows):
        by_episode.setdefault(int(table.episode[row]), []).append(position)
    decompressor = zstandard.ZstdDecompressor()
    for e, positions in by_episode.items():
        # one open per episode, however many of its chunks the pool holds
        with open_reader(table.episode_ids[e]) as reader:
            for position in positions:
                row = rows[position]
                start, count = int(offsets[position]), int(table.frames[row])
                _check_chunk(reader, int(table.chunk[row]), count, frame_shape)
                reader.read_chunk(int(table.chunk[row]), decompressor,
                                  out=pool[start:start + count])
    return pool


def _check_chunk(reader: EpisodeReader, k: int, count: int,
                 frame_shape: tuple[int, ...]) -> None:
    if reader.frame_shape != tuple(frame_shape):
        raise StoreError(f"episode file {reader.name} holds frames of shape "
                         f"{reader.frame_shape}, not the store's {tuple(frame_shape)}: move "
                         "it out of the store")
    if k >= reader.num_chunks or reader.chunk_length(k) != count:
        raise StoreError(f"episode file {reader.name} changed while batches were being "
                         "planned: start the epoch again")


def gather_frames(table: ChunkTable, refs: np.ndarray, open_reader: OpenReader,
                  frame_shape: tuple[int, ...]) -> np.ndarray:
    """Frames of arbitrary frame numbers, holding one decompressed chunk at a time."""
    out = np.empty((len(refs), *frame_shape), dtype=np.uint8)
    rows, offsets = table.locate(refs)
    decompressor = zstandard.ZstdDecompressor()
    for row in np.unique(rows):
        wanted = np.flatnonzero(rows == row)
        with open_reader(table.episode_ids[int(table.episode[row])]) as reader:
            _check_chunk(reader, int(table.chunk[row]), int(table.frames[row]), frame_shape)
            chunk = reader.read_chunk(int(table.chunk[row]), decompressor)
        out[wanted] = chunk[offsets[wanted]]
    return out


def iterate_batches(plan: EpochPlan, open_reader: OpenReader, frame_shape: tuple[int, ...],
                    start_batch: int = 0, prefetch: bool = True) -> Iterator[np.ndarray]:
    """The batches of ``plan`` from ``start_batch`` on.

    Holds one pool (two with ``prefetch``, the next one being read by a background thread;
    zstd releases the GIL) plus fewer than a batch of carried frames.
    """
    if start_batch >= plan.num_batches:
        return
    first = int(np.searchsorted(plan.first_batch + plan.batches, start_batch, side="right"))
    carried = gather_frames(plan.table, plan.carried_refs(first), open_reader, frame_shape)
    size = plan.batch_size
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wmlab-prefetch") if (
        prefetch) else None
    pending: Future[np.ndarray] | None = None
    try:
        for g in range(first, plan.num_pools):
            if pending is not None:
                pool, pending = pending.result(), None
            else:
                pool = load_pool(plan, g, open_reader, frame_shape)
            if executor is not None and g + 1 < plan.num_pools:
                pending = executor.submit(load_pool, plan, g + 1, open_reader, frame_shape)
            pool[:len(carried)] = carried
            order = plan.shuffle(g)
            skip = max(0, start_batch - int(plan.first_batch[g]))
            for b in range(skip, int(plan.batches[g])):
                yield pool[order[b * size:(b + 1) * size]]
            carried = pool[order[int(plan.batches[g]) * size:]]
            del pool  # release this pool before the next one is read
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
