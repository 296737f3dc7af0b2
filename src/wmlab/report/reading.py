"""Reading a run directory for the report: its config, metrics CSVs, evaluation JSONs, stage
records and iterations.

A report is written at any point of a run, so the readers of a run's files are lenient: a
missing or damaged config, evaluation JSON or stage record gives None, a row saying what is
wrong, or is left out, rather than an error. ``RunFiles`` and ``read_metrics`` raise; their
callers decide.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import sys
from dataclasses import dataclass
from typing import Any

import fsspec

from wmlab.config import Config, from_dict
from wmlab.errors import WmlabError
from wmlab.metrics import METRICS_FILE
from wmlab.runs import ITERATIONS, STAGES, RunLayout, spent_seconds

RUN = RunLayout("")  # every path of a run, relative to its directory

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


# Stages whose compute comes before C's first generation (the x offset of C's curve).
UPSTREAM_STAGES = STAGES[:STAGES.index("controller")]


class RunFiles:
    """Read access to one run directory (a path or fsspec URL)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)

    def exists(self, rel: str) -> bool:
        return bool(self.fs.exists(f"{self.root}/{rel}"))

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open(f"{self.root}/{rel}", "rb") as handle:
            return handle.read()

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def glob(self, pattern: str) -> list[str]:
        """Paths relative to the run directory, sorted."""
        prefix = f"{self.root}/"
        found = self.fs.glob(f"{self.root}/{pattern}")
        return sorted(p[len(prefix):] if p.startswith(prefix) else p.rsplit("/", 1)[-1]
                      for p in found)

    def name(self) -> str:
        return self.root.rstrip("/").rsplit("/", 1)[-1]


def iteration_runs(run: RunFiles) -> list[tuple[str, RunFiles]]:
    """The sub-runs ``<run>/iterations/<k>/``, in numeric order."""
    found = []
    for rel in run.glob(f"{ITERATIONS}/*"):
        name = rel.rsplit("/", 1)[-1]
        if name.isdigit() and run.fs.isdir(f"{run.root}/{rel}"):
            found.append((int(name), RunFiles(f"{run.url}/{rel}")))
    return [(f"iteration {k}", sub) for k, sub in sorted(found, key=lambda item: item[0])]


def newest(paths: list[str]) -> str | None:
    """The file of the latest epoch/step (numbers in names compared as numbers)."""
    def key(path: str) -> tuple[list[int], str]:
        return [int(n) for n in re.findall(r"\d+", path.rsplit("/", 1)[-1])], path
    return max(paths, key=key) if paths else None


# ---------------------------------------------------------------------------------------------
# The config


def read_config(run: RunFiles) -> tuple[Config | None, str, str]:
    """The run's resolved config, its text, and what is wrong with it ("" when nothing).

    A damaged config is reported rather than raised: the rest of the run may still be worth
    looking at.
    """
    if not run.exists(RUN.config):
        return None, "", "no config.toml in this run directory"
    text = run.read_bytes(RUN.config).decode(errors="replace")
    try:
        return from_dict(tomllib.loads(text)), text, ""
    except tomllib.TOMLDecodeError as exc:
        return None, text, f"config.toml is not valid TOML ({exc})"
    except WmlabError as exc:
        return None, text, f"config.toml does not validate ({exc})"


def env_key(cfg: Config) -> str | None:
    """Which published table applies: carracing, doom, binpacking, or None."""
    for name in (cfg.preset, cfg.env.name):
        lowered = name.lower()
        if "carracing" in lowered:
            return "carracing"
        if "doom" in lowered or "takecover" in lowered:
            return "doom"
        if "binpacking" in lowered:
            return "binpacking"
    return None


# ---------------------------------------------------------------------------------------------
# Metrics and compute


def read_metrics(run: RunFiles, rel: str) -> list[dict[str, float]]:
    """Rows of a metrics.csv as floats; empty cells (keys logged at other steps) left out."""
    rows = []
    for raw in csv.DictReader(io.StringIO(run.read_text(rel))):
        row = {}
        for key, value in raw.items():
            if key is None or value in (None, ""):
                continue
            try:
                row[key] = float(value)
            except ValueError:
                continue
        if "step" in row:
            rows.append(row)
    return rows


def series(rows: list[dict[str, float]], key: str, x: str = "step"
           ) -> tuple[list[float], list[float]]:
    pairs = [(r[x], r[key]) for r in rows if key in r and x in r]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def stage_compute(run: RunFiles, name: str) -> float:
    """A stage's compute over its attempts, discarded ones included (seconds; 0 when it
    has no record)."""
    if not run.exists(f"{RUN.stages}/{name}.json"):
        return 0.0
    try:
        record = json.loads(run.read_bytes(f"{RUN.stages}/{name}.json"))
        return spent_seconds(record)
    except (ValueError, TypeError, AttributeError):
        return 0.0


def compute_curve(runs: list[tuple[str, RunFiles]]) -> list[tuple[str, list[float],
                                                                  list[float]]]:
    """Per run (iterations after each other): the scored means against the hours of
    compute spent so far, every earlier stage and iteration included (and compute on
    outputs discarded since). The evaluate and report stages of an iteration count before
    the next iteration starts."""
    curves, spent = [], 0.0
    for label, run in runs:
        spent += sum(stage_compute(run, name) for name in UPSTREAM_STAGES)
        metrics = f"{RUN.controller}/{METRICS_FILE}"
        rows = read_metrics(run, metrics) if run.exists(metrics) else []
        in_generations = sum(row.get("seconds", 0.0) for row in rows)
        # C's stage compute beyond its generations (the tau measurement, the carry-over's
        # scoring, attempts started again) came before them: it counts first
        before = max(0.0, stage_compute(run, "controller") - in_generations)
        hours, scores, elapsed = [], [], spent + before
        for row in rows:
            elapsed += row.get("seconds", 0.0)
            if "eval_mean" in row and elapsed > 0:  # (a log axis: no point at hour 0)
                hours.append(elapsed / 3600)
                scores.append(row["eval_mean"])
        if hours:
            curves.append((label, hours, scores))
        spent = elapsed + stage_compute(run, "evaluate") + stage_compute(run, "report")
    return curves


def compute_curves(histories: list[list[tuple[str, RunFiles]]]
                   ) -> list[tuple[str, list[float], list[float]]]:
    """``compute_curve`` of each run's history (its iterations in order), every run counted
    from its own zero: compute never adds up across two runs."""
    return [curve for history in histories for curve in compute_curve(history)]


def stage_records(run: RunFiles, rels: list[str]) -> dict[str, dict[str, Any]]:
    """The readable ones of the stage records ``rels`` (``stages/*.json``) by stage name."""
    found: dict[str, dict[str, Any]] = {}
    for rel in rels:
        try:
            record = json.loads(run.read_bytes(rel))
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(record, dict):
            found[str(record.get("stage", rel))] = record
    return found


# ---------------------------------------------------------------------------------------------
# Evaluation JSONs


@dataclass
class EvalRow:
    """One row of the report's evaluation table, read from an evaluation JSON."""

    run: str
    name: str
    mean: float | None
    std: float | None
    episodes: int | None
    backend: str
    detail: str  # what was evaluated (controller, tau, policy...)


_MEAN_KEYS = ("mean", "return_mean", "mean_return", "score_mean", "score")
_STD_KEYS = ("std", "return_std", "std_return", "score_std")
_DETAIL_KEYS = ("label", "agent", "policy", "controller", "kind", "tau", "where", "fitness",
                "iteration")


def _short(key: str, value: Any) -> Any:
    """A controller's path as its last two parts (the run is named in its own column)."""
    if key == "controller" and isinstance(value, str) and value.count("/") > 1:
        return "/".join(value.rstrip("/").split("/")[-2:])
    return value


def _first_number(data: dict[str, Any], keys: tuple[str, ...]) -> float | None:
    return next((float(data[k]) for k in keys if isinstance(data.get(k), (int, float))), None)


def parse_eval(data: Any, run: str, name: str) -> EvalRow:
    """An evaluation JSON, read leniently: the evaluation command writes mean, std, the
    episodes' returns and the backend; older or hand-made files may hold only some."""
    if not isinstance(data, dict):
        data = {"returns": data} if isinstance(data, list) else {}
    if isinstance(data.get("summary"), dict):
        data = {**data, **data["summary"]}
    returns = data.get("returns")
    if returns is None and isinstance(data.get("episodes"), list):
        returns = [e.get("return") for e in data["episodes"] if isinstance(e, dict)]
    values = [float(v) for v in returns or [] if isinstance(v, (int, float))]
    mean = _first_number(data, _MEAN_KEYS)
    std = _first_number(data, _STD_KEYS)
    if values and mean is None:
        mean = sum(values) / len(values)
    if values and std is None:
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    episodes = data.get("episodes") if isinstance(data.get("episodes"), int) else None
    if episodes is None and values:
        episodes = len(values)
    details = [f"{k} {_short(k, data[k])}" for k in _DETAIL_KEYS
               if isinstance(data.get(k), (str, int, float)) and not isinstance(data[k], bool)
               and data[k] != ""]
    return EvalRow(run=run, name=name, mean=mean, std=std, episodes=episodes,
                      backend=str(data.get("backend", "") or "-"),
                      detail=", ".join(details) or name)


def read_evals(run: RunFiles, label: str) -> list[EvalRow]:
    results = []
    for rel in run.glob(f"{RUN.eval}/*.json"):
        name = rel.rsplit("/", 1)[-1][:-len(".json")]
        try:
            data = json.loads(run.read_bytes(rel))
        except (ValueError, UnicodeDecodeError):
            results.append(EvalRow(label, name, None, None, None, "-",
                                      f"{rel} is not valid JSON"))
            continue
        results.append(parse_eval(data, label, name))
    return results


def _read_json(run: RunFiles, rel: str) -> Any:
    """A JSON file's content; None when it is absent or unreadable."""
    try:
        return json.loads(run.read_bytes(rel)) if run.exists(rel) else None
    except (ValueError, UnicodeDecodeError):
        return None


# wmlab.evaluate is imported in the two functions below, not at the top: it imports torch
# (over a second), which writing a report otherwise never needs.


def backend_transfer_line(run: RunFiles, cfg: Config) -> str | None:
    """The "backend transfer: ..." line when the run's controller was scored on its training
    backend (eval/eval-<backend>.json) beside the reported one; None otherwise."""
    from wmlab.evaluate import gap_from_evals, reported_backend, training_backend

    try:
        trained_on, reported = training_backend(cfg), reported_backend(cfg)
    except WmlabError:
        return None
    found: dict[str, dict[str, Any]] = {}
    for backend in {trained_on, reported}:
        data = _read_json(run, RUN.scores("eval", backend))
        if isinstance(data, dict) and data.get("where", "real") == "real":
            found[backend] = data
    if trained_on == reported or len(found) < 2:
        return None
    try:
        return gap_from_evals(cfg.env.name, found[trained_on], found[reported]).line()
    except WmlabError as exc:
        return f"backend transfer: not computed ({exc})"


def versus_random_line(run: RunFiles, cfg: Config, policy: str = "random") -> str | None:
    """C against the random policy (or the reference behaviour ``policy`` of
    eval.references) on the same episodes (eval/eval-<backend>.json and
    eval/<policy>-<backend>.json of the reported backend), or None without both."""
    from wmlab.evaluate import reported_backend, versus_random

    try:
        backend = reported_backend(cfg)
    except WmlabError:
        return None
    found = []
    for rel in (RUN.scores("eval", backend), RUN.scores(policy, backend)):
        data = _read_json(run, rel)
        if not isinstance(data, dict):
            return None
        found.append(data)
    paired = versus_random(*found, against=policy)
    return None if paired is None else paired.line()


def episode_lengths_line(run: RunFiles, cfg: Config) -> str | None:
    """How the reported episodes ended: their median length and how many stopped before the
    step cap (CarRacing: a lap finished in time; the cap's -0.1 a frame is what a slow lap
    costs). None for an evaluation recorded before lengths were kept."""
    import statistics

    from wmlab.evaluate import reported_backend

    try:
        data = _read_json(run, RUN.scores("eval", reported_backend(cfg)))
    except WmlabError:
        return None
    extra = data.get("extra") if isinstance(data, dict) else None
    lengths = extra.get("lengths") if isinstance(extra, dict) else None
    cap = extra.get("max_steps") if isinstance(extra, dict) else None
    if not lengths or not isinstance(cap, int) or cap <= 0:
        return None
    early = sum(1 for n in lengths if n < cap)
    return (f"episode lengths: median {statistics.median(lengths):g} steps; {early} of "
            f"{len(lengths)} ended before the cap of {cap} steps")
