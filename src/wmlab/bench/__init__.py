"""Throughput benchmarks, one per stage, each against the naive way of doing the same work.

Benchmarks print figures; they never assert a time (the test suite only checks that they run).
"""

from __future__ import annotations

import argparse
import json

from wmlab.errors import WmlabError


def run_bench(what: str, args: argparse.Namespace) -> int:
    if what == "collect":
        from wmlab.bench.collect import bench_collect, format_rows

        rows = bench_collect(quick=args.quick)
    else:  # pragma: no cover - argparse restricts the choices
        raise WmlabError(f"no benchmark named '{what}'")
    print(format_rows(rows))
    if args.json_out:
        with open(args.json_out, "w") as handle:
            json.dump(rows, handle, indent=2)
    return 0
