"""The report of a run: ``report.md`` and a self-contained ``report.html``.

``write_report(run_dir)`` reads whatever the run directory holds (its config, the episode
store, V's, M's and C's metrics and pictures, the evaluation JSONs) and writes one page
with a section per stage. A stage that has not run yet is named in its section instead of
failing the report, so a report can be written at any point of a run. The plots go to
``<run>/report/`` as PNGs; the HTML page carries every picture inline (base64), so it can
be mailed or archived as one file.

Several runs (the iterations of ``<run>/iterations/<k>/``, or runs passed as ``compare``)
are reported side by side in the evaluation table and in a plot of C's scored means.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import fsspec

from wmlab.config import Config, from_dict
from wmlab.errors import WmlabError
from wmlab.fsio import atomic_write_bytes

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


# ---------------------------------------------------------------------------------------------
# Published results (SPEC.md section 7, and the bin packing paper for binpacking)


@dataclass(frozen=True)
class PublishedScore:
    method: str
    mean: float
    std: float | None = None
    where: str = "real"  # "real" env or "dream"
    approximate: bool = False

    def score(self) -> str:
        mean = f"{'~' if self.approximate else ''}{_num(self.mean)}"
        return mean if self.std is None else f"{mean} +- {_num(self.std)}"


PUBLISHED: dict[str, tuple[PublishedScore, ...]] = {
    "carracing": (
        PublishedScore("World Models: full world model (z, h)", 906, 21),
        PublishedScore("World Models: V only (z)", 632, 251),
        PublishedScore("World Models: V only (z) + 40 hidden units", 788, 141),
        PublishedScore("PyTorch reimplementation", 860, 120),
        PublishedScore("Gym leaderboard", 838, 11),
        PublishedScore("A3C (discrete)", 652, 10),
        PublishedScore("A3C (continuous)", 591, 45),
        PublishedScore("DQN", 343, 18),
    ),
    "doom": (
        PublishedScore("World Models, C trained in the dream, tau 0.10", 193, 58),
        PublishedScore("World Models, C trained in the dream, tau 0.10", 2086, 140, "dream"),
        PublishedScore("World Models, C trained in the dream, tau 0.50", 196, 50),
        PublishedScore("World Models, C trained in the dream, tau 0.50", 2060, 277, "dream"),
        PublishedScore("World Models, C trained in the dream, tau 1.00", 868, 511),
        PublishedScore("World Models, C trained in the dream, tau 1.00", 1145, 690, "dream"),
        PublishedScore("World Models, C trained in the dream, tau 1.15", 1092, 556),
        PublishedScore("World Models, C trained in the dream, tau 1.15", 918, 546, "dream"),
        PublishedScore("World Models, C trained in the dream, tau 1.30", 753, 139),
        PublishedScore("World Models, C trained in the dream, tau 1.30", 732, 269, "dream"),
        PublishedScore("World Models: released agent", 973, 540),
        PublishedScore("Random policy", 210, 108),
    ),
    "binpacking": (
        PublishedScore("World Models", -104.5),
        PublishedScore("Best fit", -26, approximate=True),
        PublishedScore("Sum of squares", -26, approximate=True),
        PublishedScore("Rainbow", -96),
    ),
}

# The figure each env's report leads with (the paper's best result on it).
HEADLINE: dict[str, str] = {"carracing": "World Models: full world model (z, h)",
                            "doom": "World Models, C trained in the dream, tau 1.15",
                            "binpacking": "World Models"}

PUBLISHED_SETTING: dict[str, str] = {
    "carracing": "CarRacing, 100 random tracks",
    "doom": "DoomTakeCover, 100 episodes in the real game (and in the dream where marked)",
    "binpacking": "bin packing, capacity 30, perfectly packable item distribution",
}

# The published compute behind a score, in hours of a 2-core machine (SPEC.md section 7:
# ~200 generations, ~4 days on 64 cores, gave ~890), and each task's "solved" line.
PUBLISHED_COMPUTE: dict[str, tuple[float, float, str]] = {
    "carracing": (4 * 24 * 64 / 2, 890.0, "paper: ~890 after ~4 days of 64 cores"),
}
SOLVED: dict[str, float] = {"carracing": 900.0, "doom": 750.0}

# What to run to produce each stage's outputs, for the "not run yet" notes.
STAGE_COMMANDS: dict[str, str] = {
    "collect": "wmlab collect",
    "vision": "wmlab train-vae",
    "memory": "wmlab train-mdrnn",
    "dream": "wmlab dream",
    "controller": "wmlab train-controller",
    "evaluate": "wmlab evaluate",
}


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
# The document: a few block types rendered to Markdown and to HTML


@dataclass
class Text:
    text: str
    emphasis: bool = False


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Image:
    path: str  # relative to the run directory
    alt: str


@dataclass
class Code:
    text: str
    summary: str  # the HTML shows it collapsed under this line


Block = Text | Table | Image | Code


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)


@dataclass
class ReportPaths:
    markdown: str
    html: str
    figures: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # stages whose outputs are absent


# ---------------------------------------------------------------------------------------------
# Reading a run directory


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


def read_config(run: RunFiles) -> tuple[Config | None, str, str]:
    """The run's resolved config, its text, and what is wrong with it ("" when nothing).

    A damaged config is reported rather than raised: the rest of the run may still be worth
    looking at.
    """
    if not run.exists("config.toml"):
        return None, "", "no config.toml in this run directory"
    text = run.read_bytes("config.toml").decode(errors="replace")
    try:
        return from_dict(tomllib.loads(text)), text, ""
    except tomllib.TOMLDecodeError as exc:
        return None, text, f"config.toml is not valid TOML ({exc})"
    except WmlabError as exc:
        return None, text, f"config.toml does not validate ({exc})"


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


@dataclass
class EvalResult:
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


def parse_eval(data: Any, run: str, name: str) -> EvalResult:
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
    mean = next((float(data[k]) for k in _MEAN_KEYS if isinstance(data.get(k), (int, float))),
                None)
    std = next((float(data[k]) for k in _STD_KEYS if isinstance(data.get(k), (int, float))),
               None)
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
    return EvalResult(run=run, name=name, mean=mean, std=std, episodes=episodes,
                      backend=str(data.get("backend", "") or "-"),
                      detail=", ".join(details) or name)


def read_evals(run: RunFiles, label: str) -> list[EvalResult]:
    results = []
    for rel in run.glob("eval/*.json"):
        name = rel.rsplit("/", 1)[-1][:-len(".json")]
        try:
            data = json.loads(run.read_bytes(rel))
        except (ValueError, UnicodeDecodeError):
            results.append(EvalResult(label, name, None, None, None, "-",
                                      f"{rel} is not valid JSON"))
            continue
        results.append(parse_eval(data, label, name))
    return results


def _newest(paths: list[str]) -> str | None:
    """The file of the latest epoch/step (numbers in names compared as numbers)."""
    def key(path: str) -> tuple[list[int], str]:
        return [int(n) for n in re.findall(r"\d+", path.rsplit("/", 1)[-1])], path
    return max(paths, key=key) if paths else None


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib's object API with the Agg canvas: no pyplot, no global backend switch)


def _figure(panels: int, width: float = 4.2, height: float = 3.0) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure

    cols = min(panels, 3)
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(width * cols, height * rows), dpi=90)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(panels)]
    return fig, axes


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def metric_panels(rows: list[dict[str, float]], preferred: tuple[str, ...],
                  merge: dict[str, tuple[str, ...]] | None = None
                  ) -> list[tuple[str, list[str]]]:
    """(title, columns) per panel: train/<name> beside val/<name> for each metric name,
    preferred names first; ``merge`` puts several names in one panel (precision/recall)."""
    names: list[str] = []
    for row in rows:
        for key in row:
            if "/" not in key:
                continue
            name = key.split("/", 1)[1]
            if name not in names and not name.endswith("_per_s"):
                names.append(name)
    names.sort(key=lambda n: (preferred.index(n) if n in preferred else len(preferred), n))
    panels, used = [], set()
    for title, members in (merge or {}).items():
        present = [n for n in members if n in names]
        if present:
            panels.append((title, [f"{s}/{n}" for n in present for s in ("train", "val")]))
            used.update(present)
    singles = [(n, [f"train/{n}", f"val/{n}"]) for n in names if n not in used]
    return singles + panels


def plot_metrics(rows: list[dict[str, float]], panels: list[tuple[str, list[str]]],
                 title: str) -> bytes:
    fig, axes = _figure(len(panels))
    for ax, (name, columns) in zip(axes, panels, strict=True):
        for column in columns:
            xs, ys = series(rows, column)
            if xs:
                style = "o-" if column.startswith("val/") else "-"
                ax.plot(xs, ys, style, markersize=3, linewidth=1, label=column)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _png(fig)


def plot_learning_curve(rows: list[dict[str, float]], title: str) -> bytes:
    """Best / mean / worst of each generation and the scored means, as the original's
    training-progress plot shows them."""
    fig, (ax,) = _figure(1, width=7.5, height=4.2)
    steps, best = series(rows, "best")
    _, mean = series(rows, "mean")
    _, worst = series(rows, "worst")
    if steps and len(worst) == len(steps) and len(best) == len(steps):
        ax.fill_between(steps, worst, best, alpha=0.15, color="tab:blue")
        ax.plot(steps, worst, linewidth=0.7, color="tab:red", label="worst")
        ax.plot(steps, best, linewidth=0.7, color="tab:green", label="best")
    if mean:
        ax.plot(steps[:len(mean)], mean, linewidth=1.2, color="tab:blue",
                label="population mean")
    eval_x, eval_y = series(rows, "eval_mean")
    if eval_x:
        ax.plot(eval_x, eval_y, "o-", color="black", markersize=4,
                label="mean parameters, scored on fixed seeds")
    ax.set_xlabel("generation")
    ax.set_ylabel("return")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _png(fig)


# Stages whose compute comes before C's first generation (the x offset of C's curve).
UPSTREAM_STAGES = ("collect", "vision", "encode", "memory")


def stage_compute(run: RunFiles, name: str) -> float:
    """A stage's compute over its attempts (seconds; 0 when it has no record)."""
    if not run.exists(f"stages/{name}.json"):
        return 0.0
    try:
        record = json.loads(run.read_bytes(f"stages/{name}.json"))
        return float(record.get("compute_seconds", record.get("seconds", 0.0)) or 0.0)
    except (ValueError, TypeError, AttributeError):
        return 0.0


def compute_curve(runs: list[tuple[str, RunFiles]]) -> list[tuple[str, list[float],
                                                                  list[float]]]:
    """Per run (iterations after each other): the scored means against the hours of
    compute spent so far, every earlier stage and iteration included. The evaluate and
    report stages of an iteration count before the next iteration starts."""
    curves, spent = [], 0.0
    for label, run in runs:
        spent += sum(stage_compute(run, name) for name in UPSTREAM_STAGES)
        rows = read_metrics(run, "controller/metrics.csv") \
            if run.exists("controller/metrics.csv") else []
        hours, scores, elapsed = [], [], spent
        for row in rows:
            elapsed += row.get("seconds", 0.0)
            if "eval_mean" in row and elapsed > 0:  # (a log axis: no point at hour 0)
                hours.append(elapsed / 3600)
                scores.append(row["eval_mean"])
        if hours:
            curves.append((label, hours, scores))
        spent = elapsed + stage_compute(run, "evaluate") + stage_compute(run, "report")
    return curves


def plot_compute_curve(curves: list[tuple[str, list[float], list[float]]],
                       published: tuple[float, float, str] | None, solved: float | None
                       ) -> bytes:
    """Scored means against hours of compute on this machine (log axis), with the paper's
    compute and score marked where known."""
    fig, (ax,) = _figure(1, width=7.5, height=4.2)
    for label, hours, scores in curves:
        ax.plot(hours, scores, "o-", markersize=3, label=label)
    if published is not None:
        hours, score, text = published
        ax.plot([hours], [score], "*", color="black", markersize=10, label=text)
    if solved is not None:
        ax.axhline(solved, color="grey", linestyle="--", linewidth=0.8, label="solved")
    ax.set_xscale("log")
    ax.set_xlabel("hours of compute on this machine, every stage before included")
    ax.set_ylabel("scored mean (fixed seeds)")
    ax.set_title("C's learning curve per hour of compute", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="best")
    return _png(fig)


def plot_fidelity(fidelity: Any) -> bytes:
    """Each controller's dream return against its real return, the diagonal for reference."""
    fig, (ax,) = _figure(1, 4.6, 4.0)
    real = [row.real for row in fidelity.rows]
    dream = [row.dream for row in fidelity.rows]
    ax.scatter(dream, real, s=18)
    for row in fidelity.rows:
        if not row.controller.startswith("generation"):
            ax.annotate(row.controller, (row.dream, row.real), fontsize=7)
    low, high = min(real + dream), max(real + dream)
    ax.plot([low, high], [low, high], color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("dream return")
    ax.set_ylabel("real return")
    ax.set_title(f"dream fidelity: rank correlation {fidelity.rank_correlation:+.2f}",
                 fontsize=9)
    ax.grid(alpha=0.3)
    return _png(fig)


def plot_compare(curves: list[tuple[str, list[float], list[float]]]) -> bytes:
    fig, (ax,) = _figure(1, width=7.5, height=4.2)
    for label, xs, ys in curves:
        ax.plot(xs, ys, "o-", markersize=3, label=label)
    ax.set_xlabel("generation")
    ax.set_ylabel("scored mean return")
    ax.set_title("C's scored mean, run by run", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def plot_data(metas: list[dict[str, Any]]) -> bytes:
    fig, axes = _figure(2)
    lengths = [float(m.get("length", 0)) for m in metas]
    returns = [float(m.get("return", 0)) for m in metas]
    for ax, values, name in ((axes[0], lengths, "episode length (steps)"),
                             (axes[1], returns, "episode return")):
        ax.hist(values, bins=min(30, max(5, len(values) // 3)), color="tab:gray")
        ax.set_xlabel(name, fontsize=8)
        ax.set_ylabel("episodes", fontsize=8)
        ax.grid(alpha=0.3)
    return _png(fig)


# ---------------------------------------------------------------------------------------------
# Sections


def _num(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if float(value).is_integer() and abs(value) >= 10:
        return str(int(value))
    if abs(value) >= 100:
        return f"{value:.{digits}f}"
    return f"{value:.4g}"


def _not_run(stage: str, what: str) -> Text:
    return Text(f"{what}: the {stage} stage has not run yet (`{STAGE_COMMANDS[stage]}`, or "
                "`wmlab run` for the whole pipeline).", emphasis=True)


class _Builder:
    """Collects sections, figures to write and missing stages for one report."""

    def __init__(self, run: RunFiles, cfg: Config | None) -> None:
        self.run = run
        self.cfg = cfg
        self.figures: dict[str, bytes] = {}  # relative path -> PNG bytes
        self.missing: list[str] = []

    def figure(self, name: str, data: bytes, alt: str) -> Image:
        rel = f"report/{name}"
        self.figures[rel] = data
        return Image(rel, alt)

    def miss(self, stage: str, what: str) -> Text:
        if stage not in self.missing:
            self.missing.append(stage)
        return _not_run(stage, what)

    def curves(self, rows: list[dict[str, float]], panels: list[tuple[str, list[str]]],
               name: str, title: str) -> list[Block]:
        if not panels:  # only bookkeeping columns so far
            return [Text("No losses logged yet.", True)]
        return [final_values_table(rows, panels),
                self.figure(name, plot_metrics(rows, panels, title), title)]

    def metrics(self, rel: str) -> list[dict[str, float]] | None:
        if not self.run.exists(rel):
            return None
        try:
            return read_metrics(self.run, rel)
        except (ValueError, UnicodeDecodeError, csv.Error):
            return []

    # -- the sections --------------------------------------------------------------------

    def summary_section(self, runs: list[tuple[str, RunFiles]]) -> Section:
        """The result first: C's score, the random policy on the same seeds, the published
        figure, and the compute it took."""
        section = Section("Summary")
        if self.cfg is None:
            section.blocks.append(Text("No readable config.toml: see below.", True))
            return section
        from wmlab.evaluate import reported_backend

        try:
            backend = reported_backend(self.cfg)
        except WmlabError:
            backend = ""
        rows = []
        for label, run in runs:
            found = {name: parse_eval(json.loads(run.read_bytes(rel)), label, name)
                     for name, rel in ((n, f"eval/{n}-{backend}.json")
                                       for n in ("eval", "random")) if run.exists(rel)}
            if "eval" not in found:
                rows.append([label, "not evaluated yet", "-", "-"])
                continue
            score, floor = found["eval"], found.get("random")
            paired = versus_random_line(run, self.cfg) or "-"
            rows.append([label, f"{_score(score.mean, score.std)} over "
                         f"{score.episodes} episodes ({backend})",
                         _score(floor.mean, floor.std) if floor else "-", paired])
        section.blocks.append(Table(["run", "C", "random policy, same seeds",
                                     "C - random, paired"], rows))
        key = env_key(self.cfg)
        if key is not None:
            headline = next(p for p in PUBLISHED[key]
                            if p.method == HEADLINE[key] and p.where == "real")
            section.blocks.append(Text(f"Published: {headline.method}, {headline.score()} "
                                       f"({PUBLISHED_SETTING[key]})."))
        total = sum(stage_compute(run, name) for _, run in runs for name in STAGE_ORDER)
        if total:
            section.blocks.append(Text(f"Compute: {_duration(total)}, every stage and "
                                       "iteration included (the Pipeline section below)."))
        return section

    def config_section(self, text: str, problem: str) -> Section:
        section = Section("Config")
        cfg = self.cfg
        if cfg is None:
            section.blocks.append(Text(f"{problem}: the sections below use the run directory's "
                                       "default layout, without published numbers.", True))
            if text:
                section.blocks.append(Code(text, "config.toml as found"))
            return section
        section.blocks.append(Table(["preset", "profile", "env", "backend", "seed"], [[
            cfg.preset, cfg.profile, cfg.env.name, cfg.env.backend or "(default)",
            str(cfg.run.seed)]]))
        section.blocks.append(Code(text, "resolved config (config.toml)"))
        return section

    def data_section(self) -> Section:
        from wmlab.data import EpisodeStore

        section = Section("Data")
        url = (self.cfg.collect.out if self.cfg is not None and self.cfg.collect.out
               else f"{self.run.url}/data")
        try:
            store = EpisodeStore.open(url)
            info = store.info()
            metas = store.metas() if info["episodes"] else []
        except WmlabError:
            section.blocks.append(self.miss("collect", f"no episode store at {url}"))
            return section
        if not info["episodes"]:
            section.blocks.append(self.miss("collect", f"the store at {url} holds no episodes"))
            return section
        length, ret = info["length"], info["return"]
        collections = ", ".join(f"{k}: {v}" for k, v in info["collections"].items())
        rows = [
            ["store", str(info["url"])],
            ["env", f"{info['env']} (backend {', '.join(info['backends'])})"],
            ["policies", ", ".join(info["policies"]) or "-"],
            ["episodes", f"{info['episodes']} ({collections})"],
            ["frames", f"{info['frames']} ({info['steps']} steps)"],
            ["length", f"{length['mean']:.1f} +- {length['std']:.1f} (min {length['min']:.0f}"
                       f", max {length['max']:.0f})"],
            ["return", f"{ret['mean']:.2f} +- {ret['std']:.2f} (min {ret['min']:.2f}, max "
                       f"{ret['max']:.2f})"],
            ["disk", f"{info['bytes_on_disk'] / 1e6:.1f} MB for {info['raw_bytes'] / 1e6:.1f} "
                     f"MB of raw frames (compressed {info['compression_ratio']:.1f}x)"],
        ]
        section.blocks.append(Table(["", "value"], rows))
        section.blocks.append(self.figure("data.png", plot_data(metas),
                                          "episode lengths and returns"))
        return section

    def vision_section(self) -> Section:
        section = Section("V: the vision model")
        rows = self.metrics("vision/metrics.csv")
        if rows is None:
            section.blocks.append(self.miss("vision", "no vision/metrics.csv"))
        elif not rows:
            section.blocks.append(Text("vision/metrics.csv holds no readable rows yet.", True))
        else:
            panels = metric_panels(rows, ("loss", "reconstruction", "kl"))
            section.blocks += self.curves(rows, panels, "vision-losses.png", "V training")
        recon = _newest(self.run.glob("vision/recon-*.png"))
        if recon is None:
            if rows is not None:
                section.blocks.append(Text("No reconstruction picture yet (one is written at "
                                           "the end of each epoch).", True))
        else:
            section.blocks.append(Text(f"Reconstructions ({recon}): validation frames on top, "
                                       "V's reconstructions below them, then frames decoded "
                                       "from random z."))
            section.blocks.append(Image(recon, "V's reconstructions"))
        return section

    def memory_section(self) -> Section:
        section = Section("M: the memory model")
        rows = self.metrics("memory/metrics.csv")
        if rows is None:
            section.blocks.append(self.miss("memory", "no memory/metrics.csv"))
        elif not rows:
            section.blocks.append(Text("memory/metrics.csv holds no readable rows yet.", True))
        else:
            panels = metric_panels(rows, ("z_nll", "done_loss", "reward_mse", "loss"),
                                   {"done precision / recall": ("done_precision",
                                                                "done_recall")})
            section.blocks += self.curves(rows, panels, "memory-losses.png", "M training")
        calibration = self._first_existing(["memory/calibration.json", "dream/calibration.json"])
        if calibration is not None:
            section.blocks.extend(self.calibration_blocks(calibration))
        if self.run.exists("eval/fidelity.json"):
            section.blocks.extend(self.fidelity_blocks("eval/fidelity.json"))
        dream = self._first_existing(["memory/dream.gif", "dream/dream.gif"]) or _newest(
            [p for p in self.run.glob("dream/*.gif") if "compare" not in p])
        if dream is None:
            if rows is not None:
                section.blocks.append(self.miss("dream", "no dream GIF"))
        else:
            section.blocks.append(Text(f"A dream ({dream}): M imagining, V drawing."))
            section.blocks.append(Image(dream, "a dream of M"))
        return section

    def calibration_blocks(self, rel: str) -> list[Block]:
        try:
            report = json.loads(self.run.read_bytes(rel))
            policies = report["policies"]
            real = all("survival_ratio" in p for p in policies.values())
            rows = [[name, f"{p['survival_mean']:.1f} +- {p['survival_std']:.1f}",
                     f"{p.get('survival_min', '-')}..{p.get('survival_max', '-')}",
                     f"{100 * float(p.get('capped_fraction', 0)):.0f}%",
                     f"{p['return_mean']:.2f} +- {p['return_std']:.2f}"]
                    + ([f"{p['real_survival_mean']:.1f} +- {p['real_survival_std']:.1f}",
                        f"{p['survival_ratio']:.2f}x"] if real else [])
                    for name, p in policies.items()]
        except (ValueError, KeyError, TypeError, AttributeError):
            return [Text(f"{rel} is damaged or in an unknown format.", True)]
        head = (f"Dream calibration ({rel}): reference policies in M's dream at tau "
                f"{report.get('tau', '?')}, {report.get('episodes', '?')} dreams each, capped "
                f"at {report.get('max_steps', '?')} steps")
        head += (f"; the same policies in the real game, {report.get('real_episodes')} "
                 "episodes each." if real else ".")
        columns = ["policy", "dream survival (steps)", "min..max", "capped", "dream return"]
        if real:
            columns += ["game survival (steps)", "dream / game"]
        blocks: list[Block] = [Text(head), Table(columns, rows)]
        if report.get("note"):
            blocks.append(Text(str(report["note"])))
        from wmlab.memory.calibration import noop_order_warning

        warning = noop_order_warning(report)
        if warning:
            blocks.append(Text(f"Warning: {warning}.", True))
        return blocks

    def fidelity_blocks(self, rel: str) -> list[Block]:
        from wmlab.fidelity import load

        try:
            results = load(self.run.read_text(rel))
        except (ValueError, KeyError, TypeError):
            return [Text(f"{rel} is damaged or in an unknown format.", True)]
        if not results:
            return []
        tau = self.cfg.dream.tau if self.cfg is not None else None
        shown = next((r for r in results if r.tau == tau), results[0])
        blocks: list[Block] = [Text(
            f"Dream fidelity ({rel}): {len(shown.rows)} controllers (the scored means of a "
            f"real-env CMA-ES run, the zero controller and a random one), each on the same "
            f"{shown.dream_episodes} dreams and on {shown.real_episodes} real episodes. The "
            "rank correlation of their dream and real returns says whether the dream orders "
            "controllers as the game does (1: exactly); real / dream compares the returns.")]
        if len(results) > 1:
            blocks.append(Table(["tau", "rank correlation", "real / dream"], [
                [f"{r.tau:g}", f"{r.rank_correlation:+.2f}", f"{r.ratio:.2f}"]
                for r in results]))
        blocks.append(Text(f"At tau {shown.tau:g}: rank correlation "
                           f"**{shown.rank_correlation:+.2f}**, real / dream {shown.ratio:.2f}."))
        rows = [[row.controller, f"{row.real:.1f}", f"{row.dream:.1f}",
                 "-" if math.isnan(row.ratio) else f"{row.ratio:.2f}"]
                for row in shown.rows]
        blocks += [Table(["controller", "real return", "dream return", "real / dream"], rows),
                   self.figure("dream-fidelity.png", plot_fidelity(shown),
                               "dream against real returns")]
        return blocks

    def controller_section(self, runs: list[tuple[str, RunFiles]] | None = None) -> Section:
        section = Section("C: the controller")
        rows = self.metrics("controller/metrics.csv")
        if rows is None:
            section.blocks.append(self.miss("controller", "no controller/metrics.csv"))
            return section
        if not rows:
            section.blocks.append(Text("controller/metrics.csv holds no readable rows yet.",
                                       True))
            return section
        where = self.cfg.es.fitness if self.cfg is not None else "?"
        last = rows[-1]
        scored = [r for r in rows if "eval_mean" in r]
        best = max(scored, key=lambda r: r["eval_mean"]) if scored else None
        table = [["generations", str(int(last["step"]))],
                 ["fitness from", "M's dream" if where == "dream" else "the real env"],
                 ["last generation best / mean / worst",
                  " / ".join(_num(last.get(k)) for k in ("best", "mean", "worst"))]]
        if best is not None:
            table.append(["best scored mean", f"{_num(best['eval_mean'])} (generation "
                                              f"{int(best['step'])})"])
        if "sigma" in last:
            table.append(["CMA-ES step size", f"{last['sigma']:.4g}"])
        counted = [r for r in rows if "env_steps" in r]
        if counted:
            dreamt = sum(r["env_steps"] for r in counted
                         if r.get("in_dream", 1.0 if where == "dream" else 0.0))
            total = sum(r["env_steps"] for r in counted)
            table.append(["members' steps: real env / dream",
                          f"{total - dreamt:,.0f} / {dreamt:,.0f} "
                          f"({100 * dreamt / total:.0f}% in the dream)"])
        section.blocks.append(Table(["", "value"], table))
        title = f"CMA-ES training progress ({'dream' if where == 'dream' else 'real env'})"
        section.blocks.append(self.figure("controller-progress.png",
                                          plot_learning_curve(rows, title),
                                          "C's learning curve"))
        curves = compute_curve(runs or [("this run", self.run)])
        if curves:
            key = env_key(self.cfg) if self.cfg is not None else None
            section.blocks.append(Text("The scored means against the compute spent to reach "
                                       "them (every stage before C included, iterations "
                                       "one after another):"))
            section.blocks.append(self.figure(
                "compute-curve.png", plot_compute_curve(
                    curves, PUBLISHED_COMPUTE.get(key or ""), SOLVED.get(key or "")),
                "scored mean against hours of compute"))
        return section

    def evaluation_section(self, runs: list[tuple[str, RunFiles]]) -> Section:
        section = Section("Evaluation")
        results: list[EvalResult] = []
        for label, run in runs:
            found = read_evals(run, label) if run.exists("eval") else []
            if found:
                results.extend(found)
                continue
            if run is self.run:
                section.blocks.append(self.miss("evaluate", "no eval/*.json"))
            if len(runs) > 1:  # side by side, every run keeps its row
                results.append(EvalResult(label, "-", None, None, None, "-",
                                          "not evaluated yet"))
        key = env_key(self.cfg) if self.cfg is not None else None
        table = [[r.run, r.detail, _score(r.mean, r.std), str(r.episodes or "-"), r.backend]
                 for r in results]
        for score in PUBLISHED.get(key or "", ()):
            where = "" if score.where == "real" else f" ({score.where})"
            table.append(["published", score.method + where, score.score(), "-", "-"])
        if table:
            section.blocks.append(Table(["run", "what", "mean +- std", "episodes", "backend"],
                                        table))
        if key is not None:
            section.blocks.append(Text(f"Published numbers: {PUBLISHED_SETTING[key]} "
                                       "(SPEC.md section 7)."))
        else:
            section.blocks.append(Text("No published numbers for this environment."))
        transfer = backend_transfer_line(self.run, self.cfg) if self.cfg is not None else None
        if transfer is not None:
            section.blocks.append(Text(transfer))
        for label, run in runs:
            paired = versus_random_line(run, self.cfg) if self.cfg is not None else None
            if paired is not None:
                section.blocks.append(Text(f"{label}: {paired}" if len(runs) > 1 else paired))
        curves = []
        for label, run in runs:
            try:
                rows = read_metrics(run, "controller/metrics.csv") if run.exists(
                    "controller/metrics.csv") else []
            except (ValueError, UnicodeDecodeError, csv.Error):
                rows = []
            xs, ys = series(rows, "eval_mean")
            if xs:
                curves.append((label, xs, ys))
        if len(runs) > 1 and curves:
            section.blocks.append(self.figure("compare-controller.png", plot_compare(curves),
                                              "C's scored means, run by run"))
        videos = [p for p in self.run.glob("eval/*.gif")]
        for video in videos[:2]:
            section.blocks.append(Text(f"An evaluation episode ({video})."))
            section.blocks.append(Image(video, "evaluation episode"))
        return section

    def side_by_side_section(self) -> Section:
        section = Section("Real, reconstructed and imagined")
        candidates = [p for folder in ("memory", "dream", "report")
                      for p in self.run.glob(f"{folder}/*.gif")
                      if "compare" in p or "side" in p]
        gif = _newest(candidates)
        if gif is None:
            section.blocks.append(self.miss("dream", "no side-by-side GIF (real | "
                                                     "reconstruction | imagined)"))
        else:
            section.blocks.append(Text(f"{gif}: a real episode, V's reconstruction of it and "
                                       "M's imagined continuation driven by the same actions."))
            section.blocks.append(Image(gif, "real | reconstruction | imagined"))
        return section

    def stages_section(self) -> Section | None:
        records = self.run.glob("stages/*.json")
        if not records:
            return None
        found: dict[str, dict[str, Any]] = {}
        for rel in records:
            try:
                record = json.loads(self.run.read_bytes(rel))
            except (ValueError, UnicodeDecodeError):
                continue
            if isinstance(record, dict):
                found[str(record.get("stage", rel))] = record
        order = {name: i for i, name in enumerate(STAGE_ORDER)}
        rows = []
        for name in sorted(found, key=lambda n: (order.get(n, len(order)), n)):
            record = found[name]
            compute = record.get("compute_seconds", record.get("seconds"))
            cpu = record.get("cpu") or {}
            rows.append([name, str(record.get("status", "?")), _duration(compute),
                         str(len(record.get("attempts", [])) or "-"),
                         str(cpu.get("model", "-")), str(record.get("finished", "-"))])
        total = sum(float(r.get("compute_seconds", r.get("seconds", 0.0)) or 0.0)
                    for r in found.values())
        return Section("Pipeline", [
            Text(f"Compute of each stage over its own attempts (pauses between sessions "
                 f"not counted): {_duration(total)} in all."),
            Table(["stage", "status", "compute", "attempts", "CPU", "finished"], rows)])

    def _first_existing(self, rels: list[str]) -> str | None:
        return next((rel for rel in rels if self.run.exists(rel)), None)


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
        rel = f"eval/eval-{backend}.json"
        try:
            data = json.loads(run.read_bytes(rel)) if run.exists(rel) else None
        except (ValueError, UnicodeDecodeError):
            data = None
        if isinstance(data, dict) and data.get("where", "real") == "real":
            found[backend] = data
    if trained_on == reported or len(found) < 2:
        return None
    try:
        return gap_from_evals(cfg.env.name, found[trained_on], found[reported]).line()
    except WmlabError as exc:
        return f"backend transfer: not computed ({exc})"


def versus_random_line(run: RunFiles, cfg: Config) -> str | None:
    """C against the random policy on the same episodes (eval/eval-<backend>.json and
    eval/random-<backend>.json of the reported backend), or None without both."""
    from wmlab.evaluate import reported_backend, versus_random

    try:
        backend = reported_backend(cfg)
    except WmlabError:
        return None
    found = []
    for rel in (f"eval/eval-{backend}.json", f"eval/random-{backend}.json"):
        try:
            data = json.loads(run.read_bytes(rel)) if run.exists(rel) else None
        except (ValueError, UnicodeDecodeError):
            data = None
        if not isinstance(data, dict):
            return None
        found.append(data)
    paired = versus_random(*found)
    return None if paired is None else paired.line()


# The pipeline's stages in the order they run (the report lists them so).
STAGE_ORDER = ("collect", "vision", "encode", "memory", "controller", "evaluate", "report")


def _duration(seconds: Any) -> str:
    """Seconds as '42.0 s', '12.5 min' or '3.20 h'."""
    if not isinstance(seconds, (int, float)):
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.2f} h"


def _score(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return _num(mean) if std is None else f"{_num(mean)} +- {_num(std)}"


def final_values_table(rows: list[dict[str, float]], panels: list[tuple[str, list[str]]]
                       ) -> Table:
    """The last logged value of each curve: train beside validation."""
    body = []
    for _, columns in panels:
        names = dict.fromkeys(c.split("/", 1)[1] for c in columns)
        for name in names:
            train = series(rows, f"train/{name}")[1]
            val = series(rows, f"val/{name}")[1]
            body.append([name, _num(train[-1]) if train else "-", _num(val[-1]) if val else "-"])
    last = int(rows[-1]["step"])
    return Table([f"metric (at step {last})", "train", "validation"], body)


# ---------------------------------------------------------------------------------------------
# Rendering


def render_markdown(title: str, sections: list[Section]) -> str:
    lines = [f"# {title}", ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, Text):
                lines += [f"*{block.text}*" if block.emphasis else block.text, ""]
            elif isinstance(block, Table):
                lines.append("| " + " | ".join(_md_cell(c) for c in block.header) + " |")
                lines.append("|" + "---|" * len(block.header))
                lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |"
                          for row in block.rows]
                lines.append("")
            elif isinstance(block, Image):
                lines += [f"![{block.alt}]({block.path})", ""]
            elif isinstance(block, Code):
                lines += [f"<details><summary>{block.summary}</summary>", "", "```toml",
                          block.text.rstrip(), "```", "", "</details>", ""]
    return "\n".join(lines)


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


_MIME = {"png": "image/png", "gif": "image/gif", "jpg": "image/jpeg", "jpeg": "image/jpeg"}

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 70em; margin: 2em auto; padding: 0 1em;
       color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; font-size: 0.92em; }
th { background: #f2f2f2; }
img { max-width: 100%; image-rendering: pixelated; border: 1px solid #eee; }
.missing { color: #a0522d; font-style: italic; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; }
"""


def render_html(title: str, sections: list[Section], images: dict[str, bytes]) -> str:
    """One self-contained page: every picture inlined as a base64 data URI."""
    esc = html.escape
    parts = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>",
             f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{esc(title)}</h1>"]
    for section in sections:
        parts.append(f"<h2>{esc(section.title)}</h2>")
        for block in section.blocks:
            if isinstance(block, Text):
                cls = " class='missing'" if block.emphasis else ""
                parts.append(f"<p{cls}>{_code_spans(esc(block.text))}</p>")
            elif isinstance(block, Table):
                head = "".join(f"<th>{esc(c)}</th>" for c in block.header)
                body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>"
                               for row in block.rows)
                parts.append(f"<table><tr>{head}</tr>{body}</table>")
            elif isinstance(block, Image):
                data = images.get(block.path)
                if data is None:
                    continue
                mime = _MIME.get(block.path.rsplit(".", 1)[-1].lower(), "image/png")
                uri = f"data:{mime};base64,{base64.b64encode(data).decode()}"
                parts.append(f"<p><img src='{uri}' alt='{esc(block.alt)}' "
                             f"title='{esc(block.path)}'></p>")
            elif isinstance(block, Code):
                parts.append(f"<details><summary>{esc(block.summary)}</summary>"
                             f"<pre>{esc(block.text)}</pre></details>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _code_spans(escaped: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)


# ---------------------------------------------------------------------------------------------
# The entry point


def iteration_runs(run: RunFiles) -> list[tuple[str, RunFiles]]:
    """The sub-runs ``<run>/iterations/<k>/``, in numeric order."""
    found = []
    for rel in run.glob("iterations/*"):
        name = rel.rsplit("/", 1)[-1]
        if name.isdigit() and run.fs.isdir(f"{run.root}/{rel}"):
            found.append((int(name), RunFiles(f"{run.url}/{rel}")))
    return [(f"iteration {k}", sub) for k, sub in sorted(found, key=lambda item: item[0])]


def write_report(run_dir: str, compare: Iterable[str] = (), *, title: str | None = None
                 ) -> ReportPaths:
    """Write ``report.md``, ``report.html`` and ``report/*.png`` into ``run_dir``.

    ``compare`` lists other run directories whose evaluations go into the same table
    (iterations under ``<run>/iterations/<k>/`` are added on their own).
    """
    run = RunFiles(run_dir)
    if not run.fs.isdir(run.root):
        raise WmlabError(f"no run directory at {run_dir}: check the path (runs live under "
                         "run.root, 'runs/' by default)")
    cfg, config_text, config_problem = read_config(run)
    if cfg is None and not run.glob("*"):
        raise WmlabError(f"{run_dir} is empty: it is not a run directory")
    runs: list[tuple[str, RunFiles]] = [(run.name(), run), *iteration_runs(run)]
    for other in compare:
        other_run = RunFiles(other)
        if not other_run.fs.isdir(other_run.root):
            raise WmlabError(f"no run directory at {other} (given to compare): check the path")
        label = other_run.name()
        if any(label == existing for existing, _ in runs):
            label = other_run.url
        runs.append((label, other_run))

    builder = _Builder(run, cfg)
    sections = [builder.summary_section(runs),
                builder.config_section(config_text, config_problem)]
    stages = builder.stages_section()
    if stages is not None:
        sections.append(stages)
    sections += [builder.data_section(), builder.vision_section(), builder.memory_section(),
                 builder.controller_section(runs), builder.evaluation_section(runs),
                 builder.side_by_side_section()]
    if builder.missing:
        sections.insert(2, Section("Not run yet", [Text(
            "Stages without outputs in this run directory: " + ", ".join(builder.missing)
            + ". Their sections below say what to run.", emphasis=True)]))

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    heading = title or f"wmlab report: {run.name()}"
    sections[0].blocks.insert(0, Text(f"Run directory {run.url}, written {stamp}."))

    for rel, data in builder.figures.items():
        atomic_write_bytes(f"{run.url}/{rel}", data)
    images = dict(builder.figures)
    for section in sections:
        for block in section.blocks:
            if isinstance(block, Image) and block.path not in images:
                images[block.path] = run.read_bytes(block.path)
    markdown = render_markdown(heading, sections)
    page = render_html(heading, sections, images)
    atomic_write_bytes(f"{run.url}/report.md", markdown.encode())
    atomic_write_bytes(f"{run.url}/report.html", page.encode())
    return ReportPaths(markdown=f"{run.url}/report.md", html=f"{run.url}/report.html",
                       figures=[f"{run.url}/{rel}" for rel in builder.figures],
                       missing=list(builder.missing))
