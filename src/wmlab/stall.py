"""What ending stalled rollouts (``es.stall_steps``) does to C's fitness, measured.

CMA-ES only ranks its members, so an early end that saves env steps is harmless when it
ranks controllers as whole episodes do. The measure takes the controllers a real-env CMA-ES
run scored along its way (its snapshots), plays each on the same tracks twice, whole and
ending where a track stalls, and reports per controller both means and the env steps taken,
and over all of them the rank correlation of the two means, their mean difference with its
standard error (paired by track), and the share of env steps the early end saved.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from wmlab.agent import workload_from_config
from wmlab.controller.cmaes import load_snapshots
from wmlab.errors import WmlabError
from wmlab.evaluators import Evaluator
from wmlab.fidelity import rank_correlation
from wmlab.fsio import atomic_write_bytes
from wmlab.runs import RunLayout

FIRST_SEED = 3_000_000  # tracks of their own: not the run's training, scoring or evaluation


@dataclass(frozen=True)
class StallRow:
    generation: int
    whole: float  # mean return over the tracks played to the end
    stalled: float  # the same tracks, ended where they stall (the fitness CMA-ES sees)
    whole_steps: int
    stalled_steps: int


@dataclass(frozen=True)
class StallEffect:
    stall_steps: int
    tracks: int
    rows: list[StallRow]
    rank_correlation: float  # of the whole and stalled means over the controllers
    difference: float  # mean of (stalled - whole) over every controller and track
    difference_se: float
    steps_saved: float  # share of the whole episodes' env steps not taken

    def line(self) -> str:
        return (f"stall after {self.stall_steps} steps, {len(self.rows)} controllers x "
                f"{self.tracks} tracks: rank correlation with whole episodes "
                f"{self.rank_correlation:+.2f}, fitness {self.difference:+.1f} +- "
                f"{self.difference_se:.1f} against whole episodes, "
                f"{100 * self.steps_saved:.0f}% of env steps saved")


def summarize(stall_steps: int, generations: list[int], whole: np.ndarray,
              stalled: np.ndarray, whole_steps: np.ndarray, stalled_steps: np.ndarray
              ) -> StallEffect:
    """The effect from the returns and steps of each controller (rows) on each track."""
    rows = [StallRow(g, float(w.mean()), float(s.mean()), int(ws.sum()), int(ss.sum()))
            for g, w, s, ws, ss in zip(generations, whole, stalled, whole_steps,
                                       stalled_steps, strict=True)]
    diff = (stalled - whole).ravel()
    se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0
    return StallEffect(
        stall_steps=stall_steps, tracks=whole.shape[1], rows=rows,
        rank_correlation=rank_correlation([r.whole for r in rows], [r.stalled for r in rows]),
        difference=float(diff.mean()), difference_se=se,
        steps_saved=1.0 - float(stalled_steps.sum()) / max(float(whole_steps.sum()), 1.0))


def measure_stall_effect(cfg: Any, tracks: int = 16, stall_steps: int = 0) -> StallEffect:
    """Play the run's snapshots whole and with stalls ended (``stall_steps``, default
    es.stall_steps) on ``tracks`` tracks of their own; writes <run>/eval/stall-effect.json."""
    stall_steps = stall_steps or cfg.es.stall_steps
    if stall_steps <= 0:
        raise WmlabError("no stall to measure: give --stall-steps N or set es.stall_steps")
    layout = RunLayout.of(cfg)
    snapshots = load_snapshots(layout.controller)
    if len(snapshots) < 2:
        raise WmlabError(f"{layout.controller} holds {len(snapshots)} scored means; the "
                         "stall's effect is measured over at least 2: train C further "
                         "(es.eval_every sets how often the mean is scored)")
    params = np.stack([s.params for s in snapshots]).astype(np.float32)
    seeds = np.tile(np.arange(FIRST_SEED, FIRST_SEED + tracks), (len(snapshots), 1))
    whole_load, es = workload_from_config(cfg, "real"), cfg.es
    results = []
    for workload in (dataclasses.replace(whole_load, stall_steps=0),
                     dataclasses.replace(whole_load, stall_steps=stall_steps)):
        with Evaluator.of_config(workload, es) as evaluator:
            returns = evaluator.run(params, seeds)
            results.append((returns, np.asarray(evaluator.last_steps)))
    effect = summarize(stall_steps, [s.generation for s in snapshots], results[0][0],
                       results[1][0], results[0][1], results[1][1])
    atomic_write_bytes(layout.stall_effect,
                       json.dumps(asdict(effect), indent=2).encode())
    return effect
