"""What every section of one report shares: the run being reported, the figures to write,
the stages found missing, and how numbers and "not run yet" notes are written."""

from __future__ import annotations

import csv
from typing import Any

from wmlab.config import Config
from wmlab.published import format_number
from wmlab.report.document import Block, Image, Table, Text
from wmlab.report.plots import plot_metrics
from wmlab.report.reading import RUN, RunFiles, read_metrics, series

# What to run to produce each stage's outputs, for the "not run yet" notes.
STAGE_COMMANDS: dict[str, str] = {
    "collect": "wmlab collect",
    "vision": "wmlab train-vae",
    "memory": "wmlab train-mdrnn",
    "dream": "wmlab dream",
    "controller": "wmlab train-controller",
    "evaluate": "wmlab evaluate",
}


def not_run(stage: str, what: str) -> Text:
    return Text(f"{what}: the {stage} stage has not run yet (`{STAGE_COMMANDS[stage]}`, or "
                "`wmlab run` for the whole pipeline).", emphasis=True)


def score_text(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    if std is None:
        return format_number(mean)
    return f"{format_number(mean)} +- {format_number(std)}"


def duration_text(seconds: Any) -> str:
    """Seconds as '42.0 s', '12.5 min' or '3.20 h'."""
    if not isinstance(seconds, (int, float)):
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.2f} h"


def final_values_table(rows: list[dict[str, float]], panels: list[tuple[str, list[str]]]
                       ) -> Table:
    """The last logged value of each curve: train beside validation."""
    body = []
    for _, columns in panels:
        names = dict.fromkeys(c.split("/", 1)[1] for c in columns)
        for name in names:
            train = series(rows, f"train/{name}")[1]
            val = series(rows, f"val/{name}")[1]
            body.append([name, format_number(train[-1]) if train else "-",
                         format_number(val[-1]) if val else "-"])
    last = int(rows[-1]["step"])
    return Table([f"metric (at step {last})", "train", "validation"], body)


class Page:
    """One report in the making: the sections add the figures it writes and the stages
    they found without outputs."""

    def __init__(self, run: RunFiles, cfg: Config | None) -> None:
        self.run = run
        self.cfg = cfg
        self.figures: dict[str, bytes] = {}  # relative path -> PNG bytes
        self.missing: list[str] = []

    def figure(self, name: str, data: bytes, alt: str) -> Image:
        rel = f"{RUN.pictures}/{name}"
        self.figures[rel] = data
        return Image(rel, alt)

    def miss(self, stage: str, what: str) -> Text:
        if stage not in self.missing:
            self.missing.append(stage)
        return not_run(stage, what)

    def curves(self, rows: list[dict[str, float]], panels: list[tuple[str, list[str]]],
               name: str, title: str) -> list[Block]:
        if not panels:  # only bookkeeping columns so far
            return [Text("No losses logged yet.", True)]
        return [final_values_table(rows, panels),
                self.figure(name, plot_metrics(rows, panels, title), title)]

    def metrics(self, rel: str) -> list[dict[str, float]] | None:
        """The rows of a metrics CSV of this run: None when absent, [] when unreadable."""
        if not self.run.exists(rel):
            return None
        try:
            return read_metrics(self.run, rel)
        except (ValueError, UnicodeDecodeError, csv.Error):
            return []

    def first_existing(self, rels: list[str]) -> str | None:
        return next((rel for rel in rels if self.run.exists(rel)), None)
