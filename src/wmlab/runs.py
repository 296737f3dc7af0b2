"""Run directories: where a run's resolved config, data and outputs live.

A run directory is a path or fsspec URL; every file in it is written under a temporary name
and renamed into place, so a kill never leaves a half-written config behind. ``RunLayout``
is the one place that knows where each stage keeps its outputs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import fsspec

from wmlab.config import Config, to_toml
from wmlab.errors import ConfigError
from wmlab.fsio import atomic_write_bytes, exists

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


ITERATIONS = "iterations"  # iteration k >= 2 of a run lives in <run>/iterations/<k>/

# The pipeline's stages in the order they run, each with its record in stages/<name>.json.
# Written here, below both, so the pipeline that runs them and the report that reads their
# records agree on the names and the order.
STAGES = ("collect", "vision", "encode", "memory", "controller", "evaluate", "report")


class _Path:
    """A path of a run directory, relative to it: ``layout.memory`` is ``<root>/memory``."""

    def __init__(self, relative: str, doc: str) -> None:
        self.relative, self.__doc__ = relative, doc

    def __get__(self, layout: RunLayout | None, owner: type) -> Any:
        return self if layout is None else layout._at(self.relative)


@dataclass(frozen=True)
class RunLayout:
    """Every path of a run directory (a path or an fsspec URL).

    >>> layout = RunLayout("runs/carracing-quick")
    >>> layout.memory, layout.iteration(2).controller
    ('runs/carracing-quick/memory', 'runs/carracing-quick/iterations/2/controller')
    """

    root: str  # "" names every path relative to a run directory (readers of any run)

    def _at(self, relative: str) -> str:
        return f"{self.root}/{relative}" if self.root else relative

    @classmethod
    def of(cls, cfg: Config) -> RunLayout:
        return cls(cfg.run_dir())

    # The paths below are relative to the run directory, read through ``_Path``.
    config = _Path("config.toml", "The run's resolved config.")
    data = _Path("data", "The episode store, unless ``collect.out`` puts it elsewhere.")
    vision = _Path("vision", "V's checkpoints, metrics and pictures.")
    memory = _Path("memory", "M's checkpoints, metrics, calibration and dream GIFs.")
    calibration = _Path("memory/calibration.json",
                        "M's dream beside the real game (reference policies), written by "
                        "the M stage.")
    controller = _Path("controller", "C's CMA-ES state, checkpoints, snapshots and metrics.")
    fitted_done_bias = _Path("controller/fitted-done-bias.json",
                             "The done-logit shift C's dreams run with under "
                             "``dream.fit_done_bias``.")
    tau_choice = _Path("controller/tau-choice.json",
                       "The tau C's dreams run at under ``dream.tau_from_fidelity``, and its "
                       "measurement.")
    eval = _Path("eval", "The evaluations, on fixed recorded seeds.")
    fidelity = _Path("eval/fidelity.json",
                     "The dream's fidelity for C (rank correlation of dream and real returns).")
    neighbour_fidelity = _Path("eval/fidelity-neighbours.json",
                               "Whether the dream ranks the controllers CMA-ES compares "
                               "around C's best (``wmlab fidelity --neighbours``).")
    stall_effect = _Path("eval/stall-effect.json", "What ending stalled rollouts does to C's "
                         "fitness (``wmlab stall-effect``).")
    tau_sweep = _Path("sweeps/tau", "The paper's temperature table (``wmlab sweep-tau``).")
    stages = _Path("stages", "One record per pipeline stage.")
    trash = _Path("trash", "Outputs of stages whose inputs changed (moved here, never "
                  "deleted).")
    report_md = _Path("report.md", "The report, in Markdown.")
    report_html = _Path("report.html", "The report, one self-contained HTML file.")
    pictures = _Path("report", "The report's figures.")

    def sweep(self, name: str) -> str:
        """A sweep of ``wmlab sweep-tau --name NAME`` (``tau``: the paper's table; another name
        keeps a variant's controllers and table apart, e.g. the dream without dropout)."""
        return self._at(f"sweeps/{name}")

    def memory_member(self, member: int) -> str:
        """M number ``member`` of an ensemble (``mdrnn.ensemble``): 0 is the run's M, the
        others live under ``memory/ensemble/<member>``."""
        return ensemble_member(self.memory, member)

    def memory_members(self, count: int) -> tuple[str, ...]:
        """The folders of an ensemble of ``count`` Ms, the run's own M first."""
        return tuple(self.memory_member(k) for k in range(count))

    def reference_real(self, policy: str) -> str:
        """A reference policy's real-game episodes, measured for the calibration."""
        return self._at(f"memory/reference-{policy}-real.json")

    def scores(self, who: str, where: str) -> str:
        """The evaluation of ``who`` ("eval": the run's C, "random", or another policy's
        name) in ``where`` (a backend, or "dream")."""
        return self._at(f"eval/{who}-{where}.json")

    def baseline_scores(self, policy: str) -> str:
        """A heuristic baseline's evaluation on the same episodes (BinPacking)."""
        return self._at(f"eval/baseline-{policy}.json")

    @property
    def base(self) -> RunLayout:
        """Iteration 1's directory (the run itself, for an iteration's layout)."""
        return RunLayout(self._split_iteration()[0])

    @property
    def iteration_number(self) -> int:
        tail = self._split_iteration()[1:]
        return int(tail[0]) if tail and tail[0].isdigit() else 1

    def _split_iteration(self) -> list[str]:
        # a leading "/" lets a relative layout ("iterations/2") split like a full path
        head, *tail = f"/{self.root}".split(f"/{ITERATIONS}/")
        return [head[1:], *tail]

    def iteration(self, k: int) -> RunLayout:
        """Iteration ``k`` of this run (1: the run itself)."""
        return self.base if k == 1 else RunLayout(self.base._at(f"{ITERATIONS}/{k}"))


def ensemble_member(memory: str, member: int) -> str:
    """The folder of member ``member`` of the ensemble whose first M is in ``memory``."""
    return memory if member == 0 else f"{memory.rstrip('/')}/ensemble/{member}"


def spent_seconds(record: dict[str, Any]) -> float:
    """A stage record's compute for a budget: its own attempts plus those of versions
    of it started again (the engine's ``discarded_seconds``)."""
    own = float(record.get("compute_seconds", record.get("seconds", 0.0)) or 0.0)
    return own + float(record.get("discarded_seconds", 0.0) or 0.0)


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


def config_drift(cfg: Config, sections: tuple[str, ...], who: str,
                 ignored: Callable[[str, str], bool] = lambda section, key: False
                 ) -> list[str]:
    """One line per key of ``sections`` where ``cfg`` differs from the run's recorded
    config.toml (a ``--set`` used for the run but forgotten by ``who``, the command acting on
    it now), except keys ``ignored(section, key)``. Nothing where no config is recorded."""
    path = RunLayout.of(cfg).config
    if not exists(path):
        return []
    with fsspec.open(path, "rb") as handle:
        try:
            recorded = tomllib.load(handle)
        except tomllib.TOMLDecodeError:
            return []
    current = tomllib.loads(to_toml(cfg))
    return [f"{section}.{key}: run {recorded[section][key]!r}, {who} {value!r}"
            for section in sections for key, value in current.get(section, {}).items()
            if key in recorded.get(section, {}) and recorded[section][key] != value
            and not ignored(section, key)]
