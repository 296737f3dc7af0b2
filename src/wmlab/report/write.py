"""``write_report``: read the run, build the sections in order, write the figures,
``report.md`` and ``report.html``."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from wmlab.errors import WmlabError
from wmlab.fsio import atomic_write_bytes
from wmlab.report.document import Image, Section, Text, render_html, render_markdown
from wmlab.report.model_sections import data_section, memory_section, vision_section
from wmlab.report.page import Page
from wmlab.report.reading import RunFiles, iteration_runs, read_config
from wmlab.report.result_sections import (
    Runs,
    config_section,
    controller_section,
    evaluation_section,
    side_by_side_section,
    stages_section,
    summary_section,
)
from wmlab.runs import ITERATIONS


@dataclass
class ReportPaths:
    markdown: str
    html: str
    figures: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # stages whose outputs are absent


def write_report(run_dir: str, compare: Iterable[str] = (), *, title: str | None = None
                 ) -> ReportPaths:
    """Write ``report.md``, ``report.html`` and ``report/*.png`` into ``run_dir``.

    ``compare`` lists other run directories whose evaluations go into the same table
    (iterations under ``<run>/iterations/<k>/`` are added on their own) and whose compute
    curves go beside this run's, each counted from its own start.
    """
    run = RunFiles(run_dir)
    if not run.fs.isdir(run.root):
        raise WmlabError(f"no run directory at {run_dir}: check the path (runs live under "
                         "run.root, 'runs/' by default)")
    cfg, config_text, config_problem = read_config(run)
    if cfg is None and not run.glob("*"):
        raise WmlabError(f"{run_dir} is empty: it is not a run directory")
    histories = _histories_to_report(run, compare)

    page = Page(run, cfg)
    sections = _sections(page, histories, config_text, config_problem)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    heading = title or f"wmlab report: {run.name()}"
    sections[0].blocks.insert(0, Text(f"Run directory {run.url}, written {stamp}."))

    for rel, data in page.figures.items():
        atomic_write_bytes(f"{run.url}/{rel}", data)
    markdown = render_markdown(heading, sections)
    html = render_html(heading, sections, _images(run, sections, page.figures))
    atomic_write_bytes(f"{run.url}/report.md", markdown.encode())
    atomic_write_bytes(f"{run.url}/report.html", html.encode())
    return ReportPaths(markdown=f"{run.url}/report.md", html=f"{run.url}/report.html",
                       figures=[f"{run.url}/{rel}" for rel in page.figures],
                       missing=list(page.missing))


def _earlier_iterations(run: RunFiles) -> Runs:
    """For ``<base>/iterations/<k>``: the base run and its iterations before k; else none."""
    parent, _, name = run.url.rpartition(f"/{ITERATIONS}/")
    if not parent or not name.isdigit():
        return []
    base = RunFiles(parent)
    earlier = [(label, sub) for label, sub in iteration_runs(base)
               if int(sub.url.rsplit("/", 1)[-1]) < int(name)]
    return [(base.name(), base), *earlier]


def _histories_to_report(run: RunFiles, compare: Iterable[str]) -> list[Runs]:
    """The run's history (its earlier iterations, itself, its iterations), then each run to
    compare with its iterations; every label differs from every other.

    An iteration's own directory (``<run>/iterations/<k>``) is reported after the run's
    earlier iterations, so its compute and learning curve count what came before it."""
    earlier = _earlier_iterations(run)
    label = f"iteration {run.name()}" if earlier else run.name()
    histories: list[Runs] = [[*earlier, (label, run), *iteration_runs(run)]]
    taken = {existing for existing, _ in histories[0]}
    for other in compare:
        other_run = RunFiles(other)
        if not other_run.fs.isdir(other_run.root):
            raise WmlabError(f"no run directory at {other} (given to compare): check the path")
        label = other_run.name() if other_run.name() not in taken else other_run.url
        history = [(label, other_run), *((f"{label}, {sub_label}", sub)
                                         for sub_label, sub in iteration_runs(other_run))]
        taken.update(existing for existing, _ in history)
        histories.append(history)
    return histories


def _sections(page: Page, histories: list[Runs], config_text: str, config_problem: str
              ) -> list[Section]:
    """Every section in the report's order. They are built in that order too: it is the
    order of the figures written and of the stages listed as not run yet."""
    runs = [labelled for history in histories for labelled in history]
    sections = [summary_section(page, runs, histories[0]),
                config_section(page, config_text, config_problem)]
    stages = stages_section(page)
    if stages is not None:
        sections.append(stages)
    sections += [data_section(page), vision_section(page), memory_section(page),
                 controller_section(page, histories), evaluation_section(page, runs),
                 side_by_side_section(page)]
    if page.missing:
        sections.insert(2, Section("Not run yet", [Text(
            "Stages without outputs in this run directory: " + ", ".join(page.missing)
            + ". Their sections below say what to run.", emphasis=True)]))
    return sections


def _images(run: RunFiles, sections: list[Section], figures: dict[str, bytes]
            ) -> dict[str, bytes]:
    """Every picture the sections show, by path: the new figures and the run's own files."""
    images = dict(figures)
    for section in sections:
        for block in section.blocks:
            if isinstance(block, Image) and block.path not in images:
                images[block.path] = run.read_bytes(block.path)
    return images
