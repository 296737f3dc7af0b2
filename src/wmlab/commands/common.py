"""What every ``wmlab`` subcommand shares: the config arguments and how they resolve.

Each stage's subcommands live in their own module of ``wmlab.commands`` with a
``register(sub)`` function; ``wmlab.cli`` only assembles them.
"""

from __future__ import annotations

import argparse


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", required=True,
                        help="environment preset: carracing, doom, binpacking")
    parser.add_argument("--profile", default="paper",
                        help="profile of the preset: paper (published set-up), quick, or "
                        "another listed by `wmlab presets` (e.g. doom budget)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable), e.g. --set vae.epochs=3")
    parser.add_argument("--run", dest="run_name", help="run directory: a name under run.root, or an absolute path or URL")
    parser.add_argument("--env", help="environment name or Gymnasium id (overrides env.name)")
    parser.add_argument("--backend", help="simulator backend (overrides env.backend)")
    parser.add_argument("--seed", type=int, help="master seed (overrides run.seed)")


def config_from_args(args: argparse.Namespace, extra: dict[str, object] | None = None):
    from wmlab.config import load_config

    flags = {"run.name": args.run_name, "env.name": args.env, "env.backend": args.backend,
             "run.seed": args.seed, **(extra or {})}
    # Flags become overrides so they pass the same validation as --set (and name the key).
    overrides = [f"{key}={toml_literal(value)}" for key, value in flags.items()
                 if value is not None]
    return load_config(args.preset, args.profile, [*overrides, *args.overrides])


def toml_literal(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
