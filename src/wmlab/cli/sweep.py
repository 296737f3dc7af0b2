"""Subcommand ``sweep-tau``: the paper's temperature table on a run's V and M."""

from __future__ import annotations

import argparse

from wmlab.cli.common import add_config_args, config_from_args


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``sweep-tau`` to the ``wmlab`` parser."""
    sweep = sub.add_parser(
        "sweep-tau", help="train C in M's dream at each temperature, score it in the dream "
        "and the real env, and write the table beside the paper's (<run>/sweeps/tau)")
    add_config_args(sweep)
    sweep.add_argument("--taus", default="0.1,0.5,1.0,1.15,1.3",
                       help="comma-separated temperatures (default: the paper's five)")
    sweep.add_argument("--generations", type=int,
                       help="CMA-ES generations per tau (default es.generations); more "
                       "generations later continue the same runs")
    sweep.add_argument("--population", type=int, help="CMA-ES population (overrides "
                       "es.population)")
    sweep.add_argument("--rollouts", type=int, help="dreams per member (overrides "
                       "es.rollouts)")
    sweep.add_argument("--episodes", type=int,
                       help="real episodes per score (default eval.episodes)")
    sweep.add_argument("--dream-episodes", type=int, default=256,
                       help="dreams per dream score, at the controller's tau (default 256)")
    sweep.add_argument("--engine", choices=("serial", "process", "ray"),
                       help="evaluator engine (overrides es.engine)")
    sweep.add_argument("--workers", type=int, help="evaluator workers (overrides es.workers)")
    sweep.add_argument("--name", default="tau",
                       help="the sweep's folder under <run>/sweeps/ (default tau: the paper's "
                       "table); another name keeps a variant apart, e.g. with --set "
                       "dream.dropout=false")
    sweep.add_argument("--no-progress", action="store_true", help="no progress bars")
    sweep.set_defaults(func=cmd_sweep_tau)


def cmd_sweep_tau(args: argparse.Namespace) -> int:
    from wmlab.runs import RunLayout
    from wmlab.sweep import check_sweep_name, parse_taus, table_markdown, tau_sweep

    taus = parse_taus(args.taus)
    # The run's own config.toml is left alone: the sweep writes only under sweeps/tau.
    cfg = config_from_args(args, {"es.engine": args.engine, "es.workers": args.workers})
    generations = cfg.es.generations if args.generations is None else args.generations
    print(f"sweep directory: {RunLayout.of(cfg).sweep(check_sweep_name(args.name))}")
    table = tau_sweep(cfg, taus, generations=generations, population=args.population,
                      rollouts=args.rollouts, episodes=args.episodes,
                      dream_episodes=args.dream_episodes, progress=not args.no_progress,
                      log=print, name=args.name)
    print(table_markdown(table), end="")
    return 0
