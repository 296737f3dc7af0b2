"""Environments as wmlab sees them: 64x64x3 uint8 frames and a raw-output -> action map.

``make`` gives one Gymnasium env, ``make_batch`` a batch stepped together (what collection
and real-env evaluation use). Built-ins: ``carracing`` (backends ``gymnasium``, the
reference, and ``envpool``, the fast C++ port) and ``doom`` (ViZDoom). Any other Gymnasium
id with image observations works through a generic wrapper.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gymnasium as gym

from wmlab.envs.batch import EnvBatch, EnvpoolBatch, GymnasiumBatch
from wmlab.envs.frames import preprocess_carracing, resize_frame
from wmlab.envs.spec import EnvSpec
from wmlab.errors import WmlabError

__all__ = ["EnvBatch", "EnvSpec", "get_spec", "list_envs", "make", "make_batch",
           "preprocess_carracing", "resize_frame"]


@dataclass(frozen=True)
class _Entry:
    spec: Callable[[], EnvSpec]
    make: Callable[..., gym.Env]  # (backend, max_steps, **kwargs) -> env


def _builtins() -> dict[str, _Entry]:
    from wmlab.envs.carracing import EnvpoolCarRacing, carracing_spec, make_gymnasium
    from wmlab.envs.doom import TakeCoverEnv, doom_spec

    def car(backend: str, max_steps: int, **kwargs) -> gym.Env:
        if backend == "envpool":
            return EnvpoolCarRacing(max_steps, **kwargs)
        return make_gymnasium(max_steps, **kwargs)

    def doom(backend: str, max_steps: int, **kwargs) -> gym.Env:
        return TakeCoverEnv(max_steps, **kwargs)

    return {"carracing": _Entry(carracing_spec, car), "doom": _Entry(doom_spec, doom)}


def list_envs() -> list[EnvSpec]:
    return [entry.spec() for entry in _builtins().values()]


def get_spec(name: str) -> EnvSpec:
    builtins = _builtins()
    if name in builtins:
        return builtins[name].spec()
    if name == "binpacking":
        raise WmlabError("the binpacking environment is not built yet (it arrives with its "
                         "own issue): use carracing or doom")
    from wmlab.envs.generic import generic_spec

    return generic_spec(name)


def _check_count(num_envs: int) -> None:
    if num_envs < 1:
        raise WmlabError(f"num_envs must be at least 1, got {num_envs}")


def make(name: str, backend: str | None = None, max_steps: int = 0, **kwargs) -> gym.Env:
    """One env with 64x64x3 uint8 observations."""
    spec = get_spec(name)
    backend = spec.check_backend(backend)
    steps = max_steps or spec.max_steps
    builtins = _builtins()
    if name in builtins:
        return builtins[name].make(backend, steps, **kwargs)
    from wmlab.envs.generic import make_generic

    return make_generic(name, steps)


def make_batch(name: str, num_envs: int, backend: str | None = None, max_steps: int = 0,
               **kwargs) -> EnvBatch:
    """``num_envs`` envs stepped as one batch (see ``wmlab.envs.batch``)."""
    _check_count(num_envs)
    spec = get_spec(name)
    backend = spec.check_backend(backend)
    steps = max_steps or spec.max_steps
    if backend == "envpool":
        return EnvpoolBatch(spec, num_envs, steps, **kwargs)
    return GymnasiumBatch(spec, lambda: make(name, backend, steps, **kwargs), num_envs,
                          backend)
