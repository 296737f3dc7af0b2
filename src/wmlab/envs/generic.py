"""Any other Gymnasium env as 64x64 frames: from image observations, or else from its renderer."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import gymnasium as gym
import numpy as np

from wmlab.envs.batch import GymnasiumBatch
from wmlab.envs.frames import FRAME_SHAPE, headless_pygame, resize_frame
from wmlab.envs.spec import EnvSpec, check_max_steps
from wmlab.errors import UnknownEnvError, WmlabError

BACKEND = "gymnasium"
DEFAULT_MAX_STEPS = 1000  # for registered envs that set no time limit of their own


def _is_image(space: gym.Space) -> bool:
    return (isinstance(space, gym.spaces.Box) and space.dtype == np.uint8
            and len(space.shape) == 3 and space.shape[-1] == 3)


class ImageFrames(gym.ObservationWrapper, gym.utils.RecordConstructorArgs):
    """64x64 frames from image observations, or from the renderer when observations are not
    images (e.g. classic control). ``render()`` returns the last full-size frame."""

    def __init__(self, env: gym.Env, from_render: bool) -> None:
        gym.utils.RecordConstructorArgs.__init__(self, from_render=from_render)
        gym.ObservationWrapper.__init__(self, env)
        if from_render and env.render_mode != "rgb_array":
            raise WmlabError(f"frames from the renderer need render_mode='rgb_array', got "
                             f"{env.render_mode!r}")
        self.from_render = from_render
        self.observation_space = gym.spaces.Box(0, 255, FRAME_SHAPE, np.uint8)
        self._screen: np.ndarray | None = None

    def observation(self, observation: Any) -> np.ndarray:
        self._screen = np.asarray(self.env.render() if self.from_render else observation)
        return resize_frame(self._screen)

    def render(self) -> np.ndarray | None:
        # The frame is kept, not drawn again: rendering is often the env's slowest part.
        return None if self._screen is None else self._screen.copy()


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _registered(gym_id: str, builtins: Iterable[str]) -> gym.envs.registration.EnvSpec:
    try:
        return gym.spec(gym_id)
    except (gym.error.UnregisteredEnv, gym.error.DeprecatedEnv, ModuleNotFoundError) as exc:
        raise UnknownEnvError(
            f"unknown environment '{gym_id}' ({_one_line(exc)}): use one of "
            f"{', '.join(builtins)}, or a registered Gymnasium id with image observations "
            "or an rgb_array renderer (see `wmlab envs`)") from None


def _gym_make(gym_id: str, **kwargs: Any) -> gym.Env:
    try:
        return gym.make(gym_id, **kwargs)
    except gym.error.DependencyNotInstalled as exc:
        raise WmlabError(f"'{gym_id}' cannot be made: {_one_line(exc)}") from None


def make_generic(gym_id: str, builtins: Iterable[str], backend: str | None = None,
                 max_steps: int | None = None, **gym_kwargs: Any) -> gym.Env:
    """A registered Gymnasium env with 64x64x3 uint8 observations."""
    if backend not in (None, BACKEND):
        raise WmlabError(f"env '{gym_id}' has no backend '{backend}': generic Gymnasium envs "
                         f"have only '{BACKEND}'")
    registered = _registered(gym_id, builtins)
    steps = check_max_steps(max_steps, registered.max_episode_steps or DEFAULT_MAX_STEPS)
    headless_pygame()
    env = _gym_make(gym_id, max_episode_steps=steps, **gym_kwargs)
    if _is_image(env.observation_space):
        return ImageFrames(env, from_render=False)
    render_modes = env.metadata.get("render_modes") or []
    env.close()
    if "rgb_array" not in render_modes:
        raise WmlabError(f"'{gym_id}' has neither (H, W, 3) uint8 image observations nor an "
                         "rgb_array renderer, and wmlab's V needs pixels: pick an env with one")
    env = _gym_make(gym_id, max_episode_steps=steps, render_mode="rgb_array", **gym_kwargs)
    return ImageFrames(env, from_render=True)


def spec_of(gym_id: str, env: gym.Env) -> EnvSpec:
    """The spec of a generic env, read from an instance made by ``make_generic``."""
    space = env.action_space
    limit = env.spec.max_episode_steps if env.spec is not None else None
    common: dict[str, Any] = dict(
        name=gym_id, gym_id=gym_id, description=f"Gymnasium {gym_id} as 64x64 frames",
        backends=(BACKEND,), default_backend=BACKEND, reference_backend=BACKEND,
        max_steps=limit or DEFAULT_MAX_STEPS)
    if isinstance(space, gym.spaces.Discrete):
        if int(space.start) != 0:
            raise WmlabError(f"'{gym_id}' numbers its actions from {space.start}: wmlab maps "
                             "controller outputs to Discrete spaces that start at 0 only")
        n = int(space.n)
        return EnvSpec(**common, action_kind="discrete", action_dim=n, controller_outputs=n)
    if isinstance(space, gym.spaces.Box):
        if not (np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high))):
            raise WmlabError(f"'{gym_id}' has an unbounded Box action space: wmlab scales "
                             "controller outputs in [-1, 1] to finite bounds only")
        size = int(np.prod(space.shape))
        return EnvSpec(**common, action_kind="box", action_dim=size, controller_outputs=size,
                       action_low=tuple(float(v) for v in space.low.ravel()),
                       action_high=tuple(float(v) for v in space.high.ravel()),
                       action_shape=tuple(int(d) for d in space.shape))
    raise WmlabError(f"'{gym_id}' has a {type(space).__name__} action space: wmlab maps "
                     "controller outputs to Box and Discrete actions only")


def generic_spec(gym_id: str, builtins: Iterable[str]) -> EnvSpec:
    """The spec of a generic env; makes one briefly to read its spaces."""
    env = make_generic(gym_id, builtins)
    try:
        return spec_of(gym_id, env)
    finally:
        env.close()


def make_generic_batch(gym_id: str, builtins: Iterable[str], num_envs: int,
                       backend: str | None = None, **options: Any) -> GymnasiumBatch:
    """``num_envs`` copies of a generic env; the spec is read from the first one."""
    if num_envs < 1:
        raise WmlabError(f"num_envs must be at least 1, got {num_envs}")
    names = tuple(builtins)
    first = make_generic(gym_id, names, backend, **options)
    try:
        spec = spec_of(gym_id, first)
    except BaseException:
        first.close()
        raise
    unused = [first]

    def make_env() -> gym.Env:
        return unused.pop() if unused else make_generic(gym_id, names, backend, **options)

    return GymnasiumBatch.build(spec, BACKEND, num_envs, make_env)
