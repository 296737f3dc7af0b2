"""M's look-ahead as C's shield ([shield]): before the agent's move is taken, M dreams a few
steps ahead under C and under each move held, and overrules C where a hold is clearly
safer. The survival M of agent_fixtures kills every move but 'right' within a few steps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from agent_fixtures import Z_DIM, make_run, survival_mdrnn
from wmlab.agent import Agent, build_models, workload_from_config
from wmlab.config import load_config
from wmlab.dream.shield import ShieldSettings, look_ahead_risks
from wmlab.envs import get_spec
from wmlab.envs.spec import DOOM_LEFT, DOOM_RIGHT
from wmlab.errors import WmlabError
from wmlab.memory.model import MDNRNN, MdrnnShape
from wmlab.vision.model import ConvVAE


def _settings(margin: float = 0.1, period: int = 1, hold: int = 0) -> ShieldSettings:
    return ShieldSettings(window=8, samples=4, period=period, margin=margin, tau=1.0,
                          done_shift=0.0, hold=hold)


def _agent(bias: float, shield: ShieldSettings | None, envs: int = 2) -> Agent:
    """A Doom agent on the survival M whose C emits tanh(bias) whatever it sees."""
    torch.manual_seed(3)
    models = build_models(get_spec("doom"), survival_mdrnn(), ConvVAE(Z_DIM), "zh", 0, True,
                          shield=shield)
    params = np.zeros((1, models.shape.num_params), np.float32)
    params[0, -1] = bias  # the output's bias
    return Agent(models, params, num_envs=envs)


def _frames(steps: int, envs: int = 2) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (steps, envs, 64, 64, 3), np.uint8)


@torch.no_grad()
def test_the_shield_takes_the_move_m_says_survives_where_c_walks_into_death():
    frames = _frames(4)
    alone, shielded = _agent(-5.0, None), _agent(-5.0, _settings())
    alone.reset(seed=[1, 2])
    shielded.reset(seed=[1, 2])
    for step in frames:
        assert alone.act_batch(step).tolist() == [DOOM_LEFT, DOOM_LEFT]
        assert shielded.act_batch(step).tolist() == [DOOM_RIGHT, DOOM_RIGHT]
        # what collection records maps back to the move taken
        assert (shielded.raw[:, 0] > 1 / 3).all()
    assert shielded.shield.overrules.tolist() == [4, 4]
    # M stepped on the move taken, not on C's: its state is that of moving right
    assert float(shielded.h.mean()) > 0 > float(alone.h.mean())


@torch.no_grad()
def test_a_c_already_on_the_safe_move_is_left_alone():
    agent = _agent(5.0, _settings())
    agent.reset(seed=[1, 2])
    for step in _frames(3):
        assert agent.act_batch(step).tolist() == [DOOM_RIGHT, DOOM_RIGHT]
    assert agent.shield.overrules.tolist() == [0, 0]


@torch.no_grad()
def test_a_shield_that_cannot_overrule_changes_nothing():
    """margin 1: no difference of two probabilities exceeds it; every step as without."""
    frames = _frames(5)
    alone, shielded = _agent(-0.2, None), _agent(-0.2, _settings(margin=1.0))
    alone.reset(seed=[4, 5])
    shielded.reset(seed=[4, 5])
    for step in frames:
        assert alone.act_batch(step).tolist() == shielded.act_batch(step).tolist()
        np.testing.assert_array_equal(alone.raw, shielded.raw)
        assert torch.equal(alone.h, shielded.h) and torch.equal(alone.c, shielded.c)


@torch.no_grad()
def test_a_hold_lasts_the_period_before_m_looks_again():
    agent = _agent(-5.0, _settings(period=3), envs=1)
    agent.reset(seed=7)
    for step in _frames(7, envs=1):
        assert agent.act_batch(step).tolist() == [DOOM_RIGHT]
    assert agent.shield.overrules.tolist() == [3]  # looks at steps 0, 3 and 6


@torch.no_grad()
def test_risks_rank_the_moves_as_the_survival_m_does():
    m = survival_mdrnn()
    s = _settings()
    holds = torch.tensor([[0.0], [-1.0], [1.0]])  # no-op, left, right

    def c_goes_left(z, h, c, restart, envs, t):
        return torch.full((len(z), 1), -1.0)

    gen = torch.Generator().manual_seed(0)
    noise = (torch.rand(2, s.window, s.samples, Z_DIM, generator=gen),
             torch.randn(2, s.window, s.samples, Z_DIM, generator=gen))
    risk = look_ahead_risks(m, s, c_goes_left, holds, np.arange(2), torch.zeros(2, Z_DIM),
                            torch.zeros(2, m.shape.hidden), torch.zeros(2, m.shape.hidden),
                            torch.ones(2, 1), *noise)
    assert risk.shape == (2, 4)
    # C (left) and the left hold are the same dreams; right the safest, no-op in between
    torch.testing.assert_close(risk[:, 0], risk[:, 2])
    assert (risk[:, 3] < risk[:, 1]).all() and (risk[:, 1] < risk[:, 2]).all()


@torch.no_grad()
def test_a_hold_that_gives_way_to_c_is_dreamt_as_that_plan():
    """shield.hold: each move held that many steps, then C's moves, as the agent would play
    after an overruling; 0 (or the whole window) holds it throughout."""
    m = survival_mdrnn()
    holds = torch.tensor([[0.0], [-1.0], [1.0]])  # no-op, left, right
    gen = torch.Generator().manual_seed(1)
    noise = (torch.rand(2, 8, 4, Z_DIM, generator=gen),
             torch.randn(2, 8, 4, Z_DIM, generator=gen))
    seen_steps: list[int] = []

    def c_goes_left(z, h, c, restart, envs, t):
        seen_steps.append(t)
        return torch.full((len(z), 1), -1.0)

    def risks(hold: int, c_candidate: bool = True) -> torch.Tensor:
        return look_ahead_risks(m, _settings(hold=hold), c_goes_left, holds, np.arange(2),
                                torch.zeros(2, Z_DIM), torch.zeros(2, m.shape.hidden),
                                torch.zeros(2, m.shape.hidden), torch.ones(2, 1), *noise,
                                c_candidate=c_candidate)

    throughout, released = risks(0), risks(2)
    torch.testing.assert_close(risks(8), throughout)  # a hold as long as the window
    # C's dream and the left hold's are the same plans either way
    torch.testing.assert_close(released[:, :3:2], throughout[:, :3:2])
    # right for 2 steps, then C's left: riskier than right throughout, safer than C's left
    assert (released[:, 3] > throughout[:, 3] + 0.05).all()
    assert (released[:, 3] < released[:, 0]).all()
    # without C as a candidate, the holds' risks are the same, C still acting after them
    seen_steps.clear()
    torch.testing.assert_close(risks(2, c_candidate=False), released[:, 1:])
    assert seen_steps == list(range(2, 8))
    with pytest.raises(ValueError, match="C's moves"):
        look_ahead_risks(m, _settings(hold=2), None, holds, np.arange(2),
                         torch.zeros(2, Z_DIM), torch.zeros(2, m.shape.hidden),
                         torch.zeros(2, m.shape.hidden), torch.ones(2, 1), *noise,
                         c_candidate=False)


@torch.no_grad()
def test_an_episode_depends_on_its_seed_not_its_slot():
    frames = _frames(4)
    a, b = _agent(-0.3, _settings()), _agent(-0.3, _settings())
    a.reset(seed=[11, 12])
    b.reset(seed=[12, 11])
    for step in frames:
        same = step[[1, 0]]  # b's env 0 sees what a's env 1 sees
        assert a.act_batch(step).tolist() == b.act_batch(same)[[1, 0]].tolist()


def test_refusals_name_the_fix():
    settings = _settings()
    with pytest.raises(WmlabError, match="shield.window = 0"):
        m = MDNRNN(MdrnnShape(z_dim=Z_DIM, action_dim=3, hidden=8, gaussians=2,
                              done_head=True))
        build_models(get_spec("carracing"), m, ConvVAE(Z_DIM), "zh", 0, True,
                     shield=settings)
    no_done = MDNRNN(MdrnnShape(z_dim=Z_DIM, action_dim=1, hidden=8, gaussians=2))
    with pytest.raises(WmlabError, match="no done head"):
        build_models(get_spec("doom"), no_done, ConvVAE(Z_DIM), "zh", 0, True,
                     shield=settings)
    with pytest.raises(WmlabError, match="margin"):
        ShieldSettings(window=8, samples=4, period=1, margin=1.5, tau=1.0, done_shift=0.0)
    with pytest.raises(WmlabError, match="shield.hold"):
        _settings(hold=-1)
    agent = _agent(0.0, settings)
    with pytest.raises(WmlabError, match="valid actions"):
        agent.decide(mask=np.ones((2, 1), bool))


def test_the_config_section_reaches_the_real_rollouts_only(tmp_path):
    cfg = make_run(tmp_path, overrides=("shield.window=25", "shield.samples=6",
                                        "shield.margin=0.2", "shield.hold=5",
                                        "dream.tau=1.15"))
    real = workload_from_config(cfg, "real")
    assert real.shield == ShieldSettings(window=25, samples=6, period=5, margin=0.2,
                                         tau=1.15,
                                         done_shift=math.log(cfg.mdrnn.done_weight), hold=5)
    assert workload_from_config(cfg, "dream").shield is None
    assert real.load().shield == real.shield
    off = load_config("doom", "budget")
    assert off.shield.window == 0 and workload_from_config(off, "real").shield is None


def test_a_shielded_evaluation_plays_the_real_game_and_is_never_taken_for_one_without(
        tmp_path):
    """Real ViZDoom episodes through the shield; the evaluate stage's reuse tells a score
    with the shield from one without it by the settings the JSON records."""
    import dataclasses
    import json
    from pathlib import Path

    from wmlab.checkpoint import save_checkpoint
    from wmlab.controller import controller_shape, shape_info
    from wmlab.controller.cmaes import BEST_WEIGHTS
    from wmlab.evaluate import evaluate_controller
    from wmlab.runs import RunLayout

    evaluation = ("env.max_steps=12", "eval.episodes=3", "eval.seed=500")
    cfg = make_run(tmp_path, overrides=evaluation)
    shape = controller_shape("zch", Z_DIM, 16, 1, bias=False)
    params = np.random.default_rng(0).normal(0, 1.0, shape.num_params)
    save_checkpoint(RunLayout.of(cfg).controller, BEST_WEIGHTS, 1,
                    {"params": torch.as_tensor(params, dtype=torch.float32)}, None,
                    {**shape_info(shape, "zch"), "generation": 1})
    plain = evaluate_controller(cfg, reuse=True)
    assert plain.extra["shield"] is None
    path = Path(RunLayout.of(cfg).eval, "eval-vizdoom.json")
    path.write_text(json.dumps({**json.loads(path.read_text()), "returns": [-1.0] * 3}))
    shielded_cfg = dataclasses.replace(cfg, shield=dataclasses.replace(cfg.shield, window=4,
                                                                       period=2))
    shielded = evaluate_controller(shielded_cfg, reuse=True)
    assert -1.0 not in shielded.returns and all(1 <= r <= 12 for r in shielded.returns)
    assert shielded.extra["shield"]["window"] == 4
    assert evaluate_controller(shielded_cfg, reuse=True).returns == shielded.returns
    assert evaluate_controller(cfg, reuse=True).returns == plain.returns  # played again
