"""M's look-ahead as C's shield: before the agent's move is taken in the real env, M dreams
a few steps ahead from the agent's own state, once under C (acting in the dream, closed
loop) and once under each of the env's moves held; where C's move is clearly riskier than
the safest hold, that hold is taken instead for a few steps.

Why: in DoomTakeCover M's dream knows which move dodges a fireball (branched 15 steps before
real hits, the move the dream finds safest is hit in the game 15% of the time, a random move
54%), but a linear C on [z, c, h] cannot compute that ranking. The dream can, at acting time.
C is trained as before; the shield only changes how the agent acts.

A candidate move is held for ``hold`` dream steps, then C acts for the rest of the window: with
``hold`` equal to ``period`` the dream plays the plan the agent would follow (a hold lasts
``period`` env steps before C acts again); ``hold`` 0 holds the move for the whole window.

Risk of a candidate: the chance that M ends the episode within ``window`` dream steps,
1 - prod_t (1 - p_t) with p_t M's end probability (its done head with the training weight
undone), averaged over ``samples`` dreams. Every candidate's dream i draws the same noise, so
a difference between candidates is one of moves, not of luck. An env's noise comes from a
generator keyed by its episode's seed: an episode still depends on its seed alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from wmlab.dream.settings import DreamSettings
from wmlab.errors import WmlabError
from wmlab.memory.model import MDNRNN, select_and_sample

# C's moves for look-ahead rows: (z, h, c, restart, env of each row, dream step) -> (rows, A)
MoveFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray, int],
                  torch.Tensor]


@dataclass(frozen=True)
class ShieldSettings:
    """How far and how often M looks ahead, and how sure it must be to overrule C."""

    window: int  # dream steps looked ahead
    samples: int  # dreams per candidate
    period: int  # env steps between looks; an overruling hold lasts this long
    margin: float  # C is overruled where its risk exceeds the safest hold's by more
    tau: float  # the dream's temperature
    done_shift: float  # the done logit's offset from the log-odds (DreamSettings.done_shift)
    hold: int = 0  # dream steps a candidate move is held before C acts; 0: the whole window

    def __post_init__(self) -> None:
        if self.window < 1 or self.samples < 1 or self.period < 1:
            raise WmlabError(f"shield: window, samples and period must be >= 1, got "
                             f"{self.window}, {self.samples}, {self.period}")
        if self.hold < 0:
            raise WmlabError(f"shield.hold: dream steps a move is held before C acts again, "
                             f">= 0 (0: the whole window); got {self.hold}")
        if not 0.0 <= self.margin <= 1.0:
            raise WmlabError(f"shield.margin is a difference of probabilities, in [0, 1]; got "
                             f"{self.margin}")

    @classmethod
    def from_config(cls, cfg: Any) -> ShieldSettings | None:
        """The [shield] section as the agent uses it, or None where shield.window is 0
        (off): the look-ahead dreams at the dream's temperature, with M's done weight undone."""
        s = cfg.shield
        if s.window == 0:
            return None
        dream = DreamSettings.from_config(cfg)
        return cls(window=s.window, samples=s.samples, period=s.period, margin=s.margin,
                   tau=dream.tau, done_shift=dream.done_shift, hold=s.hold)

    @property
    def release(self) -> int:
        """The dream step from which C acts in every candidate's dream."""
        return self.hold if 0 < self.hold < self.window else self.window


@torch.no_grad()
def look_ahead_risks(model: MDNRNN, settings: ShieldSettings, c_moves: MoveFn | None,
                     holds: torch.Tensor, envs: np.ndarray, z: torch.Tensor, h: torch.Tensor,
                     c: torch.Tensor, restart: torch.Tensor, uniform: torch.Tensor,
                     normal: torch.Tensor, c_candidate: bool = True) -> torch.Tensor:
    """(E, [1 +] K) risks for E agents in state (z, h, c, restart) (each (E, .)): under C
    first (where ``c_candidate``), then under each of the K ``holds`` (action vectors as
    M reads them, (K, A)), each held ``settings.hold`` steps and C's afterwards.
    ``uniform`` and ``normal``: (E, window, samples, z) noise of each agent's dreams;
    ``envs``: the agents' env indices, passed on to ``c_moves`` (C's moves; None only where
    C is no candidate and the holds last the whole window)."""
    release = settings.release
    if c_moves is None and (c_candidate or release < settings.window):
        raise ValueError("look_ahead_risks: C's moves are needed where C is a candidate or "
                         "a hold gives way to C")
    e, n = len(z), settings.samples
    # every candidate's move as a row (C's: a placeholder, replaced by C's move each step)
    moves = torch.cat([holds.new_zeros((1, holds.shape[1])), holds]).float() \
        if c_candidate else holds.float()
    k = len(moves)
    # rows ordered (agent, candidate, sample)
    def spread(x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(k * n, dim=0)

    zz, hh, cc, rr = spread(z), spread(h), spread(c), spread(restart.reshape(e, 1))
    held = moves.repeat_interleave(n, dim=0).repeat(e, 1)  # (e * k * n, A)
    c_rows = (torch.arange(e).unsqueeze(1) * k * n + torch.arange(n)).reshape(-1)
    c_envs, row_envs = np.repeat(envs, n), np.repeat(envs, k * n)
    survive = torch.ones(len(zz))
    for t in range(settings.window):
        if t >= release:  # every hold has given way: C acts in all the dreams
            actions = c_moves(zz, hh, cc, rr, row_envs, t).float()
        elif c_candidate:
            actions = held.clone()
            actions[c_rows] = c_moves(zz[c_rows], hh[c_rows], cc[c_rows], rr[c_rows], c_envs,
                                      t).float()
        else:
            actions = held
        hh, cc = model.advance(zz, actions, rr, hh, cc)
        rr = torch.zeros_like(rr)
        out = model.split_output(model.head(hh))
        survive *= 1.0 - torch.sigmoid(out.done_logit.float() - settings.done_shift)
        # sample i of every candidate of an agent draws that agent's noise i
        u = uniform[:, t].unsqueeze(1).expand(e, k, n, -1).reshape(len(zz), -1)
        g = normal[:, t].unsqueeze(1).expand(e, k, n, -1).reshape(len(zz), -1)
        zz = select_and_sample(out, settings.tau, u, g)
    return (1.0 - survive).reshape(e, k, n).mean(2)


class Shield:
    """Per env: when it next looks ahead, the hold it keeps meanwhile (or none: C acts), and
    the generator of its dreams' noise."""

    def __init__(self, model: MDNRNN, settings: ShieldSettings, holds: torch.Tensor,
                 hold_actions: np.ndarray, num_envs: int) -> None:
        self.model, self.settings = model, settings
        self.holds = holds  # (K, A): each env action as M reads it
        self.hold_actions = np.asarray(hold_actions, dtype=np.int64)  # (K,) the env actions
        self.countdown = np.zeros(num_envs, dtype=np.int64)
        self.held = np.full(num_envs, -1, dtype=np.int64)  # index into holds; -1: C acts
        self.rngs = [np.random.default_rng([0, 5817]) for _ in range(num_envs)]
        self.overrules = np.zeros(num_envs, dtype=np.int64)  # this episode's, per env

    def reset(self, env: int, seed: int) -> None:
        self.rngs[env] = np.random.default_rng([int(seed), 5817])
        self.countdown[env], self.held[env], self.overrules[env] = 0, -1, 0

    def guard(self, proposed: np.ndarray, c_moves: MoveFn, z: torch.Tensor, h: torch.Tensor,
              c: torch.Tensor, restart: torch.Tensor, running: np.ndarray | None
              ) -> np.ndarray:
        """The env actions to take: C's ``proposed`` ones, or a hold where M, looking ahead
        now or at the last look, found C's riskier by more than the margin."""
        live = np.ones(len(proposed), bool) if running is None else np.asarray(running, bool)
        due = np.flatnonzero(live & (self.countdown <= 0))
        if len(due):
            s, z_dim = self.settings, self.model.shape.z_dim
            shape = (s.window, s.samples, z_dim)
            uniform = np.stack([self.rngs[i].random(shape, dtype=np.float32) for i in due])
            normal = np.stack([self.rngs[i].standard_normal(shape, dtype=np.float32)
                               for i in due])
            state = [x.index_select(0, torch.as_tensor(due))
                     for x in (z, h, c, restart.reshape(len(proposed), -1))]
            noise = torch.from_numpy(uniform), torch.from_numpy(normal)
            c_risk = look_ahead_risks(self.model, s, c_moves, self.holds[:0], due, *state,
                                      *noise)[:, 0].numpy()
            # only where C's own risk exceeds the margin can a hold be safer by more: the
            # holds are dreamt there alone (on the same noise), most looks cost one dream
            self.held[due] = -1
            risky = np.flatnonzero(c_risk > s.margin)
            if len(risky):
                rows = torch.as_tensor(risky)
                hold_risk = look_ahead_risks(self.model, s, c_moves, self.holds, due[risky],
                                             *[x.index_select(0, rows) for x in state],
                                             *[x.index_select(0, rows) for x in noise],
                                             c_candidate=False).numpy()
                overrule = c_risk[risky] - hold_risk.min(1) > s.margin
                self.held[due[risky]] = np.where(overrule, hold_risk.argmin(1), -1)
                self.overrules[due[risky]] += overrule
            self.countdown[due] = s.period
        actions = np.asarray(proposed).copy()
        kept = live & (self.held >= 0)
        actions[kept] = self.hold_actions[self.held[kept]]
        self.countdown[live] -= 1
        return actions
