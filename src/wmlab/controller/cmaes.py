"""CMA-ES over C's parameters, with checkpoints that resume the same future.

The loop sees fitness only through ``Fitness.evaluate(params (P, n), seeds (P, R)) -> (P,)``
(mean return per member): real envs, the dream or a test function are all the same to it.

A mixed schedule (``es.dream_generations`` = N with ``es.fitness = "real"``) scores the
members of the first N generations in M's dream and the rest in the real env, in one CMA-ES
run: the generation counter alone picks the fitness, so a resumed run picks as the
uninterrupted one would. The mean is always scored on the real env (the fitness the run is
about), so "best" compares like with like; metrics.csv's ``in_dream`` column says which
fitness each generation's members had. A dream can be exploited (C learns to fool M):
``es.dream_patience`` = K ends the dream generations once K scorings in a row have not
beaten the best real score, and the real ones start afresh from the best scored mean (the
generation it ended at is kept in the state, so a resumed run switches where it did).

Per generation: ask P candidates from ``cma`` (in mirrored pairs under ``es.mirrored``), draw
the generation's rollout seeds (members i and i + P/2 share them when antithetic, a mirrored
pair when mirrored), evaluate, subtract the L2 penalty
``l2 * mean(w^2)`` (the original *added* it, rewarding large weights; here it penalises),
tell ``cma`` the negated scores (it minimises). Every ``eval_every`` generations (and at the
last) the current mean is scored on fixed seeds and the best such mean is kept.

The best of many means scored on few episodes is the luckiest as much as the best (on
CarRacing, ~30 points above its controller at 32 tracks). ``es.final_candidates`` = k scores
the k best scored means once more, after the last generation, on ``es.final_rollouts``
episodes of seeds of their own, and keeps the best by that score (the paper scored its means
on 1,024 rollouts); ``final-choice.json`` keeps each candidate's score as it is measured, so
a killed choice resumes where it stopped.

``es.h_components`` = k searches fewer parameters: a linear C's weights on M's hidden state
only along h's k principal directions (``wmlab.controller.subspace``); the loop asks and tells
CMA-ES in that subspace and maps each point to a whole controller before it is scored or saved.
``es.standardize`` searches the same weights in units of each input's spread, mapped the same
way.

Checkpoint (``<run>/controller``), written every generation:

- ``es-state.pkl``: the pickled ``cma.CMAEvolutionStrategy`` plus the generation counter and
  the best scored mean. Pickle is what ``cma`` itself supports for saving its state; it is
  our own file, written atomically, and read only from the run directory.
- ``controller-<g>.safetensors`` / ``best-<g>.safetensors`` (+ JSON sidecars): the current
  mean and the best scored mean as plain tensors, what ``wmlab evaluate`` loads.

``cma`` draws its samples through a generator the strategy owns (``SeededRandn``), so the
pickle carries the exact random state; anything ``cma`` might still draw from numpy's global
generator runs under a seed derived from (run seed, generation), with the caller's global
state restored afterwards. A resumed run draws exactly what the uninterrupted run would
have drawn.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import pickle
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from wmlab.checkpoint import checkpoint_exists, load_checkpoint, save_checkpoint
from wmlab.config import EsConfig
from wmlab.errors import WmlabError
from wmlab.fsio import atomic_write_bytes, exists
from wmlab.metrics import MetricsLogger


class SearchSpace(Protocol):
    """Where CMA-ES searches when not C's weights one by one (``wmlab.controller.subspace``:
    es.h_components, es.standardize): ``size`` parameters, each point mapped to a whole
    controller by ``full``, a whole controller to its point by ``coordinates``."""

    @property
    def size(self) -> int: ...

    def full(self, searched: np.ndarray) -> np.ndarray: ...

    def coordinates(self, params: np.ndarray) -> np.ndarray: ...

STATE_FILE = "es-state.pkl"
MEAN_WEIGHTS = "controller"
BEST_WEIGHTS = "best"
SNAPSHOTS = "snapshots"  # every scored mean: snapshots/g<generation>
FINAL_CHOICE = "final-choice.json"  # es.final_candidates: the candidates' second scores
SEED_RANGE = 2**31 - 1  # seeds every backend accepts (EnvPool needs int32)


class Fitness(Protocol):
    def evaluate(self, params: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        """params (P, n), seeds (P, R) -> mean return of each member (P,)."""
        ...


@dataclass
class EsResult:
    folder: str
    generation: int
    resumed_from: int
    mean: np.ndarray
    best_score: float | None
    best_params: np.ndarray | None
    best_generation: int
    history: list[dict[str, float]] = field(default_factory=list)
    finished: bool = True
    final_choice: dict[str, Any] | None = None  # es.final_candidates' scores and choice


def check_es_config(es: EsConfig) -> None:
    if es.population < 2:
        raise WmlabError(f"es.population is {es.population}: CMA-ES needs at least 2 members "
                         "(the paper uses 64)")
    if es.antithetic and es.population % 2:
        raise WmlabError(f"es.population ({es.population}) must be even with es.antithetic")
    if es.sigma0 <= 0:
        raise WmlabError(f"es.sigma0 is {es.sigma0}: the initial step size must be positive")
    if es.dream_generations and es.fitness != "real":
        raise WmlabError(f"es.dream_generations ({es.dream_generations}) is the mixed "
                         "schedule of a real-env run (dream generations first, then real "
                         "ones): set es.fitness = \"real\", or es.dream_generations = 0 to "
                         "train in the dream only")
    if es.dream_patience and not es.dream_generations:
        raise WmlabError(f"es.dream_patience ({es.dream_patience}) ends the mixed "
                         "schedule's dream generations early, and es.dream_generations is "
                         "0: set es.dream_generations, or es.dream_patience = 0")
    if es.dream_rollouts and not es.dream_generations:
        raise WmlabError(f"es.dream_rollouts ({es.dream_rollouts}) sets the rollouts of the "
                         "mixed schedule's dream generations, and es.dream_generations is 0: "
                         "set es.dream_generations, or es.rollouts for a run in one world")
    if es.max_steps and es.fitness != "real":
        raise WmlabError(f"es.max_steps ({es.max_steps}) caps C's real-env rollouts, and C "
                         "trains in the dream (es.fitness = \"dream\"): cap dreams with "
                         "dream.max_steps, or set es.max_steps = 0")


def generation_seeds(seed: int, generation: int, population: int, rollouts: int,
                     antithetic: bool, common: bool = False,
                     mirrored: bool = False) -> np.ndarray:
    """(P, R) rollout seeds of one generation; rows i and i + P/2 equal when antithetic,
    rows 2k and 2k + 1 when ``mirrored`` (cma's mirrored pairs sit side by side), every row
    equal when ``common`` (all members on the same episodes: where episodes vary more than
    good controllers differ, only the same episodes rank them)."""
    rng = np.random.default_rng([seed, generation, 5])
    if common:
        return np.repeat(rng.integers(0, SEED_RANGE, (1, rollouts)), population, axis=0)
    if not (antithetic or mirrored):
        return rng.integers(0, SEED_RANGE, (population, rollouts))
    half = rng.integers(0, SEED_RANGE, (population // 2, rollouts))
    return np.repeat(half, 2, axis=0) if mirrored else np.concatenate([half, half])


def eval_seeds(seed: int, eval_rollouts: int, rollouts: int, stream: int = 1_000_003
               ) -> np.ndarray:
    """The fixed seeds the mean is scored on, as rows of at most ``rollouts`` (so the work
    splits into jobs like a generation's); another ``stream`` draws other seeds (the final
    choice's)."""
    per_row = max(d for d in range(1, rollouts + 1) if eval_rollouts % d == 0)
    rng = np.random.default_rng([seed, stream])
    return rng.integers(0, SEED_RANGE, eval_rollouts).reshape(-1, per_row)


FINAL_SEEDS_STREAM = 1_000_033  # the final choice's episodes: none of the scorings' seeds


def l2_penalty(params: np.ndarray, l2: float) -> np.ndarray:
    """The weight penalty per member: l2 * mean(w^2) (subtracted from fitness)."""
    return l2 * np.mean(np.square(params), axis=1)


@contextlib.contextmanager
def numpy_seeded(*key: int) -> Iterator[None]:
    """Run ``cma`` code under a seed derived from ``key``; leave the global state as it was."""
    saved = np.random.get_state()
    np.random.seed(np.random.SeedSequence(list(key)).generate_state(1)[0])
    try:
        yield
    finally:
        np.random.set_state(saved)


class SeededRandn:
    """``cma``'s ``randn`` option: standard normals from a generator owned by the strategy.

    ``cma`` defaults to ``np.random.randn``, a method of numpy's global generator; pickling
    the strategy would then copy that generator by value and the resumed run would draw
    from the copy, not from what it drew before. Owning the generator makes the pickled
    strategy carry its exact random state.
    """

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng([seed, 23])

    def __call__(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape)


def new_strategy(num_params: int, es: EsConfig, seed: int, start: np.ndarray | None = None
                 ) -> Any:
    """A fresh CMA-ES whose mean starts at ``start`` (default: zero, as the paper)."""
    import cma

    options = {"popsize": es.population, "randn": SeededRandn(seed), "verbose": -9,
               "verb_disp": 0, "verb_log": 0, "verb_filenameprefix": "", "maxiter": math.inf,
               "tolfun": 0, "tolfunhist": 0, "tolflatfitness": math.inf, "tolx": 0,
               "tolstagnation": math.inf}
    if es.covariance == "diagonal":
        # A full covariance of n parameters costs n^2 memory per checkpoint and O(n^2) per
        # sample: 600 MB a generation for BinPacking's 8,670-parameter controller.
        options["CMA_diagonal"] = True
    if es.mirrored:
        # every second member is the mirror of the one before it (method 0: all of them,
        # not cma's default selective mirroring of the previous generation's worst)
        options.update(CMA_mirrors=es.population // 2, CMA_mirrormethod=0)
    with numpy_seeded(seed, 17):
        x0 = np.zeros(num_params) if start is None else np.asarray(start, dtype=np.float64)
        return cma.CMAEvolutionStrategy(x0, es.sigma0, options)


def score_mean(fitness: Fitness, mean: np.ndarray, seeds: np.ndarray) -> float:
    """Mean return of the controller ``mean`` over all of ``seeds`` (rows of equal size)."""
    rows = np.repeat(mean[None, :].astype(np.float32), len(seeds), axis=0)
    return float(np.mean(fitness.evaluate(rows, seeds)))


def _read_state(folder: str) -> dict[str, Any] | None:
    """The CMA-ES checkpoint in ``folder`` as saved, or None where there is none."""
    path = f"{folder}/{STATE_FILE}"
    if not exists(path):
        return None
    import fsspec

    with fsspec.open(path, "rb") as handle:
        try:
            return _StateUnpickler(handle).load()
        except Exception as exc:
            raise WmlabError(f"ES state {path} is damaged ({type(exc).__name__}): delete "
                             f"{folder} to train the controller from scratch") from None


def finished_generations(folder: str) -> int:
    """Generations the CMA-ES checkpoint in ``folder`` has finished (0 where there is none)."""
    state = _read_state(folder)
    return 0 if state is None else int(state["generation"])


def _load_state(folder: str, num_params: int, es: EsConfig) -> dict[str, Any] | None:
    state = _read_state(folder)
    if state is None:
        return None
    if state.get("mirrored", False) != es.mirrored:  # states from before the key: False
        raise WmlabError(f"{folder} holds a CMA-ES run with es.mirrored = "
                         f"{str(state.get('mirrored', False)).lower()}, but this config sets "
                         f"{str(es.mirrored).lower()}: set it back, or use another run name")
    if state.get("standardize", False) != es.standardize:
        raise WmlabError(f"{folder} holds a CMA-ES run with es.standardize = "
                         f"{str(state.get('standardize', False)).lower()}, but this config "
                         f"sets {str(es.standardize).lower()}: set it back, or use another "
                         "run name")
    if state["num_params"] != num_params or state["population"] != es.population:
        raise WmlabError(f"{folder} holds a CMA-ES run of {state['population']} members x "
                         f"{state['num_params']} parameters, but this config asks for "
                         f"{es.population} x {num_params}: use another run name or delete "
                         f"{folder}")
    return state


class _StateUnpickler(pickle.Unpickler):
    """Reads CMA-ES states written before this module moved (they name ``wmlab.es``)."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "wmlab.es":
            module = __name__
        return super().find_class(module, name)


def _save_state(folder: str, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    pickle.dump(state, buffer)
    atomic_write_bytes(f"{folder}/{STATE_FILE}", buffer.getvalue())


@dataclass
class _Search:
    """One CMA-ES run as it goes: its settings, the fitnesses, and ``state``, what
    ``es-state.pkl`` keeps (the strategy, the generation counter and the best scored mean)."""

    es: EsConfig
    folder: str
    seed: int
    info: dict[str, Any]  # written into every controller checkpoint's sidecar
    fitness: Fitness
    dream_fitness: Fitness | None
    score_fitness: Fitness
    fixed_seeds: np.ndarray  # what every scored mean is scored on
    state: dict[str, Any]
    space: SearchSpace | None = None  # es.h_components / es.standardize: maps to C

    @property
    def strategy(self) -> Any:
        return self.state["es"]

    def controllers(self, searched: np.ndarray) -> np.ndarray:
        """CMA-ES's points (P, m) -> the controllers they stand for (P, n)."""
        return searched if self.space is None else self.space.full(searched)

    def searched(self, params: np.ndarray) -> np.ndarray:
        """A controller (n,) -> CMA-ES's point for it."""
        return params if self.space is None else self.space.coordinates(params)


def _new_state(num_params: int, es: EsConfig, seed: int, start: np.ndarray | None,
               start_score: float | None = None, space: SearchSpace | None = None
               ) -> dict[str, Any]:
    """A new search of ``num_params`` (the subspace's size under ``space``); the best
    scored mean, where the start was scored, is the start itself (whole)."""
    scored = start is not None and start_score is not None
    point = start if start is None or space is None else space.coordinates(start)
    return {"es": new_strategy(num_params, es, seed, point), "generation": 0,
            "best_score": start_score if scored else None,
            "best_params": np.asarray(start, dtype=np.float64).copy() if scored else None,
            "best_generation": 0, "num_params": num_params, "population": es.population,
            "mirrored": es.mirrored, "standardize": es.standardize, "dream_ended_at": None,
            "unimproved_scorings": 0}


def run_es(fitness: Fitness, num_params: int, es: EsConfig, folder: str, *, seed: int = 0,
           info: dict[str, Any] | None = None, progress: bool = True,
           stop_after_generations: int | None = None,
           on_generation: Callable[[int, dict[str, float]], None] | None = None,
           dream_fitness: Fitness | None = None,
           score_fitness: Fitness | None = None, start: np.ndarray | None = None,
           start_score: float | None = None, space: SearchSpace | None = None
           ) -> EsResult:
    """Run (or resume) CMA-ES until ``es.generations``; checkpoints in ``folder``.

    With ``es.dream_generations`` = N > 0, generations 1..N score members with
    ``dream_fitness`` and the rest with ``fitness``. The mean is scored with
    ``score_fitness`` (default ``fitness``): whole episodes where members' rollouts may be
    cut short (es.stall_steps), so scored means compare like with like. A new run's mean
    starts at ``start`` (default zero); ``start_score``, its score on the fixed seeds where
    already measured, makes it the first best scored mean (generation 0). ``space`` (a
    ``SearchSpace``: es.h_components, es.standardize): CMA-ES searches its ``size``
    parameters, each point mapped to a whole controller by ``space.full``; every controller
    saved is whole.
    """
    check_es_config(es)
    if es.dream_generations and dream_fitness is None:
        raise WmlabError(f"es.dream_generations is {es.dream_generations} but no dream "
                         "fitness was given: train through train_controller, or set "
                         "es.dream_generations = 0")
    folder = folder.rstrip("/")
    searched = num_params if space is None else space.size
    state = _load_state(folder, searched, es)
    if state is None:
        state = _new_state(searched, es, seed, start, start_score, space)
    first = state["generation"]
    metrics = MetricsLogger(folder, resume_step=first)
    search = _Search(es, folder, seed, info or {}, fitness, dream_fitness,
                     score_fitness or fitness, eval_seeds(seed, es.eval_rollouts, es.rollouts),
                     state, space)
    result = EsResult(folder=folder, generation=first, resumed_from=first,
                      mean=_mean(search),
                      best_score=state["best_score"], best_params=state["best_params"],
                      best_generation=state["best_generation"])
    bar = _bar(progress, first, es.generations)
    done_now = 0
    try:
        for generation in range(first, es.generations):
            if stop_after_generations is not None and done_now >= stop_after_generations:
                result.finished = False
                break
            row = _run_generation(search, generation, metrics)
            step = generation + 1
            result.history.append({"generation": step, **row})
            result.generation, done_now = step, done_now + 1
            if on_generation is not None:
                on_generation(step, row)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(best=f"{row['best']:.1f}", mean=f"{row['mean']:.1f}",
                                sigma=f"{row['sigma']:.3f}")
    finally:
        metrics.close()
        if bar is not None:
            bar.close()
    result.mean = _mean(search)
    result.best_score, result.best_params = state["best_score"], state["best_params"]
    result.best_generation = state["best_generation"]
    if result.finished and es.final_candidates and state["best_params"] is not None:
        result.final_choice = _final_choice(search)
        chosen = result.final_choice["chosen"]
        result.best_score, result.best_generation = chosen["eval_mean"], chosen["generation"]
        result.best_params = chosen.pop("params")
    return result


def _mean(search: _Search) -> np.ndarray:
    """CMA-ES's mean as a controller."""
    return search.controllers(np.asarray(search.strategy.mean, dtype=np.float64)[None])[0]


def _run_generation(search: _Search, generation: int, metrics: MetricsLogger
                    ) -> dict[str, float]:
    """One generation, from asking for its members to its checkpoint; its metrics row."""
    es = search.es
    began = time.monotonic()
    mean, row = _evolve(search, generation)
    step = generation + 1
    if step % es.eval_every == 0 or step == es.generations:
        in_dream = generation < _dream_until(search)
        best_before = search.state["best_score"]
        row["eval_mean"] = _score_the_mean(search, step, mean)
        if in_dream and es.dream_patience:
            _end_dream_if_exploited(search, step, best_before, row["eval_mean"])
    row["seconds"] = time.monotonic() - began
    metrics.log(step, row)
    write_progress_plot(search.folder, metrics.rows())
    save_checkpoint(search.folder, MEAN_WEIGHTS, step, _weights(mean), None,
                    {**search.info, "generation": step})
    search.state["generation"] = step
    _save_state(search.folder, search.state)  # last: the commit point of this generation
    return row


def _evolve(search: _Search, generation: int) -> tuple[np.ndarray, dict[str, float]]:
    """Ask CMA-ES for the generation's members, score them and tell it the scores: the
    new mean and the members' metrics."""
    es, seed, strategy = search.es, search.seed, search.strategy
    with numpy_seeded(seed, generation, 3):
        candidates = np.asarray(strategy.ask(), dtype=np.float64)
    in_dream = generation < _dream_until(search)
    rollouts = es.dream_rollouts if in_dream and es.dream_rollouts else es.rollouts
    seeds = generation_seeds(seed, generation, es.population, rollouts, es.antithetic,
                             es.common_seeds, es.mirrored)
    members = search.dream_fitness if in_dream and search.dream_fitness is not None \
        else search.fitness
    controllers = search.controllers(candidates)
    returns = np.asarray(members.evaluate(controllers.astype(np.float32), seeds),
                         dtype=np.float64)
    steps = getattr(members, "last_steps", None)
    scores = returns - l2_penalty(controllers, es.l2)
    with numpy_seeded(seed, generation, 4):
        strategy.tell(list(candidates), list(-scores))
    mean = _mean(search)
    row = {"best": float(returns.max()), "mean": float(returns.mean()),
           "worst": float(returns.min()), "best_penalised": float(scores.max()),
           "sigma": float(strategy.sigma)}
    if es.dream_generations:
        row["in_dream"] = 1.0 if in_dream else 0.0  # which fitness the members had
    if steps is not None:  # the members' env (or dream) steps, for the budget
        row["env_steps"] = float(np.sum(steps))
    return mean, row


def _dream_until(search: _Search) -> int:
    """The generation at which the dream generations end: es.dream_generations (so a
    larger value extends them), unless es.dream_patience ended them sooner."""
    ended = search.state.get("dream_ended_at")
    dreams = search.es.dream_generations
    return dreams if ended is None else min(ended, dreams)


def _end_dream_if_exploited(search: _Search, step: int, best_before: float | None,
                            score: float) -> None:
    """Count the scorings without a better real score; at es.dream_patience, end the dream
    generations here and restart CMA-ES (sigma0, a fresh covariance) at the best scored
    mean: the dream has stopped teaching C what the game rewards."""
    state, es = search.state, search.es
    improved = best_before is None or score > best_before
    state["unimproved_scorings"] = 0 if improved else state.get("unimproved_scorings", 0) + 1
    if state["unimproved_scorings"] < es.dream_patience:
        return
    state["dream_ended_at"] = step
    restart_seed = int(np.random.SeedSequence([search.seed, step, 29]).generate_state(1)[0])
    state["es"] = new_strategy(state["num_params"], es, restart_seed,
                               search.searched(state["best_params"]))


def _score_the_mean(search: _Search, step: int, mean: np.ndarray) -> float:
    """Score the mean on the fixed seeds, keep it as a snapshot and, if no scored mean
    was better, as the best; its score."""
    state, folder = search.state, search.folder
    score = score_mean(search.score_fitness, mean, search.fixed_seeds)
    sidecar = {**search.info, "generation": step, "eval_mean": score,
               "eval_rollouts": search.es.eval_rollouts}
    # every scored mean is kept (a few KB): the controllers along the run, with their
    # real scores, are what the dream's fidelity is measured on
    save_checkpoint(f"{folder}/{SNAPSHOTS}", f"g{step:05d}", step, _weights(mean), None,
                    sidecar)
    if state["best_score"] is None or score > state["best_score"]:
        state.update(best_score=score, best_params=mean.copy(), best_generation=step)
        save_checkpoint(folder, BEST_WEIGHTS, step, _weights(mean), None, sidecar)
    return score


def _final_candidates(search: _Search) -> list[Snapshot]:
    """The es.final_candidates best scored means (ties: the earlier), the start among them
    where it was scored (generation 0)."""
    scored = load_snapshots(search.folder)
    state = search.state
    if state["best_generation"] == 0 and all(s.generation for s in scored):
        scored.insert(0, Snapshot(0, np.asarray(state["best_params"], dtype=np.float64),
                                  float(state["best_score"])))
    ranked = sorted(scored, key=lambda snap: (-snap.eval_mean, snap.generation))
    return ranked[:search.es.final_candidates]


def _final_choice(search: _Search) -> dict[str, Any]:
    """Score the best scored means again on es.final_rollouts episodes of their own and
    keep the best of them by that score as the run's best C. Each candidate's score is
    written to final-choice.json as soon as it is measured; a resumed choice reuses them."""
    import fsspec

    es, folder = search.es, search.folder
    path = f"{folder}/{FINAL_CHOICE}"
    seeds = eval_seeds(search.seed, es.final_rollouts, es.rollouts, FINAL_SEEDS_STREAM)
    known: dict[int, float] = {}
    if exists(path):
        with fsspec.open(path, "rb") as handle:
            saved = json.loads(handle.read())
        if saved.get("final_rollouts") == es.final_rollouts:
            known = {int(row["generation"]): float(row["final_mean"])
                     for row in saved["candidates"]}
    candidates = _final_candidates(search)
    rows: list[dict[str, Any]] = []

    def write(chosen: int | None) -> None:
        record = {"final_rollouts": es.final_rollouts, "eval_rollouts": es.eval_rollouts,
                  "candidates": rows, "chosen_generation": chosen}
        atomic_write_bytes(path, json.dumps(record, indent=2).encode())

    for snap in candidates:
        if snap.generation not in known:
            known[snap.generation] = score_mean(search.score_fitness, snap.params, seeds)
        rows.append({"generation": snap.generation, "eval_mean": snap.eval_mean,
                     "final_mean": known[snap.generation]})
        write(None)
    best = max(range(len(candidates)), key=lambda i: rows[i]["final_mean"])  # first of ties
    chosen = candidates[best]
    write(chosen.generation)
    save_checkpoint(folder, BEST_WEIGHTS, chosen.generation, _weights(chosen.params), None,
                    {**search.info, "generation": chosen.generation,
                     "eval_mean": chosen.eval_mean, "eval_rollouts": es.eval_rollouts,
                     "final_mean": rows[best]["final_mean"],
                     "final_rollouts": es.final_rollouts})
    return {"candidates": rows, "chosen": {**rows[best], "params": chosen.params}}


def _weights(params: np.ndarray) -> dict[str, torch.Tensor]:
    return {"params": torch.as_tensor(np.asarray(params, dtype=np.float32))}


def load_controller_params(folder: str) -> tuple[np.ndarray, dict[str, Any]]:
    """The best scored mean if there is one, else the latest mean: (params (n,), sidecar)."""
    name = BEST_WEIGHTS if checkpoint_exists(folder, BEST_WEIGHTS) else MEAN_WEIGHTS
    ckpt = load_checkpoint(folder, name, with_state=False)
    if "params" not in ckpt.weights:
        raise WmlabError(f"{folder}/{name} is not a controller checkpoint (no 'params')")
    return ckpt.weights["params"].double().numpy(), {**ckpt.info, "source": f"{folder}/{name}"}


@dataclass
class Snapshot:
    """The mean of the search distribution at one scoring, and its score on the fixed
    seeds the run scores every mean on."""

    generation: int
    params: np.ndarray
    eval_mean: float
    in_game: bool = True  # scored in the real env; False for a C trained in the dream alone


def load_snapshots(folder: str) -> list[Snapshot]:
    """Every scored mean of the CMA-ES run in ``folder``, in generation order."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(f"{folder.rstrip('/')}/{SNAPSHOTS}")
    if not fs.exists(path):
        return []
    names = sorted(p.rsplit("/", 1)[-1][:-5] for p in fs.ls(path, detail=False)
                   if p.endswith(".json"))
    out = []
    for name in names:
        ckpt = load_checkpoint(f"{folder.rstrip('/')}/{SNAPSHOTS}", name, with_state=False)
        out.append(Snapshot(int(ckpt.info["generation"]),
                            ckpt.weights["params"].double().numpy(),
                            float(ckpt.info["eval_mean"]),
                            ckpt.info.get("fitness", "real") != "dream"))
    return sorted(out, key=lambda snap: snap.generation)


def _bar(progress: bool, start: int, total: int) -> Any:
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="CMA-ES", unit="gen")


def write_progress_plot(folder: str, rows: list[dict[str, str]]) -> None:
    """progress.png: best / mean / worst per generation and the scored means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from wmlab.plots import pyplot_png

    def column(key: str) -> tuple[list[float], list[float]]:
        pairs = [(float(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps, best = column("best")
    _, mean = column("mean")
    _, worst = column("worst")
    if steps:
        ax.fill_between(steps, worst, best, alpha=0.2, label="population worst..best")
        ax.plot(steps, mean, label="population mean")
        ax.plot(steps, best, linewidth=0.8, label="population best")
    eval_steps, eval_values = column("eval_mean")
    if eval_steps:
        ax.plot(eval_steps, eval_values, "o-", color="black", label="mean scored on fixed seeds")
    ax.set_xlabel("generation")
    _, seconds = column("seconds")
    if len(steps) >= 2 and len(seconds) == len(steps) and min(seconds) > 0:
        # progress per unit of compute, the figure budgets are judged by
        # generation 0 at hour 0, and the mean rate beyond the last generation, so that the
        # axis maps the whole plotted range (np.interp would clamp at the ends)
        rate = float(np.sum(seconds)) / 3600.0 / len(seconds)
        gens = np.concatenate([[0.0], steps, [steps[-1] + 1e6]])
        hours = np.concatenate([[0.0], np.cumsum(seconds) / 3600.0, [0.0]])
        hours[-1] = hours[-2] + 1e6 * rate
        top = ax.secondary_xaxis("top", functions=(
            lambda g: np.interp(g, gens, hours), lambda h: np.interp(h, hours, gens)))
        top.set_xlabel("hours of C training (wall-clock)", fontsize=8)
    ax.set_ylabel("return")
    ax.set_title("CMA-ES training progress")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    atomic_write_bytes(f"{folder}/progress.png", pyplot_png(fig))
