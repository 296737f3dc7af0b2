"""What the rest of wmlab knows about an environment, as plain picklable data.

The controller C (and every random collection policy) emits raw outputs in [-1, 1]^k; the
spec maps them to the env's action and to the float vector that episodes store and M reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wmlab.errors import WmlabError

ACTION_KINDS = ("carracing", "doom", "box", "discrete")
DOOM_VECTOR = np.array([0.0, -1.0, 1.0], dtype=np.float32)  # noop, left, right


@dataclass(frozen=True)
class EnvSpec:
    name: str
    gym_id: str
    description: str
    backends: tuple[str, ...]
    default_backend: str
    max_steps: int
    action_kind: str
    action_dim: int  # size of the stored action vector (M's action input)
    controller_outputs: int  # raw outputs of C
    action_low: tuple[float, ...] = ()  # Box bounds, flattened (generic Box envs)
    action_high: tuple[float, ...] = ()
    action_shape: tuple[int, ...] = ()
    reference_backend: str = ""

    def check_backend(self, backend: str | None) -> str:
        chosen = backend or self.default_backend
        if chosen not in self.backends:
            raise WmlabError(f"env '{self.name}' has no backend '{chosen}': choose one of "
                             f"{', '.join(self.backends)}")
        return chosen

    def to_env_action(self, raw: np.ndarray) -> np.ndarray:
        """(B, controller_outputs) raw outputs in [-1, 1] -> a batch of env actions."""
        raw = np.asarray(raw, dtype=np.float32).reshape(len(raw), self.controller_outputs)
        if self.action_kind == "carracing":
            out = np.empty_like(raw)
            out[:, 0] = raw[:, 0]
            out[:, 1] = (raw[:, 1] + 1.0) / 2.0
            out[:, 2] = np.clip(raw[:, 2], 0.0, 1.0)
            return out
        if self.action_kind == "doom":
            a = raw[:, 0]
            return np.where(a < -1 / 3, 1, np.where(a > 1 / 3, 2, 0)).astype(np.int64)
        if self.action_kind == "discrete":
            return raw.argmax(axis=1).astype(np.int64)
        low, high = np.asarray(self.action_low), np.asarray(self.action_high)
        scaled = low + (np.clip(raw, -1.0, 1.0) + 1.0) / 2.0 * (high - low)
        return scaled.astype(np.float32).reshape(len(raw), *self.action_shape)

    def action_vector(self, env_actions: np.ndarray) -> np.ndarray:
        """A batch of env actions -> (B, action_dim) float32, as stored and fed to M."""
        env_actions = np.asarray(env_actions)
        if self.action_kind == "doom":
            return DOOM_VECTOR[env_actions.astype(np.int64)].reshape(-1, 1)
        if self.action_kind == "discrete":
            return np.eye(self.action_dim, dtype=np.float32)[env_actions.astype(np.int64)]
        return env_actions.reshape(len(env_actions), self.action_dim).astype(np.float32)
