"""Playing by hand: key -> action maps, game sessions (the dream's too), and the window
loop (headless)."""

import os

import numpy as np
import pytest
import torch

from wmlab import envs
from wmlab.baselines import best_fit, sum_of_squares
from wmlab.cli import main
from wmlab.cli.common import use_display
from wmlab.dream import BatchedDream, DreamSettings, DreamStart
from wmlab.dream.gallery import DreamModels
from wmlab.dream.pictures import decode_latents
from wmlab.envs.binpacking import BinPackingEnv, make_problem
from wmlab.envs.spec import DOOM_LEFT, DOOM_NOOP, DOOM_RIGHT
from wmlab.errors import WmlabError
from wmlab.memory.model import MDNRNN, MdrnnShape
from wmlab.play import (
    DREAM_CAPTION,
    BinPackingKeys,
    BinPackingSession,
    RealtimeSession,
    carracing_action,
    doom_action,
    dream_session,
    keyboard_mapping,
    make_session,
    play_dream,
    run_window,
)
from wmlab.vision.model import ConvVAE

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


# ---------------------------------------------------------------------------------------------
# Inside the dream


def test_keyboard_mapping_for_the_dream():
    assert keyboard_mapping("doom", 1)({"left", "up"}).tolist() == [-1.0]
    assert keyboard_mapping("doom", 1)({"left", "right"}).tolist() == [0.0]
    assert keyboard_mapping("carracing", 3)({"left", "up"}).tolist() == [-1.0, 1.0, 0.0]
    np.testing.assert_allclose(keyboard_mapping("carracing", 3)({"right", "down"}),
                               [1.0, 0.0, 0.8])
    assert keyboard_mapping("pong", 2)({"right", "up"}).tolist() == [1.0, 0.0]


def dream_models(max_steps: int) -> DreamModels:
    """A tiny untrained V and M whose dreams end only at the step cap."""
    torch.manual_seed(0)
    shape = MdrnnShape(z_dim=4, action_dim=1, hidden=8, done_head=True)
    mdrnn = MDNRNN(shape).eval()
    with torch.no_grad():
        mdrnn.head.bias[3 * shape.z_dim * shape.gaussians] = -1e4  # the done logit
    start = DreamStart(torch.randn(3, 4), torch.full((3, 4), -2.0))
    return DreamModels(mdrnn, ConvVAE(4).eval(), start, {}, DreamSettings(1.15, max_steps))


def test_dream_session_steps_with_the_keys_held_and_starts_the_next_dream():
    models = dream_models(max_steps=4)
    session = dream_session(models, "doom", seed=5)
    held = [{"left"}] * 4 + [set()] + [{"right"}] * 3
    returns = run_window(session, scripted=held, caption=DREAM_CAPTION)
    # frames 1-4 play seed 5's dream to its cap (+1 a step: Doom's survival reward);
    # frame 5 starts seed 6's, which frames 6-8 step with Right held
    assert returns == [4.0] and session.steps == 3 and not session.done
    assert "dream step 3" in session.status()
    same = BatchedDream(models.mdrnn, models.start, models.settings)
    same.reset([6])
    for _ in range(3):
        same.step(torch.ones(1, 1))
    assert torch.equal(session.dream.z, same.z)
    np.testing.assert_array_equal(session.picture(), decode_latents(models.vae, same.z)[0])
    session.restart()  # R: the next seed's dream, from its start
    assert session.seed == 8 and session.steps == 0 and session.picture().shape == (64, 64, 3)


def test_play_dream_opens_the_window_loop_headless():
    assert play_dream(dream_models(max_steps=3), "doom", max_frames=9) == [3.0, 3.0]


def test_a_window_needs_a_display(monkeypatch):
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    for name in ("DISPLAY", "WAYLAND_DISPLAY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("sys.platform", "linux")
    with pytest.raises(WmlabError, match="wmlab dream --play needs a display"):
        use_display("wmlab dream --play")
    monkeypatch.setenv("DISPLAY", ":0")
    use_display("wmlab dream --play")  # a display: the real driver, not the dummy
    assert "SDL_VIDEODRIVER" not in os.environ
