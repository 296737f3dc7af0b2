"""The dream: M run as an environment, for B dreams at once as one tensor program.

A dream starts from a stored first-frame (mu, logvar), sampled, with the LSTM state zeroed
and the restart flag set. Each step M advances on [z, action, restart], the next z is
sampled at temperature tau, the episode ends when the done logit is positive or at the step
cap, and the reward is +1 per step (Doom) or M's predicted reward where it has that head.

Randomness is drawn per *dream seed*, not per batch position: the noise of step t for the
dream with seed s comes from a generator keyed by (s, t)-independent blocks (see
``_NoiseSource``), so a dream's trajectory depends only on its seed and its controller,
whichever batch or worker runs it. That is what lets members i and i + P/2 share rollouts
(antithetic seeds) and makes every evaluation engine agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from wmlab.memory.model import MDNRNN, LstmState, MdrnnOutput


@dataclass
class DreamStart:
    """The first-frame latent distributions dreams start from."""

    mu: torch.Tensor  # (N, z)
    logvar: torch.Tensor  # (N, z)


class _NoiseSource:
    """Per-seed random streams for a batch of dreams, drawn in blocks of steps.

    Each distinct seed owns a numpy generator; every ``block`` steps it fills that seed's
    next block of uniforms (component choice) and normals (the Gaussian draw). Dreams
    sharing a seed read the same numbers, and a seed's numbers never depend on the others.
    """

    def __init__(self, seeds: np.ndarray, z_dim: int, block: int = 64) -> None:
        self.unique, self.index = np.unique(np.asarray(seeds, dtype=np.int64),
                                            return_inverse=True)
        self.z_dim, self.block = z_dim, block
        self.rngs = [np.random.default_rng([int(s), 77]) for s in self.unique]
        self._uniform = self._normal = None
        self._start = None

    def start_index(self, count: int) -> np.ndarray:
        """Which stored start each dream uses (drawn from its seed's own stream)."""
        return np.array([np.random.default_rng([int(s), 13]).integers(count)
                         for s in self.unique])[self.index]

    def start_noise(self) -> np.ndarray:
        return np.stack([np.random.default_rng([int(s), 29]).standard_normal(self.z_dim)
                         for s in self.unique])[self.index]

    def step(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(uniform (B, z), normal (B, z)) for each dream at its own step t."""
        needed = int(t.max()) // self.block
        if self._start is None or needed >= len(self._uniform):
            self._extend(needed + 1)
        uniform = self._uniform[t // self.block, self.index, t % self.block]
        normal = self._normal[t // self.block, self.index, t % self.block]
        return uniform, normal

    def _extend(self, blocks: int) -> None:
        have = 0 if self._uniform is None else len(self._uniform)
        shape = (len(self.unique), self.block, self.z_dim)
        new_u = np.empty((blocks - have, *shape), np.float32)
        new_n = np.empty((blocks - have, *shape), np.float32)
        for b in range(blocks - have):
            for i, rng in enumerate(self.rngs):
                new_u[b, i] = rng.random((self.block, self.z_dim), dtype=np.float32)
                new_n[b, i] = rng.standard_normal((self.block, self.z_dim), dtype=np.float32)
        self._uniform = new_u if have == 0 else np.concatenate([self._uniform, new_u])
        self._normal = new_n if have == 0 else np.concatenate([self._normal, new_n])
        self._start = True


def sample_with_noise(out: MdrnnOutput, tau: float, uniform: torch.Tensor,
                      normal: torch.Tensor) -> torch.Tensor:
    """``sample_next_z`` with given noise: the component by inverse CDF of softmax(logits/tau),
    then mean + sigma * sqrt(tau) * normal."""
    probs = torch.softmax(out.logits.float() / max(tau, 1e-6), dim=-1)
    cdf = probs.cumsum(-1)
    component = (uniform.unsqueeze(-1) > cdf).sum(-1, keepdim=True).clamp(max=probs.shape[-1] - 1)
    mean = out.means.gather(-1, component).squeeze(-1)
    sigma = out.log_sigmas.gather(-1, component).squeeze(-1).exp()
    return mean + sigma * (tau ** 0.5) * normal


class BatchedDream:
    """B dreams stepped together; finished dreams restart independently when asked."""

    def __init__(self, model: MDNRNN, start: DreamStart, tau: float, max_steps: int,
                 device: torch.device | str = "cpu") -> None:
        self.model = model.eval()
        self.start = DreamStart(start.mu.to(device), start.logvar.to(device))
        self.tau, self.max_steps = tau, max_steps
        self.device = torch.device(device)
        self.z: torch.Tensor | None = None
        self.state: LstmState | None = None

    @property
    def hidden(self) -> torch.Tensor:
        return self.state[0][0]

    @property
    def cell(self) -> torch.Tensor:
        return self.state[1][0]

    @torch.no_grad()
    def reset(self, seeds: np.ndarray) -> torch.Tensor:
        """Start one dream per seed; returns z (B, z)."""
        seeds = np.asarray(seeds)
        self.noise = _NoiseSource(seeds, self.model.shape.z_dim)
        picks = torch.as_tensor(self.noise.start_index(len(self.start.mu)), device=self.device)
        eps = torch.as_tensor(self.noise.start_noise(), device=self.device)
        mu, logvar = self.start.mu[picks], self.start.logvar[picks]
        self.z = mu + torch.exp(0.5 * logvar) * eps
        self.state = self.model.initial_state(len(seeds), self.device)
        self.t = np.zeros(len(seeds), dtype=np.int64)
        self.restart = torch.ones(len(seeds), device=self.device)
        self.done = torch.zeros(len(seeds), dtype=torch.bool, device=self.device)
        self.returns = torch.zeros(len(seeds), device=self.device)
        return self.z

    @torch.no_grad()
    def step(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Advance every running dream with ``actions`` (B, A): returns z', reward, done.

        Finished dreams are frozen (their z and state stop changing, reward 0) until the
        batch is reset, so one call per step serves a whole population.
        """
        restart = self.restart.unsqueeze(1) if self.model.shape.restart_input else None
        out, _, new_state = self.model(self.z.unsqueeze(1), actions.unsqueeze(1).float(),
                                       restart=restart, state=self.state)
        out = MdrnnOutput(*(None if v is None else v[:, 0] for v in
                            (out.logits, out.means, out.log_sigmas, out.done_logit,
                             out.reward)))
        uniform, normal = self.noise.step(self.t)
        next_z = sample_with_noise(out, self.tau,
                                   torch.as_tensor(uniform, device=self.device),
                                   torch.as_tensor(normal, device=self.device))
        running = ~self.done
        reward = out.reward if out.reward is not None else torch.ones_like(self.returns)
        reward = torch.where(running, reward, torch.zeros_like(reward))
        self.t = self.t + running.cpu().numpy()
        ended = torch.as_tensor(self.t >= self.max_steps, device=self.device)
        if out.done_logit is not None:
            ended = ended | (out.done_logit > 0)
        keep = running.view(1, -1, 1)
        self.state = (torch.where(keep, new_state[0], self.state[0]),
                      torch.where(keep, new_state[1], self.state[1]))
        self.z = torch.where(running.unsqueeze(1), next_z, self.z)
        self.returns += reward
        self.done = self.done | (running & ended)
        self.restart = torch.zeros_like(self.restart)
        return self.z, reward, self.done
