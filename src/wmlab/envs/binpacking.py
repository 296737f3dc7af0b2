"""Online stochastic bin packing: the ORL benchmark (Balaji et al. 2019), faithfully.

Items of random size s arrive one at a time and must be placed at once into a bag of
capacity C. The state is N_0..N_{C-1}, the number of open bags at each fill level (full
bags leave the count, so N_0 is always 0), plus the incoming item's size. Action 0 opens a
new bag (reward -(C - s)); action k >= 1 puts the item into a bag at level k (reward +s),
valid only if N_k > 0 and k + s <= C. The summed reward of an episode is therefore minus the
empty space left in the open bags. Invalid actions, by variant:

- ``base``: the episode ends with reward -100 - w_prev, where w_prev is the previous step's
  incremental waste (C - s' after a new bag, -s' after an existing one, 0 on the first
  step). This is a quirk of the reference code, kept on purpose. The item is not placed,
  but the step still counts and, as in the reference, the final observation shows the
  next item (on the bags as they were).
- ``nearest-valid``: the action is replaced by the existing, fitting level nearest to the
  chosen one (ties to the lower level; a new bag if none fits), with no penalty.
- ``action-mask``: nearest-valid underneath, and the observation also carries the mask.

The episode ends after T items (the horizon). The observation carries no clock, so this is
reported as ``truncated``; ``terminated`` only follows an invalid action of the base variant.
Unlike the original, item draws are seeded: ``reset(seed=s)`` fixes the whole sequence
(``reset(options={"items": [...]})`` forces its first items).

Two Gymnasium faces: ``BinPackingEnv`` (registered as ``wmlab/BinPacking-v0`` and friends)
observes the ORL vector (or a dict with the mask), and ``BinPackingFrames`` observes the
64x64x3 drawing of ``wmlab.envs.binpacking_draw``; the latter is wmlab's ``binpacking`` env.
Problem settings ride in the wmlab env name, e.g. ``binpacking:distribution=linear-waste-100``
or ``binpacking:capacity=30,distribution=perfectly-packable-100,horizon=1000``, because the
action count C belongs to the env's spec and ``get_spec`` sees only the name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

import gymnasium as gym
import numpy as np

from wmlab.envs.batch import GymnasiumBatch
from wmlab.envs.binpacking_draw import draw_frame, draw_human
from wmlab.envs.entry import EnvEntry
from wmlab.envs.frames import FRAME_SHAPE
from wmlab.envs.spec import EnvSpec, check_max_steps
from wmlab.errors import WmlabError

NAME = "binpacking"
BACKEND = "python"
VARIANTS = ("base", "nearest-valid", "action-mask")
INVALID_PENALTY = 100.0  # ORL's BIG_NEG_REWARD
GYM_IDS = MappingProxyType({"wmlab/BinPacking-v0": "base",
                            "wmlab/BinPackingNearestValid-v0": "nearest-valid",
                            "wmlab/BinPackingActionMask-v0": "action-mask"})
_PROB_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Distribution:
    """A named ORL problem: capacity, item sizes with their probabilities, horizon."""

    capacity: int
    sizes: tuple[int, ...]
    probs: tuple[float, ...]
    horizon: int
    waste: str  # how the optimal waste grows with T: "linear", "bounded" or "sqrt"


_ONE_TO_NINE = tuple(range(1, 10))
DISTRIBUTIONS: Mapping[str, Distribution] = MappingProxyType({
    "linear-waste-9": Distribution(9, (2, 3), (0.8, 0.2), 1000, "linear"),
    "perfectly-packable-9": Distribution(9, (2, 3), (0.75, 0.25), 1000, "sqrt"),
    "bounded-waste-9": Distribution(9, (2, 3), (0.5, 0.5), 1000, "bounded"),
    "linear-waste-100": Distribution(100, _ONE_TO_NINE, (0, 0, 0, 1 / 3, 0, 0, 0, 0, 2 / 3),
                                     10000, "linear"),
    "bounded-waste-100": Distribution(
        100, _ONE_TO_NINE, (0.14, 0.10, 0.06, 0.13, 0.11, 0.13, 0.03, 0.11, 0.19), 10000,
        "bounded"),
    "perfectly-packable-100": Distribution(
        100, _ONE_TO_NINE, (0.06, 0.11, 0.11, 0.22, 0, 0.11, 0.06, 0, 0.33), 10000, "sqrt"),
})
DEFAULT_DISTRIBUTION = "linear-waste-9"  # ORL's default problem


@dataclass(frozen=True)
class Problem:
    """One fully specified, validated bin packing problem and invalid-action variant."""

    capacity: int = 9
    sizes: tuple[int, ...] = (2, 3)
    probs: tuple[float, ...] = (0.8, 0.2)
    horizon: int = 1000
    variant: str = "action-mask"

    def __post_init__(self) -> None:
        _check_problem(self)

    @property
    def num_actions(self) -> int:
        return self.capacity


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_problem(p: Problem) -> None:
    if not _is_int(p.capacity) or p.capacity < 2:
        raise WmlabError(f"bin packing capacity C must be an integer of at least 2, got "
                         f"{p.capacity!r}")
    if not _is_int(p.horizon) or p.horizon <= 0:
        raise WmlabError(f"bin packing horizon T must be a positive integer, got "
                         f"{p.horizon!r}")
    if p.variant not in VARIANTS:
        raise WmlabError(f"bin packing variant '{p.variant}' is unknown: choose one of "
                         f"{', '.join(VARIANTS)}")
    if not p.sizes or len(p.sizes) != len(p.probs):
        raise WmlabError(f"bin packing needs one probability per item size: got "
                         f"{len(p.sizes)} sizes and {len(p.probs)} probabilities")
    bad = [s for s in p.sizes if not _is_int(s) or s < 1 or s > p.capacity]
    if bad:
        raise WmlabError(f"bin packing item sizes must be integers in 1..C={p.capacity}; "
                         f"{', '.join(map(repr, bad))} is not (raise the capacity or drop "
                         f"the size)")
    if len(set(p.sizes)) != len(p.sizes):
        raise WmlabError(f"bin packing item sizes must be distinct, got {list(p.sizes)}")
    if any(not isinstance(q, (int, float, np.floating, np.integer)) or isinstance(q, bool)
           or not math.isfinite(q) or q < 0 for q in p.probs):
        raise WmlabError(f"bin packing probabilities must be non-negative numbers, got "
                         f"{list(p.probs)}")
    total = float(sum(p.probs))
    if abs(total - 1.0) > _PROB_TOLERANCE:
        raise WmlabError(f"bin packing probabilities must sum to 1, got {list(p.probs)} "
                         f"(sum {total:.6g})")


def make_problem(distribution: str | None = None, *, capacity: int | None = None,
                 sizes: Sequence[int] | None = None, probs: Sequence[float] | None = None,
                 horizon: int | None = None, variant: str = "action-mask") -> Problem:
    """A problem from a named distribution (default ORL's ``linear-waste-9``), with any
    field overridden: custom distributions give ``sizes`` and ``probs``."""
    name = distribution or DEFAULT_DISTRIBUTION
    if name not in DISTRIBUTIONS:
        raise WmlabError(f"unknown bin packing distribution '{name}': choose one of "
                         f"{', '.join(DISTRIBUTIONS)} or give sizes and probs")
    base = DISTRIBUTIONS[name]
    return Problem(capacity=base.capacity if capacity is None else capacity,
                   sizes=base.sizes if sizes is None else tuple(sizes),
                   probs=base.probs if probs is None else tuple(probs),
                   horizon=base.horizon if horizon is None else horizon,
                   variant=variant)


# ---------------------------------------------------------------------------------------------
# The rules, as pure functions of (counts, item, capacity)


def valid_mask(counts: np.ndarray, item: int, capacity: int) -> np.ndarray:
    """(C,) int8: 1 where the action is valid (0 always; k iff N_k > 0 and k + s <= C)."""
    mask = np.zeros(capacity, dtype=np.int8)
    mask[1:capacity - item + 1] = counts[1:capacity - item + 1] > 0
    mask[0] = 1
    return mask


def nearest_valid(counts: np.ndarray, item: int, capacity: int, action: int) -> int:
    """``action`` if valid, else the nearest existing fitting level (ties lower), else 0."""
    mask = valid_mask(counts, item, capacity)
    if mask[action]:
        return action
    levels = np.flatnonzero(mask[1:]) + 1
    if len(levels) == 0:
        return 0
    # argmin returns the first minimum, and levels ascend, so ties go to the lower level.
    return int(levels[np.argmin(np.abs(levels - action))])


def waste_of(counts: np.ndarray, capacity: int) -> int:
    """Empty space left in the open bags: sum_k N_k (C - k)."""
    return int(np.dot(counts, capacity - np.arange(capacity)))


class BinPackingEnv(gym.Env):
    """ORL's bin packing with the vector observation [N_0..N_{C-1}, s] (plus the mask).

    ``info`` after every reset and step: ``full_bags``, ``waste`` (empty space in open bags
    now), ``action_mask`` (for the incoming item), ``step``; after a step also ``action``
    (the one applied) and ``invalid`` (whether the chosen one was).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(self, distribution: str | None = None, *, capacity: int | None = None,
                 sizes: Sequence[int] | None = None, probs: Sequence[float] | None = None,
                 horizon: int | None = None, variant: str = "base",
                 problem: Problem | None = None, render_mode: str | None = None) -> None:
        if problem is None:
            problem = make_problem(distribution, capacity=capacity, sizes=sizes, probs=probs,
                                   horizon=horizon, variant=variant)
        if render_mode not in (None, "rgb_array"):
            raise WmlabError(f"bin packing render_mode must be 'rgb_array' or None, got "
                             f"{render_mode!r}")
        self.problem = problem
        self.render_mode = render_mode
        C = problem.capacity
        self._sizes = np.asarray(problem.sizes, dtype=np.int64)
        probs = np.asarray(problem.probs, dtype=np.float64)
        self._probs = probs / probs.sum()
        self.action_space = gym.spaces.Discrete(C)
        vector = gym.spaces.Box(0, max(problem.horizon, C), (C + 1,), np.int64)
        if problem.variant == "action-mask":
            self.observation_space = gym.spaces.Dict({
                "action_mask": gym.spaces.Box(0, 1, (C,), np.int8), "real_obs": vector})
        else:
            self.observation_space = vector
        self.counts = np.zeros(C, dtype=np.int64)
        self.item = 0
        self.t = 0
        self.full_bags = 0
        self.score = 0.0
        self._items = np.zeros(0, dtype=np.int64)
        self._last_waste = 0  # w_prev of the base variant's penalty
        self._done = True

    # -- state ---------------------------------------------------------------------------

    @property
    def mask(self) -> np.ndarray:
        return valid_mask(self.counts, self.item, self.problem.capacity)

    @property
    def waste(self) -> int:
        return waste_of(self.counts, self.problem.capacity)

    def _obs(self) -> Any:
        vector = np.append(self.counts, self.item).astype(np.int64)
        if self.problem.variant == "action-mask":
            return {"action_mask": self.mask, "real_obs": vector}
        return vector

    def _info(self) -> dict[str, Any]:
        return {"full_bags": self.full_bags, "waste": self.waste,
                "action_mask": self.mask, "step": self.t}

    # -- Gymnasium API -------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        # The whole item sequence at once: one seeded draw, and the same items whatever
        # the actions (the last is the item shown after the final step).
        self._items = self.np_random.choice(self._sizes, size=self.problem.horizon + 1,
                                            p=self._probs)
        if options and "items" in options:
            self._force_items(options["items"])
        self.counts[:] = 0
        self.t = 0
        self.full_bags = 0
        self.score = 0.0
        self._last_waste = 0
        self._done = False
        self.item = int(self._items[0])
        return self._obs(), self._info()

    def _force_items(self, items: Sequence[int]) -> None:
        """Replace the first draws by ``items`` (hand-made sequences for tests and replays)."""
        items = list(items)
        unknown = sorted({s for s in items if s not in self.problem.sizes})
        if unknown or len(items) > len(self._items):
            raise WmlabError(f"forced items must be at most T+1={len(self._items)} of the "
                             f"sizes {list(self.problem.sizes)}, got {items}")
        self._items[:len(items)] = items

    def step(self, action):
        if self._done:
            raise WmlabError("the bin packing episode is over: call reset() before step()")
        C = self.problem.capacity
        if not _is_int(action) or not 0 <= int(action) < C:
            raise WmlabError(f"bin packing actions are integers in 0..{C - 1}, got {action!r}")
        chosen = int(action)
        item = self.item
        valid = bool(valid_mask(self.counts, item, C)[chosen])
        if not valid and self.problem.variant == "base":
            return self._end_on_invalid(chosen)
        applied = chosen if valid else nearest_valid(self.counts, item, C, chosen)
        if applied == 0:
            level = item
            self._last_waste = C - item
        else:
            self.counts[applied] -= 1
            level = applied + item
            self._last_waste = -item
        if level >= C:
            self.full_bags += 1
        else:
            self.counts[level] += 1
        reward = float(-self._last_waste)
        self.score += reward
        self._next_item()
        truncated = self.t >= self.problem.horizon
        self._done = truncated
        info = {**self._info(), "action": applied, "invalid": not valid}
        return self._obs(), reward, False, truncated, info

    def _end_on_invalid(self, chosen: int) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        """The base variant's end: the penalty, the bags untouched, and the next item shown.

        The reference draws the next item after every step, valid or not, so its final
        observation shows that item, not the one refused; the step counts, as it does there.
        ``truncated`` stays False even when the refused item was the last one: the invalid
        action ended the episode, not the horizon.
        """
        reward = -INVALID_PENALTY - self._last_waste
        self.score += reward
        self._done = True
        self._next_item()
        info = {**self._info(), "action": chosen, "invalid": True}
        return self._obs(), reward, True, False, info

    def _next_item(self) -> None:
        """Move on to the next item of the sequence.

        Steps only run while t < T, and the sequence holds T + 1 items, so the item after
        the last step (valid or not) always exists: nothing is drawn past its end.
        """
        self.t += 1
        self.item = int(self._items[self.t])

    def render(self) -> np.ndarray | None:
        if self.render_mode is None:
            return None
        return self.human_picture()

    def frame(self) -> np.ndarray:
        """The 64x64x3 drawing of the current state (what V sees)."""
        return draw_frame(self.counts, self.item, self.problem.capacity)

    def human_picture(self, message: str = "") -> np.ndarray:
        """A larger drawing with the numbers written out, for people and GIFs."""
        return draw_human(self.counts, self.item, self.problem.capacity, score=self.score,
                          waste=self.waste, full_bags=self.full_bags, step=self.t,
                          horizon=self.problem.horizon, message=message)


class BinPackingFrames(gym.Wrapper):
    """``BinPackingEnv`` observed as its 64x64x3 drawing; the vector state stays in ``info``
    (``counts``, ``item``), along with the mask, so a controller can mask its outputs."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(self, env: BinPackingEnv) -> None:
        super().__init__(env)
        self.observation_space = gym.spaces.Box(0, 255, FRAME_SHAPE, np.uint8)

    @property
    def render_mode(self) -> str:
        return "rgb_array"

    def _add_state(self, info: dict[str, Any]) -> dict[str, Any]:
        env: BinPackingEnv = self.env
        return {**info, "counts": env.counts.copy(), "item": env.item}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        _, info = self.env.reset(seed=seed, options=options)
        return self.env.frame(), self._add_state(info)

    def step(self, action):
        _, reward, terminated, truncated, info = self.env.step(action)
        return self.env.frame(), reward, terminated, truncated, self._add_state(info)

    def render(self) -> np.ndarray:
        return self.env.human_picture()


# ---------------------------------------------------------------------------------------------
# wmlab's env: spec, name parameters, registry entry, Gymnasium ids


def parse_params(text: str) -> dict[str, Any]:
    """``key=value,...`` after ``binpacking:`` -> keyword arguments of ``make_problem``.

    Keys: distribution, capacity, sizes, probs, horizon, variant; sizes and probs are lists
    separated by ``/`` (e.g. ``sizes=2/3,probs=0.8/0.2``).
    """
    out: dict[str, Any] = {}
    keys = ("distribution", "capacity", "sizes", "probs", "horizon", "variant")
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = (x.strip() for x in part.partition("="))
        if not sep or key not in keys:
            raise WmlabError(f"bin packing env parameter '{part}' is not key=value with a key "
                             f"among {', '.join(keys)} (e.g. "
                             f"binpacking:distribution=bounded-waste-100)")
        if key in out:
            raise WmlabError(f"bin packing env parameter '{key}' is given twice")
        try:
            if key in ("capacity", "horizon"):
                out[key] = int(value)
            elif key == "sizes":
                out[key] = tuple(int(v) for v in value.split("/"))
            elif key == "probs":
                out[key] = tuple(float(v) for v in value.split("/"))
            else:
                out[key] = value
        except ValueError:
            raise WmlabError(f"bin packing env parameter '{part}': '{value}' is not a valid "
                             f"{key} (sizes and probs are lists like 2/3 and 0.8/0.2)") from None
    return out


def problem_from_name(name: str) -> Problem:
    """The problem of a wmlab env name: ``binpacking`` or ``binpacking:key=value,...``."""
    base, _, params = name.partition(":")
    if base.strip() != NAME:
        raise WmlabError(f"'{name}' is not a bin packing env name (binpacking[:key=value,...])")
    return make_problem(**parse_params(params))


def binpacking_spec(name: str = NAME) -> EnvSpec:
    problem = problem_from_name(name)
    C = problem.capacity
    return EnvSpec(name=name.strip(), gym_id=next(iter(GYM_IDS)),
                   description=f"online bin packing (ORL), C={C}, drawn as 64x64 pixels",
                   backends=(BACKEND,), default_backend=BACKEND, reference_backend=BACKEND,
                   max_steps=problem.horizon, action_kind="discrete", action_dim=C,
                   controller_outputs=C)


def make_frames(name: str = NAME, max_steps: int | None = None,
                variant: str | None = None) -> BinPackingFrames:
    """wmlab's bin packing env: 64x64 frames; ``max_steps`` (if not 0) sets the horizon."""
    problem = problem_from_name(name)
    horizon = check_max_steps(max_steps, problem.horizon)
    problem = replace(problem, horizon=horizon, variant=variant or problem.variant)
    return BinPackingFrames(BinPackingEnv(problem=problem))


def entry(name: str = NAME) -> EnvEntry:
    """The registry entry of ``name``; ``configure`` answers ``binpacking:...`` names."""
    spec = binpacking_spec(name)

    def make(backend: str, **options: Any) -> gym.Env:
        return make_frames(spec.name, **options)

    def make_batch(backend: str, num_envs: int, **options: Any) -> GymnasiumBatch:
        return GymnasiumBatch.build(spec, backend, num_envs,
                                    lambda: make_frames(spec.name, **options))

    return EnvEntry(spec=spec, make=make, make_batch=make_batch,
                    options={BACKEND: ("max_steps", "variant")},
                    configure=lambda params: entry(f"{NAME}:{params}"))


def register_gymnasium() -> None:
    """Register the three ORL variants with Gymnasium (once; its registry is global)."""
    for gym_id, variant in GYM_IDS.items():
        if gym_id not in gym.registry:
            gym.register(id=gym_id, entry_point="wmlab.envs.binpacking:BinPackingEnv",
                         kwargs={"variant": variant}, disable_env_checker=False)


register_gymnasium()
