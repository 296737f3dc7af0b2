"""The look-ahead controller (controller.lookahead): each action scored by a linear map of
M's state after it, M stepped once per action; the scores masked and argmaxed as any
discrete C's logits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from agent_fixtures import make_run
from wmlab.agent import Agent, _act, build_models, run_dream, workload_from_config
from wmlab.config import load_config
from wmlab.controller.model import check_shape, controller_shape, shape_info
from wmlab.dream import DreamSettings
from wmlab.envs import get_spec
from wmlab.envs.spec import EnvSpec
from wmlab.errors import ConfigError, WmlabError
from wmlab.memory.model import MDNRNN, MdrnnShape
from wmlab.runs import RunLayout
from wmlab.vision.model import ConvVAE

Z, H = 4, 6


def binpacking_mdrnn(z_dim: int = Z, hidden: int = H, seed: int = 0) -> MDNRNN:
    """A random M for binpacking's 9 levels, with the heads and restart input."""
    torch.manual_seed(seed)
    return MDNRNN(MdrnnShape(z_dim=z_dim, action_dim=9, hidden=hidden, gaussians=2,
                             done_head=True, reward_head=True, restart_input=True)).eval()


def _lookahead_models(kind: str = "zh", vae: bool = True):
    m = binpacking_mdrnn()
    return build_models(get_spec("binpacking"), m, ConvVAE(Z) if vae else None, kind, 0,
                        True, lookahead=True)


def _by_hand(m: MDNRNN, kind: str, theta: np.ndarray, z, h, c, restart) -> tuple:
    """Each row's scores with M stepped separately for each action (``advance``, one row
    and one action at a time), and each (row, action)'s next (h, c)."""
    actions = m.shape.action_dim
    scores = np.zeros((len(z), actions), np.float32)
    states = {}
    for row in range(len(z)):
        for a in range(actions):
            vector = torch.eye(actions)[a:a + 1]
            h1, c1 = m.advance(z[row:row + 1], vector, restart[row:row + 1], h[row:row + 1],
                               c[row:row + 1])
            reward = m.read_out(h1).reward  # the full head, as M's training reads it
            x = torch.cat([c1, h1, reward[:, None]] if kind == "zch" else [h1, reward[:, None]],
                          1)[0]
            width = x.shape[0]
            w, b = torch.from_numpy(theta[row][:width]), torch.from_numpy(theta[row][width:])
            scores[row, a] = float(w @ x + b[a])
            states[row, a] = (h1[0], c1[0])
    return scores, states


@pytest.mark.parametrize("kind", ["zh", "zch"])
@torch.no_grad()
def test_each_action_is_scored_on_m_stepped_for_it_by_hand(kind):
    models = _lookahead_models(kind)
    m = models.mdrnn
    width = (2 if kind == "zch" else 1) * H + 1  # [(c',) h', predicted reward]
    assert models.shape.num_params == width + 9  # w, then one bias per action
    rng = np.random.default_rng(0)
    params = rng.normal(0, 1, (2, models.shape.num_params)).astype(np.float32)
    agent = Agent(models, params, num_envs=4)  # 2 members x 2 envs, rows grouped by member
    agent.z = torch.randn(4, Z)
    agent.h, agent.c = torch.randn(4, H) * 0.5, torch.randn(4, H) * 0.5
    agent.restart = torch.tensor([[1.0], [0.0], [0.0], [1.0]])  # a restart zeroes the state
    z, h, c, restart = agent.z.clone(), agent.h.clone(), agent.c.clone(), agent.restart.clone()
    running = np.array([True, True, False, True])
    actions = agent.decide(running=running)
    scores, states = _by_hand(m, kind, np.repeat(params, 2, axis=0), z, h, c, restart)
    np.testing.assert_allclose(agent.raw, scores, rtol=1e-5, atol=1e-5)
    assert actions.tolist() == scores.argmax(1).tolist()
    # M's next state is the chosen action's look-ahead; the row not running keeps its own
    for row in (0, 1, 3):
        torch.testing.assert_close(agent.h[row], states[row, int(actions[row])][0])
        torch.testing.assert_close(agent.c[row], states[row, int(actions[row])][1])
    torch.testing.assert_close(agent.h[2], h[2])


@torch.no_grad()
def test_the_mask_still_applies():
    models = _lookahead_models()
    n = models.shape.num_params
    params = np.zeros((1, n), np.float32)
    params[0, n - 9 + 5] = 100.0  # b_5: level 5 scores highest by far
    agent = Agent(models, params, num_envs=2)
    mask = np.ones((2, 9), bool)
    mask[0, 5] = False  # level 5 holds no bag in env 0
    actions = agent.decide(mask)
    assert agent.raw[0].argmax() == 5 and actions[0] != 5
    assert actions[0] == np.where(mask[0], agent.raw[0], -np.inf).argmax()
    assert actions[1] == 5


def _reset_mdrnn() -> MDNRNN:
    """z = x, two actions: 'keep' (0) and 'reset' (1). From a zero state, the two hidden
    units after 'keep' hold tanh(tanh(+-3x - 1.5)), an even function of the next state
    x, growing with |x|; after 'reset' their input gate is shut and they hold 0."""
    m = MDNRNN(MdrnnShape(z_dim=1, action_dim=2, hidden=2, gaussians=1))
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        w, b = m.lstm.weight_ih_l0, m.lstm.bias_ih_l0  # gate rows i, f, g, o; columns z, a
        w[0:2, 1], w[0:2, 2] = 10.0, -10.0  # input gate open after keep, shut after reset
        w[4, 0], w[5, 0] = 3.0, -3.0  # g: +-3x ...
        b[4:6] = -1.5  # ... - 1.5
        b[6:8] = 10.0  # output gate open
    return m.eval()


@torch.no_grad()
def test_lookahead_follows_a_next_state_rule_no_linear_c_can():
    """The rule: reset (paying 0.25) when the next state's cost x^2 would exceed it, i.e.
    argmin over a of [x_a^2 + 0.25 (a = reset)], x_keep = x, x_reset = 0: reset iff |x| >
    0.5. A linear C on [z, h] sees [x, 0] on an episode's first step, so its two scores'
    difference is affine in x: its sign at x = 0 is that of the mean of its values at -1
    and +1, so it cannot reset at -1 and +1 yet keep at 0. The look-ahead C can."""
    spec = EnvSpec(name="toy", gym_id="toy", description="", backends=("python",),
                   default_backend="python", max_steps=10, action_kind="discrete",
                   action_dim=2, controller_outputs=2)
    m = _reset_mdrnn()
    models = build_models(spec, m, None, "zh", 0, True, lookahead=True)
    x = torch.tensor([-1.0, -0.8, -0.6, -0.4, -0.2, 0.0, 0.2, 0.4, 0.6, 0.8, 1.0])[:, None]
    threshold = float(torch.tanh(torch.tanh(torch.tensor(-3.0))))  # the units' sum at 0.5
    theta = torch.tensor([[-1.0, -1.0, 0.0, -threshold]])  # w = -1: keep's cost; b_reset
    zeros, start = torch.zeros(len(x), 2), torch.ones(len(x), 1)
    chosen = _act(models, theta, x, zeros, zeros, start, 1).env_actions
    rule = (x[:, 0] ** 2 > 0.25).long()  # argmin of x_a^2 + 0.25 [a = reset]
    assert chosen.tolist() == rule.tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1]
    # the linear C of the same M, searched at random: never reset-keep-reset on -1, 0, 1
    linear = build_models(spec, m, None, "zh", 0, True)
    rng = np.random.default_rng(1)
    thetas = torch.from_numpy(rng.normal(0, 3, (2000, linear.shape.num_params)).astype(
        np.float32))
    three = torch.tensor([[-1.0], [0.0], [1.0]]).repeat(2000, 1)
    acted = _act(linear, thetas, three, torch.zeros(6000, 2), torch.zeros(6000, 2),
                 torch.ones(6000, 1), 2000)
    assert not (acted.env_actions.reshape(2000, 3) == [1, 0, 1]).all(1).any()


def test_parameter_count_and_saved_shapes():
    # wm30: M of 256 units with a reward head, 30 levels: w (256 + 1), then b_a
    shape = controller_shape("zh", 32, 256, 30, lookahead=True, reward=True)
    assert shape.num_params == 256 + 1 + 30
    assert controller_shape("zch", 32, 256, 30, lookahead=True).num_params == 512 + 30
    assert controller_shape("zh", 32, 256, 30, bias=False, lookahead=True).num_params == 256
    linear = controller_shape("zh", 32, 256, 30)
    with pytest.raises(WmlabError, match="lookahead False in the file but True here"):
        check_shape(shape_info(linear, "zh"), shape, "zh", "c.safetensors")
    with pytest.raises(WmlabError, match="lookahead True in the file but False here"):
        check_shape(shape_info(shape, "zh"), linear, "zh", "c.safetensors")
    # controllers saved before the key existed are linear ones, and still load
    old = {k: v for k, v in shape_info(linear, "zh").items() if k != "lookahead"}
    check_shape(old, linear, "zh", "c.safetensors")


@torch.no_grad()
def test_a_hidden_layer_scores_each_action_by_the_same_small_network():
    """controller.hidden = k with the look-ahead: score_a = v . tanh(W x_a + b) + b_a, x_a
    the features after action a, (W, b, v) shared by the actions; as a row-by-row product."""
    cfg = load_config("binpacking", "quick", ["controller.lookahead=true",
                                              "controller.hidden=3"])
    assert cfg.controller.hidden == 3  # accepted now: the look-ahead's score may be non-linear
    models = build_models(get_spec("binpacking"), binpacking_mdrnn(), None, "zh", 3, True,
                          lookahead=True)
    width = H + 1  # h', predicted reward
    assert models.shape.num_params == 3 * width + 3 + 3 + 9
    rng = np.random.default_rng(2)
    params = rng.normal(0, 1, (2, models.shape.num_params)).astype(np.float32)
    z, h, c = torch.randn(4, Z), torch.randn(4, H) * 0.5, torch.randn(4, H) * 0.5
    restart = torch.zeros(4, 1)
    acted = _act(models, torch.from_numpy(params), z, h, c, restart, 2)
    m = models.mdrnn
    for row in range(4):
        theta = torch.from_numpy(params[row // 2])  # rows grouped by member
        w1 = theta[:3 * width].reshape(3, width)
        b1, v, b_a = theta[3 * width:3 * width + 3], theta[3 * width + 3:3 * width + 6], \
            theta[3 * width + 6:]
        for a in range(9):
            h1, _ = m.advance(z[row:row + 1], torch.eye(9)[a:a + 1], restart[row:row + 1],
                              h[row:row + 1], c[row:row + 1])
            x = torch.cat([h1[0], m.read_out(h1).reward])
            expected = float(v @ torch.tanh(w1 @ x + b1) + b_a[a])
            assert acted.raw[row, a] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    # the linear look-ahead is what it was: w then b_a, no hidden parameters
    assert controller_shape("zh", Z, H, 9, lookahead=True, reward=True).num_params == width + 9


@torch.no_grad()
def test_a_hidden_layer_finds_a_band_rule_the_linear_lookahead_barely_reaches():
    """Reset (action 1) exactly when the next state x is in a band: keep at x = 0 and 1,
    reset at 0.5. After 'keep' this M's two units are monotone in x, one rising, one
    falling, and flat past 0.5 (tanh of tanh), so a linear look-ahead follows the band only
    on a thin sliver of weights (0.0019 w1 < 0.71 w0 < 0.050 w1): 2,000 random draws of it
    miss it, the same search of a 4-unit hidden layer finds it."""
    spec = EnvSpec(name="toy", gym_id="toy", description="", backends=("python",),
                   default_backend="python", max_steps=10, action_kind="discrete",
                   action_dim=2, controller_outputs=2)
    m = _reset_mdrnn()
    x = torch.tensor([0.0, 0.5, 1.0])[:, None]
    zeros, start = torch.zeros(3, 2), torch.ones(3, 1)
    linear = build_models(spec, m, None, "zh", 0, True, lookahead=True)
    rng = np.random.default_rng(3)
    thetas = torch.from_numpy(rng.normal(0, 3, (2000, linear.shape.num_params)).astype(
        np.float32))
    acted = _act(linear, thetas, x.repeat(2000, 1), zeros.repeat(2000, 1),
                 zeros.repeat(2000, 1), start.repeat(2000, 1), 2000)
    assert not (acted.env_actions.reshape(2000, 3) == [0, 1, 0]).all(1).any()
    hidden = build_models(spec, m, None, "zh", 4, True, lookahead=True)
    found = torch.from_numpy(rng.normal(0, 3, (2000, hidden.shape.num_params)).astype(
        np.float32))
    acted = _act(hidden, found, x.repeat(2000, 1), zeros.repeat(2000, 1),
                 zeros.repeat(2000, 1), start.repeat(2000, 1), 2000)
    assert (acted.env_actions.reshape(2000, 3) == [0, 1, 0]).all(1).any()


def test_refusals_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="set controller.inputs to zh"):
        load_config("binpacking", "quick", ["controller.lookahead=true", 'controller.inputs="z"'])
    for env, actions in (("carracing", 3), ("doom", 1)):
        m = MDNRNN(MdrnnShape(z_dim=Z, action_dim=actions, hidden=H))
        with pytest.raises(WmlabError, match=f"env '{env}' has {env} actions: set "
                                             "controller.lookahead = false"):
            build_models(get_spec(env), m, None, "zh", 0, True, lookahead=True)
    from wmlab.dream.gallery import _policy_from

    cfg = load_config("binpacking", "quick", ["controller.lookahead=true"])
    with pytest.raises(WmlabError, match="wmlab evaluate --dream"):
        _policy_from(cfg, {"params": torch.zeros(16)}, "c.safetensors", binpacking_mdrnn())


@torch.no_grad()
def test_dream_rollouts_with_a_lookahead_c(tmp_path):
    """In the dream C looks ahead from the dream's state; a C of biases alone acts as the
    linear C of the same biases, and one that reads h' runs the dream to its end."""
    cfg = make_run(tmp_path, "binpacking", mdrnn=binpacking_mdrnn(8, 16))
    linear = workload_from_config(cfg, "dream").load()
    cfg.controller.lookahead = True
    ahead = workload_from_config(cfg, "dream").load()
    settings = DreamSettings(tau=1.0, max_steps=20, done_mode="threshold")
    seeds = np.arange(6).reshape(2, 3)
    for level in (0, 3):
        biases = np.zeros((2, ahead.shape.num_params), np.float32)
        biases[:, ahead.shape.inputs + level] = 1.0
        plain = np.zeros((2, linear.shape.num_params), np.float32)
        plain[:, linear.shape.num_params - 9 + level] = 1.0
        np.testing.assert_array_equal(run_dream(ahead, biases, seeds, settings),
                                      run_dream(linear, plain, seeds, settings))
    reading = np.random.default_rng(0).normal(0, 1, (2, ahead.shape.num_params))
    returns = run_dream(ahead, reading.astype(np.float32), seeds, settings)
    assert returns.shape == (2, 3) and np.isfinite(returns).all()


def test_binpacking_lookahead_c_trains_and_evaluates(tmp_path, one_thread):
    from wmlab.evaluate import evaluate_controller
    from wmlab.pipeline.controller_stage import train_controller

    overrides = ("env.max_steps=12", "controller.lookahead=true", "es.population=4",
                 "es.rollouts=1", "es.generations=1", "es.eval_every=1",
                 "es.eval_rollouts=2", "eval.episodes=2")
    cfg = make_run(tmp_path, "binpacking", overrides, mdrnn=binpacking_mdrnn(8, 16))
    result = train_controller(cfg, progress=False)
    assert result.generation == 1
    info = json.loads(Path(RunLayout.of(cfg).controller, "controller.json").read_text())
    assert info["lookahead"] is True and info["num_params"] == 16 + 1 + 9
    real = evaluate_controller(cfg, episodes=2)
    # 12 items of 2 or 3 into bags of 9: at worst a new bag each (waste 7 each)
    assert len(real.returns) == 2 and all(-12 * 7 <= r <= 0 for r in real.returns)
    dream = evaluate_controller(cfg, episodes=2, where="dream")
    assert np.isfinite(dream.mean)
    # a linear C's config refuses the look-ahead controller, saying why
    cfg.controller.lookahead = False
    with pytest.raises(WmlabError, match="lookahead True in the file but False here"):
        evaluate_controller(cfg, episodes=2)
