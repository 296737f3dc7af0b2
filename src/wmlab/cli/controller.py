"""Subcommands of C: ``wmlab train-controller``, ``evaluate`` and ``fidelity``."""

from __future__ import annotations

import argparse
import dataclasses

from wmlab.cli.common import (
    add_config_args,
    add_pretrained_arg,
    command_line_overrides,
    config_from_args,
    config_or_pretrained,
)
from wmlab.config import Config
from wmlab.errors import WmlabError


def register(sub: argparse._SubParsersAction) -> None:
    """Add this stage's subcommands to the ``wmlab`` parser."""
    train = sub.add_parser("train-controller",
                           help="train C with CMA-ES in the real env or in M's dream")
    add_config_args(train)
    train.add_argument("--fitness", choices=("real", "dream"),
                       help="where rollouts run (overrides es.fitness)")
    train.add_argument("--generations", type=int, help="overrides es.generations")
    train.add_argument("--engine", choices=("serial", "process", "ray"),
                       help="evaluator engine (overrides es.engine; default process)")
    train.add_argument("--workers", type=int, help="evaluator workers (overrides es.workers)")
    train.add_argument("--ray-address", help="Ray cluster address, e.g. auto or host:6379 "
                       "(overrides es.ray_address; implies --engine ray)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train_controller)

    evaluate = sub.add_parser("evaluate", help="score a controller over N episodes "
                              "(fixed seeds, reference backend) and write JSON")
    add_config_args(evaluate)
    add_pretrained_arg(evaluate, "score")
    evaluate.add_argument("--episodes", type=int, help="episodes (overrides eval.episodes; "
                          "--pretrained: the recorded score's, on the same seeds)")
    evaluate.add_argument("--eval-backend", help="env backend of the score (overrides "
                          "eval.backend; default the reference backend)")
    evaluate.add_argument("--dream", action="store_true",
                          help="score in M's dream at dream.tau instead of the real env")
    evaluate.add_argument("--engine", choices=("serial", "process", "ray"),
                          help="evaluator engine (overrides es.engine)")
    evaluate.add_argument("--workers", type=int, help="evaluator workers")
    evaluate.add_argument("--out", help="JSON path (default <run>/eval/eval-<backend>.json)")
    evaluate.add_argument("--video", metavar="PATH.gif",
                          help="also write a GIF of the first episode: real frame beside "
                          "the agent's view (V's reconstruction)")
    evaluate.add_argument("--iteration", type=int, default=1,
                          help="the agent generation to score (default 1): its config is "
                          "the run's with run.later applied, as `wmlab run` trained it; "
                          "--set still wins")
    evaluate.add_argument("--record-machine", action="store_true",
                          help="with --pretrained: keep this CPU's returns in the agent's "
                          "metadata (they reproduce exactly here from then on)")
    evaluate.set_defaults(func=cmd_evaluate)

    fidelity = sub.add_parser("fidelity", help="how faithful M's dream is for C: controllers "
                              "of a real-env CMA-ES run scored in the dream and in the game "
                              "(rank correlation, real / dream ratio), at one or more taus")
    _add_run_args(fidelity, "whose V and M dream")
    fidelity.add_argument("--dreams", type=int, help="dreams per controller (overrides "
                          "eval.fidelity_dreams; default 64 where that is 0)")
    fidelity.add_argument("--taus", type=float, nargs="+",
                          help="taus to measure at (overrides eval.fidelity_taus)")
    fidelity.add_argument("--snapshots", metavar="CONTROLLER_DIR",
                          help="the CMA-ES run whose scored means are compared (default: "
                          "this run's C; another run's are scored again in this run's game)")
    fidelity.add_argument("--neighbours", type=float, metavar="SIGMA",
                          help="instead of the run's scored means, its best C and --count "
                          "draws around it at this step size, as CMA-ES compares them; "
                          "reports how well the game agrees with itself on them too")
    fidelity.add_argument("--count", type=int, default=16,
                          help="neighbours drawn with --neighbours (default 16)")
    fidelity.set_defaults(func=cmd_fidelity)

    stall = sub.add_parser("stall-effect", help="what ending stalled rollouts "
                           "(es.stall_steps) does to C's fitness: the run's scored means "
                           "played whole and with stalls ended on the same tracks")
    _add_run_args(stall, "whose controllers are played")
    stall.add_argument("--tracks", type=int, default=16, help="tracks per controller")
    stall.add_argument("--stall-steps", type=int, default=0,
                       help="steps without reward that end a track (default es.stall_steps)")
    stall.set_defaults(func=cmd_stall_effect)


def _add_run_args(parser: argparse.ArgumentParser, whose: str) -> None:
    """The config arguments and ``--iteration`` of a command that measures a trained run."""
    add_config_args(parser)
    parser.add_argument("--iteration", type=int, default=1,
                        help=f"the agent generation {whose} (default 1)")


def _iteration_config(args: argparse.Namespace,
                      extra: dict[str, object] | None = None) -> Config:
    """The config of the run's ``--iteration``: for a later one, run.later applied as
    `wmlab run` applied it, then the command line again, so that --set still wins."""
    from wmlab.config import load_config, parse_override, with_overrides
    from wmlab.pipeline import iteration_config

    if args.iteration < 1:
        raise WmlabError(f"--iteration must be 1 or more, got {args.iteration}")
    overrides = command_line_overrides(args, extra)
    if args.iteration == 1:
        return load_config(args.preset, args.profile, overrides)
    # run.later is checked together with the rest of the command line, not before it, so a
    # --set undoing a run.later setting (eval.validation_episodes=0, to score on the
    # validation seeds) is not refused for the state between them; the command line is then
    # applied again, to win over what iteration_config sets (but run.name: the iteration's
    # folder is named after the run's)
    given = [parse_override(o)[1] for o in overrides if o.startswith("run.later=")]
    later = given[-1] if given else load_config(args.preset, args.profile).run.later
    rest = [o for o in overrides if not o.startswith("run.later=")]
    cfg = load_config(args.preset, args.profile, [*rest, "run.later=[]"])
    checked = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, later=[*later, *rest]))
    again = [o for o in rest if not o.startswith("run.name=")]
    new = with_overrides(iteration_config(checked, args.iteration), again)
    return dataclasses.replace(new, run=dataclasses.replace(new.run, later=list(later)))


def cmd_stall_effect(args: argparse.Namespace) -> int:
    from wmlab.stall import measure_stall_effect

    if args.tracks < 2:
        raise WmlabError(f"--tracks must be 2 or more, got {args.tracks}")
    cfg = _iteration_config(args)
    effect = measure_stall_effect(cfg, args.tracks, args.stall_steps)
    for row in effect.rows:
        print(f"  generation {row.generation:4d}: whole {row.whole:7.1f} ({row.whole_steps} "
              f"steps), stalled {row.stalled:7.1f} ({row.stalled_steps} steps)")
    print(effect.line())
    return 0


def cmd_train_controller(args: argparse.Namespace) -> int:
    from wmlab.pipeline.controller_stage import check_training_inputs, train_controller
    from wmlab.runs import prepare_run_dir

    engine = args.engine or ("ray" if args.ray_address else None)
    cfg = config_from_args(args, {
        "es.fitness": args.fitness, "es.generations": args.generations, "es.engine": engine,
        "es.workers": args.workers, "es.ray_address": args.ray_address})
    check_training_inputs(cfg)  # bad input stops here, before the run directory is touched
    run_dir = prepare_run_dir(cfg)
    print(f"run directory: {run_dir}")
    result = train_controller(cfg, progress=not args.no_progress)
    best = ("none yet" if result.best_score is None else
            f"{result.best_score:.1f} (generation {result.best_generation})")
    print(f"CMA-ES: {result.generation} generations (resumed at {result.resumed_from}); "
          f"best scored mean {best}; checkpoints, metrics.csv and progress.png in "
          f"{result.folder}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from wmlab.evaluate import evaluate_controller

    flags = {"eval.backend": args.eval_backend, "es.engine": args.engine,
             "es.workers": args.workers}
    cfg = _evaluated_config(args, flags)
    if args.episodes is not None and args.episodes <= 0:
        raise WmlabError(f"--episodes must be at least 1, got {args.episodes}")
    if args.record_machine and (not args.pretrained or args.dream):
        raise WmlabError("--record-machine keeps a shipped agent's real returns: use it with "
                         "--pretrained NAME and without --dream")
    if args.record_machine and (args.episodes is not None or args.eval_backend):
        # refused before the evaluation, not after it: only the recorded episodes count
        raise WmlabError("--record-machine records the returns of the recorded score's "
                         "episodes: leave out --episodes and --eval-backend")
    result = evaluate_controller(cfg, episodes=args.episodes,
                                 where="dream" if args.dream else "real", out=args.out,
                                 video=args.video)
    print(result.line())
    if args.pretrained and not args.dream:
        from wmlab.pretrained import reproduce

        print(reproduce(args.pretrained, result))
        if args.record_machine:
            from wmlab.shipped import record_machine_score

            record_machine_score(args.pretrained, result)
            print(f"recorded this CPU's returns in '{args.pretrained}' metadata")
    if args.video:
        print(f"video: {args.video}")
    return 0


def _evaluated_config(args: argparse.Namespace, flags: dict[str, object]) -> Config:
    """The config ``wmlab evaluate`` scores: the pretrained agent's, or the run's at
    ``--iteration`` (run.later applied, then --set and the flags again, so they win), with a
    warning for each setting the agent plays by that differs from the run's config.toml."""
    from wmlab.evaluators import warn
    from wmlab.runs import config_drift

    if args.pretrained and args.iteration != 1:
        raise WmlabError("--iteration does not apply to --pretrained: a shipped agent is one "
                         "generation")
    if args.pretrained or not args.preset:  # the latter refused there, naming the fix
        return config_or_pretrained(args, flags)
    cfg = _iteration_config(args, flags)
    for line in config_drift(cfg, ("env", "controller", "shield"), "evaluate"):
        warn(f"differs from the run's config.toml: {line} (pass --set to match"
             f"{'' if args.iteration > 1 else ', or --iteration K for a later iteration'})")
    return cfg


def cmd_fidelity(args: argparse.Namespace) -> int:
    from wmlab.fidelity import DEFAULT_FIDELITY_DREAMS, measure_fidelity, measure_neighbour_fidelity

    cfg = _iteration_config(args)
    dreams = args.dreams or cfg.eval.fidelity_dreams or DEFAULT_FIDELITY_DREAMS
    taus = args.taus or cfg.eval.fidelity_taus
    if args.neighbours is not None:
        if args.snapshots:
            raise WmlabError("--neighbours draws around this run's best C: leave out "
                             "--snapshots")
        for result in measure_neighbour_fidelity(cfg, dreams, args.neighbours, args.count,
                                                 taus=taus):
            print(result.line())
            print(f"  the best C {result.notes['best_real']:.1f} in the game, its "
                  f"neighbours {result.notes['neighbours_real']:.1f} on average")
        print(f"table and controllers: {cfg.run_dir()}/eval/fidelity-neighbours.json")
        return 0
    for result in measure_fidelity(cfg, dreams, taus=taus,
                                   snapshots_from=args.snapshots or ""):
        print(result.line())
    from wmlab.pipeline import Pipeline

    # the evaluate stage wrote this file too: it stays finished, and the report shows the
    # new table on the next `wmlab run`
    Pipeline(config_from_args(args), progress=False,
             iteration=args.iteration).adopt_outputs("evaluate")
    print(f"table and controllers: {cfg.run_dir()}/eval/fidelity.json (the report takes it "
          "on the next `wmlab run`)")
    return 0
