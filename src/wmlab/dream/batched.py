"""The dream: M run as an environment, for B dreams at once as one tensor program.

A dream starts from a stored first-frame (mu, logvar), sampled, with the LSTM state zeroed
and the restart flag set. Each step M advances on [z, action, restart], the next z is
sampled at temperature tau, the episode ends when the done logit is positive or at the step
cap, and the reward is +1 per step (Doom) or M's predicted reward where it has that head.

Randomness belongs to each *dream*, not to the batch: every dream owns a numpy generator
seeded by its seed, which draws its start, then its noise in blocks of steps. A dream's
trajectory therefore depends only on its seed and its actions, whichever batch position or
worker runs it (members i and i + P/2 can share rollouts, every evaluation engine agrees).
With M's dropout kept on (``DreamSettings.dropout``) each dream's masks come from a second
generator of its seed (``_mask_rng``): its noise is the noise it has without dropout.

Speed: one step is two matmuls for the whole batch (the LSTM gates from [x, h] against the
concatenated [W_ih, W_hh], then the mixture head), a few elementwise ops and an inverse-CDF
component draw; no per-dream Python work except refilling a dream's noise block every
``noise_block`` steps.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from wmlab.device import bf16_is_native
from wmlab.dream.settings import DreamSettings
from wmlab.errors import WmlabError
from wmlab.memory.fastlinear import FastLinear
from wmlab.memory.model import MDNRNN, DreamStart, inverted_dropout, select_and_sample
from wmlab.memory.scan import lstm_kernels, tanh

# The running dreams are stepped in groups of this many rows (see BatchedDream.step).
COMPACT_ROUND = 16


def _row_rng(seed: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), 0x5EED])


def _mask_rng(seed: int) -> np.random.Generator:
    """A dream's dropout masks: a stream of their own, so that turning dropout on leaves
    the dream's start and noise as they were (dreams with and without compare in pairs)."""
    return np.random.default_rng([int(seed), 0xD809])


class BatchedDream:
    """B dreams stepped together; finished dreams are frozen until reset (all or some)."""

    def __init__(self, model: MDNRNN, start: DreamStart, settings: DreamSettings,
                 device: torch.device | str = "cpu", noise_block: int = 64) -> None:
        if start.mu.shape[1] != model.shape.z_dim:
            raise WmlabError(f"the initial-z store has z of size {start.mu.shape[1]} but M "
                             f"expects {model.shape.z_dim}: they come from different runs")
        self.model = model.eval()
        self.shape = model.shape
        self.settings = settings
        self.device = torch.device(device)
        self.start = DreamStart(start.mu.to(self.device).float(),
                                start.logvar.to(self.device).float())
        self.tau = settings.tau
        self.max_steps = int(settings.max_steps)
        self.alive_reward = float(settings.alive_reward)
        self.done_mode = settings.done_mode
        # The done head was trained with positives weighted by w, which shifts its logit by
        # log(w) from the true log-odds: "sample" undoes that before drawing, so the dream's
        # hazard is M's estimate of the real one rather than w times it.
        self.done_shift = settings.done_shift
        # dream.done_bias: added to the done logit in either mode; positive ends dreams
        # sooner, for matching the dream's survival to the game's by hand
        self.done_bias = float(settings.done_bias)
        # dream.precision: "bfloat16" runs the two matmuls in bf16 (state and sampling stay
        # float32); ~3x faster where the CPU has AVX512-BF16, and emulated (slower than
        # float32) where it has not, so there the dream stays in float32
        self.dtype = getattr(torch, settings.precision)
        if self.dtype == torch.bfloat16 and not bf16_is_native(self.device):
            self.dtype = torch.float32
        # dream.dropout: M's training dropout kept on, on h before the head (the state
        # and what C reads stay whole): the dream is stochastic in a way C cannot exploit
        self.dropout = float(settings.dropout)
        self.block = int(noise_block)
        self.compact = True  # step only the running dreams (False: every row, then mask)
        lstm, head = model.lstm, model.head
        with torch.no_grad():
            # [W_ih, W_hh] side by side: the gates of a step are one matmul of [x, h]
            w_gates = torch.cat([lstm.weight_ih_l0, lstm.weight_hh_l0], 1).to(self.device)
            b_gates = (lstm.bias_ih_l0 + lstm.bias_hh_l0).to(self.device)
            w_head, b_head = head.weight.to(self.device), head.bias.to(self.device)
            if self.dtype == torch.float32:  # oneDNN where available
                self._gates, self._head = FastLinear(w_gates, b_gates), FastLinear(w_head,
                                                                                  b_head)
            else:
                self._gates = FastLinear(w_gates.to(self.dtype), b_gates.to(self.dtype))
                self._head = FastLinear(w_head.to(self.dtype), b_head.to(self.dtype))
        # the C step kernels (memory/lstm_steps.c) on the CPU for K <= 64 components; None:
        # the PyTorch ops, the same formulas
        self._kernels = lstm_kernels() if self.device.type == "cpu" and \
            self.shape.gaussians <= 64 else None
        self.batch = 0

    # -- state ---------------------------------------------------------------------------

    @property
    def hidden(self) -> torch.Tensor:
        return self.h

    @property
    def cell(self) -> torch.Tensor:
        return self.c

    @torch.no_grad()
    def reset(self, seeds: np.ndarray | list[int]) -> torch.Tensor:
        """Start one dream per seed (the batch size is len(seeds)); returns z (B, z)."""
        seeds = np.asarray(seeds, dtype=np.int64).reshape(-1)
        if len(seeds) == 0:
            raise WmlabError("a dream batch needs at least one seed")
        b, z_dim, hidden = len(seeds), self.shape.z_dim, self.shape.hidden
        self.batch = b
        self.z = torch.zeros(b, z_dim, device=self.device)
        self.h = torch.zeros(b, hidden, device=self.device)
        self.c = torch.zeros(b, hidden, device=self.device)
        self.restart = torch.zeros(b, device=self.device)
        self.done = torch.zeros(b, dtype=torch.bool, device=self.device)
        self.terminated = torch.zeros(b, dtype=torch.bool, device=self.device)
        self.returns = torch.zeros(b, device=self.device)
        self.t = np.zeros(b, dtype=np.int64)
        self.seeds = seeds.copy()
        self._rngs: list[np.random.Generator] = [None] * b  # type: ignore[list-item]
        self._mask_rngs: list[np.random.Generator] = [None] * b  # type: ignore[list-item]
        self._uniform = torch.zeros(b, self.block, z_dim, device=self.device)
        self._normal = torch.zeros(b, self.block, z_dim, device=self.device)
        self._done_uniform = torch.zeros(b, self.block, device=self.device)
        # the units of h that reach the head, per dream and step of the block (bool: a
        # quarter of float32's memory, 32 MB for 1,024 Doom dreams)
        self._keep = torch.zeros(b, self.block, hidden, dtype=torch.bool, device=self.device) \
            if self.dropout > 0.0 else None
        self.reset_rows(np.arange(b), seeds)
        return self.z

    @torch.no_grad()
    def reset_rows(self, rows: np.ndarray, seeds: np.ndarray) -> None:
        """Restart the dreams at ``rows`` with new seeds; the others are untouched."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        seeds = np.asarray(seeds, dtype=np.int64).reshape(-1)
        if len(rows) == 0:
            return
        if (seeds < 0).any():
            raise WmlabError(f"dream seeds must be non-negative, got {int(seeds.min())}")
        picks, eps = [], []
        for row, seed in zip(rows, seeds, strict=True):
            rng = _row_rng(seed)
            picks.append(int(rng.integers(len(self.start.mu))))
            eps.append(rng.standard_normal(self.shape.z_dim).astype(np.float32))
            self._rngs[row] = rng
            if self._keep is not None:
                self._mask_rngs[row] = _mask_rng(seed)
            self.seeds[row] = seed
        index = torch.as_tensor(rows, device=self.device)
        pick = torch.as_tensor(picks, device=self.device)
        noise = torch.as_tensor(np.stack(eps), device=self.device)
        mu, logvar = self.start.mu[pick], self.start.logvar[pick]
        self.z[index] = mu + torch.exp(0.5 * logvar) * noise
        self.h[index] = 0.0
        self.c[index] = 0.0
        self.restart[index] = 1.0
        self.done[index] = False
        self.terminated[index] = False
        self.returns[index] = 0.0
        self.t[rows] = 0
        self._refill(rows)

    def _refill(self, rows: np.ndarray) -> None:
        """The next block of (uniform, normal) noise, and of dropout masks where the dream
        has them, of each dream in ``rows``."""
        shape = (self.block, self.shape.z_dim)
        uniform = np.stack([self._rngs[r].random(shape, dtype=np.float32) for r in rows])
        normal = np.stack([self._rngs[r].standard_normal(shape, dtype=np.float32)
                           for r in rows])
        index = torch.as_tensor(rows, device=self.device)
        self._uniform[index] = torch.as_tensor(uniform, device=self.device)
        self._normal[index] = torch.as_tensor(normal, device=self.device)
        if self.done_mode == "sample":  # drawn last, so threshold dreams keep their streams
            done_uniform = np.stack([self._rngs[r].random(self.block, dtype=np.float32)
                                     for r in rows])
            self._done_uniform[index] = torch.as_tensor(done_uniform, device=self.device)
        if self._keep is not None:
            shape = (self.block, self.shape.hidden)
            keep = np.stack([self._mask_rngs[r].random(shape, dtype=np.float32)
                             >= self.dropout for r in rows])
            self._keep[index] = torch.as_tensor(keep, device=self.device)

    # -- stepping ------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, actions: torch.Tensor | np.ndarray, active: np.ndarray | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Advance every running dream with ``actions`` (B, A): returns z', reward, done.

        Finished dreams (and rows where ``active`` is False) are frozen: z, state and step
        count stay, reward 0. ``done`` is True for every dream that has finished.
        """
        if self.batch == 0:
            raise WmlabError("call reset(seeds) before stepping the dream")
        actions = torch.as_tensor(actions, device=self.device, dtype=torch.float32)
        actions = actions.reshape(self.batch, -1)
        if actions.shape[1] != self.shape.action_dim:
            raise WmlabError(f"dream actions have {actions.shape[1]} values per dream but M "
                             f"takes {self.shape.action_dim}")
        running = ~self.done
        if active is not None:
            running = running & torch.as_tensor(np.asarray(active, bool), device=self.device)
        reward = torch.zeros_like(self.returns)
        died = torch.zeros_like(self.done)
        # every dream running (most of a generation's early steps): no gathers or scatters
        if bool(running.all()):
            h, c, next_z, out, flat, ended = self._advance(actions, None)
            self.h, self.c, self.z = h, c, next_z
            reward = out.reward.clone() if out.reward is not None else \
                torch.full_like(self.returns, self.alive_reward)
            self.restart = torch.zeros_like(self.restart)
            if out.done_logit is not None:
                died = ended if ended is not None else self._died(out.done_logit, flat)
        elif bool(running.any()):
            rows = self._rows_to_step(running)
            h, c, next_z, out, flat, ended = self._advance(actions, rows)
            kept = torch.nonzero(running.index_select(0, rows)).squeeze(1)
            written = rows.index_select(0, kept)

            def kept_rows(tensor: torch.Tensor) -> torch.Tensor:
                return tensor.index_select(0, kept)

            # new tensors (index_copy, not in place): callers may hold z, h or c of a step
            self.h = self.h.index_copy(0, written, kept_rows(h))
            self.c = self.c.index_copy(0, written, kept_rows(c))
            self.z = self.z.index_copy(0, written, kept_rows(next_z))
            self.restart = self.restart.index_fill(0, written, 0.0)
            if out.reward is not None:
                reward.index_copy_(0, written, kept_rows(out.reward))
            else:
                reward.index_fill_(0, written, self.alive_reward)
            if out.done_logit is not None:
                ended = ended if ended is not None else self._died(out.done_logit, flat)
                died.index_copy_(0, written, kept_rows(ended))
        self.returns += reward

        ran = running.cpu().numpy()
        self.t += ran
        capped = torch.as_tensor(self.t >= self.max_steps, device=self.device)
        self.terminated |= died
        self.done |= died | (running & capped)
        refill = np.flatnonzero(ran & (self.t % self.block == 0) & ~self.done.cpu().numpy())
        if len(refill):
            self._refill(refill)
        return self.z, reward, self.done

    def _rows_to_step(self, running: torch.Tensor) -> torch.Tensor:
        """Only the running dreams are computed: a population's dreams end at very different
        times (a few hundred steps to the 2,100 cap), and a full-width step for the last
        survivors would spend most of its matmuls on frozen rows."""
        if not self.compact:  # the naive full-width step, kept for `wmlab bench controller`
            return torch.arange(self.batch, device=self.device)
        rows = torch.nonzero(running).squeeze(1)
        if len(rows) % COMPACT_ROUND:
            # a few frozen rows ride along (computed, not written) so that the matmuls see
            # few distinct batch sizes: oneDNN builds a kernel for each new shape
            extra = COMPACT_ROUND - len(rows) % COMPACT_ROUND
            rows = torch.cat([rows, torch.nonzero(~running).squeeze(1)[:extra]])
        return rows

    def _advance(self, actions: torch.Tensor, rows: torch.Tensor | None):
        """One LSTM step and the next z for the dreams at ``rows`` (None: all of them):
        (h, c, z', out, flat, died), ``flat`` the dreams' rows of the flattened noise,
        ``died`` the ends drawn by the C kernel (None: draw them with ``_died``)."""
        def take(tensor: torch.Tensor) -> torch.Tensor:
            # index_select: ~5x faster than tensor[rows] for these row gathers
            return tensor if rows is None else tensor.index_select(0, rows)

        parts = [take(self.z), take(actions)]
        if self.shape.restart_input:
            parts.append(take(self.restart).unsqueeze(1))
        parts.append(take(self.h))
        x = torch.cat(parts, 1).to(self.dtype)
        # each dream's place in its noise block, as rows of the flattened (B * block) noise
        pos = torch.as_tensor(self.t % self.block, device=self.device)
        flat = torch.arange(self.batch, device=self.device) * self.block + pos
        flat = take(flat)
        if self._kernels is not None:
            return self._advance_native(self._gates(x), take(self.c), flat)
        gates = self._gates(x).float()
        hidden = self.shape.hidden
        # gate order i, f, g, o: one sigmoid over i and f together
        in_forget = torch.sigmoid(gates[:, :2 * hidden])
        i, f = in_forget.chunk(2, 1)
        c = torch.addcmul(f * take(self.c), i, tanh(gates[:, 2 * hidden:3 * hidden]))
        h = torch.sigmoid(gates[:, 3 * hidden:]).mul_(tanh(c))
        out = self.model.split_output(self._head(self._head_input(h, flat)).float())
        z_dim = self.shape.z_dim
        next_z = select_and_sample(out, self.tau,
                                   self._uniform.view(-1, z_dim).index_select(0, flat),
                                   self._normal.view(-1, z_dim).index_select(0, flat))
        return h, c, next_z, out, flat, None

    def _advance_native(self, gates: torch.Tensor, c_prev: torch.Tensor, flat: torch.Tensor):
        """``_advance`` after the gates' matmul, with the cell, the draw of z' and of the
        dream's end each one C call over the rows (same formulas, float32)."""
        lib, s = self._kernels, self.shape
        rows, hidden = gates.shape[0], s.hidden
        gates, c_prev = gates.contiguous(), c_prev.float().contiguous()
        low = int(self.dtype == torch.bfloat16)
        c = torch.empty(rows, hidden)
        h = torch.empty(rows, hidden)
        h_low = torch.empty(rows, hidden, dtype=self.dtype)
        scratch = torch.empty(max(9 * hidden, s.output_size))
        lib.dream_lstm_step(rows, hidden, gates.data_ptr(), int(gates.dtype == torch.bfloat16),
                            c_prev.data_ptr(), c.data_ptr(), h.data_ptr(), h_low.data_ptr(),
                            low, scratch.data_ptr())
        # with dropout, the head's input as the PyTorch path makes it (from float32 h)
        head = self._head(h_low if self._keep is None else self._head_input(h, flat))
        head = head.contiguous()
        next_z = torch.empty(rows, s.z_dim)
        died = torch.zeros(rows, dtype=torch.bool)
        flat = flat.to(torch.int64).contiguous()
        done_column = 3 * s.z_dim * s.gaussians if s.done_head else -1
        lib.dream_sample(rows, s.z_dim, s.gaussians, head.shape[1], head.data_ptr(),
                         int(head.dtype == torch.bfloat16), self.tau,
                         self._uniform.data_ptr(), self._normal.data_ptr(), flat.data_ptr(),
                         next_z.data_ptr(), done_column, int(self.done_mode == "sample"),
                         self.done_shift, self.done_bias, self._done_uniform.data_ptr(),
                         died.data_ptr(), scratch.data_ptr())
        out = self.model.split_output(head.float())
        return h, c, next_z, out, flat, died if s.done_head else None

    def _head_input(self, h: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """h (rows, H) float32 as the head reads it, in the matmuls' dtype: with dropout, each
        dream's mask of this step (at ``flat``, its row of the flattened (B * block) masks)
        applied and the kept units scaled in float32, before any rounding to bf16."""
        if self._keep is not None:
            keep = self._keep.view(-1, self.shape.hidden).index_select(0, flat)
            h = inverted_dropout(h, keep, self.dropout)
        return h.to(self.dtype)

    def _died(self, done_logit: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """threshold: the original's rule, done when the logit > 0 (probability > 0.5 under
        the weighted loss); sample: done with M's (unweighted) probability, drawn from each
        dream's noise at ``flat`` (rows of the flattened (B * block) noise)."""
        if self.done_mode == "threshold":
            return done_logit + self.done_bias > 0
        probability = torch.sigmoid(done_logit.float() - self.done_shift + self.done_bias)
        return self._done_uniform.view(-1).index_select(0, flat) < probability

    @torch.no_grad()
    def rollout(self, policy: Callable[[BatchedDream], torch.Tensor], seeds: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
        """Run one dream per seed to its end under ``policy(dream) -> actions (B, A)``;
        returns (returns, lengths) as numpy arrays."""
        self.reset(seeds)
        while not bool(self.done.all()):
            self.step(policy(self))
        return self.returns.cpu().numpy(), self.t.copy()
