"""Pretrained agents: ``wmlab export`` and ``wmlab pretrained`` (see ``wmlab.pretrained``).

The ``--pretrained`` option of ``evaluate`` and ``dream`` is in ``wmlab.cli.common``, that of
``play`` in ``wmlab.cli.play``."""

from __future__ import annotations

import argparse
from typing import Any

from wmlab.config import toml_value
from wmlab.errors import WmlabError

SHIPPED_MB = 15  # what one agent may add to the package


def cmd_export(args: argparse.Namespace) -> int:
    from wmlab.pretrained import evaluate_and_record
    from wmlab.shipped import export_agent, pretrained_root

    if args.evaluate is not None and args.evaluate < 1:
        raise WmlabError(f"--evaluate must be at least 1 episode, got {args.evaluate}")
    metadata = export_agent(args.run_dir, args.name, args.dest, dtype=args.dtype,
                            allow_unfinished=args.allow_unfinished)
    dest = args.dest or str(pretrained_root())
    print(f"exported '{args.name}' to {dest}/{args.name}: "
          f"{metadata['size_bytes'] / 1e6:.2f} MB; parameters V {metadata['parameters']['vision']:,}"
          f", M {metadata['parameters']['memory']:,}, C {metadata['parameters']['controller']:,}")
    if metadata["size_bytes"] > SHIPPED_MB * 1e6:
        print(f"note: {metadata['size_bytes'] / 1e6:.1f} MB is more than the ~{SHIPPED_MB} MB "
              "an agent shipped in the package should add")
    if args.evaluate:
        overrides = [f"es.{key}={toml_value(value)}" for key, value in
                     (("engine", args.engine), ("workers", args.workers)) if value is not None]
        metadata = evaluate_and_record(args.name, args.evaluate,
                                       source=None if args.no_float32 else args.run_dir,
                                       root=args.dest, overrides=overrides)
        score = metadata["score"]
        print(f"score ({metadata['dtype']['vision']} V and M): {score['mean']:.1f} +- "
              f"{score['std']:.1f} over {score['episodes']} episodes (seeds "
              f"{score['first_seed']}..{score['last_seed']}, {score['backend']})")
        ref: dict[str, Any] | None = score.get("float32")
        if ref:
            print(f"float32 weights on the same seeds: {ref['mean']:.1f} +- {ref['std']:.1f}"
                  f" (difference {ref['difference']:+.3f}; {ref['identical_episodes']} of "
                  f"{ref['episodes']} episodes returned exactly the same)")
    return 0


def cmd_pretrained(args: argparse.Namespace) -> int:
    from wmlab.shipped import available, describe, pretrained_root, read_metadata

    root = pretrained_root()
    names = available(root)
    if not names:
        print(f"no pretrained agents in {root}: export one with `wmlab export RUN --name NAME`")
        return 0
    print(f"pretrained agents in {root}:")
    for name in names:
        print("  " + describe(read_metadata(name, root)))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``export`` and ``pretrained`` to the ``wmlab`` parser."""
    p = sub.add_parser("export", help="ship a finished run's V, M and C as a pretrained agent "
                                      "(safetensors + config + metadata)")
    p.add_argument("run_dir", metavar="RUN", help="the run directory, e.g. runs/doom-paper")
    p.add_argument("--name", required=True, help="the agent's name, e.g. doom")
    p.add_argument("--dest", help="folder of agents (default: the package's "
                                  "pretrained_agents/, or $WMLAB_PRETRAINED_PATH)")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                   help="storage of V, M and the dream starts (C is always float32)")
    p.add_argument("--evaluate", type=int, metavar="N",
                   help="score the exported weights on N real episodes and record it")
    p.add_argument("--no-float32", action="store_true",
                   help="with --evaluate: do not compare with the run's float32 weights")
    p.add_argument("--allow-unfinished", action="store_true",
                   help="ship the best scored controller of an unfinished CMA-ES run")
    p.add_argument("--engine", choices=("serial", "process", "ray"),
                   help="evaluator engine for --evaluate (default: the run's es.engine)")
    p.add_argument("--workers", type=int, help="evaluator workers for --evaluate")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("pretrained", help="list the pretrained agents shipped with wmlab")
    p.set_defaults(func=cmd_pretrained)
