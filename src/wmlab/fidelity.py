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
measured by the CMA-ES loop, where it scored them in the game; a C trained in the dream alone
has them scored in the game here); the zero and random controllers are scored on the same
seeds.
Every controller plays the same dreams.

A run's scored means span a whole search (from a parked car to the best driver); what C's
search needs from a dream is finer: to rank the candidates CMA-ES compares in a generation,
draws around its mean at its step size. ``measure_neighbour_fidelity`` scores such
neighbours of the run's best C in the dream and the game, and beside the rank correlation
reports how well the game agrees with itself on them (its tracks split in two halves): real
returns are noisy, so that is the most any dream could reach.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from wmlab.errors import WmlabError
from wmlab.runs import RunLayout

DEFAULT_FIDELITY_DREAMS = 64  # dreams per controller where eval.fidelity_dreams is 0


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
        line = (f"dream fidelity over {len(self.rows)} controllers: rank correlation with "
                f"the real returns {self.rank_correlation:+.2f}, real / dream return ratio "
                f"{self.ratio:.2f} (tau {self.tau:g})")
        if "game_split_half" in self.notes:
            line += (f"; the game's two halves of its tracks agree at "
                     f"{self.notes['game_split_half']:+.2f}")
        return line

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


def measure_fidelity(cfg: Any, dream_episodes: int, *, taus: Sequence[float] = (),
                     snapshots_from: str = "", real: Any = None, dream: Any = None
                     ) -> list[Fidelity]:
    """Score controllers in M's dream at each of ``taus`` (default: dream.tau) and compare
    with their real returns; writes ``<eval>/fidelity.json`` and returns one result a tau.

    The controllers are the scored means of the CMA-ES run in ``snapshots_from`` (default:
    this run's C), plus the zero controller and a random one. Their real returns are the
    scores the run gave them on its fixed seeds; snapshots from another run (e.g. the
    previous iteration's, whose M was another) are scored again in the real env here, with
    this run's V and M, on the same seeds. ``real`` and ``dream`` are fitnesses
    (``evaluate(params, seeds) -> means``); by default the run's real env and M's dream.
    """
    from wmlab.agent import workload_from_config
    from wmlab.controller.cmaes import eval_seeds, load_snapshots, score_mean
    from wmlab.evaluators import Evaluator
    from wmlab.fsio import atomic_write_bytes

    source = (snapshots_from or RunLayout.of(cfg).controller).rstrip("/")
    snapshots = load_snapshots(source)
    if not snapshots:
        raise WmlabError(f"{source} has no scored means (snapshots/): train C in the real "
                         "env first (its scorings are the controllers compared)")
    if dream_episodes < 1:
        raise WmlabError(f"eval.fidelity_dreams is {dream_episodes}: give at least 1 dream "
                         "per controller")
    if dream is None:
        check_heads(workload_from_config(cfg, "dream").load())
    es = cfg.es
    own = source == RunLayout.of(cfg).controller.rstrip("/")
    fixed = eval_seeds(cfg.run.seed, es.eval_rollouts, es.rollouts)
    controllers = {f"generation {s.generation}": s.params for s in snapshots}
    # a C trained in the dream alone scored its means in the dream: scored in the game here
    real_returns = {f"generation {s.generation}": s.eval_mean for s in snapshots
                    if s.in_game} if own else {}
    controllers.update(reference_controllers(len(snapshots[0].params), es.sigma0,
                                             cfg.run.seed))
    names = list(controllers)
    params = np.stack([controllers[n] for n in names]).astype(np.float32)
    with contextlib.ExitStack() as stack:
        game = real if real is not None else stack.enter_context(
            Evaluator.of_config(workload_from_config(cfg, "real"), cfg.es))
        for name in names:
            if name not in real_returns:
                real_returns[name] = score_mean(game, controllers[name], fixed)
    results = _compare_in_dreams(cfg, real_returns, params, dream_episodes, taus, dream,
                                 real_episodes=int(fixed.size), notes={"snapshots": source})
    atomic_write_bytes(RunLayout.of(cfg).fidelity, dump(results).encode())
    return results


def _compare_in_dreams(cfg: Any, real_returns: dict[str, float], params: np.ndarray,
                       dream_episodes: int, taus: Sequence[float], dream: Any,
                       real_episodes: int, notes: dict[str, Any]) -> list[Fidelity]:
    """The controllers (``params``, in ``real_returns``' order) in the same dreams at each
    tau (default dream.tau), compared with their real returns: one result a tau."""
    from wmlab.agent import workload_from_config
    from wmlab.evaluators import Evaluator

    names = list(real_returns)
    seeds = np.random.default_rng([cfg.run.seed, 7907]).integers(0, 2**31 - 1,
                                                                  dream_episodes)
    dream_seeds = np.repeat(seeds[None], len(names), axis=0)
    results = []
    for tau in (list(taus) or [cfg.dream.tau]):
        with contextlib.ExitStack() as stack:
            workload = workload_from_config(cfg, "dream")
            fitness = dream if dream is not None else stack.enter_context(Evaluator.of_config(
                dataclasses.replace(workload, dream=workload.dream.with_tau(tau)), cfg.es))
            dreamt = fitness.evaluate(params, dream_seeds)
        results.append(compare(real_returns, dict(zip(names, map(float, dreamt), strict=True)),
                               tau=float(tau), real_episodes=real_episodes,
                               dream_episodes=dream_episodes, notes=dict(notes)))
    return results


def held_out_tracks(seed: int, count: int) -> np.ndarray:
    """``count`` env seeds from a stream of their own: not the scored mean's fixed seeds
    (where the best C was chosen, so its figure there is luckier than it), nor the members'."""
    from wmlab.controller.cmaes import SEED_RANGE

    return np.random.default_rng([seed, 7937]).integers(0, SEED_RANGE, count)


def neighbour_controllers(center: np.ndarray, sigma: float, count: int, seed: int
                          ) -> dict[str, np.ndarray]:
    """``center`` ("best") and ``count`` draws around it at ``sigma``, as CMA-ES samples a
    generation's members around its mean (isotropic: its covariance as it starts)."""
    if not sigma > 0:
        raise WmlabError(f"--neighbours takes the step size to draw at, > 0; got {sigma}")
    if count < 2:
        raise WmlabError(f"--count must be 2 or more neighbours to rank, got {count}")
    rng = np.random.default_rng([seed, 7927])
    center = np.asarray(center, dtype=np.float64)
    draws = {f"sigma {sigma:g} #{i + 1}": center + rng.normal(0.0, sigma, center.size)
             for i in range(count)}
    return {"best": center, **draws}


def measure_neighbour_fidelity(cfg: Any, dream_episodes: int, sigma: float, count: int, *,
                               taus: Sequence[float] = (), real: Any = None,
                               dream: Any = None) -> list[Fidelity]:
    """Does the dream rank the candidates CMA-ES compares? The run's best C and ``count``
    neighbours at ``sigma`` scored in the game (on es.eval_rollouts held-out tracks, in two
    halves) and in M's dream at each of ``taus``; writes ``<eval>/fidelity-neighbours.json``.

    ``notes`` of each result: the game's split-half rank correlation (its first half of the
    tracks against its second, over the same controllers), the best C's real return and its
    neighbours' mean. ``real`` and ``dream`` are fitnesses, as for ``measure_fidelity``.
    """
    from wmlab.agent import workload_from_config
    from wmlab.controller.cmaes import load_controller_params
    from wmlab.evaluators import Evaluator
    from wmlab.fsio import atomic_write_bytes

    if dream_episodes < 1:
        raise WmlabError(f"eval.fidelity_dreams is {dream_episodes}: give at least 1 dream "
                         "per controller")
    controller = RunLayout.of(cfg).controller
    center, _ = load_controller_params(controller)
    controllers = neighbour_controllers(center, sigma, count, cfg.run.seed)
    if dream is None:
        check_heads(workload_from_config(cfg, "dream").load())
    tracks = held_out_tracks(cfg.run.seed, cfg.es.eval_rollouts)
    if len(tracks) < 2:
        raise WmlabError(f"es.eval_rollouts is {len(tracks)}: the game's two halves need at "
                         "least 2 tracks")
    names = list(controllers)
    params = np.stack([controllers[n] for n in names]).astype(np.float32)
    halves = [tracks[:len(tracks) // 2], tracks[len(tracks) // 2:]]
    with contextlib.ExitStack() as stack:
        game = real if real is not None else stack.enter_context(
            Evaluator.of_config(workload_from_config(cfg, "real"), cfg.es))
        first, second = (np.asarray(game.evaluate(params, np.repeat(half[None], len(names),
                                                                    axis=0)), np.float64)
                         for half in halves)
    weight = len(halves[0]) / len(tracks)
    real_returns = dict(zip(names, map(float, weight * first + (1 - weight) * second),
                            strict=True))
    notes = {"neighbours_of": controller, "sigma": float(sigma),
             "game_split_half": rank_correlation(first, second),
             "best_real": real_returns["best"],
             "neighbours_real": float(np.mean([real_returns[n] for n in names[1:]]))}
    results = _compare_in_dreams(cfg, real_returns, params, dream_episodes, taus, dream,
                                 real_episodes=int(tracks.size), notes=notes)
    atomic_write_bytes(RunLayout.of(cfg).neighbour_fidelity, dump(results).encode())
    return results


def check_heads(models: Any) -> None:
    """A dream scores controllers only where M predicts rewards (or the env pays +1 a step
    alive) and when episodes end."""
    from wmlab.dream.settings import missing_dream_heads

    missing = missing_dream_heads(models.mdrnn.shape, models.spec.survival_reward)
    if missing:
        raise WmlabError(f"the dream's fidelity needs M's {' and '.join(missing)}: this M "
                         "was trained without (its dream has no reward or no end); train "
                         "M with " + " ".join(f"--set mdrnn.{m}=true" for m in missing))


def dump(results: list[Fidelity]) -> str:
    return json.dumps({"results": [json.loads(r.to_json()) for r in results]}, indent=2)


def load(text: str) -> list[Fidelity]:
    """The results of a fidelity.json (one a tau)."""
    return [Fidelity.from_json(json.dumps(item)) for item in json.loads(text)["results"]]
