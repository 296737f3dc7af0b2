"""``wmlab envs``, ``wmlab presets`` and ``wmlab config``: what a run can be configured with."""

from __future__ import annotations

import argparse

from wmlab.cli.common import add_config_args, config_from_args


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


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``envs``, ``presets`` and ``config`` to the ``wmlab`` parser."""
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
