"""The ``wmlab`` command: parses arguments, calls the Python API, prints.

Every problem the user can fix arrives here as a ``WmlabError`` and is printed as one line
(``wmlab: error: ...``) with exit status 2; nothing the user did produces a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from wmlab import __version__
from wmlab.bench import STAGES
from wmlab.commands import STAGE_MODULES
from wmlab.commands.common import add_config_args, config_from_args
from wmlab.errors import WmlabError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


# ---------------------------------------------------------------------------------------------
# Commands


def cmd_envs(args: argparse.Namespace) -> int:
    from wmlab import envs

    rows = [(spec.name, ", ".join(spec.backends), spec.default_backend, spec.description)
            for spec in envs.list_envs()]
    print(f"{'name':<12} {'backends':<22} {'default':<10} description")
    for name, backends, default, description in rows:
        print(f"{name:<12} {backends:<22} {default:<10} {description}")
    print("Any other Gymnasium id with image observations works too, e.g. --env CarRacing-v3.")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from wmlab.config import list_presets

    for preset, profiles in list_presets().items():
        print(f"{preset:<12} profiles: {', '.join(profiles)}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from wmlab.config import describe, to_toml

    if args.config_command == "options":
        for key, default, help_text in describe():
            print(f"{key:<28} {default:<12} {help_text}")
        return 0
    print(to_toml(config_from_args(args)), end="")
    return 0


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


def cmd_bench(args: argparse.Namespace) -> int:
    from wmlab.bench import run_bench

    return run_bench(args.what, args)


# ---------------------------------------------------------------------------------------------
# Parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wmlab", description="World Models: collect, train V, M and C, dream, evaluate.")
    parser.add_argument("--version", action="version", version=f"wmlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("envs", help="list the environments and their backends")
    p.set_defaults(func=cmd_envs)

    p = sub.add_parser("presets", help="list the presets and their profiles")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("config", help="show a resolved config, or every option")
    config_sub = p.add_subparsers(dest="config_command", required=True, metavar="WHAT")
    show = config_sub.add_parser("show", help="print the resolved config as TOML")
    add_config_args(show)
    config_sub.add_parser("options", help="every config key with its default and meaning")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("collect", help="collect random-policy episodes into an episode store")
    add_config_args(p)
    p.add_argument("--episodes", type=int, help="episodes to have in the store (collect.episodes)")
    p.add_argument("--workers", type=int, help="worker processes; 0 = one per core")
    p.add_argument("--envs-per-worker", type=int, help="envs stepped as a batch per worker")
    p.add_argument("--policy", help="uniform, brown, held or random-weights")
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

    p = sub.add_parser("bench", help="throughput benchmarks of each stage")
    p.add_argument("what", choices=STAGES, help="stage to benchmark")
    p.add_argument("--quick", action="store_true", help="shorter runs (noisier figures)")
    p.add_argument("--json", dest="json_out", help="also write the figures as JSON here")
    p.set_defaults(func=cmd_bench)

    for module in STAGE_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # CarRacing draws with pygame
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except WmlabError as exc:
        print(f"wmlab: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("wmlab: interrupted; finished work is kept: re-run the same command to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
