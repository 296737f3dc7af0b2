"""Encoded series: every frame's (mu, logvar) under one V, beside the episodes they encode.

M trains from these, never from frames. They live in ``<store>/series/<fingerprint>/``,
one ``.npz`` per episode, where the fingerprint is the hash of the V weights that made them:
series of different V's can never be mixed, and retraining V simply starts a new folder.
``series/current.json`` names the folder that is complete for the newest V.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np

from wmlab.errors import StoreError
from wmlab.fsio import atomic_write_bytes


@dataclass
class Series:
    """One episode as M sees it: T+1 latent distributions and the T steps between them."""

    episode_id: str
    mu: np.ndarray  # (T+1, z) float16
    logvar: np.ndarray  # (T+1, z) float16
    actions: np.ndarray  # (T, A) float32
    rewards: np.ndarray  # (T,) float32
    dones: np.ndarray  # (T,) bool

    @property
    def length(self) -> int:
        return len(self.rewards)


class SeriesStore:
    def __init__(self, store_url: str, fingerprint: str) -> None:
        self.store_url = store_url.rstrip("/")
        self.fingerprint = fingerprint
        self.url = f"{self.store_url}/series/{fingerprint}"
        self.fs, self.path = fsspec.core.url_to_fs(self.url)

    @classmethod
    def current(cls, store_url: str) -> SeriesStore:
        """The series of the V that was last encoded completely."""
        fs, path = fsspec.core.url_to_fs(f"{store_url.rstrip('/')}/series/current.json")
        try:
            with fs.open(path, "rb") as handle:
                fingerprint = json.load(handle)["fingerprint"]
        except FileNotFoundError:
            raise StoreError(f"no encoded series in {store_url}: run `wmlab encode` after "
                             "training V") from None
        return cls(store_url, fingerprint)

    def mark_current(self, info: dict[str, Any]) -> None:
        payload = json.dumps({"fingerprint": self.fingerprint, **info}, indent=2).encode()
        atomic_write_bytes(f"{self.store_url}/series/current.json", payload)

    def write_info(self, info: dict[str, Any]) -> None:
        """Record which V made this folder (``vae.json``), so it can be traced to its weights."""
        payload = json.dumps({"fingerprint": self.fingerprint, **info}, indent=2).encode()
        atomic_write_bytes(f"{self.url}/vae.json", payload)

    def info(self) -> dict[str, Any]:
        try:
            with self.fs.open(f"{self.path}/vae.json", "rb") as handle:
                return json.load(handle)
        except FileNotFoundError:
            return {"fingerprint": self.fingerprint}

    def _file(self, episode_id: str) -> str:
        return f"{self.path}/{episode_id}.npz"

    def has(self, episode_id: str) -> bool:
        return self.fs.exists(self._file(episode_id))

    def ids(self) -> list[str]:
        if not self.fs.exists(self.path):
            return []
        names = (p.rsplit("/", 1)[-1] for p in self.fs.ls(self.path, detail=False))
        return sorted(n[:-4] for n in names if n.endswith(".npz") and ".tmp-" not in n)

    def write(self, series: Series) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, mu=series.mu.astype(np.float16), logvar=series.logvar.astype(np.float16),
                 actions=series.actions.astype(np.float32),
                 rewards=series.rewards.astype(np.float32), dones=series.dones.astype(bool))
        atomic_write_bytes(f"{self.url}/{series.episode_id}.npz", buffer.getvalue())

    def load(self, episode_id: str) -> Series:
        try:
            with self.fs.open(self._file(episode_id), "rb") as handle:
                data = np.load(io.BytesIO(handle.read()))
                arrays = {k: data[k] for k in ("mu", "logvar", "actions", "rewards", "dones")}
        except FileNotFoundError:
            raise StoreError(f"episode {episode_id} has no series under V {self.fingerprint}: "
                             "run `wmlab encode`") from None
        except (ValueError, OSError, KeyError) as exc:
            raise StoreError(f"series file {self.url}/{episode_id}.npz is damaged ({exc}): "
                             "delete it and run `wmlab encode` again") from None
        return Series(episode_id=episode_id, **arrays)

    def iter_series(self, ids: list[str] | None = None) -> Iterator[Series]:
        for episode_id in ids if ids is not None else self.ids():
            yield self.load(episode_id)
