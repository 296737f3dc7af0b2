"""CarRacing-v3: the Gymnasium reference and the EnvPool port, both as 64x64 frames."""

from __future__ import annotations

import os

import gymnasium as gym
import numpy as np

from wmlab.envs.batch import EnvpoolBatch
from wmlab.envs.frames import preprocess_carracing
from wmlab.envs.spec import EnvSpec

GYM_ID = "CarRacing-v3"
MAX_STEPS = 1000


def carracing_spec() -> EnvSpec:
    return EnvSpec(name="carracing", gym_id=GYM_ID,
                   description="CarRacing-v3, 64x64 frames (dashboard cropped), 1000 steps",
                   backends=("gymnasium", "envpool"), default_backend="gymnasium",
                   reference_backend="gymnasium", max_steps=MAX_STEPS,
                   action_kind="carracing", action_dim=3, controller_outputs=3)


class CarRacingFrames(gym.ObservationWrapper):
    """Observations become 64x64x3 frames; the last full 96x96 frame stays readable."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.observation_space = gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)
        self.last_screen: np.ndarray | None = None

    def observation(self, observation: np.ndarray) -> np.ndarray:
        self.last_screen = observation
        return preprocess_carracing(observation)


def make_gymnasium(max_steps: int = MAX_STEPS) -> gym.Env:
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # pygame draws off-screen
    return CarRacingFrames(gym.make(GYM_ID, max_episode_steps=max_steps))


class EnvpoolCarRacing(gym.Env):
    """A single EnvPool CarRacing env behind the Gymnasium API."""

    metadata = {"render_modes": []}

    def __init__(self, max_steps: int = MAX_STEPS) -> None:
        self.batch = EnvpoolBatch(carracing_spec(), 1, max_steps)
        self.observation_space = gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)
        self.action_space = gym.spaces.Box(np.array([-1, 0, 0], np.float32),
                                           np.array([1, 1, 1], np.float32))

    def reset(self, *, seed: int | None = None, options=None):
        super().reset(seed=seed)
        if seed is None:
            seed = int(self.np_random.integers(2**31))
        return self.batch.reset([seed])[0], {}

    def step(self, action):
        obs, reward, terminated, truncated = self.batch.step(np.asarray(action)[None])
        return obs[0], float(reward[0]), bool(terminated[0]), bool(truncated[0]), {}

    def close(self) -> None:
        self.batch.close()
