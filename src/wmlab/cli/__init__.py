"""The ``wmlab`` command: parses arguments, calls the Python API, prints.

Each group of subcommands is a module of this package with ``register(sub)``, which adds its
subparsers; ``build_parser`` only assembles them. The work itself is done by the Python API
of the stage, so a notebook can call it the same way. A command imports that API when it
runs, not at the top of its module, so that ``wmlab --help`` does not wait for torch.

Every problem the user can fix arrives here as a ``WmlabError`` and is printed as one line
(``wmlab: error: ...``) with exit status 2; nothing the user did produces a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from wmlab.cli import (
    bench,
    config,
    controller,
    data,
    memory,
    pipeline,
    play,
    pretrained,
    report,
    sweep,
    vision,
)
from wmlab.errors import WmlabError
from wmlab.version import __version__

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

# In the order `wmlab --help` lists their subcommands: the pipeline's, stage by stage.
SUBCOMMAND_GROUPS = (
    config,  # envs, presets, config
    data,  # collect, data
    bench,  # bench
    vision,  # train-vae, encode
    memory,  # train-mdrnn, calibrate, dream
    controller,  # train-controller, evaluate, fidelity
    sweep,  # sweep-tau
    play,  # play, baseline
    report,  # report
    pipeline,  # run, status
    pretrained,  # export, pretrained
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wmlab", description="World Models: collect, train V, M and C, dream, evaluate.")
    parser.add_argument("--version", action="version", version=f"wmlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in SUBCOMMAND_GROUPS:
        group.register(sub)
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
