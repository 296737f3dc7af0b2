"""The sections of the run and its results: the summary, the config, the pipeline's stages,
C (the controller), the evaluation beside the published numbers, and the side-by-side GIF.

``runs`` is the reported run first, then its iterations and the runs given to compare (with
theirs), each with the label it is shown under. A run's *history* is the run and its
iterations in order, the reported one's from its first iteration to itself and beyond:
compute adds up along one history, never across two runs.
"""

from __future__ import annotations

import csv
import json

from wmlab.config import Config
from wmlab.errors import WmlabError
from wmlab.metrics import METRICS_FILE
from wmlab.published import (
    HEADLINE,
    PUBLISHED,
    PUBLISHED_COMPUTE,
    PUBLISHED_SETTING,
    SOLVED,
    format_number,
)
from wmlab.report.document import Code, Image, Section, Table, Text
from wmlab.report.page import Page, duration_text, score_text
from wmlab.report.plots import plot_compare, plot_compute_curve, plot_learning_curve
from wmlab.report.reading import (
    RUN,
    EvalRow,
    RunFiles,
    backend_transfer_line,
    compute_curves,
    env_key,
    episode_lengths_line,
    newest,
    parse_eval,
    read_evals,
    read_metrics,
    series,
    stage_compute,
    stage_records,
    versus_random_line,
)
from wmlab.runs import STAGES, spent_seconds

Runs = list[tuple[str, RunFiles]]


def summary_section(page: Page, runs: Runs, history: Runs) -> Section:
    """The result first: C's score, the random policy on the same seeds, the published
    figure, and the compute of the reported run's ``history``."""
    section = Section("Summary")
    if page.cfg is None:
        section.blocks.append(Text("No readable config.toml: see below.", True))
        return section
    # Imported here, not at the top: wmlab.evaluate imports torch (over a second).
    from wmlab.evaluate import reported_backend

    try:
        backend = reported_backend(page.cfg)
    except WmlabError:
        backend = ""
    rows = [_summary_row(label, run, page.cfg, backend) for label, run in runs]
    section.blocks.append(Table(["run", "C", "random policy, same seeds",
                                 "C - random, paired"], rows))
    chosen = _chosen_line(page.run, backend)
    if chosen:
        section.blocks.append(Text(f"{chosen[0].upper()}{chosen[1:]}; its score above is on "
                                   "the evaluation seeds, which no choice has seen."))
    key = env_key(page.cfg)
    if key is not None:
        headline = next(p for p in PUBLISHED[key]
                        if p.method == HEADLINE[key] and p.where == "real")
        section.blocks.append(Text(f"Published: {headline.method}, {headline.score()} "
                                   f"({PUBLISHED_SETTING[key]})."))
    total = sum(stage_compute(run, name) for _, run in history for name in STAGES)
    if total:
        section.blocks.append(Text(f"Compute: {duration_text(total)}, every stage and "
                                   "iteration included (the Pipeline section below)."))
    return section


def _chosen_line(run: RunFiles, backend: str) -> str | None:
    """Which iteration the run names as its agent (eval.validation_episodes), when more than
    one was scored on the validation seeds."""
    from wmlab.evaluate import choose_iteration, read_validations

    if not backend:
        return None
    choice = choose_iteration(read_validations(run.url, backend))
    return choice.line() if choice is not None and len(choice.means) > 1 else None


def _summary_row(label: str, run: RunFiles, cfg: Config, backend: str) -> list[str]:
    """One run's C and random policy on the reported backend, and their paired difference."""
    found = {name: parse_eval(json.loads(run.read_bytes(rel)), label, name)
             for name, rel in ((n, RUN.scores(n, backend))
                               for n in ("eval", "random")) if run.exists(rel)}
    if "eval" not in found:
        return [label, "not evaluated yet", "-", "-"]
    score, floor = found["eval"], found.get("random")
    paired = versus_random_line(run, cfg) or "-"
    return [label, f"{score_text(score.mean, score.std)} over "
            f"{score.episodes} episodes ({backend})",
            score_text(floor.mean, floor.std) if floor else "-", paired]


def config_section(page: Page, text: str, problem: str) -> Section:
    section = Section("Config")
    cfg = page.cfg
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


def stages_section(page: Page) -> Section | None:
    """The pipeline's stage records, in pipeline order; None when the run has none."""
    records = page.run.glob(f"{RUN.stages}/*.json")
    if not records:
        return None
    found = stage_records(page.run, records)
    order = {name: i for i, name in enumerate(STAGES)}
    rows = []
    for name in sorted(found, key=lambda n: (order.get(n, len(order)), n)):
        record = found[name]
        compute = record.get("compute_seconds", record.get("seconds"))
        cpu = record.get("cpu") or {}
        rows.append([name, str(record.get("status", "?")), duration_text(compute),
                     str(len(record.get("attempts", [])) or "-"),
                     str(cpu.get("model", "-")), str(record.get("finished", "-"))])
    total = sum(spent_seconds(r) for r in found.values())
    discarded = sum(float(r.get("discarded_seconds", 0.0) or 0.0) for r in found.values())
    spent_on_trash = (f", of which {duration_text(discarded)} on outputs of stages started "
                      "again (now in trash/)") if discarded else ""
    return Section("Pipeline", [
        Text(f"Compute of each stage over its own attempts (pauses between sessions "
             f"not counted): {duration_text(total)} in all{spent_on_trash}."),
        Table(["stage", "status", "compute", "attempts", "CPU", "finished"], rows)])


def controller_section(page: Page, histories: list[Runs] | None = None) -> Section:
    section = Section("C: the controller")
    rows = page.metrics(f"{RUN.controller}/{METRICS_FILE}")
    if rows is None:
        section.blocks.append(page.miss("controller", "no controller/metrics.csv"))
        return section
    if not rows:
        section.blocks.append(Text(f"{RUN.controller}/{METRICS_FILE} holds no readable rows yet.",
                                   True))
        return section
    where = page.cfg.es.fitness if page.cfg is not None else "?"
    section.blocks.append(Table(["", "value"], _controller_rows(rows, where)))
    title = f"CMA-ES training progress ({'dream' if where == 'dream' else 'real env'})"
    section.blocks.append(page.figure("controller-progress.png",
                                      plot_learning_curve(rows, title),
                                      "C's learning curve"))
    curves = compute_curves(histories or [[("this run", page.run)]])
    if curves:
        key = env_key(page.cfg) if page.cfg is not None else None
        section.blocks.append(Text("The scored means against the compute spent to reach "
                                   "them (every stage before C included, a run's "
                                   "iterations one after another, every run from its "
                                   "own start):"))
        section.blocks.append(page.figure(
            "compute-curve.png", plot_compute_curve(
                curves, PUBLISHED_COMPUTE.get(key or ""), SOLVED.get(key or "")),
            "scored mean against hours of compute"))
    return section


def _controller_rows(rows: list[dict[str, float]], where: str) -> list[list[str]]:
    """C's training at a glance, from its metrics rows; ``where`` is es.fitness."""
    last = rows[-1]
    scored = [r for r in rows if "eval_mean" in r]
    best = max(scored, key=lambda r: r["eval_mean"]) if scored else None
    table = [["generations", str(int(last["step"]))],
             ["fitness from", "M's dream" if where == "dream" else "the real env"],
             ["last generation best / mean / worst",
              " / ".join(format_number(last.get(k)) for k in ("best", "mean", "worst"))]]
    if best is not None:
        table.append(["best scored mean", f"{format_number(best['eval_mean'])} (generation "
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
    return table


def evaluation_section(page: Page, runs: Runs) -> Section:
    section = Section("Evaluation")
    results: list[EvalRow] = []
    for label, run in runs:
        found = read_evals(run, label) if run.exists(RUN.eval) else []
        if found:
            results.extend(found)
            continue
        if run is page.run:
            section.blocks.append(page.miss("evaluate", "no eval/*.json"))
        if len(runs) > 1:  # side by side, every run keeps its row
            results.append(EvalRow(label, "-", None, None, None, "-",
                                      "not evaluated yet"))
    key = env_key(page.cfg) if page.cfg is not None else None
    table = [[r.run, r.detail, score_text(r.mean, r.std), str(r.episodes or "-"), r.backend]
             for r in results] + _published_rows(key)
    if table:
        section.blocks.append(Table(["run", "what", "mean +- std", "episodes", "backend"],
                                    table))
    if key is not None:
        section.blocks.append(Text(f"Published numbers: {PUBLISHED_SETTING[key]} "
                                   "(SPEC.md section 7)."))
    else:
        section.blocks.append(Text("No published numbers for this environment."))
    transfer = backend_transfer_line(page.run, page.cfg) if page.cfg is not None else None
    if transfer is not None:
        section.blocks.append(Text(transfer))
    policies = ("random", *page.cfg.eval.references) if page.cfg is not None else ()
    for label, run in runs:
        for policy in policies:
            paired = versus_random_line(run, page.cfg, policy)
            if paired is not None:
                section.blocks.append(Text(f"{label}: {paired}" if len(runs) > 1 else paired))
    lengths = episode_lengths_line(page.run, page.cfg) if page.cfg is not None else None
    if lengths is not None:
        section.blocks.append(Text(lengths))
    curves = _scored_means(runs)
    if len(runs) > 1 and curves:
        section.blocks.append(page.figure("compare-controller.png", plot_compare(curves),
                                          "C's scored means, run by run"))
    videos = [p for p in page.run.glob(f"{RUN.eval}/*.gif")]
    for video in videos[:2]:
        section.blocks.append(Text(f"An evaluation episode ({video})."))
        section.blocks.append(Image(video, "evaluation episode"))
    return section


def _published_rows(key: str | None) -> list[list[str]]:
    """The published scores of an env (``env_key``) as rows of the evaluation table."""
    rows = []
    for score in PUBLISHED.get(key or "", ()):
        where = "" if score.where == "real" else f" ({score.where})"
        rows.append(["published", score.method + where, score.score(), "-", "-"])
    return rows


def _scored_means(runs: Runs) -> list[tuple[str, list[float], list[float]]]:
    """Per run with any: C's scored means by generation."""
    curves: list[tuple[str, list[float], list[float]]] = []
    for label, run in runs:
        try:
            metrics = f"{RUN.controller}/{METRICS_FILE}"
            rows = read_metrics(run, metrics) if run.exists(metrics) else []
        except (ValueError, UnicodeDecodeError, csv.Error):
            rows = []
        xs, ys = series(rows, "eval_mean")
        if xs:
            curves.append((label, xs, ys))
    return curves


def side_by_side_section(page: Page) -> Section:
    section = Section("Real, reconstructed and imagined")
    candidates = [p for folder in ("memory", "dream", "report")
                  for p in page.run.glob(f"{folder}/*.gif")
                  if "compare" in p or "side" in p]
    gif = newest(candidates)
    if gif is None:
        section.blocks.append(page.miss("dream", "no side-by-side GIF (real | "
                                                 "reconstruction | imagined)"))
    else:
        section.blocks.append(Text(f"{gif}: a real episode, V's reconstruction of it and "
                                   "M's imagined continuation driven by the same actions."))
        section.blocks.append(Image(gif, "real | reconstruction | imagined"))
    return section

