"""``wmlab bench STAGE``: the throughput benchmark of one stage (see ``wmlab.bench``)."""

from __future__ import annotations

import argparse

from wmlab.bench import STAGES, run_bench


def cmd_bench(args: argparse.Namespace) -> int:
    return run_bench(args.what, args)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``bench`` to the ``wmlab`` parser."""
    p = sub.add_parser("bench", help="throughput benchmarks of each stage")
    p.add_argument("what", choices=STAGES, help="stage to benchmark")
    p.add_argument("--quick", action="store_true", help="shorter runs (noisier figures)")
    p.add_argument("--json", dest="json_out", help="also write the figures as JSON here")
    p.add_argument("--device", default="cpu",
                   help="torch device for vision and memory: cpu (default), cuda, cuda:N")
    p.set_defaults(func=cmd_bench)
