"""The built-in environments: adding one is one ``entry()`` function and one line below."""

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


class BuiltinEntries(dict):
    """Name -> entry; also answers ``<name>:<params>`` for entries with ``configure``
    (e.g. ``binpacking:capacity=30``), so a name alone still determines the spec."""

    def _configured(self, name: object) -> EnvEntry | None:
        if not isinstance(name, str) or ":" not in name:
            return None
        base, params = name.split(":", 1)
        entry = dict.get(self, base.strip())
        if entry is None or entry.configure is None:
            return None
        return entry.configure(params)

    def __contains__(self, name: object) -> bool:
        return dict.__contains__(self, name) or self._configured(name) is not None

    def __missing__(self, name: str) -> EnvEntry:
        entry = self._configured(name)
        if entry is None:
            raise KeyError(name)
        return entry


def builtin_entries() -> dict[str, EnvEntry]:
    """Name -> entry, built on each call so no module holds mutable registry state."""
    from wmlab.envs import binpacking, carracing, doom

    entries = (carracing.entry(), doom.entry(), binpacking.entry())
    return BuiltinEntries({entry.spec.name: entry for entry in entries})
