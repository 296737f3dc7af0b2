import json

import numpy as np
import pytest

from wmlab.errors import WmlabError
from wmlab.policies import POLICY_NAMES, PolicyConfig, make_policy


def _frames(batch, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (batch, 64, 64, 3), dtype=np.uint8)


@pytest.mark.parametrize("name", POLICY_NAMES)
@pytest.mark.parametrize("outputs", [1, 3])
def test_outputs_stay_in_the_raw_action_space(name, outputs):
    policy = make_policy(PolicyConfig(name=name, weights_scale=5.0), num_envs=4, outputs=outputs)
    for slot in range(4):
        policy.reset(slot, seed=slot)
    for step in range(200):
        raw = policy.act(_frames(4, step))
        assert raw.shape == (4, outputs) and raw.dtype == np.float32
        assert np.all(raw >= -1.0) and np.all(raw <= 1.0)


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_actions_depend_only_on_the_episode_seed(name):
    """The same seed in another slot of another batch gives the same actions."""
    frames = [_frames(3, t) for t in range(50)]
    a = make_policy(PolicyConfig(name=name), num_envs=3, outputs=2)
    b = make_policy(PolicyConfig(name=name), num_envs=3, outputs=2)
    for slot in range(3):
        a.reset(slot, seed=100 + slot)
        b.reset(2 - slot, seed=100 + slot)
    for t in range(50):
        out_a = a.act(frames[t])
        out_b = b.act(frames[t][::-1].copy())
        np.testing.assert_array_equal(out_a, out_b[::-1])
    c = make_policy(PolicyConfig(name=name), num_envs=2, outputs=2)
    c.reset(0, seed=999)
    c.reset(1, seed=100)
    played = np.stack([c.act(frames[t % 50][:2]) for t in range(300)])
    assert not np.array_equal(played[:, 0], played[:, 1])


def test_held_policy_holds_between_min_and_max_frames():
    policy = make_policy(PolicyConfig(name="held", hold_min=3, hold_max=5), num_envs=1, outputs=1)
    policy.reset(0, seed=1)
    values = [float(policy.act(_frames(1))[0, 0]) for _ in range(400)]
    runs, length = [], 1
    for prev, cur in zip(values, values[1:], strict=False):
        if cur == prev:
            length += 1
        else:
            runs.append(length)
            length = 1
    assert runs and min(runs) >= 3 and max(runs) <= 5


def test_brown_policy_moves_in_small_steps():
    policy = make_policy(PolicyConfig(name="brown", brown_sigma=0.05), num_envs=1, outputs=3)
    policy.reset(0, seed=3)
    values = np.array([policy.act(_frames(1))[0] for _ in range(300)])
    steps = np.abs(np.diff(values, axis=0))
    assert steps.max() < 0.5 and values.std() > 0.05


def test_uniform_policy_covers_the_doom_thresholds_evenly():
    policy = make_policy(PolicyConfig(name="uniform"), num_envs=1, outputs=1)
    policy.reset(0, seed=4)
    raw = np.array([policy.act(_frames(1))[0, 0] for _ in range(3000)])
    shares = [np.mean(raw < -1 / 3), np.mean(np.abs(raw) <= 1 / 3), np.mean(raw > 1 / 3)]
    assert all(0.28 < s < 0.39 for s in shares)


def test_unknown_policy_and_bad_hold():
    with pytest.raises(WmlabError, match="unknown policy 'lazy'"):
        make_policy(PolicyConfig(name="lazy"), 1, 1)
    with pytest.raises(WmlabError, match="hold_min"):
        make_policy(PolicyConfig(name="held", hold_min=4, hold_max=2), 1, 1)


def test_fixed_policy_holds_one_behaviour_per_episode_and_covers_all():
    policy = make_policy(PolicyConfig(name="fixed"), num_envs=1, outputs=1)
    seen = set()
    for seed in range(40):
        policy.reset(0, seed=seed)
        actions = {float(policy.act(_frames(1))[0, 0]) for _ in range(30)}
        assert len(actions) == 1  # constant for the whole episode
        seen |= actions
    assert seen == {-1.0, 0.0, 1.0}  # no-op, left and right all occur


def test_the_sweep_reads_nothing_and_turns_on_its_clock():
    sweep = make_policy(PolicyConfig(name="sweep", sweep_first=2, sweep_period=3), 2, 2)
    rng = np.random.default_rng(0)
    firsts = []
    for _ in range(10):
        out = sweep.act(rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8))
        assert np.array_equal(out[0], out[1]) and not out[:, 1].any()  # frames change nothing
        firsts.append(float(out[0, 0]))
    assert firsts == [-1, -1, 1, 1, 1, -1, -1, -1, 1, 1]
    sweep.reset(0, seed=7)  # a new episode starts its own clock; the other slot's goes on
    assert sweep.act(np.zeros((2, 64, 64, 3), np.uint8))[:, 0].tolist() == [-1.0, 1.0]
    with pytest.raises(WmlabError, match="sweep_period >= 1"):
        make_policy(PolicyConfig(name="sweep", sweep_period=0), 1, 1)


def test_on_doom_the_sweep_outlives_standing_still(tmp_path):
    """The reason it is Doom's reference: moving across the room dodges most fireballs."""
    from wmlab.config import load_config
    from wmlab.evaluate import evaluate_random_policy

    cfg = load_config("doom", "quick", [f'run.root="{tmp_path}"'])
    sweep = evaluate_random_policy(cfg, episodes=3, policy="sweep")
    still = evaluate_random_policy(cfg, episodes=3, policy="noop")
    assert sweep.seeds == still.seeds
    assert sweep.extra["length_mean"] > 2 * still.extra["length_mean"]


def _runs(outputs: np.ndarray) -> list[int]:
    """Lengths of the runs of equal values in a sequence."""
    edges = np.flatnonzero(np.diff(outputs)) + 1
    return np.diff(np.concatenate([[0], edges, [len(outputs)]])).tolist()


def test_collection_sweeps_draw_their_clock_per_episode_and_explore():
    config = PolicyConfig(name="sweeps", sweep_period=40)
    sweeps = make_policy(config, 1, 1)
    frames = np.zeros((1, 64, 64, 3), np.uint8)
    periods = set()
    for seed in range(6):
        sweeps.reset(0, seed)
        out = np.array([sweeps.act(frames)[0, 0] for _ in range(300)])
        assert set(out.tolist()) <= {-1.0, 1.0}
        legs = _runs(out)[1:-1]  # whole legs between turns: one period each
        assert len(set(legs)) == 1 and 20 <= legs[0] <= 60
        periods.add(legs[0])
        sweeps.reset(0, seed)  # the same seed, the same clock
        assert np.array_equal(out, [sweeps.act(frames)[0, 0] for _ in range(300)])
    assert len(periods) > 1  # episodes differ in their clocks
    exploring = make_policy(PolicyConfig(name="sweeps", sweep_period=40, explore=0.3), 1, 1)
    exploring.reset(0, 0)
    out = np.array([exploring.act(frames)[0, 0] for _ in range(1000)])
    stray = np.mean(np.abs(out) < 1.0)
    assert 0.2 < stray < 0.4  # uniform outputs among the sweep's +-1


def test_explore_is_refused_for_a_policy_that_cannot_use_it():
    from wmlab.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="collect.explore"):
        load_config("doom", "quick", ["collect.explore=0.2"])
    assert load_config("doom", "quick", ['collect.policy="sweeps"',
                                         "collect.explore=0.2"]).collect.explore == 0.2


def _car_agent(envs: int):
    """A CarRacing agent of random V and M whose C emits a fixed raw action everywhere."""
    import torch

    from wmlab.agent import Agent, build_models
    from wmlab.envs import get_spec
    from wmlab.memory.model import MDNRNN, MdrnnShape
    from wmlab.vision.model import ConvVAE

    torch.manual_seed(0)
    mdrnn = MDNRNN(MdrnnShape(z_dim=4, action_dim=3, hidden=8, gaussians=2)).eval()
    models = build_models(get_spec("carracing"), mdrnn, ConvVAE(4), "zh", 0, True)
    params = np.zeros((1, models.shape.num_params), np.float32)
    params[0, -3:] = [0.5, -0.2, -0.7]  # the output biases: C's raw tanh(b) at every step
    return Agent(models, params, num_envs=envs)


def test_the_agent_explores_the_outputs_named_held_for_their_steps():
    """collect.explore with the agent policy: with probability explore a uniform draw of the
    outputs in collect.explore_outputs is held explore_hold steps, the other outputs stay
    C's; the draws depend on the episode's seed alone, and M steps on the moves taken."""
    from wmlab.agent import AgentPolicy, Exploration
    from wmlab.config import ConfigError, load_config

    c_raw = np.tanh([0.5, -0.2, -0.7]).astype(np.float32)
    frames = [_frames(2, t) for t in range(60)]

    def play(explore, seeds=(11, 12)):
        policy = AgentPolicy(_car_agent(2), explore)
        for slot, seed in enumerate(seeds):
            policy.reset(slot, seed)
        raws, states = [], []
        for step in frames:
            raws.append(policy.act(step))
            states.append(policy.agent.h.clone())
        return np.stack(raws), states

    plain, plain_h = play(Exploration())
    assert np.allclose(plain, c_raw, atol=1e-6)
    throttle = Exploration(rate=0.3, hold=5, outputs=(1, 2))
    raws, states = play(throttle)
    np.testing.assert_allclose(raws[..., 0], c_raw[0], atol=1e-6)  # steering: C's
    explored = ~np.isclose(raws[..., 1], c_raw[1])
    assert 0.2 < explored.mean() < 0.9
    for env in range(2):  # each exploring move lasts its 5 steps (or to the end)
        runs = np.diff(np.flatnonzero(np.diff(np.r_[0, explored[:, env], 0])))[::2]
        held = np.split(raws[:, env, 1], np.flatnonzero(np.diff(raws[:, env, 1])) + 1)
        assert all(length % 5 == 0 or length == runs[-1] for length in runs)
        assert any(len(part) >= 5 for part in held)
    # M advanced on the moves taken, not on C's
    assert not np.allclose(states[-1].numpy(), plain_h[-1].numpy())
    # the draws are the seed's: env 1's seed in env 0 gives env 1's moves
    again, _ = play(throttle, seeds=(12, 11))
    np.testing.assert_array_equal(again[:, 0], raws[:, 1])
    with pytest.raises(WmlabError, match="collect.explore_outputs"):
        Exploration.of(PolicyConfig(explore=0.1, explore_outputs=(3,)), 3)
    # in a later iteration's collection, explore applies to the agent's share
    later = load_config("carracing", "solve").run.later
    cfg = load_config("carracing", "solve", [
        "run.later=" + json.dumps([*later, "collect.explore=0.05", "collect.explore_hold=5",
                                   "collect.explore_outputs=[1, 2]"])])
    assert "collect.explore=0.05" in cfg.run.later
    with pytest.raises(ConfigError, match="collect.explore"):  # iteration 1: brown alone
        load_config("carracing", "solve", ["collect.explore=0.05"])


def test_an_output_the_agent_cannot_explore_is_refused_before_collecting(tmp_path):
    """collect.explore_outputs naming an output C does not have: one line, nothing written."""
    from wmlab.collect import collect
    from wmlab.config import load_config

    cfg = load_config("carracing", "quick", [
        f'run.root="{tmp_path}"', 'collect.policy="agent"', 'collect.agent_run="nowhere"',
        "collect.explore=0.1", "collect.explore_outputs=[1, 3]"])
    with pytest.raises(WmlabError, match="collect.explore_outputs") as err:
        collect(cfg, progress=False)
    assert "\n" not in str(err.value)
    assert not any(tmp_path.iterdir())
