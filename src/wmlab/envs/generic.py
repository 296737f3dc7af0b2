"""Any Gymnasium env with image observations (or an rgb_array renderer) as 64x64 frames."""

from __future__ import annotations

import os

import gymnasium as gym
import numpy as np

from wmlab.envs.frames import resize_frame
from wmlab.envs.spec import EnvSpec
from wmlab.errors import UnknownEnvError, WmlabError

DEFAULT_MAX_STEPS = 1000


def _is_image(space: gym.Space) -> bool:
    return (isinstance(space, gym.spaces.Box) and space.dtype == np.uint8
            and len(space.shape) == 3 and space.shape[-1] == 3)


class ImageFrames(gym.ObservationWrapper):
    """64x64 frames from image observations, or from the renderer when observations are
    not images (e.g. classic control)."""

    def __init__(self, env: gym.Env, from_render: bool) -> None:
        super().__init__(env)
        self.from_render = from_render
        self.observation_space = gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)

    def observation(self, observation):
        return resize_frame(self.env.render() if self.from_render else observation)


def make_generic(gym_id: str, max_steps: int = 0) -> gym.Env:
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    kwargs = {"max_episode_steps": max_steps} if max_steps else {}
    try:
        env = gym.make(gym_id, **kwargs)
    except gym.error.Error as exc:
        raise UnknownEnvError(
            f"unknown environment '{gym_id}' ({exc}): use carracing, doom, or a registered "
            "Gymnasium id with image observations (see `wmlab envs`)") from None
    if _is_image(env.observation_space):
        return ImageFrames(env, from_render=False)
    render_modes = env.metadata.get("render_modes") or []
    env.close()
    if "rgb_array" not in render_modes:
        raise WmlabError(f"'{gym_id}' has neither image observations nor an rgb_array "
                         "renderer: wmlab's V needs pixels")
    return ImageFrames(gym.make(gym_id, render_mode="rgb_array", **kwargs), from_render=True)


def generic_spec(gym_id: str) -> EnvSpec:
    env = make_generic(gym_id)
    try:
        space = env.action_space
        limit = env.spec.max_episode_steps if env.spec else None
        common = dict(name=gym_id, gym_id=gym_id, description=f"Gymnasium {gym_id}",
                      backends=("gymnasium",), default_backend="gymnasium",
                      reference_backend="gymnasium", max_steps=limit or DEFAULT_MAX_STEPS)
        if isinstance(space, gym.spaces.Discrete):
            return EnvSpec(**common, action_kind="discrete", action_dim=int(space.n),
                           controller_outputs=int(space.n))
        if isinstance(space, gym.spaces.Box):
            size = int(np.prod(space.shape))
            return EnvSpec(**common, action_kind="box", action_dim=size,
                           controller_outputs=size,
                           action_low=tuple(float(v) for v in space.low.ravel()),
                           action_high=tuple(float(v) for v in space.high.ravel()),
                           action_shape=tuple(space.shape))
        raise WmlabError(f"'{gym_id}' has a {type(space).__name__} action space: wmlab maps "
                         "controller outputs to Box and Discrete actions only")
    finally:
        env.close()
