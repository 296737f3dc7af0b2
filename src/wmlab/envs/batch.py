"""Stepping B environments as one batch: what collection and real-env evaluation use.

There is no auto-reset: ``reset(seeds)`` starts one episode per env, each determined by its
own seed alone (whatever B, whatever its slot), and ``step`` advances only the envs still
running. A finished env keeps returning its last frame with reward 0 and the flags it ended
with, so a caller may act on every row without special cases (the agent encodes with V and
steps M only the envs still running).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import gymnasium as gym
import numpy as np

from wmlab.closing import Closing
from wmlab.envs.frames import FRAME_SHAPE
from wmlab.envs.spec import EnvSpec
from wmlab.errors import WmlabError

StepResult = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
ENVPOOL_SEED_RANGE = 2**31  # envpool.make asserts every seed fits in an int32


@runtime_checkable
class EnvBatch(Protocol):
    """B envs of one kind, reset together and stepped together."""

    spec: EnvSpec
    num_envs: int
    backend: str
    masks: np.ndarray | None  # (B, n) valid actions, for envs that report them; else None

    def reset(self, seeds: Sequence[int]) -> np.ndarray:
        """Start one episode per env, env i seeded by ``seeds[i]``: (B, 64, 64, 3) uint8."""
        ...

    def step(self, env_actions: Any) -> StepResult:
        """Advance the running envs: obs (B,64,64,3) uint8, rewards (B,) float32,
        terminated (B,) bool, truncated (B,) bool."""
        ...

    def close(self) -> None: ...


def check_seeds(seeds: Sequence[int], num_envs: int) -> list[int]:
    """One non-negative integer seed per env, or a WmlabError naming what is wrong."""
    if len(seeds) != num_envs:
        raise WmlabError(f"reset needs one seed per env: got {len(seeds)} seeds for "
                         f"{num_envs} envs")
    checked = []
    for seed in seeds:
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise WmlabError(f"seeds must be non-negative integers, got {seed!r}")
        checked.append(int(seed))
    return checked


class _BatchBase(Closing, ABC):
    """The bookkeeping both implementations share: last frames and end flags per env."""

    spec: EnvSpec
    backend: str
    masks: np.ndarray | None = None

    def __init__(self, num_envs: int) -> None:
        if num_envs < 1:
            raise WmlabError(f"num_envs must be at least 1, got {num_envs}")
        self.num_envs = num_envs
        self._frames = np.zeros((num_envs, *FRAME_SHAPE), dtype=np.uint8)
        self._terminated = np.zeros(num_envs, dtype=bool)
        self._truncated = np.zeros(num_envs, dtype=bool)
        self._started = False

    @property
    def running(self) -> np.ndarray:
        """(B,) bool: envs whose episode has not finished since the last reset."""
        return ~(self._terminated | self._truncated)

    def _begin(self, seeds: Sequence[int]) -> list[int]:
        checked = check_seeds(seeds, self.num_envs)
        self._terminated[:] = False
        self._truncated[:] = False
        self._started = True
        return checked

    def end(self, ids: np.ndarray) -> None:
        """End the episodes of envs ``ids`` now, as truncated: they are not stepped again
        until the next reset (a rollout that can no longer score stops costing steps)."""
        self._truncated[np.asarray(ids, dtype=np.int64)] = True

    def _check_step(self, env_actions: Any) -> None:
        if not self._started:
            raise WmlabError("call reset(seeds) on the env batch before step()")
        if len(env_actions) != self.num_envs:
            raise WmlabError(f"step needs one action per env: got {len(env_actions)} for "
                             f"{self.num_envs} envs")

    def _result(self, rewards: np.ndarray) -> StepResult:
        # Copies, so that callers may keep what they get across steps.
        return (self._frames.copy(), rewards, self._terminated.copy(),
                self._truncated.copy())

    @abstractmethod
    def reset(self, seeds: Sequence[int]) -> np.ndarray: ...

    @abstractmethod
    def step(self, env_actions: Any) -> StepResult: ...

    @abstractmethod
    def close(self) -> None: ...


class GymnasiumBatch(_BatchBase):
    """B Gymnasium envs with 64x64 observations, stepped one after another in this process."""

    def __init__(self, spec: EnvSpec, envs: Sequence[gym.Env], backend: str) -> None:
        super().__init__(len(envs))
        self.spec, self.backend = spec, backend
        self.envs = list(envs)

    @classmethod
    def build(cls, spec: EnvSpec, backend: str, num_envs: int,
              make_env: Callable[[], gym.Env]) -> GymnasiumBatch:
        """``num_envs`` envs from ``make_env``; those made are closed if a later one fails."""
        if num_envs < 1:
            raise WmlabError(f"num_envs must be at least 1, got {num_envs}")
        envs: list[gym.Env] = []
        try:
            for _ in range(num_envs):
                envs.append(make_env())
        except BaseException:
            for env in envs:
                env.close()
            raise
        return cls(spec, envs, backend)

    def reset(self, seeds: Sequence[int]) -> np.ndarray:
        self.masks = None
        for i, seed in enumerate(self._begin(seeds)):
            self._frames[i], info = self.envs[i].reset(seed=seed)
            self._keep_mask(i, info)
        return self._frames.copy()

    def _keep_mask(self, i: int, info: dict) -> None:
        """Envs that report valid actions (BinPacking's ``action_mask``): keep them, (B, n)
        bool in ``self.masks``, so a controller can choose among valid actions only."""
        mask = info.get("action_mask") if isinstance(info, dict) else None
        if mask is None:
            return
        if self.masks is None:
            self.masks = np.ones((self.num_envs, len(mask)), dtype=bool)
        self.masks[i] = np.asarray(mask, dtype=bool)

    def step(self, env_actions: Any) -> StepResult:
        self._check_step(env_actions)
        rewards = np.zeros(self.num_envs, dtype=np.float32)
        for i in np.flatnonzero(self.running).tolist():
            obs, reward, terminated, truncated, info = self.envs[i].step(env_actions[i])
            self._keep_mask(i, info)
            self._frames[i] = obs
            rewards[i] = reward
            self._terminated[i] = terminated
            self._truncated[i] = truncated
        return self._result(rewards)

    def close(self) -> None:
        for env in self.envs:
            env.close()


def import_envpool() -> Any:
    """EnvPool is optional: import it only when the envpool backend is asked for."""
    try:
        import envpool
    except ImportError:
        raise WmlabError("the envpool backend needs EnvPool: pip install 'wmlab[envpool]' "
                         "(or use the gymnasium backend)") from None
    return envpool


class EnvpoolBatch(_BatchBase):
    """One EnvPool pool of B envs (C++), stepping only the envs still running.

    EnvPool seeds env i once, when the pool is built (``env_seed[i]``), and a later
    ``pool.reset`` continues that env's random stream, so an episode would depend on the
    episodes before it. ``reset`` therefore builds a new pool from the episode seeds
    (reduced modulo 2**31, EnvPool's int32 range); that adds ~1 ms per env to a reset,
    against ~1 s of stepping per CarRacing episode. The pool runs in sync mode, where
    ``step(actions, env_id=ids)`` advances just ``ids`` and returns them in that order;
    EnvPool's next-step auto-reset never fires because a finished env is not stepped again.
    """

    def __init__(self, spec: EnvSpec, num_envs: int, *,
                 preprocess: Callable[[np.ndarray], np.ndarray],
                 max_steps: int, num_threads: int = 1) -> None:
        super().__init__(num_envs)
        if num_threads < 1:
            raise WmlabError(f"num_threads must be at least 1, got {num_threads}")
        self.spec, self.backend = spec, "envpool"
        self.max_steps, self.num_threads = max_steps, num_threads
        self._preprocess = preprocess
        self._envpool = import_envpool()
        self._pool: Any = None
        self._all_ids = np.arange(num_envs, dtype=np.int32)
        self.screens: np.ndarray | None = None  # last full-size frame per env, for videos

    def reset(self, seeds: Sequence[int]) -> np.ndarray:
        env_seeds = [seed % ENVPOOL_SEED_RANGE for seed in self._begin(seeds)]
        self._drop_pool()
        self._pool = self._envpool.make(
            self.spec.gym_id, env_type="gymnasium", num_envs=self.num_envs,
            batch_size=self.num_envs, num_threads=self.num_threads, env_seed=env_seeds,
            max_episode_steps=self.max_steps)
        obs, info = self._pool.reset()
        order = np.asarray(info["env_id"])
        self.screens = np.empty_like(obs)
        self.screens[order] = obs
        self._frames[order] = self._preprocess(obs)
        return self._frames.copy()

    def step(self, env_actions: Any) -> StepResult:
        self._check_step(env_actions)
        rewards = np.zeros(self.num_envs, dtype=np.float32)
        running = self.running
        ids = self._all_ids if running.all() else self._all_ids[running]
        if len(ids):
            actions = np.asarray(env_actions, dtype=np.float32)[ids]
            obs, reward, terminated, truncated, info = self._pool.step(actions, env_id=ids)
            order = np.asarray(info["env_id"])
            self.screens[order] = obs
            self._frames[order] = self._preprocess(obs)
            rewards[order] = reward
            self._terminated[order] = terminated
            self._truncated[order] = truncated
        return self._result(rewards)

    def _drop_pool(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def close(self) -> None:
        self._drop_pool()
        self._started = False  # a step after close asks for a reset, which rebuilds the pool
