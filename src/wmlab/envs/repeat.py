"""Action repeat: each of the agent's actions held for k env frames (``env.action_repeat``).

The agent then sees every k-th frame and decides k times less often, as many CarRacing and
Atari agents do; V, M and C cost k times less per env frame. A repeated step returns the
last frame, the rewards of its k frames summed, and how the episode ended; an episode that
ends within the k frames is not stepped again. Everything above the env (collection, M's
sequences, the dream, C's rollouts) counts the agent's steps; returns are the env's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from wmlab.closing import Closing
from wmlab.envs.batch import EnvBatch, StepResult
from wmlab.errors import WmlabError

MAX_ACTION_REPEAT = 64


def check_action_repeat(repeat: Any) -> int:
    """The action repeat as an int of at least 1, or a WmlabError naming the problem."""
    if isinstance(repeat, bool) or not isinstance(repeat, (int, np.integer)) or not (
            1 <= repeat <= MAX_ACTION_REPEAT):
        raise WmlabError(f"action_repeat must be an integer from 1 to {MAX_ACTION_REPEAT} "
                         f"(1: the agent acts on every frame), got {repeat!r}")
    return int(repeat)


def agent_steps(frames: int, repeat: int) -> int:
    """The agent's steps in an episode of ``frames`` env frames (the last step may be cut)."""
    return -(-frames // repeat)


class RepeatedBatch(Closing):
    """An env batch whose every step holds each env's action for ``repeat`` frames."""

    def __init__(self, inner: EnvBatch, repeat: int) -> None:
        self.inner, self.repeat = inner, check_action_repeat(repeat)
        self.spec, self.num_envs, self.backend = inner.spec, inner.num_envs, inner.backend

    @property
    def masks(self) -> np.ndarray | None:
        return self.inner.masks

    @property
    def running(self) -> np.ndarray:
        return self.inner.running

    def __getattr__(self, name: str) -> Any:
        # the inner batch's other attributes (its envs, their full-size screens) read through
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def end(self, ids: np.ndarray) -> None:
        self.inner.end(ids)

    def reset(self, seeds: Sequence[int]) -> np.ndarray:
        return self.inner.reset(seeds)

    def step(self, env_actions: Any) -> StepResult:
        frames, rewards, terminated, truncated = self.inner.step(env_actions)
        total = rewards.astype(np.float32)
        for _ in range(self.repeat - 1):
            if (terminated | truncated).all():
                break  # every episode has ended: the inner batch would only repeat itself
            frames, rewards, terminated, truncated = self.inner.step(env_actions)
            total += rewards  # an env that has ended adds 0
        return frames, total, terminated, truncated

    def close(self) -> None:
        self.inner.close()


class ActionRepeat(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """One Gymnasium env whose every step holds the action for ``repeat`` frames."""

    def __init__(self, env: gym.Env, repeat: int) -> None:
        gym.utils.RecordConstructorArgs.__init__(self, repeat=repeat)
        gym.Wrapper.__init__(self, env)
        self.repeat = check_action_repeat(repeat)

    def step(self, action: Any):
        total = 0.0
        for _ in range(self.repeat):
            obs, reward, terminated, truncated, info = self.env.step(action)
            total += float(reward)
            if terminated or truncated:
                break
        return obs, total, terminated, truncated, info
