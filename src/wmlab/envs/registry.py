"""The built-in environments: adding one is one ``entry()`` function and one line below."""

from __future__ import annotations

import wmlab.envs.binpacking as binpacking
import wmlab.envs.carracing as carracing
import wmlab.envs.doom as doom
from wmlab.envs.entry import EnvEntry


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
    entries = (carracing.entry(), doom.entry(), binpacking.entry())
    return BuiltinEntries({entry.spec.name: entry for entry in entries})
