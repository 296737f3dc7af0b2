"""What the rest of wmlab knows about an environment, as plain picklable data.

The controller C (and every collection policy) emits raw outputs in [-1, 1]^k. The spec maps
them to the env's own action (``to_env_action``) and maps env actions to the float vector
that episodes store and M reads (``action_vector``). The mapping is chosen by ``action_kind``
rather than by stored callables so that a spec pickles into spawned worker processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from wmlab.errors import WmlabError

ActionKind = Literal["carracing", "doom", "box", "discrete"]
ACTION_KINDS: tuple[str, ...] = ("carracing", "doom", "box", "discrete")

# ViZDoom's Discrete(3) for TakeCover: 0 no-op, 1 move left, 2 move right.
DOOM_NOOP, DOOM_LEFT, DOOM_RIGHT = 0, 1, 2
_DOOM_VECTOR = np.array([0.0, -1.0, 1.0], dtype=np.float32)  # indexed by the action above
# float32 like the raw outputs, so that exactly +-1/3 compares equal and stays a no-op.
DOOM_THRESHOLD = np.float32(1.0 / 3.0)


@dataclass(frozen=True)
class EnvSpec:
    """An environment as the library sees it (frames are always 64x64x3 uint8)."""

    name: str  # wmlab name: "carracing", "doom", or the Gymnasium id of a generic env
    gym_id: str
    description: str
    backends: tuple[str, ...]
    default_backend: str
    max_steps: int  # default episode cap
    action_kind: ActionKind
    action_dim: int  # size of the float32 action vector stored in episodes and fed to M
    controller_outputs: int  # raw outputs of C, each in [-1, 1]
    # Generic Box actions only: bounds flattened, and the shape the env expects.
    action_low: tuple[float, ...] = ()
    action_high: tuple[float, ...] = ()
    action_shape: tuple[int, ...] = ()
    # The backend whose scores are reported (EnvPool's CarRacing is a port, not the original).
    reference_backend: str = ""
    # The env pays +1 per step alive and nothing else (Doom), so a dream that only knows
    # when an episode ends (M's done head) already scores C as the env would.
    survival_reward: bool = False

    def __post_init__(self) -> None:
        if self.action_kind not in ACTION_KINDS:
            raise ValueError(f"action_kind must be one of {ACTION_KINDS}, got {self.action_kind}")
        if self.default_backend not in self.backends:
            raise ValueError(f"default backend {self.default_backend} not in {self.backends}")
        if self.action_kind == "box" and not (
                len(self.action_low) == len(self.action_high) == self.action_dim):
            raise ValueError("a box spec needs action_low/high of length action_dim")

    def check_backend(self, backend: str | None) -> str:
        """The backend to use: ``backend`` if this env has it, the default if None."""
        chosen = self.default_backend if backend is None else backend
        if chosen not in self.backends:
            raise WmlabError(f"env '{self.name}' has no backend '{chosen}': choose one of "
                             f"{', '.join(self.backends)}")
        return chosen

    def to_env_action(self, raw: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """(B, controller_outputs) raw outputs in [-1, 1] -> a batch of B env actions.

        ``mask`` (B, controller_outputs), for discrete envs that report their valid actions
        (``EnvBatch.masks``, BinPacking's): the best valid output is chosen, so an invalid
        action never is. Other kinds of action have nothing to mask and ignore it.
        """
        raw = _as_batch(raw, self.controller_outputs, "controller outputs")
        if self.action_kind == "carracing":
            return _carracing_action(raw)
        if self.action_kind == "doom":
            return _doom_action(raw[:, 0])
        if self.action_kind == "discrete":
            return _discrete_action(raw, mask)
        return self._box_action(raw)

    def action_vector(self, env_actions: np.ndarray) -> np.ndarray:
        """A batch of B env actions -> (B, action_dim) float32, as stored and fed to M."""
        actions = np.asarray(env_actions)
        if self.action_kind == "doom":
            return _DOOM_VECTOR[_as_indices(actions, 3)].reshape(-1, 1)
        if self.action_kind == "discrete":
            return np.eye(self.action_dim, dtype=np.float32)[_as_indices(actions,
                                                                         self.action_dim)]
        return _as_batch(actions, self.action_dim, "env actions")

    def _box_action(self, raw: np.ndarray) -> np.ndarray:
        low = np.asarray(self.action_low, dtype=np.float32)
        high = np.asarray(self.action_high, dtype=np.float32)
        # Clipped so that a controller slightly out of range still yields a valid action.
        scaled = low + (np.clip(raw, -1.0, 1.0) + 1.0) / 2.0 * (high - low)
        return scaled.astype(np.float32).reshape(len(raw), *self.action_shape)


def _as_batch(values: np.ndarray, width: int, what: str) -> np.ndarray:
    """Values -> (B, width) float32; rows of another size are a caller's bug, named here."""
    array = np.asarray(values, dtype=np.float32)
    if array.ndim == 0 or array.size != len(array) * width:
        raise WmlabError(f"expected a batch of {what} with {width} values each, got shape "
                         f"{np.shape(values)}")
    return array.reshape(len(array), width)


def _as_indices(actions: np.ndarray, count: int) -> np.ndarray:
    indices = actions.astype(np.int64).reshape(-1)
    if indices.size and (indices.min() < 0 or indices.max() >= count):
        raise WmlabError(f"discrete actions must lie in 0..{count - 1}, got "
                         f"{indices.min()}..{indices.max()}")
    return indices


def _carracing_action(raw: np.ndarray) -> np.ndarray:
    """[steer, gas, brake]: steer as is, gas rescaled to [0, 1], brake only when positive."""
    out = np.empty_like(raw)
    out[:, 0] = raw[:, 0]
    out[:, 1] = (raw[:, 1] + 1.0) / 2.0
    out[:, 2] = np.clip(raw[:, 2], 0.0, 1.0)
    return out


def _discrete_action(logits: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The index of the largest logit (the first of equal ones), among the valid ones when
    ``mask`` is given: an invalid logit becomes -inf, so it can never win."""
    if mask is not None:
        logits = np.where(np.asarray(mask, dtype=bool), logits, -np.inf)
    return logits.argmax(axis=1).astype(np.int64)


def _doom_action(a: np.ndarray) -> np.ndarray:
    """The paper's thresholds: a < -1/3 left, a > 1/3 right, else no-op (ends included)."""
    actions = np.full(a.shape, DOOM_NOOP, dtype=np.int64)
    actions[a < -DOOM_THRESHOLD] = DOOM_LEFT
    actions[a > DOOM_THRESHOLD] = DOOM_RIGHT
    return actions


def check_max_steps(max_steps: int | None, default: int) -> int:
    """An episode cap from the user: None or 0 means the env's default."""
    if max_steps is None or max_steps == 0:
        return default
    if not isinstance(max_steps, (int, np.integer)) or max_steps < 0:
        raise WmlabError(f"max_steps must be a positive integer (or 0 for the default "
                         f"{default}), got {max_steps!r}")
    return int(max_steps)
