"""A dream of several Ms at once (``mdrnn.ensemble``): what one M gets wrong, the others
are unlikely to get wrong the same way.

A controller trained in one M's dream learns that M's errors: on Doom its dream survival
rises generation after generation while its real survival stays flat (docs/results/doom.md).
Here K Ms, trained on the same data from different seeds, step side by side on the same z
and the same actions. The dream ends when *any* of them says the episode ends (each
draws its end from the same uniform, so in ``sample`` mode the hazard is the largest of
theirs), the next z comes from each M in turn (step t from M t mod K), and the reward is
their mean, or under ``ensemble_reward = "min"`` the least of them (a reward only some Ms
predict is not paid: C cannot climb by one M's optimism). C reads the first M's state, the
M it acts with in the real game.

Every M is a ``BatchedDream`` with the dream's seeds, so each has the noise a lone dream
of those seeds would have: a dream still depends only on its seed and its actions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from wmlab.dream.batched import BatchedDream
from wmlab.dream.settings import DreamSettings
from wmlab.errors import WmlabError
from wmlab.memory.model import MDNRNN, DreamStart


class EnsembleDream:
    """B dreams stepped by K Ms together; the state C reads is the first M's."""

    def __init__(self, models: Sequence[MDNRNN], start: DreamStart,
                 settings: DreamSettings, device: torch.device | str = "cpu") -> None:
        if not models:
            raise WmlabError("an ensemble dream needs at least one M")
        shapes = {(m.shape.z_dim, m.shape.action_dim, m.shape.restart_input) for m in models}
        if len(shapes) > 1:
            raise WmlabError("the Ms of an ensemble must take the same z, actions and restart "
                             "flag: train them in one run (mdrnn.ensemble)")
        self.dreams = [BatchedDream(m, start, settings, device) for m in models]
        self.pessimistic = settings.ensemble_reward == "min"
        self.returns = torch.zeros(0)  # under "min": the least rewards summed, per dream

    @property
    def compact(self) -> bool:
        return self.dreams[0].compact

    @compact.setter
    def compact(self, value: bool) -> None:
        for dream in self.dreams:
            dream.compact = value

    @property
    def hidden(self) -> torch.Tensor:
        return self.dreams[0].hidden

    @property
    def cell(self) -> torch.Tensor:
        return self.dreams[0].cell

    @property
    def restart(self) -> torch.Tensor:
        return self.dreams[0].restart

    @property
    def done(self) -> torch.Tensor:
        """Ended dreams: those that any M has ended (each M only knows its own ends)."""
        return torch.stack([dream.done for dream in self.dreams]).any(0)

    @property
    def batch(self) -> int:
        return self.dreams[0].batch

    @property
    def t(self) -> np.ndarray:
        """Each dream's steps so far (every M steps the same rows)."""
        return self.dreams[0].t

    @property
    def z(self) -> torch.Tensor:
        return self.dreams[0].z

    @torch.no_grad()
    def reset(self, seeds: np.ndarray | list[int]) -> torch.Tensor:
        """Start one dream per seed in every M (the same start z); returns z (B, z)."""
        z = [dream.reset(seeds) for dream in self.dreams][0]
        self.returns = torch.zeros_like(self.dreams[0].returns)
        return z

    @torch.no_grad()
    def step(self, actions: torch.Tensor | np.ndarray
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Advance every running dream in every M: returns z', reward, done (as one dream).

        Every M steps exactly the running dreams, so their step counts stay equal and a
        dream's return is the mean of the Ms' returns (or, under "min", the sum of each
        step's least reward)."""
        running = self.done.logical_not()
        # the next z of dream b from M number t mod K (t counted before this step)
        source = torch.as_tensor(self.dreams[0].t % len(self.dreams), device=running.device)
        active = running.cpu().numpy()
        rewards = [dream.step(actions, active)[1] for dream in self.dreams]
        chosen = torch.stack([dream.z for dream in self.dreams]).gather(
            0, source.view(1, -1, 1).expand(1, -1, self.dreams[0].z.shape[1]))[0]
        z = torch.where(running.unsqueeze(1), chosen, self.dreams[0].z)
        for dream in self.dreams:  # every M goes on from the same z
            dream.z = z.clone()
        stacked = torch.stack(rewards)
        if not self.pessimistic:
            return z, stacked.mean(0), self.done
        least = stacked.min(0).values  # every M pays 0 on the dreams that have ended
        self.returns += least
        return z, least, self.done

    @torch.no_grad()
    def rollout(self, policy: Callable[[EnsembleDream], torch.Tensor], seeds: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
        """Run one dream per seed to its end under ``policy(dream) -> actions (B, A)``;
        returns (returns, lengths) as numpy arrays (``BatchedDream.rollout``'s contract)."""
        self.reset(seeds)
        while not bool(self.done.all()):
            self.step(policy(self))
        returns = self.returns if self.pessimistic else \
            torch.stack([dream.returns for dream in self.dreams]).mean(0)
        return returns.cpu().numpy(), self.dreams[0].t.copy()
