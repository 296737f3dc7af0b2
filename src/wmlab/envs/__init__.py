"""Environments as wmlab sees them: 64x64x3 uint8 frames and a raw-output -> action map.

``make`` gives one Gymnasium env, ``make_batch`` B envs stepped together (what collection and
real-env evaluation use). Built-ins: ``carracing`` (backends ``gymnasium``, the reference,
and ``envpool``, the fast C++ port) and ``doom`` (ViZDoom). Any other Gymnasium id with image
observations, or an rgb_array renderer, works through a generic wrapper.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from wmlab.envs.batch import EnvBatch, EnvpoolBatch, GymnasiumBatch
from wmlab.envs.entry import EnvEntry
from wmlab.envs.frames import (
    preprocess_carracing,
    preprocess_carracing_batch,
    resize_batch,
    resize_frame,
)
from wmlab.envs.registry import builtin_entries
from wmlab.envs.repeat import ActionRepeat, RepeatedBatch, check_action_repeat
from wmlab.envs.spec import EnvSpec
from wmlab.errors import WmlabError

__all__ = ["EnvBatch", "EnvEntry", "EnvSpec", "EnvpoolBatch", "GymnasiumBatch", "env_options",
           "get_spec", "list_envs", "make", "make_batch", "preprocess_carracing",
           "preprocess_carracing_batch", "resize_batch", "resize_frame"]


def list_envs() -> list[EnvSpec]:
    """The built-in environments (any other Gymnasium id with pixels works too)."""
    return [entry.spec for entry in builtin_entries().values()]


def get_spec(name: str) -> EnvSpec:
    """The spec of ``name``; for a generic Gymnasium id, one env is made briefly."""
    entries = builtin_entries()
    if name in entries:
        return entries[name].spec
    from wmlab.envs.generic import generic_spec

    return generic_spec(name, entries)


def env_options(max_steps: int = 0, action_repeat: int = 1) -> dict[str, int]:
    """The options of ``make``/``make_batch`` a run's ``[env]`` sets, defaults left out."""
    options = {"max_steps": max_steps} if max_steps else {}
    return {**options, "action_repeat": action_repeat} if action_repeat != 1 else options


def make(name: str, backend: str | None = None, *, action_repeat: int = 1,
         **options: Any) -> gym.Env:
    """One env with 64x64x3 uint8 observations.

    Options: ``max_steps`` (episode cap in env frames, default the env's own) and
    ``action_repeat`` (each action held for that many frames, rewards summed; 1 = every
    frame) for every env; ``num_threads`` for carracing/envpool; ``resolution`` for doom;
    other Gymnasium ids pass their options to ``gymnasium.make``.
    """
    repeat = check_action_repeat(action_repeat)
    entries = builtin_entries()
    if name not in entries:
        from wmlab.envs.generic import make_generic

        env = make_generic(name, entries, backend, **options)
    else:
        entry = entries[name]
        chosen = entry.spec.check_backend(backend)
        entry.check_options(chosen, options)
        env = entry.make(chosen, **options)
    return ActionRepeat(env, repeat) if repeat > 1 else env


def make_batch(name: str, num_envs: int, backend: str | None = None, *,
               action_repeat: int = 1, **options: Any) -> EnvBatch:
    """``num_envs`` envs stepped as one batch (see ``wmlab.envs.batch``); options as ``make``."""
    if isinstance(num_envs, bool) or not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
        raise WmlabError(f"num_envs must be an integer of at least 1, got {num_envs!r}")
    repeat = check_action_repeat(action_repeat)
    entries = builtin_entries()
    if name not in entries:
        from wmlab.envs.generic import make_generic_batch

        batch = make_generic_batch(name, entries, num_envs, backend, **options)
    else:
        entry = entries[name]
        chosen = entry.spec.check_backend(backend)
        entry.check_options(chosen, options)
        batch = entry.make_batch(chosen, num_envs, **options)
    return RepeatedBatch(batch, repeat) if repeat > 1 else batch
