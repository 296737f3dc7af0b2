"""``wmlab collect`` (episodes into an episode store) and ``wmlab data`` (inspect or verify
a store)."""

from __future__ import annotations

import argparse

from wmlab.cli.common import add_config_args, config_from_args


def cmd_collect(args: argparse.Namespace) -> int:
    from wmlab.collect import collect_shares
    from wmlab.data import EpisodeStore, format_info
    from wmlab.runs import prepare_run_dir

    cfg = config_from_args(args, {
        "collect.episodes": args.episodes, "collect.workers": args.workers,
        "collect.out": args.out, "collect.policy": args.policy,
        "collect.envs_per_worker": args.envs_per_worker,
        "collect.collection": args.collection})
    run_dir = prepare_run_dir(cfg)
    print(f"run directory: {run_dir}")
    if args.policy:  # an explicit --policy collects that policy's episodes only
        cfg.collect.fixed_fraction = 0.0
    summaries = collect_shares(cfg, progress=not args.no_progress)
    for _, summary in summaries:
        print(summary.line())
    if args.info:
        print(format_info(EpisodeStore.open(summaries[-1][1].store_url).info()))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from wmlab.data import EpisodeStore, format_info

    store = EpisodeStore.open(args.url)
    if args.data_command == "info":
        print(format_info(store.info()))
        return 0
    report = store.verify(progress=not args.no_progress)
    print(report.summary())
    if report.bad and args.quarantine:
        store.quarantine(sorted(report.bad))
        print(f"moved {len(report.bad)} bad episode file(s) to {args.url.rstrip('/')}/bad/; "
              "`wmlab collect` with the same arguments re-collects them")
    return 0 if report.ok else 1


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``collect`` and ``data`` to the ``wmlab`` parser."""
    p = sub.add_parser("collect", help="collect random-policy episodes into an episode store")
    add_config_args(p)
    p.add_argument("--episodes", type=int, help="episodes to have in the store (collect.episodes)")
    p.add_argument("--workers", type=int, help="worker processes; 0 = one per core")
    p.add_argument("--envs-per-worker", type=int, help="envs stepped as a batch per worker")
    p.add_argument("--policy", help="uniform, brown, held or random-weights; for binpacking "
                   "also best-fit, sum-of-squares, sum-of-squares-orl (with collect.explore)")
    p.add_argument("--collection", help="name of this collection in the store")
    p.add_argument("--out", help="store path or URL (default: <run>/data)")
    p.add_argument("--info", action="store_true", help="print the store summary afterwards")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("data", help="inspect or verify an episode store")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="WHAT")
    info = data_sub.add_parser("info", help="episodes, frames, returns, lengths, size on disk")
    info.add_argument("url", help="store path or URL")
    verify = data_sub.add_parser("verify", help="check every episode file; non-zero if any is bad")
    verify.add_argument("url", help="store path or URL")
    verify.add_argument("--quarantine", action="store_true",
                        help="move bad files to <store>/bad/ so collect can redo them")
    verify.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_data)
