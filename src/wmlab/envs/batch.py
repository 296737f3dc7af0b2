"""Stepping B environments as one batch: what collection and real-env evaluation use.

There is no auto-reset: ``reset(seeds)`` starts one episode per env, each determined by its
own seed alone (whatever B, whatever its slot), and ``step`` advances only the envs still
running. A finished env keeps returning its last frame with reward 0 and its final flags, so
the caller can run V, M and C on the whole batch every step without special cases.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import gymnasium as gym
import numpy as np

from wmlab.envs.frames import CARRACING_ROWS, resize_batch
from wmlab.envs.spec import EnvSpec
from wmlab.errors import WmlabError

StepResult = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


class EnvBatch(Protocol):
    spec: EnvSpec
    num_envs: int
    backend: str

    def reset(self, seeds: Sequence[int]) -> np.ndarray: ...

    def step(self, env_actions: np.ndarray) -> StepResult: ...

    def close(self) -> None: ...


class _Bookkeeping:
    """Finished flags, last frames and frozen outputs shared by both implementations."""

    def __init__(self, num_envs: int) -> None:
        self.num_envs = num_envs
        self.frames = np.zeros((num_envs, 64, 64, 3), np.uint8)
        self.terminated = np.zeros(num_envs, bool)
        self.truncated = np.zeros(num_envs, bool)

    @property
    def running(self) -> np.ndarray:
        return ~(self.terminated | self.truncated)

    def _check_seeds(self, seeds: Sequence[int]) -> list[int]:
        if len(seeds) != self.num_envs:
            raise WmlabError(f"reset needs one seed per env: got {len(seeds)} for "
                             f"{self.num_envs} envs")
        self.terminated[:] = False
        self.truncated[:] = False
        return [int(s) for s in seeds]


class GymnasiumBatch(_Bookkeeping):
    """B Gymnasium envs (64x64 observations) stepped one after another in this process."""

    def __init__(self, spec: EnvSpec, make_env: Callable[[], gym.Env], num_envs: int,
                 backend: str) -> None:
        super().__init__(num_envs)
        self.spec, self.backend = spec, backend
        self.envs = [make_env() for _ in range(num_envs)]

    def reset(self, seeds: Sequence[int]) -> np.ndarray:
        for i, seed in enumerate(self._check_seeds(seeds)):
            self.frames[i], _ = self.envs[i].reset(seed=seed)
        return self.frames.copy()

    def step(self, env_actions: np.ndarray) -> StepResult:
        rewards = np.zeros(self.num_envs, np.float32)
        for i in np.flatnonzero(self.running):
            obs, reward, terminated, truncated, _ = self.envs[i].step(env_actions[i])
            self.frames[i], rewards[i] = obs, reward
            self.terminated[i], self.truncated[i] = terminated, truncated
        return self.frames.copy(), rewards, self.terminated.copy(), self.truncated.copy()

    def close(self) -> None:
        for env in self.envs:
            env.close()


class EnvpoolBatch(_Bookkeeping):
    """EnvPool's C++ CarRacing: one pool of B envs, stepping only the running ones.

    EnvPool seeds each env once, at construction (``env_seed``); so ``reset`` builds a new
    pool with the episode seeds (about a millisecond), which makes each episode depend on
    its own seed only, as with the Gymnasium backend.
    """

    def __init__(self, spec: EnvSpec, num_envs: int, max_steps: int, num_threads: int = 1
                 ) -> None:
        super().__init__(num_envs)
        self.spec, self.backend = spec, "envpool"
        self.max_steps, self.num_threads = max_steps, num_threads
        self.pool = None
        try:
            import envpool  # noqa: F401
        except ImportError:
            raise WmlabError("the envpool backend needs EnvPool: pip install "
                             "'wmlab[envpool]' (or use --backend gymnasium)") from None

    def reset(self, seeds: Sequence[int]) -> np.ndarray:
        import envpool

        seeds = self._check_seeds(seeds)
        if self.pool is not None:
            self.pool.close()
        self.pool = envpool.make(self.spec.gym_id, env_type="gymnasium",
                                 num_envs=self.num_envs, num_threads=self.num_threads,
                                 env_seed=[s % 2**31 for s in seeds],
                                 max_episode_steps=self.max_steps)
        obs, _ = self.pool.reset()
        self.frames[:] = resize_batch(obs, CARRACING_ROWS)
        return self.frames.copy()

    def step(self, env_actions: np.ndarray) -> StepResult:
        rewards = np.zeros(self.num_envs, np.float32)
        ids = np.flatnonzero(self.running)
        if len(ids):
            obs, reward, terminated, truncated, info = self.pool.step(
                np.asarray(env_actions, np.float32)[ids], env_id=ids)
            order = np.asarray(info["env_id"])
            self.frames[order] = resize_batch(obs, CARRACING_ROWS)
            rewards[order] = reward
            self.terminated[order] = terminated
            self.truncated[order] = truncated
        return self.frames.copy(), rewards, self.terminated.copy(), self.truncated.copy()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None
