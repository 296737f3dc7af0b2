"""Bin packing (ORL): rules per variant, seeded draws, drawing, baselines, wmlab integration."""

import dataclasses
import json

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from wmlab import envs
from wmlab.baselines import (
    best_fit,
    evaluate,
    make_policy,
    problems_for,
    run_policy,
    sum_of_squares,
    sum_of_squares_orl,
)
from wmlab.cli import main
from wmlab.collect import collect
from wmlab.config import load_config
from wmlab.data import EpisodeStore
from wmlab.envs.binpacking import (
    DISTRIBUTIONS,
    BinPackingEnv,
    BinPackingFrames,
    make_problem,
    nearest_valid,
    problem_from_name,
    valid_mask,
)
from wmlab.envs.binpacking_draw import LINEAR_COUNTS, draw_frame, draw_human
from wmlab.errors import WmlabError


def _env(variant, items, capacity=9, sizes=(2, 3), probs=(0.5, 0.5), horizon=20):
    env = BinPackingEnv(capacity=capacity, sizes=sizes, probs=probs, horizon=horizon,
                        variant=variant)
    env.reset(seed=0, options={"items": items})
    return env


def _play(env, actions):
    """Step through ``actions``; (rewards, last info, terminated, truncated)."""
    rewards = []
    terminated = truncated = False
    info = {}
    for action in actions:
        _, reward, terminated, truncated, info = env.step(action)
        rewards.append(reward)
    return rewards, info, terminated, truncated


# --- rules ----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["base", "nearest-valid", "action-mask"])
def test_valid_moves_follow_the_rules_in_every_variant(variant):
    env = _env(variant, [2, 3, 2, 2, 3, 3])
    # New bag (2) -> level 2; +3 -> level 5; +2 -> 7; +2 -> 9 = full and gone; new bag (3).
    rewards, info, terminated, truncated = _play(env, [0, 2, 5, 7, 0])
    assert rewards == [-7.0, 3.0, 2.0, 2.0, -6.0]
    assert env.counts.tolist() == [0, 0, 0, 1, 0, 0, 0, 0, 0]
    assert info["full_bags"] == 1 and info["waste"] == 6 == -sum(rewards)
    assert not terminated and not truncated and not info["invalid"]
    assert env.item == 3 and info["action_mask"].tolist() == [1, 0, 0, 1, 0, 0, 0, 0, 0]


def test_base_variant_ends_with_minus_100_minus_previous_waste():
    env = _env("base", [2, 3])
    _, reward, terminated, truncated, info = env.step(4)  # first step: w_prev = 0
    assert (reward, terminated, truncated, info["invalid"]) == (-100.0, True, False, True)
    with pytest.raises(WmlabError, match="reset"):
        env.step(0)
    env = _env("base", [2, 3, 3])
    rewards, _, terminated, _ = _play(env, [0, 8])  # after a new bag: w_prev = 9 - 2
    assert rewards == [-7.0, -100.0 - 7.0] and terminated
    env = _env("base", [2, 3, 3, 3])
    rewards, _, terminated, _ = _play(env, [0, 2, 6])  # after an existing bag: w_prev = -3
    assert rewards == [-7.0, 3.0, -100.0 + 3.0] and terminated
    assert env.counts.tolist() == [0, 0, 0, 0, 0, 1, 0, 0, 0]  # the invalid move changed nothing


def test_base_variant_ends_showing_the_next_item_on_the_bags_as_they_were():
    """As in the reference, the item after the refused one is drawn and shown at the end."""
    env = BinPackingFrames(BinPackingEnv(capacity=9, sizes=(2, 3), probs=(0.5, 0.5),
                                         horizon=4, variant="base"))
    env.reset(seed=0, options={"items": [2, 3, 2, 3, 2]})  # T + 1 items: the last is shown
    # New bag (2) -> level 2; +3 -> level 5; +2 -> level 7; the 3 does not fit on 7 (last step).
    rewards = [env.step(action)[1] for action in (0, 2, 5)]
    frame, reward, terminated, truncated, info = env.step(7)
    assert rewards + [reward] == [-7.0, 3.0, 2.0, -100.0 + 2.0]  # w_prev = -2
    assert (terminated, truncated, info["invalid"], info["action"]) == (True, False, True, 7)
    bags = [0, 0, 0, 0, 0, 0, 0, 1, 0]  # the refused 3 went nowhere
    assert info["counts"].tolist() == bags and info["item"] == 2 and info["step"] == 4
    assert info["action_mask"].tolist() == [1, 0, 0, 0, 0, 0, 0, 1, 0]  # a 2 fits on 7
    np.testing.assert_array_equal(frame, draw_frame(np.array(bags), 2, 9))
    assert not np.array_equal(frame, draw_frame(np.array(bags), 3, 9))
    vector = _env("base", [2, 3, 2, 3, 2], horizon=4)  # the Gymnasium face: ORL's vector
    _play(vector, [0, 2, 5])
    assert vector.step(7)[0].tolist() == bags + [2]


@pytest.mark.parametrize("variant", ["nearest-valid", "action-mask"])
def test_invalid_actions_go_to_the_nearest_fitting_level(variant):
    env = _env(variant, [2] * 7 + [3, 2, 2])
    _play(env, [0, 2, 4, 0, 2, 4, 0])  # bags at levels 2, 6, 6
    assert env.counts.tolist() == [0, 0, 1, 0, 0, 0, 2, 0, 0]
    # Item 3: level 4 is empty; levels 2 and 6 are both 2 away -> the lower one, no penalty.
    _, reward, terminated, _, info = env.step(4)
    assert (info["action"], info["invalid"], reward, terminated) == (2, True, 3.0, False)
    # Item 2, chosen level 8 does not exist: nearest existing fitting level is 6 (6+2 <= 9).
    _, reward, _, _, info = env.step(8)
    assert (info["action"], reward) == (6, 2.0)
    assert env.counts.tolist() == [0, 0, 0, 0, 0, 1, 1, 0, 1]
    # Item 2: levels 5 and 6 fit, 8 does not (8 + 2 > 9); nearest to 7 is 6.
    _, _, _, _, info = env.step(7)
    assert info["action"] == 6
    assert env.counts.tolist() == [0, 0, 0, 0, 0, 1, 0, 0, 2]


def test_nothing_fits_means_a_new_bag_and_zero_is_always_valid():
    counts = np.array([0, 0, 0, 0, 0, 0, 0, 0, 3])
    assert valid_mask(counts, 2, 9).tolist() == [1, 0, 0, 0, 0, 0, 0, 0, 0]
    assert nearest_valid(counts, 2, 9, 8) == 0
    assert nearest_valid(counts, 1, 9, 3) == 8  # a 1 fits into level 8
    env = _env("nearest-valid", [3, 3, 3, 3], capacity=4, sizes=(3,), probs=(1.0,))
    rewards, info, _, _ = _play(env, [0, 3, 1])
    assert rewards == [-1.0, -1.0, -1.0] and env.counts.tolist() == [0, 0, 0, 3]
    assert info["action"] == 0 and info["invalid"]


def test_action_mask_observation_carries_the_mask():
    env = _env("action-mask", [2, 3, 3])
    obs, _, _, _, _ = env.step(0)
    assert obs["real_obs"].tolist() == [0, 0, 1, 0, 0, 0, 0, 0, 0, 3]
    assert obs["action_mask"].tolist() == [1, 0, 1, 0, 0, 0, 0, 0, 0]
    assert env.observation_space.contains(obs)
    base = _env("base", [2, 3])
    obs, _, _, _, _ = base.step(0)
    assert obs.tolist() == [0, 0, 1, 0, 0, 0, 0, 0, 0, 3]


def test_episode_ends_at_the_horizon_and_summed_reward_is_minus_open_waste():
    for variant in ("nearest-valid", "action-mask"):
        for name in ("linear-waste-9", "bounded-waste-100"):
            env = BinPackingEnv(name, horizon=60, variant=variant)
            rng = np.random.default_rng(1)
            _, info = env.reset(seed=5)
            total, steps, done = 0.0, 0, False
            while not done:
                _, reward, terminated, truncated, info = env.step(
                    int(rng.integers(env.problem.capacity)))
                total += reward
                steps += 1
                done = terminated or truncated
                assert not terminated
            assert steps == 60 and truncated and info["step"] == 60
            C = env.problem.capacity
            open_waste = sum(int(n) * (C - k) for k, n in enumerate(env.counts))
            assert total == -open_waste == -info["waste"]
            assert env.counts[0] == 0


def test_seeded_draws_follow_the_distribution():
    a = BinPackingEnv("perfectly-packable-9", horizon=4000)
    b = BinPackingEnv("perfectly-packable-9", horizon=4000)
    a.reset(seed=3)
    b.reset(seed=3)
    items_a = [a.item]
    for _ in range(4000):
        a.step(0)
        b.step(0)
        assert a.item == b.item
        items_a.append(a.item)
    assert set(items_a) == {2, 3}
    assert np.mean(np.array(items_a) == 2) == pytest.approx(0.75, abs=0.03)
    b.reset(seed=4)
    other = [b.item]
    for _ in range(50):
        b.step(0)
        other.append(b.item)
    assert other != items_a[:51]


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"sizes": (2, 3), "probs": (0.5, 0.6)}, "sum to 1"),
    ({"capacity": 9, "sizes": (2, 10), "probs": (0.5, 0.5)}, "sizes must be integers in 1..C"),
    ({"capacity": 1, "sizes": (1,), "probs": (1.0,)}, "at least 2"),
    ({"horizon": 0}, "horizon T must be a positive"),
    ({"horizon": -5}, "horizon T must be a positive"),
    ({"sizes": (2, 3), "probs": (1.0,)}, "one probability per item size"),
    ({"sizes": (2, 3), "probs": (1.5, -0.5)}, "non-negative"),
    ({"variant": "lenient"}, "variant"),
])
def test_bad_problems_are_refused_at_construction(kwargs, message):
    with pytest.raises(WmlabError, match=message):
        BinPackingEnv(**kwargs)


def test_bad_names_and_ids_are_refused_with_clear_messages():
    with pytest.raises(WmlabError, match="unknown bin packing distribution"):
        BinPackingEnv("linear-waste-7")
    with pytest.raises(WmlabError, match="capacity C must be"):
        envs.get_spec("binpacking:capacity=1")
    with pytest.raises(WmlabError, match="sum to 1"):
        envs.make("binpacking:probs=0.5/0.6")
    with pytest.raises(WmlabError, match="not key=value"):
        envs.make_batch("binpacking:colour=red", 1)
    with pytest.raises(WmlabError, match="sizes must be integers"):
        gym.make("wmlab/BinPacking-v0", capacity=5, sizes=(2, 6), probs=(0.5, 0.5))
    with pytest.raises(WmlabError, match="actions are integers in 0..8"):
        _env("base", [2]).step(9)


# --- Gymnasium and wmlab --------------------------------------------------------------------


@pytest.mark.parametrize("gym_id, variant", [("wmlab/BinPacking-v0", "base"),
                                             ("wmlab/BinPackingNearestValid-v0", "nearest-valid"),
                                             ("wmlab/BinPackingActionMask-v0", "action-mask")])
def test_registered_with_gymnasium(gym_id, variant):
    env = gym.make(gym_id, distribution="bounded-waste-9", horizon=30)
    assert env.unwrapped.problem.variant == variant
    check_env(env.unwrapped, skip_render_check=True)
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs) and "full_bags" in info


def test_wmlab_env_frames_spec_and_batch():
    spec = envs.get_spec("binpacking")
    assert (spec.action_kind, spec.action_dim, spec.controller_outputs) == ("discrete", 9, 9)
    wm30 = envs.get_spec("binpacking:capacity=30,distribution=perfectly-packable-100,"
                         "horizon=1000")
    assert (wm30.action_dim, wm30.max_steps) == (30, 1000)
    assert "binpacking" in [s.name for s in envs.list_envs()]
    env = envs.make("binpacking", max_steps=3)
    obs, info = env.reset(seed=2)
    assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8
    assert info["action_mask"][0] == 1 and "counts" in info
    assert env.render().shape[2] == 3 and env.render().shape[0] > 64
    batch = envs.make_batch("binpacking", 2, max_steps=3)
    frames = batch.reset([7, 7])
    np.testing.assert_array_equal(frames[0], frames[1])
    for _ in range(3):
        frames, rewards, terminated, truncated = batch.step(
            spec.to_env_action(np.eye(9, dtype=np.float32)[[0, 4]]))
    assert truncated.all() and not terminated.any()
    base = envs.make_batch("binpacking", 1, variant="base")  # the variant as a make option
    base.reset([0])
    _, rewards, terminated, _ = base.step(np.array([5]))
    assert terminated[0] and rewards[0] == -100.0


def test_collect_binpacking_episodes_into_a_store(tmp_path):
    cfg = load_config("binpacking", "quick", [f"run.root={tmp_path}", "collect.episodes=2",
                                              "collect.workers=1", "env.max_steps=6"])
    summary = collect(cfg, progress=False)
    assert summary.kept_now == 2
    store = EpisodeStore.open(cfg.store_url())
    for episode_id in store.episode_ids():
        episode = store.load(episode_id)
        assert episode.frames.shape == (7, 64, 64, 3)
        assert episode.actions.shape == (6, 9)
        np.testing.assert_array_equal(episode.actions.sum(axis=1), np.ones(6))
        assert episode.meta["env"] == "binpacking" and episode.meta["truncated"]
        assert episode.rewards.sum() <= 0  # minus the waste left in the open bags


def _heuristic_collection(tmp_path, explore):
    cfg = load_config("binpacking", "quick", [
        f"run.root={tmp_path}", "collect.episodes=2", "collect.workers=1",
        "env.name=binpacking:horizon=40", "collect.policy=sum-of-squares",
        f"collect.explore={explore}", "env.max_steps=0"])
    collect(cfg, progress=False)
    store = EpisodeStore.open(cfg.store_url())
    return [store.load(i) for i in store.episode_ids()]


def test_a_heuristic_collects_its_own_moves_mixed_with_random_valid_ones(tmp_path):
    """collect.policy = a heuristic plays its rule on the env's state: replaying the rule on
    the same items gives the recorded moves; with collect.explore some moves are random,
    always valid (no episode ends on a refused move)."""
    problem = problem_from_name("binpacking:horizon=40")
    played = _heuristic_collection(tmp_path / "rule", 0.0)
    for episode in played:
        env = BinPackingEnv(problem=problem)
        env.reset(seed=episode.meta["seed"])
        for action in episode.actions.argmax(axis=1):
            assert action == sum_of_squares(env.counts, env.item, problem.capacity)
            env.step(int(action))
        assert episode.length == 40 and episode.meta["truncated"]
    mixed = _heuristic_collection(tmp_path / "mixed", 0.5)
    departures = 0
    for episode in mixed:
        env = BinPackingEnv(problem=problem)
        env.reset(seed=episode.meta["seed"])
        for action in episode.actions.argmax(axis=1):
            assert valid_mask(env.counts, env.item, problem.capacity)[action]
            departures += action != sum_of_squares(env.counts, env.item, problem.capacity)
            env.step(int(action))
        assert episode.length == 40
    assert 10 <= departures <= 60  # about half of 80 moves drawn at random, some agreeing


def test_a_heuristic_collection_policy_refuses_other_envs():
    from wmlab.collect import collection_policy
    from wmlab.config import ConfigError
    from wmlab.policies import PolicyConfig

    with pytest.raises(ConfigError, match="collect.explore"):  # explore without a heuristic
        load_config("binpacking", "quick", ["collect.explore=0.3"])

    with pytest.raises(WmlabError, match="binpacking envs only"):
        collection_policy(PolicyConfig(name="best-fit"), 1, 3, env_batch=None)
    with pytest.raises(WmlabError, match="binpacking envs only"):
        collection_policy(PolicyConfig(name="best-fit"), 1, 2,
                          env_batch=type("Batch", (), {"envs": [gym.make("CartPole-v1")]})())


# --- drawing --------------------------------------------------------------------------------


@pytest.mark.parametrize("capacity", [9, 30, 100])
def test_drawing_is_deterministic_and_shows_every_level_and_the_item(capacity):
    rng = np.random.default_rng(capacity)
    counts = rng.integers(0, 5, capacity)
    counts[0] = 0
    frame = draw_frame(counts, 3, capacity)
    assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8
    np.testing.assert_array_equal(frame, draw_frame(counts.copy(), 3, capacity))
    seen = {frame.tobytes()}
    for level in range(1, capacity):  # one more bag at any level changes the picture
        more = counts.copy()
        more[level] += 1
        seen.add(draw_frame(more, 3, capacity).tobytes())
    for item in (1, 2, 4):  # and so does the incoming item
        seen.add(draw_frame(counts, item, capacity).tobytes())
    assert len(seen) == 1 + (capacity - 1) + 3


def test_drawn_counts_are_exact_while_small_and_monotone_after():
    frames = [draw_frame(np.array([0, 0, n, 0, 0, 0, 0, 0, 0]), 2, 9) for n in range(0, 600)]
    heights = [int((f[:53, 9] != frames[0][:53, 9]).any(axis=1).sum()) for f in frames]
    assert heights[:LINEAR_COUNTS + 1] == list(range(0, 2 * LINEAR_COUNTS + 1, 2))
    assert np.all(np.diff(heights) >= 0) and heights[-1] == 52 > heights[300]


def test_human_drawing_is_deterministic():
    counts = np.array([0, 0, 3, 1, 0, 0, 0, 0, 2])
    kwargs = {"score": -12.0, "waste": 12, "full_bags": 4, "step": 9, "horizon": 20}
    a = draw_human(counts, 2, 9, **kwargs)
    np.testing.assert_array_equal(a, draw_human(counts, 2, 9, **kwargs))
    assert a.shape[0] > 64 * 4 and not np.array_equal(a, draw_human(counts, 3, 9, **kwargs))


def test_frames_env_is_deterministic_and_changes_with_the_state():
    a, b = envs.make("binpacking"), envs.make("binpacking")
    fa, _ = a.reset(seed=11)
    fb, _ = b.reset(seed=11)
    np.testing.assert_array_equal(fa, fb)
    ga = a.step(0)[0]
    np.testing.assert_array_equal(ga, b.step(0)[0])
    assert not np.array_equal(fa, ga)


# --- baselines ------------------------------------------------------------------------------


def test_heuristics_match_their_definitions():
    counts = np.array([0, 1, 0, 2, 0, 1, 0, 0, 0])
    assert best_fit(counts, 3, 9) == 5  # the fullest bag that takes a 3
    assert best_fit(counts, 9, 9) == 0
    rng = np.random.default_rng(0)
    for _ in range(300):  # sum of squares = the exhaustive minimum of sum N_h^2 afterwards
        C = int(rng.integers(2, 20))
        counts = rng.integers(0, 4, C)
        counts[0] = 0
        item = int(rng.integers(1, C + 1))

        def after(action, counts=counts, item=item, C=C):
            new = counts.copy()
            level = item if action == 0 else action + item
            if action:
                new[action] -= 1
            if level < C:
                new[level] += 1
            return int((new ** 2).sum())

        valid = np.flatnonzero(valid_mask(counts, item, C))
        assert after(sum_of_squares(counts, item, C)) == min(after(a) for a in valid)
        for policy in (best_fit, sum_of_squares, sum_of_squares_orl,
                       make_policy("random", 1)):
            assert policy(counts, item, C) in valid


def test_heuristics_beat_random():
    """Best fit and the ORL benchmark's sum of squares beat random everywhere; the textbook
    sum of squares on the perfectly packable and bounded waste distributions it is designed
    for (on linear waste it does not: see docs/guide/binpacking.md)."""
    for name in DISTRIBUTIONS:
        problem = dataclasses.replace(make_problem(name), horizon=1000)
        episodes = 8 if problem.capacity == 9 else 3
        score = {policy: np.mean([r.ret for r in run_policy(problem, policy, episodes)])
                 for policy in ("best-fit", "sum-of-squares", "sum-of-squares-orl",
                                "random")}
        assert score["best-fit"] > score["random"], name
        assert score["sum-of-squares-orl"] > score["random"], name
        if DISTRIBUTIONS[name].waste != "linear":
            assert score["sum-of-squares"] > score["random"], name


def test_sum_of_squares_waste_growth_perfectly_packable_vs_linear():
    def mean_waste(name, horizon):
        problem = dataclasses.replace(make_problem(name), horizon=horizon)
        return np.mean([r.waste for r in run_policy(problem, "sum-of-squares", 6)])

    packable = mean_waste("perfectly-packable-9", 5000) / mean_waste("perfectly-packable-9", 500)
    linear = mean_waste("linear-waste-9", 5000) / mean_waste("linear-waste-9", 500)
    assert packable < 5 < 7 < linear < 13  # ~sqrt(10) against ~10


def test_baseline_rows_and_cli(tmp_path, capsys):
    rows = evaluate("best-fit", problems_for("binpacking", ["bounded-waste-9"], 40), 3)
    assert len(rows) == 1 and rows[0].episodes == 3 and rows[0].horizon == 40
    assert rows[0].mean == pytest.approx(np.mean(rows[0].returns))
    out = tmp_path / "baseline.json"
    assert main(["baseline", "binpacking", "--policy", "sum-of-squares", "--episodes", "2",
                 "--horizon", "30", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert [row["distribution"] for row in data] == list(DISTRIBUTIONS)
    assert all(len(row["returns"]) == 2 and row["horizon"] == 30 for row in data)
    assert all(name in printed for name in DISTRIBUTIONS) and "+-" in printed
    assert main(["baseline", "binpacking:capacity=12,sizes=2/5,probs=0.4/0.6,horizon=20",
                 "--policy", "random", "--episodes", "1"]) == 0
    assert main(["baseline", "binpacking", "--episodes", "1", "--horizon", "0"]) == 2
    assert "horizon T must be a positive" in capsys.readouterr().err


def test_problem_from_name_custom_and_named():
    p = problem_from_name("binpacking:capacity=12,sizes=2/5,probs=0.4/0.6,horizon=20,"
                          "variant=base")
    assert (p.capacity, p.sizes, p.probs, p.horizon, p.variant) == (12, (2, 5), (0.4, 0.6),
                                                                    20, "base")
    q = problem_from_name("binpacking:distribution=bounded-waste-100")
    assert (q.capacity, q.horizon) == (100, 10000) and q.variant == "action-mask"


def test_env_batch_exposes_the_action_mask_and_c_chooses_only_valid_actions():
    from wmlab.envs import make_batch

    with make_batch("binpacking", 2) as batch:
        batch.reset([1, 2])
        capacity = batch.spec.controller_outputs
        # no bag is open yet: only "open a new bag" (0) is valid
        assert batch.masks.shape == (2, capacity)
        assert batch.masks[:, 0].all() and not batch.masks[:, 1:].any()
        raw = np.full((2, capacity), -1.0, dtype=np.float32)
        raw[:, 5] = 1.0  # C prefers level 5, which holds no bag
        assert batch.spec.to_env_action(raw, batch.masks).tolist() == [0, 0]
        batch.step(np.zeros(2, dtype=np.int64))
        # one bag now sits at the first item's level: valid exactly where the env says
        for env, mask in zip(batch.envs, batch.masks, strict=True):
            assert mask.tolist() == [bool(v) for v in env.unwrapped.mask]


def test_tiny_pipeline_reports_the_agent_beside_the_baselines(tmp_path):
    from wmlab.config import load_config
    from wmlab.pipeline import Pipeline

    cfg = load_config("binpacking", "quick", [
        f"run.root=\"{tmp_path}\"", "collect.workers=1", "collect.episodes=2",
        "env.max_steps=30", "vae.z_dim=4", "vae.epochs=1", "vae.batch_size=16",
        "mdrnn.hidden=8", "mdrnn.steps=4", "mdrnn.batch_size=2", "mdrnn.seq_len=10",
        "mdrnn.initial_z=2", "mdrnn.calibration_episodes=0", "dream.max_steps=30",
        "es.population=4", "es.rollouts=1", "es.generations=1", "es.eval_every=1",
        "es.eval_rollouts=2", "es.engine=\"serial\"", "eval.episodes=3"])
    results = Pipeline(cfg, progress=False, log=lambda _: None).run()
    assert {r.status for r in results} == {"ran"}
    run = tmp_path / "binpacking-quick"
    agent = json.loads((run / "eval/eval-python.json").read_text())
    for policy in ("best-fit", "sum-of-squares", "sum-of-squares-orl"):
        row = json.loads((run / f"eval/baseline-{policy}.json").read_text())
        assert row["seeds"] == agent["seeds"]  # the same items as the agent
        assert all(-30 <= r <= 0 for r in row["returns"])
    report = (run / "report.md").read_text()
    assert "best-fit heuristic" in report and "-104.5" in report


def test_best_profile_scores_each_level_ahead_on_common_items():
    """Issue 29's profile: the look-ahead C on wm30, every member on the same item
    sequences, and an iteration 2 that continues V, M and C."""
    from unittest import mock

    from wmlab.config import load_config
    from wmlab.pipeline import iteration_config

    cfg = load_config("binpacking", "best")
    assert cfg.controller.lookahead and cfg.es.common_seeds and cfg.es.fitness == "real"
    assert "capacity=30" in cfg.env.name and cfg.mdrnn.reward_head
    cfg.run.name = "/nowhere/best"
    with mock.patch("wmlab.checkpoint.checkpoint_exists", return_value=True):
        later = iteration_config(cfg, 2)
    assert later.vae.epochs == 0 and later.collect.agent_fraction > 0
    assert later.es.init_from.endswith("/controller") and later.controller.lookahead
