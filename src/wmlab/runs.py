"""Run directories: where a run's resolved config, data and outputs live.

A run directory is a path or fsspec URL; every file in it is written under a temporary name
and renamed into place, so a kill never leaves a half-written config behind. ``RunLayout``
is the one place that knows where each stage keeps its outputs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import fsspec

from wmlab.config import Config, to_toml
from wmlab.errors import ConfigError
from wmlab.fsio import atomic_write_bytes

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


ITERATIONS = "iterations"  # iteration k >= 2 of a run lives in <run>/iterations/<k>/


@dataclass(frozen=True)
class RunLayout:
    """Every path of a run directory (a path or an fsspec URL).

    >>> layout = RunLayout("runs/carracing-quick")
    >>> layout.memory, layout.iteration(2).controller
    ('runs/carracing-quick/memory', 'runs/carracing-quick/iterations/2/controller')
    """

    root: str

    @classmethod
    def of(cls, cfg: Config) -> RunLayout:
        return cls(cfg.run_dir())

    @property
    def config(self) -> str:
        """The run's resolved config (``config.toml``)."""
        return f"{self.root}/config.toml"

    @property
    def data(self) -> str:
        """The episode store, unless ``collect.out`` puts it elsewhere."""
        return f"{self.root}/data"

    @property
    def vision(self) -> str:
        return f"{self.root}/vision"

    @property
    def memory(self) -> str:
        return f"{self.root}/memory"

    @property
    def calibration(self) -> str:
        """M's dream beside the real game (reference policies), written by the M stage."""
        return f"{self.memory}/calibration.json"

    def reference_real(self, policy: str) -> str:
        """A reference policy's real-game episodes, measured for the calibration."""
        return f"{self.memory}/reference-{policy}-real.json"

    @property
    def controller(self) -> str:
        return f"{self.root}/controller"

    @property
    def eval(self) -> str:
        return f"{self.root}/eval"

    @property
    def fidelity(self) -> str:
        """The dream's fidelity for C (rank correlation of dream and real returns)."""
        return f"{self.eval}/fidelity.json"

    @property
    def tau_sweep(self) -> str:
        return f"{self.root}/sweeps/tau"

    @property
    def stages(self) -> str:
        """One record per pipeline stage."""
        return f"{self.root}/stages"

    @property
    def trash(self) -> str:
        """Outputs of stages whose inputs changed (moved here, never deleted)."""
        return f"{self.root}/trash"

    @property
    def report_md(self) -> str:
        return f"{self.root}/report.md"

    @property
    def report_html(self) -> str:
        return f"{self.root}/report.html"

    @property
    def pictures(self) -> str:
        """The report's figures."""
        return f"{self.root}/report"

    @property
    def base(self) -> RunLayout:
        """Iteration 1's directory (the run itself, for an iteration's layout)."""
        return RunLayout(self.root.split(f"/{ITERATIONS}/")[0])

    @property
    def iteration_number(self) -> int:
        tail = self.root.split(f"/{ITERATIONS}/")
        return int(tail[1]) if len(tail) > 1 and tail[1].isdigit() else 1

    def iteration(self, k: int) -> RunLayout:
        """Iteration ``k`` of this run (1: the run itself)."""
        return self.base if k == 1 else RunLayout(f"{self.base.root}/{ITERATIONS}/{k}")


def prepare_run_dir(cfg: Config) -> str:
    """Create the run directory of ``cfg`` and record its resolved config there.

    A directory made by another preset is refused rather than silently mixed with this one.
    """
    run_dir = cfg.run_dir()
    fs, path = fsspec.core.url_to_fs(run_dir)
    config_path = RunLayout(path).config
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
    atomic_write_bytes(RunLayout(run_dir).config, to_toml(cfg).encode())
    return run_dir
