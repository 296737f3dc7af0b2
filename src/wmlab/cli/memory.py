"""Subcommands of M: ``wmlab train-mdrnn``, ``calibrate`` and ``dream`` (see wmlab.cli)."""

from __future__ import annotations

import argparse
import json

from wmlab.cli.common import (
    add_config_args,
    add_pretrained_arg,
    add_training_command,
    config_from_args,
    config_or_pretrained,
    use_display,
)
from wmlab.errors import WmlabError


def cmd_train_mdrnn(args: argparse.Namespace) -> int:
    from wmlab.calibrate import calibrate_trained_memory
    from wmlab.memory.train import check_series, load_series, train_ensemble
    from wmlab.runs import prepare_run_dir

    cfg = config_from_args(args, {"mdrnn.steps": args.steps, "mdrnn.regime": args.regime})
    data = load_series(cfg)
    check_series(cfg, data)  # before anything is written
    print(f"run directory: {prepare_run_dir(cfg)}")
    results = train_ensemble(cfg, progress=not args.no_progress, series=data)
    for result in results:
        last = result.history[-1] if result.history else {}
        shown = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k != "step")
        print(f"{result.folder}: M trained to step {result.steps} (from "
              f"{result.resumed_from}), {result.steps_per_second:,.0f} steps/s"
              + (f"; validation: {shown}" if shown else ""))
    finished = all(result.finished for result in results)
    calibration = calibrate_trained_memory(cfg) if finished else None
    if calibration:
        print_calibration(calibration)
    return 0


def print_calibration(report: dict) -> None:
    print("dream calibration (survival in the dream, mean +- std over "
          f"{report['episodes']} dreams at tau {report['tau']}"
          + (f"; in the game over {report['real_episodes']} episodes)" if
             "real_episodes" in report else ")") + ":")
    for name, row in report["policies"].items():
        real = (f"; game {row['real_survival_mean']:.1f} +- {row['real_survival_std']:.1f}, "
                f"dream/game {row['survival_ratio']:.2f}x" if "survival_ratio" in row else "")
        print(f"  {name:<7} {row['survival_mean']:7.1f} +- {row['survival_std']:.1f} "
              f"({100 * row['capped_fraction']:.0f}% reach the cap){real}")


def cmd_calibrate(args: argparse.Namespace) -> int:
    from wmlab.calibrate import calibrate_real, check_dream_calibration

    cfg = config_from_args(args, {})
    report = calibrate_real(cfg, args.episodes)
    print_calibration(report)
    if cfg.dream.calibration_tolerance > 0:
        check_dream_calibration(cfg)
        print(f"within dream.calibration_tolerance ({cfg.dream.calibration_tolerance:g}x)")
    return 0


def cmd_dream(args: argparse.Namespace) -> int:
    from wmlab.dream.gallery import (
        DreamRequest,
        controller_policy,
        load_dream_models,
        make_dream_pictures,
    )
    from wmlab.play import play_dream
    from wmlab.runs import prepare_run_dir

    cfg = config_or_pretrained(args, {"dream.tau": args.tau})
    if args.steps < 1:
        raise WmlabError(f"--steps must be at least 1, got {args.steps}")
    # a pretrained agent dreams with its own controller; it ships no episodes to compare
    controller = args.controller or ("best" if args.pretrained else None)
    request = DreamRequest(steps=args.steps, seed=cfg.run.seed, controller=controller,
                           out=args.out, episode=args.episode,
                           compare=not args.no_compare and not args.pretrained)
    models = load_dream_models(cfg)  # everything checked before anything is written
    if request.controller:
        controller_policy(cfg, request.controller, models.mdrnn)
    if args.play:
        use_display("wmlab dream --play")
        play_dream(models, cfg.env.name, request.seed)
        return 0
    print(f"run directory: {prepare_run_dir(cfg)}")
    summary = make_dream_pictures(cfg, request, models)
    for key in ("dream_gif", "compare_gif"):
        if summary.get(key):
            print(f"wrote {summary[key]}")
    print(json.dumps({k: v for k, v in summary.items() if not k.endswith("_gif")}))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this stage's subcommands to the ``wmlab`` parser."""
    options = (("--steps", {"type": int, "help": "optimiser steps (mdrnn.steps)"}),
               ("--regime", {"choices": ("episodes", "streams"), "help": "mdrnn.regime"}))
    add_training_command(sub, "train-mdrnn", "train M (the MDN-RNN) on V's encoded series; "
                         "resumes where a killed run stopped", cmd_train_mdrnn, options)

    p = sub.add_parser("calibrate", help="run the dream calibration's reference policies "
                                         "(random, no-op, left) in the real game too and "
                                         "compare their survival")
    add_config_args(p)
    p.add_argument("--episodes", type=int,
                   help="real episodes per policy (mdrnn.calibration_real_episodes)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("dream", help="GIFs of M's dream decoded by V (and real | V | dream "
                                     "side by side), or --play it with the keyboard")
    add_config_args(p)
    add_pretrained_arg(p, "dream with")
    p.add_argument("--tau", type=float, help="sampling temperature (dream.tau)")
    p.add_argument("--steps", type=int, default=300, help="dream steps in the GIF (300)")
    p.add_argument("--controller", help="controller driving the dream: a checkpoint name "
                                        "of <run>/controller (e.g. best) or a .safetensors "
                                        "file with a flat 'params' tensor; default random")
    p.add_argument("--episode", help="episode id for the side-by-side GIF (default: the "
                                     "first validation episode)")
    p.add_argument("--out", help="folder for the GIFs (default: <run>/memory)")
    p.add_argument("--no-compare", action="store_true", help="only the dream GIF")
    p.add_argument("--play", action="store_true",
                   help="play inside the dream in a pygame window (arrow keys)")
    p.set_defaults(func=cmd_dream)
