"""Subcommands of V: ``wmlab train-vae`` and ``wmlab encode`` (see wmlab.cli)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from wmlab.cli.common import add_training_command, config_from_args
from wmlab.config import Config


def cmd_train_vae(args: argparse.Namespace) -> int:
    from wmlab.vision.train import check_resumable, train_vae

    cfg = config_from_args(args, {"vae.epochs": args.epochs, "vae.kind": args.kind})
    return _run_stage(cfg, check_resumable, train_vae, progress=not args.no_progress)


def cmd_encode(args: argparse.Namespace) -> int:
    from wmlab.vision.encode import check_encodable, encode_store

    return _run_stage(config_from_args(args), check_encodable, encode_store,
                      progress=not args.no_progress)


def _run_stage(cfg: Config, check: Callable[[Config], object],
               run: Callable[..., Any], progress: bool) -> int:
    """Check first (a refused config must not overwrite the run's config.toml), then run
    the stage and print its one-line result."""
    from wmlab.runs import prepare_run_dir

    check(cfg)
    print(f"run directory: {prepare_run_dir(cfg)}")
    print(run(cfg, progress=progress).line())
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this stage's subcommands to the ``wmlab`` parser."""
    add_training_command(
        sub, "train-vae", "train V (the VAE, or VAE-GAN) on the episode store; resumes where "
        "a killed run stopped", cmd_train_vae,
        (("--epochs", {"type": int, "help": "passes over the training frames (vae.epochs)"}),
         ("--kind", {"choices": ("vae", "vae-gan"), "help": "vision model (vae.kind)"})))
    add_training_command(sub, "encode", "write every episode's (mu, logvar) series with the "
                         "trained V, beside the episodes (resumable)", cmd_encode)
