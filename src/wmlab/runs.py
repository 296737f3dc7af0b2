"""Run directories: where a run's resolved config, data and outputs live.

A run directory is a path or fsspec URL; every file in it is written under a temporary name
and renamed into place, so a kill never leaves a half-written config behind.
"""

from __future__ import annotations

import sys

import fsspec

from wmlab.config import Config, to_toml
from wmlab.errors import ConfigError
from wmlab.fsio import atomic_write_bytes

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def prepare_run_dir(cfg: Config) -> str:
    """Create the run directory of ``cfg`` and record its resolved config there.

    A directory made by another preset is refused rather than silently mixed with this one.
    """
    run_dir = cfg.run_dir()
    fs, path = fsspec.core.url_to_fs(run_dir)
    config_path = f"{path}/config.toml"
    if fs.exists(config_path):
        with fs.open(config_path, "rb") as handle:
            try:
                previous = tomllib.load(handle)
            except tomllib.TOMLDecodeError:
                previous = {}
        if previous.get("preset", cfg.preset) != cfg.preset:
            raise ConfigError(
                f"run directory {run_dir} belongs to preset '{previous.get('preset')}', not "
                f"'{cfg.preset}': choose another run name with --run NAME")
    atomic_write_bytes(f"{run_dir}/config.toml", to_toml(cfg).encode())
    return run_dir
