"""``wmlab play ENV`` (by hand, or ``--pretrained``: an agent plays) and
``wmlab baseline binpacking`` (the heuristics of bin packing)."""

from __future__ import annotations

import argparse

from wmlab.baselines import POLICIES
from wmlab.cli.common import use_display
from wmlab.envs.binpacking import DISTRIBUTIONS
from wmlab.errors import WmlabError


def cmd_play(args: argparse.Namespace) -> int:
    from wmlab.play import make_session, run_window

    if not (args.headless_ok or args.record):
        use_display("wmlab play", ", or pass --headless-ok to play blind")
    if args.pretrained is not None:
        return play_agent(args)
    if args.record:
        raise WmlabError("--record records an agent: add --pretrained")
    session = make_session(args.env, seed=args.seed or 0)
    returns = run_window(session, fps=args.fps, scale=args.scale, max_frames=args.max_frames)
    for i, value in enumerate(returns):
        print(f"episode {i}: return {value:g}")
    return 0


def play_agent(args: argparse.Namespace) -> int:
    """``wmlab play ENV --pretrained [NAME]``: the agent plays in the window."""
    from wmlab.play import run_window
    from wmlab.pretrained import agent_session, write_pictures_gif
    from wmlab.shipped import materialize

    name = args.pretrained or args.env
    cfg = materialize(name)
    if cfg.env.name != args.env:
        raise WmlabError(f"pretrained agent '{name}' plays {cfg.env.name}, not {args.env}: "
                         f"run `wmlab play {cfg.env.name} --pretrained {name}`")
    session = agent_session(cfg, seed=args.seed, recording=bool(args.record))
    try:
        returns = run_window(session, fps=args.fps, scale=args.scale,
                             max_frames=args.max_frames)
    finally:
        session.env.close()
    for i, value in enumerate(returns):
        print(f"episode {i}: return {value:g}")
    print(f"{session.steps} steps of the last episode, score {session.score:g}")
    if args.record:
        write_pictures_gif(args.record, session.pictures)
        print(f"recording: {args.record} ({len(session.pictures)} frames)")
    return 0


def cmd_baseline(args: argparse.Namespace) -> int:
    from wmlab.baselines import POLICIES, evaluate, format_rows, problems_for, write_json

    problems = problems_for(args.env, args.distribution or (), args.horizon)
    policies = list(POLICIES[:3]) if args.policy == "all" else [args.policy]
    rows = []
    for policy in policies:
        rows.extend(evaluate(policy, problems, args.episodes, args.seed))
    print(format_rows(rows))
    if args.json_out:
        write_json(rows, args.json_out)
        print(f"results written to {args.json_out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``play`` and ``baseline`` to the ``wmlab`` parser."""
    p = sub.add_parser("play", help="play binpacking, carracing or doom by hand in a window",
                       description="Keys: bin packing - a digit plays that level (C > 10: "
                       "type it and press Enter), 0/N new bag, Left/Right + Space cursor, "
                       "B best fit, S sum of squares; CarRacing - arrows; Doom - Left/Right. "
                       "R restarts, Esc quits.")
    p.add_argument("env", help="binpacking (or binpacking:key=value,...), carracing or doom")
    p.add_argument("--seed", type=int, help="seed of the first episode (default 0; "
                   "--pretrained: the first seed it was scored on)")
    p.add_argument("--fps", type=int, default=50, help="frames per second (CarRacing, Doom)")
    p.add_argument("--scale", type=int, default=0, help="pixel zoom; 0 = automatic")
    p.add_argument("--max-frames", "--max-steps", type=int, default=0,
                   help="stop after this many frames (steps)")
    p.add_argument("--pretrained", nargs="?", const="", metavar="NAME",
                   help="watch a pretrained agent play instead (default: the one named like "
                   "ENV): the real frame, V's reconstruction and M's prediction (Doom) or "
                   "the actions (CarRacing)")
    p.add_argument("--record", metavar="PATH.gif", help="--pretrained: also write what the "
                   "window shows as a GIF (works without a display)")
    p.add_argument("--headless-ok", action="store_true",
                   help="keep SDL_VIDEODRIVER=dummy (no visible window; for scripts)")
    p.set_defaults(func=cmd_play)

    p = sub.add_parser("baseline", help="heuristic baselines of bin packing",
                       description="Mean +- std of the episode return of a heuristic on "
                       "every named distribution (or those given). Distributions: "
                       + ", ".join(DISTRIBUTIONS))
    p.add_argument("env", help="binpacking (every named distribution) or "
                   "binpacking:key=value,... (one custom problem)")
    p.add_argument("--policy", default="all", choices=(*POLICIES, "all"),
                   help="heuristic to run; all = best-fit, sum-of-squares and random")
    p.add_argument("--episodes", type=int, default=10, help="episodes per distribution")
    p.add_argument("--distribution", action="append", choices=tuple(DISTRIBUTIONS),
                   help="named distribution (repeatable); default: all six")
    p.add_argument("--horizon", type=int, help="override every problem's horizon T")
    p.add_argument("--seed", type=int, default=0, help="seed of the item sequences")
    p.add_argument("--json", dest="json_out", help="also write the results as JSON here")
    p.set_defaults(func=cmd_baseline)
