"""Subcommands of V: ``wmlab train-vae`` and ``wmlab encode`` (see wmlab.cli)."""

from __future__ import annotations

import argparse

from wmlab.cli.common import add_training_command, config_from_args


def cmd_train_vae(args: argparse.Namespace) -> int:
    from wmlab.runs import prepare_run_dir
    from wmlab.vision.train import check_resumable, train_vae

    cfg = config_from_args(args, {"vae.epochs": args.epochs, "vae.kind": args.kind})
    check_resumable(cfg)  # a refused config must not overwrite the run's config.toml
    print(f"run directory: {prepare_run_dir(cfg)}")
    result = train_vae(cfg, progress=not args.no_progress)
    print(result.line())
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    from wmlab.runs import prepare_run_dir
    from wmlab.vision.encode import check_encodable, encode_store

    cfg = config_from_args(args)
    check_encodable(cfg)  # a refused config must not overwrite the run's config.toml
    print(f"run directory: {prepare_run_dir(cfg)}")
    print(encode_store(cfg, progress=not args.no_progress).line())
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
