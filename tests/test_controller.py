"""C: parameter counts, the batched population forward, the agent loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agent_fixtures import Z_DIM, make_run
from wmlab.agent import Agent, EnvNoise, build_models, run_dream, run_real, workload_from_config
from wmlab.controller import (
    ControllerShape,
    check_shape,
    controller_shape,
    population_forward,
    shape_info,
)
from wmlab.dream import DreamSettings
from wmlab.envs import get_spec, make_batch
from wmlab.errors import WmlabError
from wmlab.vision.model import frames_to_tensor


def test_paper_parameter_counts():
    carracing = controller_shape("zh", 32, 256, 3, hidden=0, bias=True)
    assert (carracing.inputs, carracing.num_params) == (288, 867)
    doom = controller_shape("zch", 64, 512, 1, hidden=0, bias=False)
    assert (doom.inputs, doom.num_params) == (1088, 1088)
    # The paper's V-only variant with a 40-unit hidden layer: 32 -> 40 -> 3.
    hidden = controller_shape("z", 32, 256, 3, hidden=40, bias=True)
    assert hidden.num_params == 33 * 40 + 40 * 3 + 3


def test_population_forward_matches_per_member_loop():
    torch.manual_seed(0)
    for shape in (ControllerShape(6, 3, 0, True), ControllerShape(6, 2, 5, False)):
        params = torch.randn(4, shape.num_params)
        feats = torch.randn(4, 7, 6)
        batched = population_forward(shape, params, feats)
        assert batched.shape == (4, 7, shape.outputs)
        for p in range(4):
            one = population_forward(shape, params[p:p + 1], feats[p:p + 1])
            torch.testing.assert_close(batched[p:p + 1], one)
        assert batched.abs().max() <= 1.0
    # Linear with bias is exactly tanh(W x + b) with W row-major first, then b.
    shape = ControllerShape(3, 2, 0, True)
    w, b = torch.randn(2, 3), torch.randn(2)
    x = torch.randn(1, 5, 3)
    out = population_forward(shape, torch.cat([w.ravel(), b])[None], x)
    torch.testing.assert_close(out[0], torch.tanh(x[0] @ w.T + b))


def test_wrong_parameter_count_is_refused():
    with pytest.raises(WmlabError, match="needs 867"):
        population_forward(controller_shape("zh", 32, 256, 3), torch.zeros(2, 866),
                           torch.zeros(2, 1, 288))


def test_checkpoint_shape_mismatch_is_named():
    shape = controller_shape("zch", 64, 512, 1, bias=False)
    info = shape_info(controller_shape("zch", 32, 256, 1, bias=False), "zch")
    with pytest.raises(WmlabError, match="inputs 544 in the file but 1088 here"):
        check_shape(info, shape, "zch", "c.safetensors")
    check_shape(shape_info(shape, "zch"), shape, "zch", "c.safetensors")


def _noise(seeds: list[int], z_dim: int) -> EnvNoise:
    noise = EnvNoise(len(seeds), z_dim)
    for env, seed in enumerate(seeds):
        noise.reset(env, seed)
    return noise


def test_z_noise_depends_on_the_seed_only():
    a = _noise([5, 9, 5], 4)
    rows = np.stack([a.next() for _ in range(70)])  # crosses a block boundary
    b = _noise([9], 4)
    np.testing.assert_array_equal(rows[:, 1], np.stack([b.next()[0] for _ in range(70)]))
    np.testing.assert_array_equal(rows[:, 0], rows[:, 2])
    # an env started later (collection restarts envs one at a time) draws its seed's
    # stream from the start, whatever the others have drawn
    for _ in range(30):
        a.next()
    a.reset(1, 9)
    np.testing.assert_array_equal(np.stack([a.next()[1] for _ in range(70)]), rows[:, 1])


def test_z_noise_scales_the_posterior_noise_and_zero_acts_on_vs_mean(tmp_path):
    """controller.z_noise: 1 samples z from V's posterior as the paper (the default, the
    same z as before the key), 0 gives V's mean, 0.5 half the noise; the key reaches the
    agent through the run's config."""
    frames = np.random.default_rng(3).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    seen = {}
    for scale in (1.0, 0.5, 0.0):
        cfg = make_run(tmp_path / str(scale),
                       overrides=(f"controller.z_noise={scale}", "vae.bf16=false"))
        models = workload_from_config(cfg, "real").load()
        assert models.z_noise == scale
        params = np.zeros(models.shape.num_params, np.float32)
        agent = Agent(models, params, num_envs=2)
        agent.reset([7, 8])
        seen[scale] = agent.observe(frames).clone()
    with torch.no_grad():  # make_run builds the same V for every run
        mu = models.vae.encode(frames_to_tensor(torch.from_numpy(frames)))[0]
    torch.testing.assert_close(seen[0.0], mu)
    assert not torch.allclose(seen[1.0], mu, atol=1e-3)
    torch.testing.assert_close(seen[0.5] - mu, (seen[1.0] - mu) / 2)


def test_real_doom_rollouts_are_batched_and_deterministic(tmp_path):
    cfg = make_run(tmp_path, overrides=("env.max_steps=25",))
    models = workload_from_config(cfg, "real").load()
    assert models.shape.num_params == Z_DIM + 2 * 16  # [z, c, h] -> 1, no bias
    rng = np.random.default_rng(0)
    params = rng.normal(0, 1.0, (2, models.shape.num_params)).astype(np.float32)
    seeds = np.array([[11, 12], [11, 13]])
    with make_batch("doom", 4, max_steps=25) as envs:
        batched = run_real(models, envs, params, seeds)
    assert batched.shape == (2, 2)
    assert np.all((batched >= 1) & (batched <= 25))
    # One env at a time gives the same returns: a rollout depends on its seed alone.
    with make_batch("doom", 1, max_steps=25) as env:
        for p in range(2):
            for r in range(2):
                one = run_real(models, env, params[p:p + 1], seeds[p:p + 1, r:r + 1])
                assert one[0, 0] == batched[p, r]


def test_real_rollouts_in_groups_of_envs_give_each_rollout_its_own_return(tmp_path,
                                                                          monkeypatch):
    """es.real_envs steps a job's rollouts a few envs at a time: each keeps its member's
    controller and its seed, and its return and length land in its own slot."""
    import dataclasses

    import wmlab.agent

    cfg = make_run(tmp_path, overrides=("env.max_steps=25",))
    whole = workload_from_config(cfg, "real").build()
    rng = np.random.default_rng(0)
    params = rng.normal(0, 1.0, (2, whole.models.shape.num_params)).astype(np.float32)
    seeds = np.array([[11, 12, 13], [14, 15, 16]])
    at_once = whole.run(params, seeds)
    grouped = dataclasses.replace(whole.workload, real_envs=4).build()
    in_groups = grouped.run(params, seeds)
    assert sorted(grouped.env_batches) == [2, 4]  # 6 rollouts: a group of 4, then 2
    np.testing.assert_array_equal(in_groups.returns, at_once.returns)
    np.testing.assert_array_equal(in_groups.steps, at_once.steps)

    def fake_run_real(models, env_batch, rows, row_seeds, steps, **options):
        assert env_batch.num_envs == row_seeds.size and row_seeds.shape[1] == 1
        steps[...] = row_seeds * 2
        return row_seeds + 1000 * rows[:, :1]  # which controller played which seed

    monkeypatch.setattr(wmlab.agent, "run_real", fake_run_real)
    marked = np.zeros_like(params)
    marked[:, 0] = [1, 2]
    out = grouped.run(marked, seeds)
    np.testing.assert_array_equal(out.returns, seeds + 1000 * marked[:, :1])
    np.testing.assert_array_equal(out.steps, seeds * 2)
    whole.close()
    grouped.close()


def test_dream_rollouts_follow_the_controller(tmp_path):
    cfg = make_run(tmp_path)
    models = workload_from_config(cfg, "dream").load()
    n = models.shape.num_params
    always_right = np.zeros((1, n), np.float32)
    always_right[0, :Z_DIM] = 1.0  # z starts near +1: tanh(8) -> move right
    always_right[0, Z_DIM:] = 2.0  # c and h follow the action: keep moving right
    standing = np.zeros((1, n), np.float32)
    seeds = np.arange(4)[None]
    right = run_dream(models, always_right, seeds, DreamSettings(tau=1.0, max_steps=30))
    still = run_dream(models, standing, seeds, DreamSettings(tau=1.0, max_steps=30))
    assert right.tolist() == [[30.0] * 4]
    assert still.tolist() == [[1.0] * 4]
    # dream.done_bias reaches C's dream rollouts (and only the dream's): a large bias ends
    # the dreams that lasted to the cap
    cfg.dream.done_bias = 20.0
    assert workload_from_config(cfg, "real").dream is None
    runner = workload_from_config(cfg, "dream").build()
    assert runner.run(always_right, seeds).returns.max() < 30


def test_models_that_do_not_fit_are_refused(tmp_path):
    cfg = make_run(tmp_path)
    models = workload_from_config(cfg, "real").load()
    with pytest.raises(WmlabError, match="M takes actions of size 1"):
        build_models(get_spec("carracing"), models.mdrnn, models.vae, "zh", 0, True)
    from wmlab.vision.model import ConvVAE

    with pytest.raises(WmlabError, match="V has z_dim 4"):
        build_models(get_spec("doom"), models.mdrnn, ConvVAE(4), "zch", 0, False)


def test_a_clock_adds_two_inputs_a_period_and_a_mismatch_is_named():
    doom = controller_shape("zch", 64, 512, 1, bias=False, clock=(70, 140))
    assert (doom.inputs, doom.num_params) == (1092, 1092)
    plain = controller_shape("zch", 64, 512, 1, bias=False)
    with pytest.raises(WmlabError, match=r"clock \[\] in the file but \[70, 140\] here"):
        check_shape(shape_info(plain, "zch"), doom, "zch", "c.safetensors")
    old_file = {k: v for k, v in shape_info(plain, "zch").items() if k != "clock"}
    check_shape(old_file, plain, "zch", "c.safetensors")  # files from before clocks


def test_clock_periods_are_checked_when_the_config_loads(tmp_path):
    from wmlab.config import ConfigError, load_config

    for bad, says in (("[1]", "at least 2"), ("[8, 8]", "twice"), ("[2.5]", "integer")):
        with pytest.raises(ConfigError, match=says):
            load_config("doom", "quick", [f"controller.clock={bad}"])
    with pytest.raises(ConfigError, match="controller.clock = \\[\\] or"):
        load_config("binpacking", "best", ["controller.clock=[10]", "controller.lookahead=true",
                                           "controller.inputs=\"zh\""])


def _clocked(models, weight: float, wave: str = "sin") -> np.ndarray:
    """A C that reads only its clock's sine (or cosine), of a one-period clock:
    tanh(weight sin(2 pi t / period))."""
    params = np.zeros((1, models.shape.num_params), np.float32)
    column = models.shape.inputs - (2 if wave == "sin" else 1)  # inputs end [sin, cos]
    params[0, column] = weight
    return params


def test_a_clock_controller_acts_on_each_episodes_own_steps(tmp_path):
    cfg = make_run(tmp_path, overrides=("controller.clock=[8]",))
    models = workload_from_config(cfg, "real").load()
    assert models.shape.inputs == Z_DIM + 2 * 16 + 2
    agent = Agent(models, _clocked(models, 3.0), num_envs=2)
    agent.reset([1, 2])
    frames = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    seen = []
    for t in range(12):
        if t == 5:
            agent.reset([3], envs=[1])  # env 1 starts a new episode: its clock starts again
        agent.act_batch(frames)
        seen.append(agent.raw[:, 0].copy())
    seen = np.array(seen)
    ticks = np.arange(12)
    np.testing.assert_allclose(seen[:, 0], np.tanh(3 * np.sin(2 * np.pi * ticks / 8)),
                               atol=1e-6)
    since = np.where(ticks < 5, ticks, ticks - 5)
    np.testing.assert_allclose(seen[:, 1], np.tanh(3 * np.sin(2 * np.pi * since / 8)),
                               atol=1e-6)


def test_a_clock_controller_keeps_time_in_the_dream(tmp_path):
    """The survival M's dreams last while C moves right. A C that reads only cos(2 pi t / 40)
    moves right for the first quarter-period and then left: its dreams end soon after step
    10 (the clock counts the dream's steps as the agent counts the game's); the same C with
    the sign turned moves left from the start and dies at once."""
    cfg = make_run(tmp_path, overrides=("controller.clock=[40]",))
    models = workload_from_config(cfg, "dream").load()
    seeds = np.arange(4)[None]
    settings = DreamSettings(tau=1.0, max_steps=60)
    steps = np.zeros((1, 4), np.int64)
    run_dream(models, _clocked(models, 4.0, "cos"), seeds, settings, steps=steps)
    assert np.all((steps > 10) & (steps < 20)), steps
    run_dream(models, _clocked(models, -4.0, "cos"), seeds, settings, steps=steps)
    assert np.all(steps < 5), steps


def test_a_clocked_c_trains_in_the_dream_and_loads_only_with_its_clock(tmp_path):
    from wmlab.config import with_overrides
    from wmlab.pipeline.controller_stage import train_controller

    cfg = make_run(tmp_path, overrides=("controller.clock=[40]", "es.population=8",
                                        "es.rollouts=2", "es.generations=2", "es.eval_every=2",
                                        "es.eval_rollouts=2", "dream.max_steps=30"))
    assert train_controller(cfg, progress=False).generation == 2
    agent = Agent.of_run(cfg, num_envs=1)
    assert agent.models.shape.clock == (40,) and agent.theta.shape[1] == Z_DIM + 2 * 16 + 2
    agent.reset(5)
    frame = np.zeros((64, 64, 3), np.uint8)
    assert agent.act(frame) in (0, 1, 2) and int(agent.steps[0]) == 1
    for other in ("[]", "[20]"):
        with pytest.raises(WmlabError, match="clock"):
            Agent.of_run(with_overrides(cfg, [f"controller.clock={other}"]))


def test_the_dream_pictures_drive_a_clocked_c_on_the_dreams_step_count(tmp_path):
    from wmlab.dream import BatchedDream
    from wmlab.dream.gallery import _policy_from

    cfg = make_run(tmp_path, overrides=("controller.clock=[8]",))
    models = workload_from_config(cfg, "dream").load()
    params = torch.from_numpy(_clocked(models, 3.0)[0])
    act = _policy_from(cfg, {"params": params}, "c.safetensors", models.mdrnn)
    dream = BatchedDream(models.mdrnn, models.start, DreamSettings(tau=1.0, max_steps=30))
    dream.reset([0, 1])
    moves = []
    for _ in range(6):  # sin(2 pi t / 8) at t = 0..5: 0, +, +, +, 0, - -> noop, right x3, ...
        vectors = act(dream)
        moves.append(vectors[:, 0].tolist())
        dream.step(vectors)
    assert moves == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [0.0, 0.0], [-1.0, -1.0]]


def test_a_c_without_a_clock_starts_a_clocked_one_that_acts_the_same(tmp_path, monkeypatch):
    """es.init_from may name a C saved without a clock for a clocked config: the clock's
    weights start at zero, so the clocked C acts exactly as the one it came from."""
    from wmlab.controller.model import with_clock

    for hidden in (0, 3):
        plain = controller_shape("zh", 4, 16, 3, hidden=hidden)
        clocked = controller_shape("zh", 4, 16, 3, hidden=hidden, clock=(8, 40))
        params = np.random.default_rng(hidden).normal(size=plain.num_params)
        start = with_clock(params, shape_info(plain, "zh"), clocked, "zh", "c.safetensors")
        assert start.shape == (clocked.num_params,) and start.dtype == params.dtype
        seen, clock = torch.randn(1, 5, plain.inputs), torch.randn(1, 5, 4)
        torch.testing.assert_close(
            population_forward(clocked, torch.from_numpy(start)[None].float(),
                               torch.cat([seen, clock], dim=-1)),
            population_forward(plain, torch.from_numpy(params)[None].float(), seen))
        assert not np.array_equal(start, np.zeros_like(start))
    # a C with another clock, or a clocked C for a config without one: refused, named
    other = controller_shape("zh", 4, 16, 3, clock=(20,))
    with pytest.raises(WmlabError, match=r"clock \[8, 40\] in the file but \[20\] here"):
        with_clock(np.zeros(clocked.num_params), shape_info(clocked, "zh"), other, "zh", "c")
    with pytest.raises(WmlabError, match=r"clock \[20\] in the file but \[\] here"):
        with_clock(np.zeros(other.num_params), shape_info(other, "zh"),
                   controller_shape("zh", 4, 16, 3), "zh", "c")

    # the C stage: es.init_from a run's unclocked C, this run with a clock
    import wmlab.pipeline.controller_stage as stage
    from wmlab.controller.cmaes import load_controller_params
    from wmlab.runs import RunLayout

    tiny = ("es.population=8", "es.rollouts=2", "es.generations=1", "es.eval_every=1",
            "es.eval_rollouts=2", "dream.max_steps=30")
    first = make_run(tmp_path / "first", overrides=tiny)
    stage.train_controller(first, progress=False)
    saved, _ = load_controller_params(RunLayout.of(first).controller)
    cfg = make_run(tmp_path / "second", overrides=(
        *tiny, "controller.clock=[40]", f'es.init_from="{RunLayout.of(first).controller}"'))
    starts = []
    real_run_es = stage.run_es

    def run_es(*args, **kwargs):
        starts.append(kwargs["start"])
        return real_run_es(*args, **kwargs)

    monkeypatch.setattr(stage, "run_es", run_es)
    assert stage.train_controller(cfg, progress=False).generation == 1
    width = Z_DIM + 2 * 16  # Doom's C: [z, c, h] -> 1 output, then the clock's sin and cos
    np.testing.assert_array_equal(starts[0], np.concatenate([saved[:width], [0.0, 0.0]]))
