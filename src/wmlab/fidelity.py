"""How faithful M's dream is where it matters for C: does it rank controllers as the game does?

A dream is useful for training C when the controllers it scores higher are the ones that
score higher in the real env; its absolute returns matter less (CMA-ES ranks). So the
measure takes a fixed set of controllers (the means a real-env CMA-ES run scored along its
way, plus the zero controller and a random one), scores each in the dream and in the real
env, and reports

- the rank correlation (Spearman) between their dream and real returns: 1 is a dream that
  orders controllers exactly as the game does, 0 one that tells C nothing;
- the real / dream return ratio, per controller and over all of them: how far the dream's
  returns are from the game's (a ratio well below 1 is a dream that flatters C).

The real side of the run's own snapshots is their score on the run's fixed seeds (already
measured by the CMA-ES loop); the zero and random controllers are scored on the same seeds.
Every controller plays the same dreams.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from wmlab.errors import WmlabError

FIDELITY_FILE = "fidelity.json"


@dataclass(frozen=True)
class FidelityRow:
    controller: str  # "generation 40", "zero", "random"
    real: float  # mean real return
    dream: float  # mean dream return

    @property
    def ratio(self) -> float:
        """real / dream; nan where the dream's return is too near zero to divide by."""
        return self.real / self.dream if abs(self.dream) > 1e-9 else math.nan


@dataclass
class Fidelity:
    rows: list[FidelityRow]
    rank_correlation: float
    ratio: float  # sum of real returns / sum of dream returns over the rows
    tau: float = math.nan
    real_episodes: int = 0
    dream_episodes: int = 0
    notes: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        return (f"dream fidelity over {len(self.rows)} controllers: rank correlation with "
                f"the real returns {self.rank_correlation:+.2f}, real / dream return ratio "
                f"{self.ratio:.2f} (tau {self.tau:g})")

    def to_json(self) -> str:
        data = asdict(self)
        data["rows"] = [{**asdict(row), "ratio": row.ratio} for row in self.rows]
        return json.dumps(data, indent=2, default=_json_number)

    @classmethod
    def from_json(cls, text: str) -> Fidelity:
        data = json.loads(text)
        rows = [FidelityRow(r["controller"], float(r["real"]), float(r["dream"]))
                for r in data.pop("rows")]
        return cls(rows=rows, **data)


def _json_number(value: Any) -> Any:
    return float(value) if isinstance(value, np.floating) else str(value)


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks 1..n, ties sharing the mean of the ranks they span."""
    array = np.asarray(values, dtype=np.float64)
    order = np.argsort(array, kind="stable")
    ranks = np.empty(len(array), dtype=np.float64)
    ranks[order] = np.arange(1, len(array) + 1)
    for value in np.unique(array):
        tied = array == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def rank_correlation(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation of ``a`` and ``b``; nan with fewer than 3 pairs or when
    one side is constant (no order to agree with)."""
    if len(a) != len(b):
        raise WmlabError(f"rank correlation needs pairs: got {len(a)} and {len(b)} values")
    if len(a) < 3:
        return math.nan
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    scale = math.sqrt(float(ra @ ra) * float(rb @ rb))
    return float(ra @ rb) / scale if scale > 0 else math.nan


def compare(real: dict[str, float], dream: dict[str, float], **extra: Any) -> Fidelity:
    """The fidelity of a dream from each controller's mean real and dream return."""
    if set(real) != set(dream):
        raise WmlabError(f"the dream and the real env scored different controllers: "
                         f"{sorted(set(real) ^ set(dream))}")
    rows = [FidelityRow(name, float(real[name]), float(dream[name])) for name in real]
    dream_sum = sum(row.dream for row in rows)
    ratio = sum(row.real for row in rows) / dream_sum if abs(dream_sum) > 1e-9 else math.nan
    return Fidelity(rows=rows, rank_correlation=rank_correlation(
        [row.real for row in rows], [row.dream for row in rows]), ratio=ratio, **extra)


def reference_controllers(num_params: int, sigma: float, seed: int) -> dict[str, np.ndarray]:
    """The zero controller and one random draw at CMA-ES's first step size."""
    rng = np.random.default_rng([seed, 7919])
    return {"zero": np.zeros(num_params), "random": rng.normal(0.0, sigma, num_params)}


def measure_fidelity(cfg: Any, dream_episodes: int, *, real: Any = None, dream: Any = None
                     ) -> Fidelity:
    """Score the run's snapshots (and the zero and a random controller) in M's dream and
    compare with their real returns; writes ``<eval>/fidelity.json``.

    ``real`` and ``dream`` are fitnesses (``evaluate(params, seeds) -> means``); by default
    the run's real env and M's dream on its evaluator engine.
    """
    from wmlab.agent import workload_from_config
    from wmlab.es import controller_dir, eval_seeds, load_snapshots, score_mean
    from wmlab.evaluate import eval_dir
    from wmlab.evaluators import Evaluator
    from wmlab.fsio import atomic_write_bytes

    snapshots = load_snapshots(controller_dir(cfg))
    if not snapshots:
        raise WmlabError(f"{controller_dir(cfg)} has no scored means (snapshots/): train C "
                         "in the real env first (its scorings are the controllers compared)")
    if dream_episodes < 1:
        raise WmlabError(f"eval.fidelity_dreams is {dream_episodes}: give at least 1 dream "
                         "per controller")
    es = cfg.es
    fixed = eval_seeds(cfg.run.seed, es.eval_rollouts, es.rollouts)
    real_returns = {f"generation {s.generation}": s.eval_mean for s in snapshots}
    controllers = {f"generation {s.generation}": s.params for s in snapshots}
    references = reference_controllers(len(snapshots[0].params), es.sigma0, cfg.run.seed)
    controllers.update(references)
    rng = np.random.default_rng([cfg.run.seed, 7907])
    seeds = rng.integers(0, 2**31 - 1, dream_episodes)
    names = list(controllers)
    params = np.stack([controllers[n] for n in names]).astype(np.float32)
    with contextlib.ExitStack() as stack:
        def evaluator(kind: str) -> Evaluator:
            return stack.enter_context(Evaluator(
                workload_from_config(cfg, kind), es.engine, es.workers, es.timeout,
                es.job_members, es.ray_address))

        real = real if real is not None else evaluator("real")
        for name, reference in references.items():
            real_returns[name] = score_mean(real, reference, fixed)
        dream = dream if dream is not None else evaluator("dream")
        dreamt = dream.evaluate(params, np.repeat(seeds[None], len(names), axis=0))
    result = compare(real_returns, dict(zip(names, map(float, dreamt), strict=True)),
                     tau=cfg.dream.tau, real_episodes=int(fixed.size),
                     dream_episodes=dream_episodes)
    atomic_write_bytes(f"{eval_dir(cfg)}/{FIDELITY_FILE}", result.to_json().encode())
    return result
