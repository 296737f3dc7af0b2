"""Subcommands of ``wmlab``, one module per stage of the pipeline.

Each module has ``register(sub)``, adding its subparsers to the ``wmlab`` parser; the work
itself is done by the Python API of the stage, so a notebook can call it the same way.
"""

STAGE_MODULES = (
    "wmlab.commands.vision",  # train-vae, encode
    "wmlab.commands.memory",  # train-mdrnn, dream
    "wmlab.commands.controller",  # train-controller, evaluate
    "wmlab.commands.sweep",  # sweep-tau
    "wmlab.commands.binpacking",  # play, baseline
    "wmlab.commands.report",  # report
    "wmlab.commands.pipeline",  # run, status
    "wmlab.commands.pretrained",  # export, pretrained
)
