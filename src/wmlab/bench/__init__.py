"""Throughput benchmarks, one per stage, each against the naive way of doing the same work.

``wmlab bench <stage>`` runs ``wmlab.bench.<stage>.run(quick) -> rows`` and prints
``format_rows(rows)``; ``--device cuda`` runs V's and M's benchmarks on a GPU (collection
and the controller's rollouts are CPU work and refuse it). Benchmarks print figures; they
never assert a time (the test suite only checks that they run).
"""

from __future__ import annotations

import argparse
import importlib
import json

from wmlab.errors import WmlabError

STAGES = ("collect", "vision", "memory", "controller")
ON_DEVICE = ("vision", "memory")  # the stages whose benchmark takes a torch device


def run_bench(what: str, args: argparse.Namespace) -> int:
    device = getattr(args, "device", "cpu")
    if what not in ON_DEVICE and device != "cpu":
        raise WmlabError(f"wmlab bench {what}: --device {device} applies to "
                         f"{' and '.join(ON_DEVICE)} only; run it without --device")
    module = importlib.import_module(f"wmlab.bench.{what}")
    extra = {"device": device} if what in ON_DEVICE else {}
    rows = module.run(quick=args.quick, **extra)
    print(module.format_rows(rows))
    if args.json_out:
        with open(args.json_out, "w") as handle:
            json.dump(rows, handle, indent=2)
    return 0
