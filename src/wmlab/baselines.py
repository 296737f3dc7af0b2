"""Heuristic baselines for online bin packing: best fit, sum of squares and random.

- best fit, sum of squares and the reference repository's sum of squares: the rules of
  ``wmlab.envs.binpacking_heuristics``.
- random: uniform over the valid actions (a uniform pick over all C actions would mostly end
  the base variant's episodes at once, which says nothing about packing).

Sum of squares is designed for perfectly packable and bounded-waste distributions (waste
O(sqrt T) and O(1)); on linear-waste ones it counts the dead bags (levels no item fits) in
its squares, so it opens new bags rather than add to them, and loses even to random (see
docs/guide/binpacking.md). Heuristics only ever choose valid actions, so the variant does not
change their scores.
Each episode's item sequence is seeded by (seed, episode index), so two policies see the
same items and their returns compare pair by pair.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from wmlab.envs.binpacking import (
    DISTRIBUTIONS,
    BinPackingEnv,
    Problem,
    make_problem,
    problem_from_name,
    valid_mask,
)
from wmlab.envs.binpacking_heuristics import (  # noqa: F401  (the rules, exported here too)
    HEURISTICS,
    Rule,
    best_fit,
    heuristic_rule,
    sum_of_squares,
    sum_of_squares_orl,
)
from wmlab.errors import WmlabError
from wmlab.runs import RunLayout

if TYPE_CHECKING:
    from wmlab.config import Config
    from wmlab.evaluate import EvalResult

Policy = Rule  # (counts, item, capacity) -> action
POLICIES = ("best-fit", "sum-of-squares", "random", "sum-of-squares-orl")


def make_policy(name: str, seed: int = 0) -> Policy:
    """The policy called ``name``; ``random`` draws from its own generator seeded by ``seed``."""
    if name in HEURISTICS:
        return heuristic_rule(name)
    if name == "random":
        rng = np.random.default_rng(seed)

        def random_valid(counts: np.ndarray, item: int, capacity: int) -> int:
            return int(rng.choice(np.flatnonzero(valid_mask(counts, item, capacity))))

        return random_valid
    raise WmlabError(f"unknown bin packing policy '{name}': choose one of {', '.join(POLICIES)}")


@dataclass
class EpisodeResult:
    ret: float
    waste: int
    full_bags: int
    steps: int


def run_episode(env: BinPackingEnv, policy: Policy, seed: int) -> EpisodeResult:
    """One episode of ``policy`` on ``env`` from ``reset(seed=seed)``."""
    env.reset(seed=seed)
    total, done = 0.0, False
    capacity = env.problem.capacity
    while not done:
        action = policy(env.counts, env.item, capacity)
        _, reward, terminated, truncated, _ = env.step(action)
        total += reward
        done = terminated or truncated
    return EpisodeResult(ret=total, waste=env.waste, full_bags=env.full_bags, steps=env.t)


def episode_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def run_policy(problem: Problem, policy_name: str, episodes: int,
               seed: int = 0) -> list[EpisodeResult]:
    """``episodes`` episodes of one policy; episode i's items depend on (seed, i) only."""
    if episodes < 1:
        raise WmlabError(f"--episodes must be at least 1, got {episodes}")
    env = BinPackingEnv(problem=problem)
    policy = make_policy(policy_name, seed)
    return [run_episode(env, policy, episode_seed(seed, i)) for i in range(episodes)]


@dataclass
class BaselineRow:
    """Episode returns of one policy on one problem."""

    distribution: str
    policy: str
    capacity: int
    horizon: int
    episodes: int
    mean: float
    std: float
    mean_waste: float
    mean_full_bags: float
    returns: list[float]


def evaluate(policy_name: str, problems: dict[str, Problem], episodes: int,
             seed: int = 0) -> list[BaselineRow]:
    """One row per named problem: mean and std of the episode return of ``policy_name``."""
    rows = []
    for name, problem in problems.items():
        results = run_policy(problem, policy_name, episodes, seed)
        returns = np.array([r.ret for r in results])
        rows.append(BaselineRow(
            distribution=name, policy=policy_name, capacity=problem.capacity,
            horizon=problem.horizon, episodes=episodes, mean=float(returns.mean()),
            std=float(returns.std()), mean_waste=float(np.mean([r.waste for r in results])),
            mean_full_bags=float(np.mean([r.full_bags for r in results])),
            returns=returns.tolist()))
    return rows


def problems_for(env_name: str = "binpacking", distributions: Sequence[str] = (),
                 horizon: int | None = None) -> dict[str, Problem]:
    """What ``wmlab baseline`` runs: every named distribution for plain ``binpacking`` (or
    those chosen), or the one problem a ``binpacking:...`` name describes."""
    if ":" in env_name:
        if distributions:
            raise WmlabError("give either a binpacking:... env name or --distribution, not both")
        problems = {env_name: problem_from_name(env_name)}
    else:
        problem_from_name(env_name)  # only to refuse names that are not bin packing
        chosen = list(distributions) or list(DISTRIBUTIONS)
        problems = {name: make_problem(name) for name in chosen}
    if horizon is not None:
        problems = {name: replace(p, horizon=horizon) for name, p in problems.items()}
    return problems


def format_rows(rows: Sequence[BaselineRow]) -> str:
    lines = [f"{'distribution':<24} {'policy':<19} {'C':>4} {'T':>6} {'episodes':>8} "
             f"{'return (mean +- std)':>22} {'waste':>9}"]
    for r in rows:
        lines.append(f"{r.distribution:<24} {r.policy:<19} {r.capacity:>4} {r.horizon:>6} "
                     f"{r.episodes:>8} {f'{r.mean:.1f} +- {r.std:.1f}':>22} "
                     f"{r.mean_waste:>9.1f}")
    return "\n".join(lines)


def write_json(rows: Sequence[BaselineRow], path: str | Path) -> None:
    """The rows as JSON (written to a temporary file, then renamed)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    tmp.replace(target)


def evaluate_on_eval_seeds(cfg: Config, policies: Sequence[str] = (
        "best-fit", "sum-of-squares", "sum-of-squares-orl")) -> list[EvalResult]:
    """The heuristics on the run's own problem and the very episodes its controller is
    scored on (``eval.seed`` ..), written as ``eval/baseline-<policy>.json`` so the report
    lists them beside the controller and the random policy."""
    from wmlab.evaluate import EvalResult, episode_rows, scored_env
    from wmlab.fsio import atomic_write_bytes

    problem = problem_from_name(cfg.env.name)
    if cfg.env.max_steps:
        problem = replace(problem, horizon=min(problem.horizon, cfg.env.max_steps))
    seeds = [int(s) for s in episode_rows(cfg.eval.seed, cfg.eval.episodes).ravel()]
    env = BinPackingEnv(problem=problem)
    backend = scored_env(cfg)[1]
    results = []
    for name in policies:
        policy = make_policy(name, cfg.run.seed)
        returns = np.array([run_episode(env, policy, seed).ret for seed in seeds])
        result = EvalResult(env=cfg.env.name, backend=backend, where="real",
                            episodes=len(seeds), mean=float(returns.mean()),
                            std=float(returns.std()), seeds=seeds,
                            returns=returns.tolist(), controller=f"{name} heuristic",
                            controller_fingerprint="", extra={"policy": name})
        atomic_write_bytes(RunLayout.of(cfg).baseline_scores(name),
                           json.dumps(asdict(result), indent=2).encode())
        results.append(result)
    return results
