"""Batches for training M from encoded series, in the two regimes of the references.

- ``episodes`` (CarRacing): each batch holds B episodes (a random window of ``seq_len``
  steps where an episode is longer; padded and masked where shorter).
- ``streams`` (Doom): episodes are concatenated into B parallel streams cut into chunks of
  ``seq_len`` steps; the LSTM state is carried from one chunk of a stream to the next and a
  restart flag marks each episode's first step.

Both draw z afresh from the stored (mu, logvar) for every batch, and both are pure functions
of (seed, step) or (seed, epoch, chunk), so a resumed run sees exactly the batches it would
have seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from wmlab.data.series import Series
from wmlab.errors import WmlabError


@dataclass
class SeriesBatch:
    """Inputs at steps t and targets at t+1, all (B, T, ...) tensors."""

    mu: torch.Tensor  # (B, T, 2, z): per step, the latent of the input frame and of the next
    logvar: torch.Tensor  # (B, T, 2, z)
    actions: torch.Tensor  # (B, T, A)
    rewards: torch.Tensor  # (B, T)
    dones: torch.Tensor  # (B, T) 1 where the episode terminated after this step
    restart: torch.Tensor  # (B, T) 1 where a new episode starts at this step
    mask: torch.Tensor  # (B, T) 1 for real steps, 0 for padding
    new_streams: bool = True  # False: continue the LSTM state of the previous batch

    def sample_z(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_t, z_t+1) ~ N(mu, exp(logvar)): V's posterior, sampled afresh for every batch."""
        mu, logvar = self.mu.float(), self.logvar.float()
        eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype).to(mu.device)
        z = mu + torch.exp(0.5 * logvar) * eps
        return z[:, :, 0], z[:, :, 1]

    def to(self, device: torch.device) -> SeriesBatch:
        moved = {k: getattr(self, k).to(device) for k in _FIELDS}
        return SeriesBatch(**moved, new_streams=self.new_streams)

    def rows(self, index: slice) -> SeriesBatch:
        """The sequences (streams) at ``index``, as a batch of their own (views)."""
        return SeriesBatch(**{k: getattr(self, k)[index] for k in _FIELDS},
                           new_streams=self.new_streams)


_FIELDS = ("mu", "logvar", "actions", "rewards", "dones", "restart", "mask")


def _require(series: list[Series], min_length: int = 1) -> None:
    if not series:
        raise WmlabError("no encoded series to train M on: collect episodes, train V and run "
                         "`wmlab encode` first")
    if max(s.length for s in series) < min_length:
        raise WmlabError(f"every episode is shorter than {min_length} steps: lower "
                         "mdrnn.seq_len or collect longer episodes")


def episode_batch(series: list[Series], batch_size: int, seq_len: int, seed: int, step: int
                  ) -> SeriesBatch:
    """B episodes drawn at random (by (seed, step)), each a window of at most seq_len."""
    _require(series)
    rng = np.random.default_rng([seed, step])
    picks = rng.integers(0, len(series), batch_size)
    length = min(seq_len, max(series[i].length for i in picks))
    z_dim, action_dim = series[0].mu.shape[1], series[0].actions.shape[1]
    mu = np.zeros((batch_size, length, 2, z_dim), np.float32)
    logvar = np.zeros_like(mu)
    actions = np.zeros((batch_size, length, action_dim), np.float32)
    rewards = np.zeros((batch_size, length), np.float32)
    dones = np.zeros((batch_size, length), np.float32)
    restart = np.zeros((batch_size, length), np.float32)
    mask = np.zeros((batch_size, length), np.float32)
    for row, index in enumerate(picks):
        s = series[index]
        start = int(rng.integers(0, s.length - length + 1)) if s.length > length else 0
        n = min(length, s.length - start)
        mu[row, :n] = _pairs(s.mu, start, start + n)
        logvar[row, :n] = _pairs(s.logvar, start, start + n)
        actions[row, :n] = s.actions[start:start + n]
        rewards[row, :n] = s.rewards[start:start + n]
        dones[row, :n] = s.dones[start:start + n]
        restart[row, 0] = 1.0  # every row starts a (part of an) episode from a zero state
        mask[row, :n] = 1.0
    return _to_batch(mu, logvar, actions, rewards, dones, restart, mask, new_streams=True)


def _pairs(latents: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """(hi-lo, 2, z): each step's input latent beside its target (the next frame's)."""
    return np.stack([latents[lo:hi], latents[lo + 1:hi + 1]], axis=1)


def _to_batch(*arrays: np.ndarray, new_streams: bool) -> SeriesBatch:
    tensors = [torch.from_numpy(a) for a in arrays]
    return SeriesBatch(*tensors, new_streams=new_streams)


@dataclass
class StreamPlan:
    """How one epoch lays episodes out in B streams (a function of seed and epoch)."""

    order: list[list[int]]  # per stream, the episode indices in order
    chunks: int  # full chunks every stream can provide
    epoch: int = 0
    first_step: int = 0  # global optimiser step of this epoch's first chunk


def plan_streams(series: list[Series], batch_size: int, seq_len: int, seed: int, epoch: int,
                 first_step: int = 0) -> StreamPlan:
    _require(series)
    rng = np.random.default_rng([seed, epoch, 1])
    lengths = np.zeros(batch_size, dtype=np.int64)
    order: list[list[int]] = [[] for _ in range(batch_size)]
    for index in rng.permutation(len(series)):
        stream = int(np.argmin(lengths))  # keep streams even so few steps are cut off
        order[stream].append(int(index))
        lengths[stream] += series[index].length
    chunks = int(lengths.min()) // seq_len
    if chunks == 0:
        raise WmlabError(f"too little data for {batch_size} streams of {seq_len}-step chunks "
                         f"(the shortest stream has {int(lengths.min())} steps): lower "
                         "mdrnn.batch_size or mdrnn.seq_len, or collect more episodes")
    return StreamPlan(order=order, chunks=chunks, epoch=epoch, first_step=first_step)


def locate_chunk(series: list[Series], batch_size: int, seq_len: int, seed: int, step: int,
                 plan: StreamPlan | None = None) -> tuple[StreamPlan, int]:
    """The epoch plan and chunk index that global ``step`` falls in.

    Epochs differ in length only through their stream layouts, so the walk starts from the
    given plan (the current epoch's) or from epoch 0 after a resume.
    """
    if plan is None or step < plan.first_step:
        plan = plan_streams(series, batch_size, seq_len, seed, 0)
    while step >= plan.first_step + plan.chunks:
        plan = plan_streams(series, batch_size, seq_len, seed, plan.epoch + 1,
                            plan.first_step + plan.chunks)
    return plan, step - plan.first_step


def stream_batch(series: list[Series], plan: StreamPlan, chunk: int, seq_len: int
                 ) -> SeriesBatch:
    """Chunk ``chunk`` of every stream of the plan (steps chunk*L .. (chunk+1)*L)."""
    start, stop = chunk * seq_len, (chunk + 1) * seq_len
    rows = [_stream_slice(series, episodes, start, stop) for episodes in plan.order]
    arrays = [np.stack([row[i] for row in rows]) for i in range(len(rows[0]))]
    return _to_batch(*arrays, new_streams=chunk == 0)


def _stream_slice(series: list[Series], episodes: list[int], start: int, stop: int):
    """Steps [start, stop) of the concatenation of ``episodes`` as per-step arrays.

    The latents are laid out per step as (input z_t, target z_{t+1}) pairs, so a target
    never crosses into the next episode.
    """
    mus, logvars, acts, rews, dns, rst = ([] for _ in range(6))
    offset = 0
    for index in episodes:
        s = series[index]
        lo, hi = max(start - offset, 0), min(stop - offset, s.length)
        if lo < hi:
            mus.append(_pairs(s.mu, lo, hi))
            logvars.append(_pairs(s.logvar, lo, hi))
            acts.append(s.actions[lo:hi])
            rews.append(s.rewards[lo:hi])
            dns.append(s.dones[lo:hi])
            flag = np.zeros(hi - lo, np.float32)
            flag[0] = 1.0 if lo == 0 else 0.0
            rst.append(flag)
        offset += s.length
        if offset >= stop:
            break
    cat = np.concatenate
    return (cat(mus).astype(np.float32), cat(logvars).astype(np.float32),
            cat(acts).astype(np.float32), cat(rews).astype(np.float32),
            cat(dns).astype(np.float32), cat(rst), np.ones(stop - start, np.float32))
