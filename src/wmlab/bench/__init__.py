"""Throughput benchmarks, one per stage, each against the naive way of doing the same work.

``wmlab bench <stage>`` runs ``wmlab.bench.<stage>.run(quick) -> rows`` and prints
``format_rows(rows)``. Benchmarks print figures; they never assert a time (the test suite
only checks that they run).
"""

from __future__ import annotations

import argparse
import importlib
import json

STAGES = ("collect", "vision", "memory", "controller")


def run_bench(what: str, args: argparse.Namespace) -> int:
    module = importlib.import_module(f"wmlab.bench.{what}")
    rows = module.run(quick=args.quick)
    print(module.format_rows(rows))
    if args.json_out:
        with open(args.json_out, "w") as handle:
            json.dump(rows, handle, indent=2)
    return 0
