"""The report's figures, each returned as PNG bytes.

matplotlib's object API with the Agg canvas: no pyplot, no global backend switch. matplotlib
is imported when the first figure is drawn, not with the report: a report of a run with
nothing to plot never needs it.
"""

from __future__ import annotations

import io
import math
from typing import Any

from wmlab.report.reading import series


def new_figure(panels: int, width: float = 4.2, height: float = 3.0) -> tuple[Any, list[Any]]:
    """A figure of ``panels`` axes, three to a row, each ``width`` x ``height`` inches."""
    from matplotlib.figure import Figure

    cols = min(panels, 3)
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(width * cols, height * rows), dpi=90)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(panels)]
    return fig, axes


def png_bytes(fig: Any) -> bytes:
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
    fig, axes = new_figure(len(panels))
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
    return png_bytes(fig)


def plot_learning_curve(rows: list[dict[str, float]], title: str) -> bytes:
    """Best / mean / worst of each generation and the scored means, as the original's
    training-progress plot shows them."""
    fig, (ax,) = new_figure(1, width=7.5, height=4.2)
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
    return png_bytes(fig)


def plot_compute_curve(curves: list[tuple[str, list[float], list[float]]],
                       published: tuple[float, float, str] | None, solved: float | None
                       ) -> bytes:
    """Scored means against hours of compute on this machine (log axis), with the paper's
    compute and score marked where known."""
    fig, (ax,) = new_figure(1, width=7.5, height=4.2)
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
    return png_bytes(fig)


def plot_fidelity(fidelity: Any) -> bytes:
    """Each controller's dream return against its real return, the diagonal for reference."""
    fig, (ax,) = new_figure(1, 4.6, 4.0)
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
    return png_bytes(fig)


def plot_compare(curves: list[tuple[str, list[float], list[float]]]) -> bytes:
    fig, (ax,) = new_figure(1, width=7.5, height=4.2)
    for label, xs, ys in curves:
        ax.plot(xs, ys, "o-", markersize=3, label=label)
    ax.set_xlabel("generation")
    ax.set_ylabel("scored mean return")
    ax.set_title("C's scored mean, run by run", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png_bytes(fig)


def plot_data(metas: list[dict[str, Any]]) -> bytes:
    fig, axes = new_figure(2)
    lengths = [float(m.get("length", 0)) for m in metas]
    returns = [float(m.get("return", 0)) for m in metas]
    for ax, values, name in ((axes[0], lengths, "episode length (steps)"),
                             (axes[1], returns, "episode return")):
        ax.hist(values, bins=min(30, max(5, len(values) // 3)), color="tab:gray")
        ax.set_xlabel(name, fontsize=8)
        ax.set_ylabel("episodes", fontsize=8)
        ax.grid(alpha=0.3)
    return png_bytes(fig)
