"""The C stage: C trained by CMA-ES (``wmlab.controller.cmaes``) on the rollouts of the run's
agent (``wmlab.agent``: V, M and C in the real env or in M's dream), checkpoints in
``<run>/controller``. It sits above the agent, which uses C's model, so it lives here with
the other stages rather than in ``wmlab.controller``."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
from collections.abc import Iterator
from typing import Any

import fsspec

from wmlab.agent import workload_from_config
from wmlab.calibrate import check_dream_calibration, current_calibration, ensure_fitted_done_bias
from wmlab.controller.carry_over import CARRY_OVER_FILE, carry_over
from wmlab.controller.cmaes import (
    STATE_FILE,
    EsResult,
    Fitness,
    SearchSpace,
    check_es_config,
    eval_seeds,
    load_controller_params,
    run_es,
    score_mean,
)
from wmlab.controller.model import shape_info, with_clock
from wmlab.controller.subspace import (
    check_h_subspace,
    check_scaled_inputs,
    h_subspace,
    scaled_inputs,
)
from wmlab.data.series import Series, SeriesStore
from wmlab.data.store import EpisodeStore
from wmlab.dream.calibration import noop_order_warning
from wmlab.dream.settings import missing_dream_heads
from wmlab.envs.repeat import agent_steps
from wmlab.errors import WmlabError
from wmlab.evaluators import Evaluator, warn
from wmlab.fidelity import DEFAULT_FIDELITY_DREAMS, measure_fidelity
from wmlab.fsio import atomic_write_bytes, exists
from wmlab.memory.model import load_mdrnn
from wmlab.raycluster import check_ray_address
from wmlab.runs import RunLayout
from wmlab.vision.encode import encode_with
from wmlab.vision.model import read_vae_info


def check_training_inputs(cfg: Any) -> tuple[Any, Any]:
    """Everything that can be wrong before training starts: the ES settings, the Ray
    address, V and M (present, fitting each other and the env, with the dream's heads for a
    mixed schedule). Returns (workload, models)."""
    check_es_config(cfg.es)
    if cfg.es.init_from == "previous":
        raise WmlabError("es.init_from = 'previous' starts C at the previous iteration's "
                         "controller, so it applies from iteration 2 on: set it in run.later "
                         "(or give a controller folder)")
    if cfg.es.engine == "ray":
        check_ray_address(cfg.es.ray_address)
    workload = workload_from_config(cfg)
    models = workload.load()
    episode = workload.max_steps or models.spec.max_steps
    if workload.kind == "real" and cfg.es.max_steps >= episode:
        raise WmlabError(f"es.max_steps ({cfg.es.max_steps}) is a shorter horizon for C's "
                         f"training rollouts, and {cfg.env.name}'s episodes end at {episode} "
                         f"steps: set es.max_steps below {episode}, or 0 for whole episodes")
    if cfg.es.dream_generations:
        check_dream_heads(models.mdrnn.shape, cfg.es.dream_generations,
                          models.spec.survival_reward)
    check_dream_length(cfg, models.spec.max_steps)
    if cfg.es.h_components:
        check_h_subspace(models.shape, cfg.controller.inputs, cfg.es.h_components,
                         models.mdrnn.shape.hidden)
    if cfg.es.standardize:
        check_scaled_inputs(models.shape, cfg.es.h_components)
    return workload, models


def check_dream_length(cfg: Any, env_frames: int) -> None:
    """With actions held for k frames, a dream step is k frames: a dream longer than the
    real episode in the agent's steps would pay C for frames the game never has."""
    repeat = cfg.env.action_repeat
    uses_dream = cfg.es.fitness == "dream" or cfg.es.dream_generations > 0
    steps = agent_steps(cfg.env.max_steps or env_frames, repeat)
    if repeat > 1 and uses_dream and cfg.dream.max_steps > steps:
        raise WmlabError(f"dream.max_steps ({cfg.dream.max_steps}) counts the agent's steps, "
                         f"and at env.action_repeat={repeat} a real episode has {steps}: set "
                         f"dream.max_steps={steps}")


def train_controller(cfg: Any, *, progress: bool = True,
                     stop_after_generations: int | None = None,
                     fitness: Fitness | None = None, folder: str | None = None) -> EsResult:
    """Train C for the run of ``cfg`` (real envs or the dream, per es.fitness); checkpoints
    go to ``folder`` (default ``<run>/controller``; sweeps keep one controller per folder)."""
    own = folder is None  # the run's C, not a sweep's: its dream's calibration is the run's
    folder = folder or RunLayout.of(cfg).controller
    mixed = cfg.es.dream_generations > 0
    dreams = cfg.es.fitness == "dream" or mixed  # C trains in M's dream, all or first
    check_es_config(cfg.es)
    if dreams and cfg.dream.tau_from_fidelity:
        cfg = copy.deepcopy(cfg)
        cfg.dream.tau = chosen_tau(cfg)
    if dreams:
        ensure_fitted_done_bias(cfg)  # C's dreams are built with it
    workload, models = check_training_inputs(cfg)
    if dreams:
        # the gate returns the calibration it checked; without a gate it is read here (a
        # stale one is measured again once, not twice)
        report = check_dream_calibration(cfg, save=own) or current_calibration(cfg, save=own)
        message = noop_order_warning(report) if report else None
        if message:
            warn(message)
    start = None
    if cfg.es.init_from:
        start, start_info = load_controller_params(cfg.es.init_from)
        # a C without a clock starts a clocked one: its clock's weights zero, the same acts
        start = with_clock(start, start_info, models.shape, cfg.controller.inputs,
                           start_info["source"])
    info = {**shape_info(models.shape, cfg.controller.inputs), "env": cfg.env.name,
            "fitness": cfg.es.fitness, "tau": cfg.dream.tau,
            **({"dream_generations": cfg.es.dream_generations} if mixed else {})}
    with contextlib.ExitStack() as stack:
        def evaluator(rollouts: Any) -> Any:
            return stack.enter_context(Evaluator.of_config(rollouts, cfg.es))

        scorer = None
        if fitness is None:
            members = member_workload(workload, cfg.es)
            fitness = evaluator(members)
            whole = dataclasses.replace(workload, stall_steps=0)
            if members != whole:
                # members' rollouts may end early (a stall, a shorter horizon); the mean is
                # scored on whole episodes, by workers of its own (idle between scorings)
                scorer = evaluator(whole)
        # the dream's workers load M only; they sit idle once the real generations start
        dream = evaluator(workload_from_config(cfg, "dream")) if mixed else None
        start_score = None
        if cfg.es.carry_over and start is not None and not exists(f"{folder}/{STATE_FILE}"):
            start, start_score = carried_start(cfg, models, start, scorer or fitness, folder)
        space = search_space(cfg, models, folder)
        return run_es(fitness, models.shape.num_params, cfg.es, folder,
                      seed=cfg.run.seed, info=info, progress=progress,
                      stop_after_generations=stop_after_generations, dream_fitness=dream,
                      score_fitness=scorer, start=start, start_score=start_score,
                      space=space)


def _driven_ids(cfg: Any) -> list[str]:
    store = EpisodeStore.open(cfg.store_url())
    return store.episode_ids("agent") or store.episode_ids()


def recorded_episodes(cfg: Any) -> Iterator[Series]:
    """The iteration's recorded series that C's fits read (es.carry_over's refit,
    es.h_components' directions): the agent-driven episodes where there are any, else all."""
    return SeriesStore.current(cfg.store_url()).iter_series(_driven_ids(cfg))


def episodes_as_started(cfg: Any) -> Iterator[Series] | None:
    """The recorded episodes as es.init_from's controller saw them, where this run's V was
    retrained from another (vae.init_from's, the previous iteration's): their z from that V,
    encoded once beside the run's own series. None where the V is the same (vae.epochs = 0
    in a later iteration keeps it), or no V to start from is named."""
    if not cfg.vae.init_from:
        return None
    before = read_vae_info(cfg.vae.init_from)["fingerprint"]
    if before == SeriesStore.current(cfg.store_url()).fingerprint:
        return None
    ids = _driven_ids(cfg)
    return encode_with(cfg, cfg.vae.init_from, ids).iter_series(ids)


def search_space(cfg: Any, models: Any, folder: str) -> SearchSpace | None:
    """Where C's search moves (kept in the controller folder, so a resumed run maps its
    search as it did): h's principal directions (es.h_components), standardised inputs
    (es.standardize), else every weight as it is (None)."""
    episodes = functools.partial(recorded_episodes, cfg)  # read only where a fit is needed
    if cfg.es.h_components:
        return h_subspace(folder, models.shape, cfg.es.h_components, models.mdrnn,
                          episodes, models.mdrnn.shape.z_dim)
    if cfg.es.standardize:
        return scaled_inputs(folder, models.shape, models.mdrnn, episodes,
                             cfg.controller.inputs, tuple(cfg.controller.clock),
                             cfg.controller.z_noise)
    return None


def member_workload(workload: Any, es: Any) -> Any:
    """The rollouts CMA-ES's members play: real episodes at a shorter horizon where
    es.max_steps sets one (their ends by stalling, es.stall_steps, are the workload's own);
    dreams as they are."""
    if workload.kind != "real" or not es.max_steps:
        return workload
    return dataclasses.replace(workload, max_steps=es.max_steps)


def carried_start(cfg: Any, models: Any, start: Any, scorer: Fitness, folder: str
                  ) -> tuple[Any, float]:
    """es.carry_over: es.init_from's controller, made for the M of mdrnn.init_from, refitted
    to this run's M on this iteration's agent-driven episodes (``wmlab.carry_over``); the
    candidate with the best real score on the fixed seeds, and that score."""
    if not cfg.mdrnn.init_from:
        raise WmlabError("es.carry_over refits es.init_from's controller from the M it was "
                         "made for (mdrnn.init_from) to this run's M: set mdrnn.init_from "
                         "(iteration 2 on sets it), or es.carry_over = false")
    old_m, _ = load_mdrnn(cfg.mdrnn.init_from)
    seeds = eval_seeds(cfg.run.seed, cfg.es.eval_rollouts, cfg.es.rollouts)
    params, choice = carry_over(models.shape, cfg.controller.inputs, start, old_m,
                                models.mdrnn, recorded_episodes(cfg),
                                lambda candidate: score_mean(scorer, candidate, seeds),
                                f"{folder}/{CARRY_OVER_FILE}", candidates=models.candidates,
                                old_episodes=episodes_as_started(cfg))
    where = "in the dream" if cfg.es.fitness == "dream" else "real"
    print(f"[controller] carried over to this M: {choice.chosen} "
          f"({where} {choice.score:.1f} on the fixed seeds; "
          + ", ".join(f"{k}: {v:.1f}" for k, v in choice.scores.items()) + ")", flush=True)
    return params, choice.score


def chosen_tau(cfg: Any) -> float:
    """The tau of ``eval.fidelity_taus`` at which M's dream ranks the scored controllers of
    ``es.init_from``'s run (plus zero and random) most like the real game (rank correlation
    of their dream and real returns); measured once, then read back, so a resumed C keeps
    its dream."""
    path = RunLayout.of(cfg).tau_choice
    if exists(path):
        with fsspec.open(path, "rb") as handle:
            return float(json.loads(handle.read())["tau"])
    if not cfg.eval.fidelity_taus or not cfg.es.init_from:
        raise WmlabError("dream.tau_from_fidelity chooses among eval.fidelity_taus by how "
                         "M's dream ranks the controllers of es.init_from's run: set both "
                         "(e.g. eval.fidelity_taus=[0.75, 1.0, 1.25] and "
                         "es.init_from=previous in run.later), or dream.tau_from_fidelity=false")
    results = measure_fidelity(cfg, cfg.eval.fidelity_dreams or DEFAULT_FIDELITY_DREAMS,
                               taus=cfg.eval.fidelity_taus, snapshots_from=cfg.es.init_from)
    ranked = [r for r in results if not math.isnan(r.rank_correlation)]
    if not ranked:
        raise WmlabError("M's dream ranks no controllers at any of eval.fidelity_taus (their "
                         "dream returns are all equal): train M longer, or set dream.tau and "
                         "dream.tau_from_fidelity=false")
    best = max(ranked, key=lambda r: r.rank_correlation)  # the first of equals: lowest tau
    choice = {"tau": best.tau, "snapshots": cfg.es.init_from,
              "rank_correlation": {f"{r.tau:g}": r.rank_correlation for r in results},
              "real_over_dream": {f"{r.tau:g}": r.ratio for r in results}}
    atomic_write_bytes(path, json.dumps(choice, indent=2, default=str).encode())
    return best.tau


def check_dream_heads(shape: Any, dream_generations: int, survival_reward: bool = False
                      ) -> None:
    missing = missing_dream_heads(shape, survival_reward)
    if missing:
        raise WmlabError(f"es.dream_generations = {dream_generations} trains C in M's dream "
                         f"first, but M has no {' and no '.join(missing)}: the dream would "
                         "have no reward or no end. Train M with "
                         + " ".join(f"--set mdrnn.{m}=true" for m in missing)
                         + ", or set es.dream_generations = 0")
