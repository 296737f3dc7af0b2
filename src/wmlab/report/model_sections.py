"""The sections of what the world model learnt from and what it learnt: the collected data,
V (the vision model) and M (the memory model, with its dream's calibration and fidelity)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from wmlab.data import EpisodeStore
from wmlab.dream.calibration import noop_order_warning
from wmlab.errors import WmlabError
from wmlab.fidelity import load as load_fidelity
from wmlab.metrics import METRICS_FILE
from wmlab.report.document import Block, Image, Section, Table, Text
from wmlab.report.page import Page
from wmlab.report.plots import metric_panels, plot_data, plot_fidelity
from wmlab.report.reading import RUN, newest


def data_section(page: Page) -> Section:
    section = Section("Data")
    url = (page.cfg.collect.out if page.cfg is not None and page.cfg.collect.out
           else f"{page.run.url}/data")
    try:
        store = EpisodeStore.open(url)
        info = store.info()
        metas = store.metas() if info["episodes"] else []
    except WmlabError:
        section.blocks.append(page.miss("collect", f"no episode store at {url}"))
        return section
    if not info["episodes"]:
        section.blocks.append(page.miss("collect", f"the store at {url} holds no episodes"))
        return section
    section.blocks.append(Table(["", "value"], _store_rows(info)))
    section.blocks.append(page.figure("data.png", plot_data(metas),
                                      "episode lengths and returns"))
    return section


def _store_rows(info: dict[str, Any]) -> list[list[str]]:
    """The episode store's summary (``EpisodeStore.info()``) as (what, value) rows."""
    length, ret = info["length"], info["return"]
    collections = ", ".join(f"{k}: {v}" for k, v in info["collections"].items())
    return [
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


def _training_curves(page: Page, section: Section, stage: str, folder: str,
                     panels: Callable[[list[dict[str, str]]], Any], figure: str,
                     title: str) -> list[dict[str, str]] | None:
    """A training stage's metrics as curves in ``section``; its rows (None: no file)."""
    path = f"{folder}/{METRICS_FILE}"
    rows = page.metrics(path)
    if rows is None:
        section.blocks.append(page.miss(stage, f"no {path}"))
    elif not rows:
        section.blocks.append(Text(f"{path} holds no readable rows yet.", True))
    else:
        section.blocks += page.curves(rows, panels(rows), figure, title)
    return rows


def vision_section(page: Page) -> Section:
    section = Section("V: the vision model")
    rows = _training_curves(
        page, section, "vision", RUN.vision,
        lambda rows: metric_panels(rows, ("loss", "reconstruction", "kl"), {
            "error per pixel: salient / background": ("salient_mse", "background_mse")}),
        "vision-losses.png", "V training")
    recon = newest(page.run.glob(f"{RUN.vision}/recon-*.png"))
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


def memory_section(page: Page) -> Section:
    section = Section("M: the memory model")
    rows = _training_curves(
        page, section, "memory", RUN.memory,
        lambda rows: metric_panels(rows, ("z_nll", "done_loss", "reward_mse", "loss"),
                                   {"done precision / recall": ("done_precision",
                                                                "done_recall")}),
        "memory-losses.png", "M training")
    calibration = page.first_existing([RUN.calibration, "dream/calibration.json"])  # old runs: dream/
    if calibration is not None:
        section.blocks.extend(calibration_blocks(page, calibration))
    if page.run.exists(RUN.fidelity):
        section.blocks.extend(fidelity_blocks(page, RUN.fidelity))
    dream = page.first_existing(["memory/dream.gif", "dream/dream.gif"]) or newest(
        [p for p in page.run.glob("dream/*.gif") if "compare" not in p])
    if dream is None:
        if rows is not None:
            section.blocks.append(page.miss("dream", "no dream GIF"))
    else:
        section.blocks.append(Text(f"A dream ({dream}): M imagining, V drawing."))
        section.blocks.append(Image(dream, "a dream of M"))
    return section


def _calibration_row(name: str, p: dict[str, Any], real: bool) -> list[str]:
    """One reference policy of a dream calibration; with ``real``, beside the real game."""
    row = [name, f"{p['survival_mean']:.1f} +- {p['survival_std']:.1f}",
           f"{p.get('survival_min', '-')}..{p.get('survival_max', '-')}",
           f"{100 * float(p.get('capped_fraction', 0)):.0f}%",
           f"{p['return_mean']:.2f} +- {p['return_std']:.2f}"]
    if real:
        row += [f"{p['real_survival_mean']:.1f} +- {p['real_survival_std']:.1f}",
                f"{p['survival_ratio']:.2f}x"]
    return row


def calibration_blocks(page: Page, rel: str) -> list[Block]:
    try:
        report = json.loads(page.run.read_bytes(rel))
        policies = report["policies"]
        real = all("survival_ratio" in p for p in policies.values())
        rows = [_calibration_row(name, p, real) for name, p in policies.items()]
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
    warning = noop_order_warning(report)
    if warning:
        blocks.append(Text(f"Warning: {warning}.", True))
    return blocks


def fidelity_blocks(page: Page, rel: str) -> list[Block]:
    try:
        results = load_fidelity(page.run.read_text(rel))
    except (ValueError, KeyError, TypeError):
        return [Text(f"{rel} is damaged or in an unknown format.", True)]
    if not results:
        return []
    tau = page.cfg.dream.tau if page.cfg is not None else None
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
               page.figure("dream-fidelity.png", plot_fidelity(shown),
                           "dream against real returns")]
    return blocks
