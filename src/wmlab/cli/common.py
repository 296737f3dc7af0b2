"""What the ``wmlab`` subcommands share: the config arguments, the ``--pretrained`` option
that ``evaluate`` and ``dream`` take, how they resolve to a config, and the display that
``play`` and ``dream --play`` open a window on.

Each group of subcommands lives in its own module of ``wmlab.cli`` with a ``register(sub)``
function; ``wmlab.cli`` only assembles them.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from wmlab.config import toml_value
from wmlab.errors import WmlabError


def add_training_command(sub: argparse._SubParsersAction, name: str, help: str,
                         func: Any, options: tuple[tuple[str, dict[str, Any]], ...] = ()
                         ) -> argparse.ArgumentParser:
    """A stage's subcommand: the config arguments, ``options`` (flag, add_argument
    keywords), ``--no-progress``, and ``func`` to run."""
    parser = sub.add_parser(name, help=help)
    add_config_args(parser)
    for flag, keywords in options:
        parser.add_argument(flag, **keywords)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=func)
    return parser


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


def command_line_overrides(args: argparse.Namespace,
                           extra: dict[str, object] | None = None) -> list[str]:
    """The config flags given and ``--set``, as overrides in the order they apply; ``extra``
    are a command's own flags as ``section.key`` -> value (None: not given)."""
    flags = {"run.name": args.run_name, "env.name": args.env, "env.backend": args.backend,
             "run.seed": args.seed, **(extra or {})}
    # Flags become overrides so they pass the same validation as --set (and name the key).
    return [*(f"{key}={toml_value(value)}" for key, value in flags.items()
              if value is not None), *args.overrides]


def config_from_args(args: argparse.Namespace, extra: dict[str, object] | None = None):
    from wmlab.config import load_config

    return load_config(args.preset, args.profile, command_line_overrides(args, extra))


def add_pretrained_arg(parser: argparse.ArgumentParser, what: str) -> None:
    """``--pretrained NAME`` on a command that also takes the config arguments; with it,
    ``--preset`` is not needed (the agent brings its own config)."""
    parser.add_argument("--pretrained", metavar="NAME",
                        help=f"{what} a pretrained agent shipped with wmlab (e.g. doom; "
                        "`wmlab pretrained` lists them) instead of a run of --preset")
    for action in parser._actions:
        if "--preset" in action.option_strings:
            action.required = False
            action.help = f"{action.help} (required unless --pretrained)"


def _pretrained_overrides(args: argparse.Namespace,
                          extra: dict[str, object] | None) -> list[str]:
    flags = {"run.name": getattr(args, "run_name", None),
             "env.backend": getattr(args, "backend", None),
             "run.seed": getattr(args, "seed", None), **(extra or {})}
    return [*(f"{key}={toml_value(value)}" for key, value in flags.items()
              if value is not None), *getattr(args, "overrides", [])]


def config_or_pretrained(args: argparse.Namespace, extra: dict[str, object] | None = None):
    """The config of ``--pretrained NAME`` (its run directory made or reused), else of
    ``--preset``; ``extra`` are flag values as ``section.key`` -> value (None: not given)."""
    if not getattr(args, "pretrained", None):
        if not args.preset:
            raise WmlabError("give --preset (e.g. --preset doom) or --pretrained NAME")
        return config_from_args(args, extra)
    if args.preset or getattr(args, "env", None):
        raise WmlabError("--preset and --env do not apply to --pretrained: the agent brings "
                         "its own config and plays the env it was trained on")
    from wmlab.shipped import materialize

    return materialize(args.pretrained, overrides=_pretrained_overrides(args, extra))


def use_display(command: str, escape: str = "") -> None:
    """Let pygame open a visible window: ``wmlab``'s main() sets SDL's dummy driver (for
    envs that draw off screen), which a window to play in must not keep. Refuses, naming
    ``command`` (and ``escape``, the way around), where there is no display."""
    if os.environ.get("SDL_VIDEODRIVER") != "dummy":
        return
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
            or sys.platform in ("darwin", "win32")):
        raise WmlabError(f"{command} needs a display (none found: DISPLAY is not set); "
                         f"run it on a desktop{escape}")
    os.environ.pop("SDL_VIDEODRIVER")
