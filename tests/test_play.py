"""Playing by hand: key -> action maps, game sessions, and the window loop (headless)."""

import os

import numpy as np
import pytest

from wmlab import envs
from wmlab.baselines import best_fit, sum_of_squares
from wmlab.cli import main
from wmlab.envs.binpacking import BinPackingEnv, make_problem
from wmlab.envs.spec import DOOM_LEFT, DOOM_NOOP, DOOM_RIGHT
from wmlab.errors import WmlabError
from wmlab.play import (
    BinPackingKeys,
    BinPackingSession,
    RealtimeSession,
    carracing_action,
    doom_action,
    make_session,
    run_window,
)

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")


def test_carracing_and_doom_keys():
    np.testing.assert_array_equal(carracing_action(set()), [0, 0, 0])
    np.testing.assert_array_equal(carracing_action({"left", "up"}), [-1, 1, 0])
    np.testing.assert_allclose(carracing_action({"right", "down"}), [1, 0, 0.8])
    np.testing.assert_array_equal(carracing_action({"left", "right"}), [0, 0, 0])
    assert doom_action(set()) == DOOM_NOOP
    assert doom_action({"left"}) == DOOM_LEFT and doom_action({"right"}) == DOOM_RIGHT
    assert doom_action({"left", "right"}) == DOOM_NOOP


def test_binpacking_keys_small_capacity_play_at_once():
    counts = np.array([0, 0, 1, 0, 0, 2, 0, 0, 0])
    keys = BinPackingKeys(9)
    assert keys.press("5", counts, 3) == 5
    assert keys.press("[2]", counts, 3) == 2  # keypad digits
    assert keys.press("n", counts, 3) == 0
    assert keys.press("b", counts, 3) == best_fit(counts, 3, 9)
    assert keys.press("s", counts, 3) == sum_of_squares(counts, 3, 9)
    assert keys.press("left", counts, 3) is None and keys.cursor == 8
    assert keys.press("left", counts, 3) is None and keys.press("space", counts, 3) == 7
    assert keys.press("x", counts, 3) is None


def test_binpacking_keys_large_capacity_type_then_enter():
    counts = np.zeros(30, dtype=np.int64)
    keys = BinPackingKeys(30)
    assert keys.press("2", counts, 4) is None and keys.press("7", counts, 4) is None
    assert keys.buffer == "27" and keys.press("return", counts, 4) == 27
    assert keys.buffer == ""
    for key in ("4", "5"):
        keys.press(key, counts, 4)
    assert keys.press("return", counts, 4) is None  # 45 is not a level of C = 30
    keys.press("1", counts, 4)
    keys.press("9", counts, 4)
    keys.press("backspace", counts, 4)
    assert keys.press("return", counts, 4) == 1


def test_binpacking_session_plays_scores_and_restarts():
    problem = make_problem("bounded-waste-9", horizon=6)
    session = BinPackingSession(BinPackingEnv(problem=problem), seed=3)
    for _ in range(6):
        assert session.key("b")
    assert session.done and session.episodes == [session.env.score]
    assert session.env.score == -session.env.waste
    assert "episode over" in session.message
    assert session.key("3") and session.env.t == 6  # no moves after the end
    assert session.key("r") and not session.done and session.env.t == 0
    assert not session.key("escape")
    picture = session.picture()
    assert picture.ndim == 3 and picture.shape[0] > 64


def test_invalid_key_moves_are_reported():
    problem = make_problem("linear-waste-9", horizon=5, variant="base")
    session = BinPackingSession(BinPackingEnv(problem=problem))
    session.key("4")  # no bag at level 4 yet: the base variant ends the episode
    assert session.done and "invalid" in session.message
    assert session.episodes == [-100.0]


def test_window_loop_headless_with_scripted_keys():
    session = make_session("binpacking:distribution=perfectly-packable-9,horizon=4", seed=1)
    returns = run_window(session, scripted=["n", "b", "b", "s", "5"])
    assert len(returns) == 1 and returns[0] == -session.env.waste


def test_realtime_session_on_doom_and_window_loop():
    session = RealtimeSession(envs.make("doom", max_steps=12), "doom")
    returns = run_window(session, scripted=[{"left"}] * 5 + [{"right"}] * 20)
    assert session.done and returns == [12.0]  # +1 per tic, capped at 12 tics
    assert "episode over" in session.status()


def test_play_cli_headless_and_bad_names():
    assert main(["play", "binpacking", "--headless-ok", "--max-frames", "2"]) == 0
    with pytest.raises(WmlabError, match="cannot play"):
        make_session("pong")
