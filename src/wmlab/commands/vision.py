"""Subcommands of this stage (see wmlab.commands)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add this stage's subcommands to the ``wmlab`` parser."""
