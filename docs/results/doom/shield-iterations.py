"""Draws shield-iterations.png: the `shield` profile's runs, iteration by iteration.

The numbers are those of doom.md's runs table (100 evaluation episodes, seeds
1,000,000..099; the standard error is the standard deviation / 10). Add a run to RUNS and
run `.venv/bin/python docs/results/doom/shield-iterations.py` from the repository root
(it draws with the report's figure helpers, so wmlab must be installed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from wmlab.report.plots import new_figure, png_bytes


@dataclass(frozen=True)
class Run:
    label: str
    means: tuple[float, ...]            # shielded from iteration 2 on
    errors: tuple[float, ...]           # standard errors of the means
    chosen: int                         # the iteration named the run's agent (validation)
    unshielded: dict[int, float]        # iteration -> the same C without the shield


RUNS = (
    Run("first run (seed 0)", (800.0, 975.6, 1091.3, 1024.4), (51.1, 51.9, 57.0, 52.2), 3,
        {2: 938.0, 3: 864.5}),
    Run("second run (seed 1)", (780.5, 1027.7, 922.3), (51.4, 55.5, 54.3), 2,
        {2: 856.6, 3: 854.4}),
    Run("third run (seed 2)", (666.0, 936.8, 1048.2, 1091.7), (42.5, 52.6, 58.4, 61.5), 3,
        {2: 779.5, 3: 897.0}),
    Run("fourth run (seed 3)", (861.0, 1014.0, 1059.9), (46.6, 49.5, 56.7), 2,
        {2: 888.9, 3: 822.7}),
    Run("fifth run (seed 4)", (760.7, 1167.5, 959.5), (46.8, 60.2, 51.9), 2,
        {2: 879.9, 3: 905.4}),
)
RANDOM, SWEEP, PAPER, TARGET = 230.5, 981.7, 1092.0, 1125.0


def draw() -> bytes:
    fig, (ax,) = new_figure(1, width=9.0, height=4.2)
    for k, run in enumerate(RUNS):
        shift = (k - (len(RUNS) - 1) / 2) * 0.07  # runs side by side at each iteration
        xs = [i + 1 + shift for i in range(len(run.means))]
        line = ax.errorbar(xs, run.means, yerr=run.errors, marker="o", capsize=3,
                           label=run.label)
        colour = line[0].get_color()
        ax.plot(xs[run.chosen - 1], run.means[run.chosen - 1], "*", markersize=18,
                color=colour, markeredgecolor="black")
        for iteration, score in run.unshielded.items():
            ax.plot(iteration + shift, score, "x", markersize=9, color=colour)
    ax.plot([], [], "x", color="grey", label="the same C without the shield")
    ax.plot([], [], "*", color="grey", markeredgecolor="black", markersize=12,
            label="the run's agent (best validation mean)")
    ax.axhline(TARGET, color="black", linestyle=":", label=f"issue 28's target ({TARGET:,.0f})")
    ax.axhline(PAPER, color="tab:red", linestyle="--", label=f"paper, tau 1.15 ({PAPER:,.0f})")
    ax.axhline(SWEEP, color="tab:olive", linestyle="-.",
               label=f"a timed sweep that never looks ({SWEEP:,.1f})")
    ax.set_xticks([1, 2, 3, 4], ["1\n(C alone)", "2", "3\n(the profile's last)",
                                 "4\n(run.iterations=4)"])
    ax.set_xlabel("iteration (from 2 on, M's look-ahead as C's shield)")
    ax.set_ylabel("real survival, 100 episodes (+- SE)")
    ax.set_ylim(600, 1250)
    ax.set_title(f"Doom, shield profile: {len(RUNS)} runs from scratch "
                 f"(random policy: {RANDOM})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return png_bytes(fig)


if __name__ == "__main__":
    Path(__file__).with_suffix(".png").write_bytes(draw())
