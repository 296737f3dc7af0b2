"""``wmlab run`` (the whole pipeline, resumable) and ``wmlab status`` (what is done)."""

from __future__ import annotations

import argparse
import sys

from wmlab.cli.common import add_config_args, command_line_overrides, config_from_args


def cmd_run(args: argparse.Namespace) -> int:
    from wmlab.config import load_config
    from wmlab.pipeline import Pipeline, describe_results, shadowed_by_later

    engine = args.engine or ("ray" if args.ray_address else None)
    overrides = command_line_overrides(args, {"es.fitness": args.fitness, "es.engine": engine,
                                              "es.workers": args.workers,
                                              "es.ray_address": args.ray_address})
    cfg = load_config(args.preset, args.profile, overrides)
    if engine == "ray":
        from wmlab.raycluster import check_ray_address

        check_ray_address(cfg.es.ray_address)  # before any stage starts
    # --iteration K runs that iteration alone; without it, iterations 1..run.iterations run
    # one after another (each resumes or skips what it has done)
    iterations = [args.iteration] if args.iteration is not None else \
        range(1, cfg.run.iterations + 1)
    if max(iterations) > 1:
        for line in shadowed_by_later(cfg, overrides):
            print(f"note: {line}", file=sys.stderr)
    for iteration in iterations:
        pipeline = Pipeline(cfg, progress=not args.no_progress, iteration=iteration)
        print(f"run directory: {pipeline.run_dir}")
        last = iteration == iterations[-1]
        results = pipeline.run(until=args.until if last else None)
        print("stages:")
        print(describe_results(results))
        report = pipeline.report_path()
        if report:
            print(f"report: {report}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from wmlab.pipeline import Pipeline

    cfg = config_from_args(args)
    pipeline = Pipeline(cfg, progress=False, iteration=args.iteration)
    print(f"run directory: {pipeline.run_dir}")
    for row in pipeline.status():
        print(f"  {row['stage']:<11} {row['status']:<8} {row['finished']}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``run`` and ``status`` to the ``wmlab`` parser."""
    p = sub.add_parser("run", help="the whole pipeline: collect, V, encode, M, C, evaluate, "
                                   "report; re-running resumes and skips finished stages")
    add_config_args(p)
    p.add_argument("--until", help="stop after this stage (collect, vision, encode, memory, "
                                   "controller, evaluate, report)")
    p.add_argument("--fitness", choices=("real", "dream"),
                   help="train C in the real env or in M's dream (es.fitness)")
    p.add_argument("--iteration", type=int, default=None,
                   help="run this agent generation alone (default: 1..run.iterations, one "
                        "after another): 2+ collects with the previous iteration's agent "
                        "(and the random policy), retrains V and M from its weights, "
                        "retrains C; runs in <run>/iterations/<k>/")
    p.add_argument("--engine", choices=("serial", "process", "ray"),
                   help="where C's rollouts and the evaluation run (es.engine; default "
                        "process: a local pool)")
    p.add_argument("--workers", type=int, help="rollout workers or Ray actors (es.workers)")
    p.add_argument("--ray-address", help="Ray cluster address, e.g. auto or host:6379 "
                                         "(es.ray_address; implies --engine ray)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="which stages of a run are done, stale, extend or not run")
    add_config_args(p)
    p.add_argument("--iteration", type=int, default=1, help="agent generation")
    p.set_defaults(func=cmd_status)
