"""The stages of a World Models run, in order: collect -> V -> encode -> M -> C -> evaluate
-> report, and ``Pipeline``, the engine over them (iterations included)."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import fsspec

from wmlab.config import Config, parse_override, toml_value, with_overrides
from wmlab.errors import WmlabError
from wmlab.pipeline.engine import Engine, Prior, Stage, StageResult, _hash, read_record
from wmlab.runs import ITERATIONS, STAGES, RunLayout

# ---------------------------------------------------------------------------------------------
# Iterations


def iteration_config(cfg: Config, iteration: int) -> Config:
    """The config of iteration ``iteration`` (2+) of ``cfg``'s run.

    It lives in ``<run>/iterations/<k>/``; it collects new episodes, a fraction with the
    previous iteration's agent and the rest with the random policy (other seeds than
    before), and trains V and M starting from the previous iteration's weights; C is trained
    afresh. Evaluation uses the same seeds, so iterations compare episode for episode.
    """
    from wmlab.checkpoint import checkpoint_exists
    from wmlab.controller.cmaes import MEAN_WEIGHTS

    previous = RunLayout.of(cfg).iteration(iteration - 1)
    if not checkpoint_exists(previous.controller, MEAN_WEIGHTS):
        raise WmlabError(f"iteration {iteration} starts from iteration {iteration - 1}'s "
                         f"trained agent, and {previous.root} has none: run `wmlab run` with "
                         f"--iteration {iteration - 1} first")
    new = copy.deepcopy(cfg)
    new.collect.agent_run = previous.root  # before run.later: its overrides check against it
    if cfg.run.later:
        new = with_overrides(new, cfg.run.later)
    name = cfg.run.name or f"{cfg.preset}-{cfg.profile}"
    new.run.name = f"{name}/{ITERATIONS}/{iteration}"
    new.collect.out = ""
    new.collect.seed = cfg.collect.seed + 1000 * (iteration - 1)
    new.collect.agent_run = previous.root
    new.vae.init_from = previous.vision
    new.mdrnn.init_from = previous.memory
    if new.es.init_from == "previous":
        new.es.init_from = previous.controller
    return new


def shadowed_by_later(cfg: Config, overrides: list[str]) -> list[str]:
    """The command-line ``overrides`` (``section.key=value``) whose key ``cfg.run.later``
    sets again for iterations 2+: there the later value applies. One line per key, naming
    both values and how to change the later iterations' one."""
    later = dict(parse_override(item) for item in cfg.run.later)
    lines = []
    for item in overrides:
        key, value = parse_override(item)
        if key in later and later[key] != value:  # as values: 0.20 is 0.2
            lines.append(f"{key}={toml_value(value)} applies to iteration 1 only: run.later "
                         f"sets {key}={toml_value(later[key])} for iterations 2+ (to change "
                         f"it there, pass --set 'run.later=[...]' with the whole list)")
    return lines


# ---------------------------------------------------------------------------------------------
# The stages


def _store_fingerprint(cfg: Config) -> str | None:
    from wmlab.data import EpisodeStore

    try:
        store = EpisodeStore.open(cfg.store_url())
        ids = store.episode_ids()
    except WmlabError:
        return None
    if len(ids) < cfg.collect.episodes:
        return None
    return _hash(ids)


def _run_collect(cfg: Config, progress: bool) -> dict[str, Any]:
    from wmlab.collect import collect_shares

    summaries = collect_shares(cfg, progress=progress)
    if len(summaries) == 1 and summaries[0][0] == cfg.collect.policy:
        summary = summaries[0][1]
        return {"line": summary.line(), "episodes": summary.kept_now, "steps": summary.steps}
    return {policy: {"line": summary.line(), "episodes": summary.kept_now}
            for policy, summary in summaries}


def _sidecar_fingerprint(folder: str, name: str) -> str | None:
    from wmlab.checkpoint import read_info

    try:
        return str(read_info(folder, name)["fingerprint"])
    except (WmlabError, KeyError):
        return None


def _run_vision(cfg: Config, progress: bool) -> dict[str, Any]:
    from wmlab.vision.train import train_vae

    result = train_vae(cfg, progress=progress)
    last = result.history[-1] if result.history else {}
    return {"steps": result.steps, "epochs": result.epochs,
            "frames_per_second": round(result.frames_per_second, 1),
            **{f"val_{k}": v for k, v in last.items() if isinstance(v, (int, float))}}


def _vision_output(cfg: Config) -> str | None:
    from wmlab.vision.model import FINAL_WEIGHTS

    return _sidecar_fingerprint(RunLayout.of(cfg).vision, FINAL_WEIGHTS)


def _run_encode(cfg: Config, progress: bool) -> dict[str, Any]:
    from wmlab.vision.encode import encode_store

    summary = encode_store(cfg, progress=progress)
    return {"line": summary.line(), "episodes": summary.episodes}


def _encode_output(cfg: Config) -> str | None:
    from wmlab.data import EpisodeStore
    from wmlab.data.series import SeriesStore

    vae = _vision_output(cfg)
    try:
        series = SeriesStore.current(cfg.store_url())
        ids = EpisodeStore.open(cfg.store_url()).episode_ids()
    except WmlabError:
        return None
    if vae is None or series.fingerprint != vae or set(ids) - set(series.ids()):
        return None
    return _hash([vae, ids])


def _run_memory(cfg: Config, progress: bool) -> dict[str, Any]:
    from wmlab.calibrate import calibrate_trained_memory
    from wmlab.memory.train import train_ensemble

    results = train_ensemble(cfg, progress=progress)
    result = results[0]  # the M C reads: its figures are the stage's
    if all(r.finished for r in results):  # the dream beside the game, before C trains in it
        calibrate_trained_memory(cfg)
    last = result.history[-1] if result.history else {}
    return {"steps": result.steps,
            "sequences_per_second": round(result.sequences_per_second, 1),
            **{f"val_{k}": v for k, v in last.items() if isinstance(v, (int, float))}}


def _memory_output(cfg: Config) -> str | None:
    from wmlab.memory.model import FINAL_WEIGHTS, INITIAL_Z

    layout = RunLayout.of(cfg)
    weights = [_sidecar_fingerprint(folder, FINAL_WEIGHTS)
               for folder in layout.memory_members(cfg.mdrnn.ensemble)]
    start = _sidecar_fingerprint(layout.memory, INITIAL_Z)
    if None in weights or start is None:
        return None
    # one M keeps the fingerprint it had before ensembles existed (finished runs stay done)
    return _hash([weights[0], start] if len(weights) == 1 else [*weights, start])


def _run_controller(cfg: Config, progress: bool) -> dict[str, Any]:
    from wmlab.pipeline.controller_stage import train_controller

    result = train_controller(cfg, progress=progress)
    summary = {"generations": result.generation, "best_score": result.best_score,
               "best_generation": result.best_generation, "fitness": cfg.es.fitness}
    if result.final_choice is not None:
        chosen = result.final_choice["chosen"]
        summary["final_choice"] = result.final_choice
        print(f"  final choice: generation {chosen['generation']} of the "
              f"{len(result.final_choice['candidates'])} best scored means, "
              f"{chosen['final_mean']:.1f} on {cfg.es.final_rollouts} episodes of its own "
              f"({chosen['eval_mean']:.1f} on the {cfg.es.eval_rollouts} fixed ones)")
    if cfg.es.fitness == "dream" and cfg.dream.fit_done_bias:
        from wmlab.dream.calibration import dream_done_bias

        summary["dream_done_bias"] = dream_done_bias(cfg)
    return summary


def _controller_output(cfg: Config) -> str | None:
    from wmlab.controller.cmaes import BEST_WEIGHTS, MEAN_WEIGHTS

    folder = RunLayout.of(cfg).controller
    found = [_sidecar_fingerprint(folder, name) for name in (BEST_WEIGHTS, MEAN_WEIGHTS)]
    return None if found[1] is None else _hash(found)


def _run_evaluate(cfg: Config, progress: bool) -> dict[str, Any]:
    from wmlab.evaluate import (
        backend_gap,
        choose_iteration,
        evaluate_controller,
        evaluate_random_policy,
        read_validations,
        same_episodes,
        training_backend,
        validate_controller,
        versus_random,
    )

    # a resumed stage keeps the evaluations its last attempt finished: its folder is moved
    # to trash whenever its inputs change, so what is there was scored from these inputs
    summary: dict[str, Any] = {}
    real = evaluate_controller(cfg, video=f"{RunLayout.of(cfg).eval}/episode.gif", reuse=True)
    summary["controller"] = real.line()
    print(f"  controller: {real.line()}")
    if cfg.eval.validation_episodes:  # other seeds, to choose the run's agent on
        held = validate_controller(cfg, reuse=True)
        summary["validation"] = held.line()
        print(f"  controller on the validation seeds: {held.line()}")
        choice = choose_iteration(read_validations(RunLayout.of(cfg).base.root, real.backend))
        if choice is not None and len(choice.means) > 1:
            summary["chosen"] = choice.line()
            print(f"  {choice.line()}")
    trained_on = training_backend(cfg)
    if trained_on != real.backend:  # e.g. trained on EnvPool, reported on Gymnasium
        there = evaluate_controller(cfg, backend=trained_on, reuse=True)
        summary[f"controller-{trained_on}"] = there.line()
        print(f"  controller on its training backend: {there.line()}")
        if there.episodes > 1:
            paired = same_episodes(cfg.env.name, trained_on, real.backend)
            gap = backend_gap(there.returns, real.returns, trained_on, real.backend, paired)
            summary["transfer"] = gap.line()
            print(f"  {gap.line()}")
    floor = evaluate_random_policy(cfg, reuse=True)
    summary["random"] = floor.line()
    print(f"  random policy, same seeds: {floor.line()}")
    paired = versus_random(dataclasses.asdict(real), dataclasses.asdict(floor))
    if paired is not None:
        summary["versus_random"] = paired.line()
        print(f"  {paired.line()}")
        if not paired.clearly_better:
            summary["hint"] = not_learned_hint(cfg)
            print(f"  {summary['hint']}")
    for name in cfg.eval.references:  # behaviours that read nothing, on the same seeds
        reference = evaluate_random_policy(cfg, policy=name, reuse=True)
        summary[name] = reference.line()
        print(f"  {name} policy, same seeds: {reference.line()}")
        against = versus_random(dataclasses.asdict(real), dataclasses.asdict(reference), name)
        if against is not None:
            summary[f"versus_{name}"] = against.line()
            print(f"  {against.line()}")
    if cfg.eval.fidelity_dreams and cfg.es.fitness == "real":
        from wmlab.fidelity import measure_fidelity

        for fidelity in measure_fidelity(cfg, cfg.eval.fidelity_dreams,
                                         taus=cfg.eval.fidelity_taus):
            summary[f"fidelity tau {fidelity.tau:g}"] = fidelity.line()
            print(f"  {fidelity.line()}")
    if cfg.es.fitness == "dream":
        dream = evaluate_controller(cfg, where="dream", reuse=True)
        summary["dream"] = dream.line()
        print(f"  in the dream: {dream.line()}")
    if cfg.env.name.partition(":")[0] == "binpacking":
        from wmlab.baselines import evaluate_on_eval_seeds

        for row in evaluate_on_eval_seeds(cfg):
            summary[row.controller] = row.line()
            print(f"  {row.controller}, same seeds: {row.line()}")
    return summary


def not_learned_hint(cfg: Config) -> str:
    """What to try when C is not clearly better than the random policy."""
    if cfg.es.fitness != "dream":
        return ("C is not clearly better than the random policy yet: train it longer "
                "(a larger es.generations continues from its checkpoint)")
    iteration = RunLayout.of(cfg).iteration_number
    return ("C is not clearly better than the random policy: its dream rewards something "
            "the game does not (the report's calibration section compares them). The "
            "paper's remedy is the next iteration, which collects episodes with this C so "
            f"that M learns where it leads: `wmlab run --preset {cfg.preset} --profile "
            f"{cfg.profile} --iteration {iteration + 1}` with this run's --run, --seed and "
            "--set (docs/results/doom-quick.md: it rescued a quick Doom run)")


def _eval_output(cfg: Config) -> str | None:
    """The evaluate stage's own results; measurements other commands add to the eval
    folder later (``wmlab stall-effect``) are not its outputs, so they must not make a
    finished evaluation look changed by hand (and run again)."""
    fs, path = fsspec.core.url_to_fs(RunLayout.of(cfg).eval)
    if not fs.exists(path):
        return None
    others = {RunLayout("").stall_effect.rsplit("/", 1)[-1]}
    names = sorted(p for p in fs.ls(path, detail=False)
                   if p.endswith(".json") and p.rsplit("/", 1)[-1] not in others)
    if not names:
        return None
    return _hash([fs.cat_file(name).decode() for name in names])


def _dream_pictures(cfg: Config) -> dict[str, Any]:
    """The dream GIFs the report shows: C (or random actions) driving M's dream, and real
    frames | V's reconstruction | M's imagined continuation from the same start."""
    from wmlab.checkpoint import checkpoint_exists
    from wmlab.controller.cmaes import BEST_WEIGHTS
    from wmlab.dream.gallery import DreamRequest, make_dream_pictures

    if not cfg.mdrnn.done_head and not cfg.mdrnn.reward_head and cfg.es.fitness == "real":
        steps = 150  # a dream without an end: a short one shows what M imagines
    else:
        steps = min(300, cfg.dream.max_steps)
    best = BEST_WEIGHTS if checkpoint_exists(RunLayout.of(cfg).controller, BEST_WEIGHTS) else None
    try:
        return make_dream_pictures(cfg, DreamRequest(steps=steps, seed=cfg.run.seed,
                                                     controller=best))
    except WmlabError as exc:  # the report says what is missing; it never stops here
        return {"dream_error": str(exc)}


def _run_report(cfg: Config, progress: bool) -> dict[str, Any]:
    from wmlab.report import write_report

    dream = _dream_pictures(cfg)
    layout = RunLayout.of(cfg)
    paths = write_report(layout.root)
    if layout.base != layout:  # an iteration: the first run's report lists all
        write_report(layout.base.root)
    return {"markdown": str(paths.markdown), "html": str(paths.html),
            "dream": {k: v for k, v in dream.items() if isinstance(v, (str, int, float))}}


def _report_output(cfg: Config) -> str | None:
    fs, path = fsspec.core.url_to_fs(RunLayout.of(cfg).report_md)
    return _hash(fs.cat_file(path).decode()) if fs.exists(path) else None


def _collect_description(cfg: Config) -> str:
    """'collecting 300 agent + 300 brown-policy episodes': every share of the store."""
    from wmlab.collect import collection_shares

    shares = " + ".join(f"{count} {policy}" for policy, count in collection_shares(cfg))
    return f"collecting {shares}-policy episodes"


def default_stages(cfg: Config) -> list[Stage]:
    """The stages of a World Models run, in the order of ``wmlab.runs.STAGES``."""
    store_in_run = not cfg.collect.out
    stages = [
        Stage("collect", ("env", "collect", "run.seed"), "data" if store_in_run else None,
              _run_collect, _store_fingerprint,
              _collect_description(cfg)),
        Stage("vision", ("vae", "run.seed"), "vision", _run_vision, _vision_output,
              f"training V ({cfg.vae.kind}, z={cfg.vae.z_dim}, {cfg.vae.epochs} epochs)"),
        Stage("encode", (), None, _run_encode, _encode_output,
              "encoding every frame to (mu, logvar)"),
        Stage("memory", ("mdrnn", "run.seed"), "memory", _run_memory, _memory_output,
              f"training M (LSTM {cfg.mdrnn.hidden}, {cfg.mdrnn.steps} steps)"),
        Stage("controller", ("env", "controller", "es", "dream", "run.seed"), "controller",
              _run_controller, _controller_output,
              f"training C by CMA-ES in the {cfg.es.fitness} env (population "
              f"{cfg.es.population} x {cfg.es.rollouts} rollouts, {cfg.es.generations} "
              "generations)"),
        Stage("evaluate", ("eval", "env.max_steps", "env.action_repeat", "dream"), "eval",
              _run_evaluate, _eval_output, f"scoring C on {cfg.eval.episodes} real episodes "
              "with fixed seeds, and the random policy on the same seeds"),
        Stage("report", (), None, _run_report, _report_output, "writing the report"),
    ]
    by_name = {stage.name: stage for stage in stages}
    return [by_name[name] for name in STAGES]

class Pipeline(Engine):
    """The stages of one World Models run (or of its iteration ``iteration``, which lives
    in ``<run>/iterations/<k>/``), with the engine's skip / resume / invalidate bookkeeping.

    >>> from wmlab import load_config
    >>> pipeline = Pipeline(load_config("carracing", "quick"))
    >>> [stage.name for stage in pipeline.stages][:3]
    ['collect', 'vision', 'encode']

    ``pipeline.run()`` runs everything that is not done; ``run(until="memory")`` stops
    after a stage; ``status()`` says what is done.
    """

    def __init__(self, cfg: Config, stages: list[Stage] | None = None,
                 progress: bool = True, log: Callable[[str], None] = print,
                 iteration: int = 1) -> None:
        if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 1:
            raise WmlabError(f"--iteration must be 1 or more, got {iteration!r}")
        prior = None
        if iteration > 1:
            prior = iteration_prior(cfg, iteration)
            cfg = iteration_config(cfg, iteration)
        self.iteration = iteration
        super().__init__(cfg, stages if stages is not None else default_stages(cfg),
                         progress, log, prior)


def iteration_prior(cfg: Config, iteration: int) -> Prior | None:
    """What iteration ``iteration`` of the run of ``cfg`` is made from: the earlier
    iteration's V, M and C, as its controller stage's record stands for them (that record's
    inputs chain the data, V and M it was trained on). Where they change (that iteration
    trained again or further), every stage of this one starts again rather than resuming
    from results made from the old ones."""
    earlier = RunLayout.of(cfg).iteration(iteration - 1)
    return Prior.of_record(read_record(f"{earlier.stages}/controller.json"))


def describe_results(results: list[StageResult]) -> str:
    lines = []
    for r in results:
        took = f" in {r.seconds:.1f} s" if r.status != "skipped" else ""
        lines.append(f"  {r.name:<11} {r.status}{took}")
    return "\n".join(lines)


