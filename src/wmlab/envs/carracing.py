"""CarRacing-v3 as 64x64 frames: Gymnasium's original (the reference) and EnvPool's C++ port.

The port agrees with Gymnasium on physics and rewards step for step but not on pixels or on
which track a seed draws (SPEC.md section 2), so a dataset must say which backend made it.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from wmlab.envs.batch import EnvpoolBatch, GymnasiumBatch
from wmlab.envs.entry import EnvEntry
from wmlab.envs.frames import (
    FRAME_SHAPE,
    headless_pygame,
    preprocess_carracing,
    preprocess_carracing_batch,
)
from wmlab.envs.spec import EnvSpec, check_max_steps

GYM_ID = "CarRacing-v3"
MAX_STEPS = 1000
BACKENDS = ("gymnasium", "envpool")


def carracing_spec() -> EnvSpec:
    return EnvSpec(name="carracing", gym_id=GYM_ID,
                   description="CarRacing-v3, 64x64 frames (dashboard cropped), 1000 steps",
                   backends=BACKENDS, default_backend="gymnasium",
                   reference_backend="gymnasium", max_steps=MAX_STEPS,
                   action_kind="carracing", action_dim=3, controller_outputs=3)


def _frame_space() -> gym.spaces.Box:
    return gym.spaces.Box(0, 255, FRAME_SHAPE, np.uint8)


def _action_space() -> gym.spaces.Box:
    return gym.spaces.Box(np.array([-1, 0, 0], np.float32), np.array([1, 1, 1], np.float32))


class CarRacingFrames(gym.ObservationWrapper, gym.utils.RecordConstructorArgs):
    """Gymnasium CarRacing with 64x64 observations; ``render()`` gives the 96x96 frame.

    The full frame is kept from the observation rather than drawn again: Gymnasium's own
    rgb_array mode would draw a second, 600x400 picture on every call.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 50}

    def __init__(self, env: gym.Env) -> None:
        gym.utils.RecordConstructorArgs.__init__(self)
        gym.ObservationWrapper.__init__(self, env)
        self.observation_space = _frame_space()
        self._screen: np.ndarray | None = None

    @property
    def render_mode(self) -> str:
        return "rgb_array"

    def observation(self, observation: np.ndarray) -> np.ndarray:
        self._screen = observation
        return preprocess_carracing(observation)

    def render(self) -> np.ndarray | None:
        return None if self._screen is None else self._screen.copy()


def make_gymnasium(max_steps: int | None = None) -> gym.Env:
    """The reference CarRacing-v3 with 64x64 frames."""
    headless_pygame()
    steps = check_max_steps(max_steps, MAX_STEPS)
    return CarRacingFrames(gym.make(GYM_ID, max_episode_steps=steps))


def make_envpool_batch(num_envs: int, max_steps: int | None = None,
                       num_threads: int = 1) -> EnvpoolBatch:
    """``num_envs`` EnvPool CarRacing envs in one pool (``num_threads`` C++ threads)."""
    return EnvpoolBatch(carracing_spec(), num_envs, preprocess=preprocess_carracing_batch,
                        max_steps=check_max_steps(max_steps, MAX_STEPS),
                        num_threads=num_threads)


class EnvpoolCarRacing(gym.Env):
    """One EnvPool CarRacing env behind the Gymnasium API; ``render()`` gives 96x96."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 50}
    render_mode = "rgb_array"

    def __init__(self, max_steps: int | None = None, num_threads: int = 1) -> None:
        self._batch = make_envpool_batch(1, max_steps, num_threads)
        self.observation_space = _frame_space()
        self.action_space = _action_space()

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        if seed is None:
            seed = int(self.np_random.integers(2**31))
        return self._batch.reset([seed])[0], {}

    def step(self, action):
        actions = np.asarray(action, dtype=np.float32).reshape(1, 3)
        obs, reward, terminated, truncated = self._batch.step(actions)
        return obs[0], float(reward[0]), bool(terminated[0]), bool(truncated[0]), {}

    def render(self) -> np.ndarray | None:
        screens = self._batch.screens
        return None if screens is None else screens[0].copy()

    def close(self) -> None:
        self._batch.close()


def _make(backend: str, **options: Any) -> gym.Env:
    if backend == "envpool":
        return EnvpoolCarRacing(**options)
    return make_gymnasium(**options)


def _make_batch(backend: str, num_envs: int, **options: Any):
    if backend == "envpool":
        return make_envpool_batch(num_envs, **options)
    return GymnasiumBatch.build(carracing_spec(), backend, num_envs,
                                lambda: make_gymnasium(**options))


def entry() -> EnvEntry:
    return EnvEntry(spec=carracing_spec(), make=_make, make_batch=_make_batch,
                    options={"gymnasium": ("max_steps",),
                             "envpool": ("max_steps", "num_threads")})
