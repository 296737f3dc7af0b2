"""Random policies that collect the data V and M learn from, and bin packing's heuristics
(``HeuristicPolicy``: they read the env's state, mixed with random valid moves).

Every policy emits *raw controller outputs* in [-1, 1]^k, the same space a trained
controller C produces; the env's spec maps them to env actions (CarRacing's gas/brake
transform, Doom's thresholds). So collection, evaluation and the dream share one action path.

Policies act for a batch of B env slots at once but keep one generator per slot, seeded per
episode: an episode's actions depend only on its own policy seed, never on which slot or
worker ran it, which makes collection reproducible whatever the parallelism.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from wmlab.config import SWEEP_FIRST, SWEEP_PERIOD
from wmlab.envs.binpacking import BinPackingEnv, valid_mask
from wmlab.envs.binpacking_heuristics import heuristic_rule
from wmlab.errors import WmlabError

POLICY_NAMES = ("uniform", "brown", "held", "random-weights", "fixed", "sweeps")  # collection
AGENT_POLICY = "agent"  # a trained run's V, M and C (wmlab.agent.AgentPolicy, via collect)


@dataclass(frozen=True)
class PolicyConfig:
    name: str = "uniform"
    brown_sigma: float = 0.2
    hold_min: int = 1
    hold_max: int = 10
    weights_scale: float = 0.01
    agent_run: str = ""  # policy "agent": the run directory whose trained V, M and C act
    explore: float = 0.0  # a heuristic's, the sweeps' or the agent's: share of random moves
    explore_hold: int = 1  # the agent's: steps an exploring move is held
    explore_outputs: tuple[int, ...] = ()  # the agent's: outputs an exploring move replaces
    sweep_first: int = SWEEP_FIRST  # sweep: steps at -1 first
    sweep_period: int = SWEEP_PERIOD  # sweep: steps at +1, then at -1, in turn


class BatchPolicy:
    """Base: per-slot generators; subclasses fill ``_act_slot``."""

    def __init__(self, num_envs: int, outputs: int, config: PolicyConfig) -> None:
        self.num_envs = num_envs
        self.outputs = outputs
        self.config = config
        self._rngs = [np.random.default_rng(0) for _ in range(num_envs)]

    def reset(self, slot: int, seed: int) -> None:
        """Start a new episode in ``slot`` whose actions depend only on ``seed``."""
        self._rngs[slot] = np.random.default_rng(seed)
        self._reset_slot(slot)

    def act(self, frames: np.ndarray) -> np.ndarray:
        """(B, 64, 64, 3) uint8 frames -> (B, k) raw outputs in [-1, 1]."""
        out = np.empty((self.num_envs, self.outputs), dtype=np.float32)
        for slot in range(self.num_envs):
            out[slot] = self._act_slot(slot, frames[slot])
        return out

    def _reset_slot(self, slot: int) -> None:
        pass

    def _act_slot(self, slot: int, frame: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class UniformPolicy(BatchPolicy):
    """A fresh uniform draw every step."""

    def _act_slot(self, slot: int, frame: np.ndarray) -> np.ndarray:
        return self._rngs[slot].uniform(-1.0, 1.0, self.outputs)


class BrownPolicy(BatchPolicy):
    """A clipped random walk: smooth steering and throttle, so the car actually travels."""

    def __init__(self, num_envs: int, outputs: int, config: PolicyConfig) -> None:
        super().__init__(num_envs, outputs, config)
        self._state = np.zeros((num_envs, outputs))

    def _reset_slot(self, slot: int) -> None:
        self._state[slot] = self._rngs[slot].uniform(-1.0, 1.0, self.outputs)

    def _act_slot(self, slot: int, frame: np.ndarray) -> np.ndarray:
        step = self._rngs[slot].normal(0.0, self.config.brown_sigma, self.outputs)
        self._state[slot] = np.clip(self._state[slot] + step, -1.0, 1.0)
        return self._state[slot]


class HeldPolicy(BatchPolicy):
    """A uniform action held for hold_min..hold_max frames (the Doom reference's data)."""

    def __init__(self, num_envs: int, outputs: int, config: PolicyConfig) -> None:
        super().__init__(num_envs, outputs, config)
        self._action = np.zeros((num_envs, outputs))
        self._left = np.zeros(num_envs, dtype=np.int64)

    def _reset_slot(self, slot: int) -> None:
        self._left[slot] = 0

    def _act_slot(self, slot: int, frame: np.ndarray) -> np.ndarray:
        if self._left[slot] == 0:
            rng = self._rngs[slot]
            self._action[slot] = rng.uniform(-1.0, 1.0, self.outputs)
            self._left[slot] = rng.integers(self.config.hold_min, self.config.hold_max + 1)
        self._left[slot] -= 1
        return self._action[slot]


class ConstantPolicy(BatchPolicy):
    """The same raw output every step: 0 everywhere (noop) or -1 on the first (left)."""

    def _act_slot(self, slot: int, frame: np.ndarray) -> np.ndarray:
        out = np.zeros(self.outputs, dtype=np.float32)
        if self.config.name == "left":
            out[0] = -1.0
        return out


def sweep_output(steps: np.ndarray, first: int = SWEEP_FIRST,
                 period: int = SWEEP_PERIOD) -> np.ndarray:
    """The sweep's first output at each of ``steps`` (steps into an episode): -1 for
    ``first`` steps, then +1 and -1 in turn for ``period`` steps each. One rule for the
    real-game policy and its twin in M's dream (``wmlab.dream.reference``)."""
    steps = np.asarray(steps, dtype=np.int64)
    turned = np.maximum(steps - first, 0) // period % 2 == 1
    return np.where((steps < first) | turned, -1.0, 1.0).astype(np.float32)


class SweepPolicy(BatchPolicy):
    """A sweep on a clock that reads nothing: the first output at -1 for ``sweep_first``
    steps, then at +1 and -1 in turn for ``sweep_period`` steps each, the others at 0.

    On DoomTakeCover that is left to the wall, then across the room and back, waiting a
    little at each wall (a crossing takes ~100 steps). The agents trained there run from
    wall to wall, and this policy, which never looks, survives as long as they do
    (docs/results/doom.md): the floor a C that dodges by sight has to beat.
    """

    def __init__(self, num_envs: int, outputs: int, config: PolicyConfig) -> None:
        super().__init__(num_envs, outputs, config)
        if config.sweep_first < 0 or config.sweep_period < 1:
            raise WmlabError(f"sweep policy needs sweep_first >= 0 and sweep_period >= 1, got "
                             f"{config.sweep_first} and {config.sweep_period}")
        self._steps = np.zeros(num_envs, dtype=np.int64)
        # each slot's clock: the config's here, drawn per episode by SweepsPolicy
        self._first = np.full(num_envs, config.sweep_first, dtype=np.int64)
        self._period = np.full(num_envs, config.sweep_period, dtype=np.int64)

    def _reset_slot(self, slot: int) -> None:
        self._steps[slot] = 0

    def _act_slot(self, slot: int, frame: np.ndarray) -> np.ndarray:
        step = self._steps[slot]
        self._steps[slot] += 1
        out = np.zeros(self.outputs, dtype=np.float32)
        out[0] = sweep_output(step, self._first[slot], self._period[slot])
        return out


class SweepsPolicy(SweepPolicy):
    """Sweeps on random clocks, for collection: each episode draws its own first leg
    (0..period steps) and period (half to one and a half times ``sweep_period``), and at
    each step, with probability ``explore``, a uniform output replaces the sweep's.

    Random data (held actions) rarely crosses the room or waits at a wall, so M cannot
    learn where a sweep leads, and its dream scores the sweep far below the game
    (docs/results/doom.md): these episodes show M the crossings and the walls at every
    time and place, and what a stray move in between does."""

    def _reset_slot(self, slot: int) -> None:
        super()._reset_slot(slot)
        rng, period = self._rngs[slot], self.config.sweep_period
        self._period[slot] = rng.integers(max(1, period // 2), period + period // 2 + 1)
        self._first[slot] = rng.integers(0, self._period[slot] + 1)

    def _act_slot(self, slot: int, frame: np.ndarray) -> np.ndarray:
        out = super()._act_slot(slot, frame)  # the clock advances on a stray step too
        rng = self._rngs[slot]
        if rng.random() < self.config.explore:
            return rng.uniform(-1.0, 1.0, self.outputs).astype(np.float32)
        return out


class FixedPolicy(BatchPolicy):
    """One fixed behaviour per episode, drawn from its seed: no-op (raw 0), or -1 or +1 on one
    output (Doom: always left, always right).

    The behaviours CMA-ES meets first (its search starts at the all-zero controller, a no-op)
    and the simplest it can settle on. Random data rarely holds one for long, so M can
    learn nothing of where they lead, and its dream may let them live far longer than the
    game does (docs/results/doom-quick.md): a share of such episodes shows M their end.
    """

    def __init__(self, num_envs: int, outputs: int, config: PolicyConfig) -> None:
        super().__init__(num_envs, outputs, config)
        self._action = np.zeros((num_envs, outputs), dtype=np.float32)

    def _reset_slot(self, slot: int) -> None:
        rng = self._rngs[slot]
        choice = int(rng.integers(0, 1 + 2 * self.outputs))  # noop, then -1/+1 per output
        self._action[slot] = 0.0
        if choice > 0:
            self._action[slot, (choice - 1) // 2] = -1.0 if choice % 2 else 1.0

    def _act_slot(self, slot: int, frame: np.ndarray) -> np.ndarray:
        return self._action[slot]


class RandomWeightsPolicy(BatchPolicy):
    """A controller with random weights, as the original CarRacing data were collected.

    The original drew C's weights from N(0, s) with s ~ U(0, 0.01) per episode and fed it the
    features of an untrained V and M. Before any V exists we use the frame itself, pooled to
    8x8x3 and centred, as those features: the behaviour is the same in kind (mostly gentle,
    observation-dependent actions that differ from episode to episode).
    """

    _features = 8 * 8 * 3

    def __init__(self, num_envs: int, outputs: int, config: PolicyConfig) -> None:
        super().__init__(num_envs, outputs, config)
        self._weights = np.zeros((num_envs, outputs, self._features + 1))

    def _reset_slot(self, slot: int) -> None:
        rng = self._rngs[slot]
        scale = rng.uniform(0.0, self.config.weights_scale)
        self._weights[slot] = rng.normal(0.0, scale, self._weights[slot].shape)

    def _act_slot(self, slot: int, frame: np.ndarray) -> np.ndarray:
        pooled = frame.reshape(8, 8, 8, 8, 3).mean(axis=(1, 3)) / 255.0 - 0.5
        features = np.append(pooled.ravel(), 1.0)
        return np.tanh(self._weights[slot] @ features)


def make_policy(config: PolicyConfig, num_envs: int, outputs: int) -> BatchPolicy:
    """A random (or fixed) policy; the trained agent's is ``wmlab.collect``'s to make."""
    classes = {"uniform": UniformPolicy, "brown": BrownPolicy, "held": HeldPolicy,
               "random-weights": RandomWeightsPolicy, "fixed": FixedPolicy,
               "noop": ConstantPolicy, "left": ConstantPolicy, "sweep": SweepPolicy,
               "sweeps": SweepsPolicy}
    if config.name not in classes:
        raise WmlabError(f"unknown policy '{config.name}': choose one of {', '.join(classes)}")
    if config.hold_min < 1 or config.hold_max < config.hold_min:
        raise WmlabError(f"held policy needs 1 <= hold_min <= hold_max, got "
                         f"{config.hold_min}..{config.hold_max}")
    return classes[config.name](num_envs, outputs, config)


class HeuristicPolicy(BatchPolicy):
    """A heuristic collecting bin packing episodes, mixed with random play: at each step a
    uniform valid move with probability ``explore``, else the heuristic's. M then sees the
    packings a good policy reaches (the uniform policy's data piles bags at the top levels
    only) and what follows a bad move there.

    It reads each env's state (``counts``, ``item``) rather than the frame: ``envs`` are the
    Gymnasium envs of the collection batch, slot by slot. The raw output is +1 for the chosen
    level and -1 elsewhere, so the spec's argmax gives that level."""

    def __init__(self, num_envs: int, outputs: int, config: PolicyConfig,
                 envs: Sequence) -> None:
        super().__init__(num_envs, outputs, config)
        self.rule = heuristic_rule(config.name)
        self.envs = [heuristic_env(env, config.name) for env in envs]

    def _act_slot(self, slot: int, frame: np.ndarray) -> np.ndarray:
        env, rng = self.envs[slot], self._rngs[slot]
        capacity = env.problem.capacity
        if rng.random() < self.config.explore:
            action = int(rng.choice(np.flatnonzero(valid_mask(env.counts, env.item, capacity))))
        else:
            action = self.rule(env.counts, env.item, capacity)
        raw = np.full(self.outputs, -1.0, dtype=np.float32)
        raw[action] = 1.0
        return raw


def heuristic_env(env: object, name: str) -> BinPackingEnv:
    """The bin packing env under a collection batch's env (its wrappers removed)."""
    inner = getattr(env, "unwrapped", env)
    if not isinstance(inner, BinPackingEnv):
        raise WmlabError(f"collect.policy '{name}' is a bin packing heuristic and plays "
                         f"binpacking envs only: choose a random policy (uniform, held, ...) "
                         f"for this env")
    return inner
