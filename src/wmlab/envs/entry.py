"""What a built-in environment provides: its spec, its makers and the options they take."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import gymnasium as gym

from wmlab.envs.batch import EnvBatch
from wmlab.envs.spec import EnvSpec
from wmlab.errors import WmlabError


@dataclass(frozen=True)
class EnvEntry:
    """How to build one built-in env: its spec, its makers and the options each backend takes."""

    spec: EnvSpec
    make: Callable[..., gym.Env]  # make(backend, **options) -> one env with 64x64 frames
    make_batch: Callable[..., EnvBatch]  # make_batch(backend, num_envs, **options)
    options: Mapping[str, tuple[str, ...]]  # backend -> keyword options it accepts
    # For envs whose spec depends on settings (bin packing's C): "<name>:<params>" -> entry.
    configure: Callable[[str], EnvEntry] | None = None

    def check_options(self, backend: str, options: Mapping[str, Any]) -> None:
        allowed = self.options.get(backend, ())
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise WmlabError(f"env '{self.spec.name}' (backend {backend}) has no option "
                             f"{', '.join(repr(name) for name in unknown)}: it accepts "
                             f"{', '.join(allowed) or 'no options'}")
