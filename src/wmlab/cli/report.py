"""Subcommand of the report: ``wmlab report RUN [--compare RUN2 ...]`` (see wmlab.cli)."""

from __future__ import annotations

import argparse


def cmd_report(args: argparse.Namespace) -> int:
    from wmlab.report import write_report

    paths = write_report(args.run_dir, compare=args.compare)
    if paths.missing:
        print(f"not run yet: {', '.join(paths.missing)} (their sections say what to run)")
    print(f"report: {paths.markdown}")
    print(f"report: {paths.html}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this stage's subcommands to the ``wmlab`` parser."""
    p = sub.add_parser("report", help="write report.md and a self-contained report.html of a "
                                      "run (works on partial runs)")
    p.add_argument("run_dir", metavar="RUN", help="run directory (path or URL), e.g. "
                                                  "runs/doom-quick")
    p.add_argument("--compare", nargs="+", default=[], metavar="RUN",
                   help="other run directories to put beside it in the evaluation table")
    p.set_defaults(func=cmd_report)
