"""env.action_repeat: each action held for k env frames, on every env and through every stage
that steps one (collection, C's rollouts, the evaluation, the dream's survival reward)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from test_dream import constant_heads, make_model, starts
from wmlab import envs
from wmlab.agent import workload_from_config
from wmlab.collect import collect
from wmlab.config import load_config
from wmlab.data import EpisodeStore
from wmlab.dream import BatchedDream, DreamSettings
from wmlab.envs.repeat import ActionRepeat, RepeatedBatch, agent_steps
from wmlab.errors import WmlabError
from wmlab.evaluate import evaluate_random_policy
from wmlab.pipeline.engine import config_slice


def _frames_of(seeds, frames, action=0):
    """Every frame of plain (repeat 1) Doom batches: obs, rewards and end flags per frame."""
    with envs.make_batch("doom", len(seeds), max_steps=frames) as batch:
        batch.reset(seeds)
        steps = [batch.step(np.full(len(seeds), action)) for _ in range(frames)]
    return [np.stack(part) for part in zip(*steps, strict=True)]  # each (frames, B, ...)


def test_a_repeated_step_is_k_plain_steps_summed_and_stops_where_the_episode_ends():
    seeds, frames, k = [5, 6, 7], 400, 3
    obs, rewards, terminated, truncated = _frames_of(seeds, frames)
    ended = terminated | truncated
    end = [int(np.flatnonzero(ended[:, i])[0]) for i in range(len(seeds))]  # frame index
    assert len(set(end)) > 1  # the players die at different frames
    assert any(e % k != k - 1 for e in end)  # and some of them within a repeated step
    with envs.make_batch("doom", len(seeds), max_steps=frames, action_repeat=k) as batch:
        assert isinstance(batch, RepeatedBatch) and batch.num_envs == 3
        first = batch.reset(seeds)
        assert first.shape == (3, 64, 64, 3)
        for t in range(agent_steps(frames, k)):
            got_obs, got_rewards, got_terminated, got_truncated = batch.step(np.zeros(3, int))
            for i, last in enumerate(end):
                frame = min(k * t + k - 1, last)  # the step's last frame, or the episode's
                np.testing.assert_array_equal(got_obs[i], obs[frame, i])
                expected = rewards[k * t:min(k * t + k, last + 1), i].sum() if k * t <= last \
                    else 0.0
                assert got_rewards[i] == pytest.approx(expected)
                assert got_terminated[i] == terminated[frame, i]
                assert got_truncated[i] == truncated[frame, i]
            if (got_terminated | got_truncated).all():
                break
        assert t == max(end) // k  # the batch is done at the step holding the last frame


def test_one_env_repeats_too_and_bad_values_are_refused_in_one_line():
    env = envs.make("doom", max_steps=5, action_repeat=2)
    try:
        assert isinstance(env, ActionRepeat)
        env.reset(seed=3)
        steps = [env.step(0)[1:4] for _ in range(3)]
        assert [reward for reward, _, _ in steps] == [2.0, 2.0, 1.0]  # 5 frames, +1 each
        assert steps[-1][2] and not steps[1][2]
    finally:
        env.close()
    assert not isinstance(envs.make_batch("doom", 1), RepeatedBatch)
    for bad in (0, -1, True, 2.5, "2", 65):
        with pytest.raises(WmlabError, match="action_repeat must be an integer") as err:
            envs.make_batch("doom", 1, action_repeat=bad)
        assert "\n" not in str(err.value)
    with pytest.raises(WmlabError, match="env.action_repeat"):
        load_config("doom", "quick", ["env.action_repeat=0"])
    assert envs.env_options(0, 1) == {}
    assert envs.env_options(30, 2) == {"max_steps": 30, "action_repeat": 2}


def _doom_cfg(tmp_path, episodes, *extra):
    return load_config("doom", "quick", [
        f"run.root={tmp_path}", f"collect.episodes={episodes}", "collect.workers=1",
        "collect.min_length=0", "env.max_steps=60", *extra])


def test_collection_stores_the_agents_steps_and_refuses_to_mix_repeats(tmp_path):
    cfg = _doom_cfg(tmp_path, 3, "env.action_repeat=2")
    collect(cfg, progress=False)
    store = EpisodeStore.open(cfg.store_url())
    assert store.manifest.action_repeat == 2
    for episode_id in store.episode_ids():
        episode = store.load(episode_id)
        steps = len(episode.rewards)
        assert steps <= 30 and episode.frames.shape[0] == steps + 1
        # +1 a frame alive: 2 a step, but for the last step of an episode that ends within it
        assert np.all(episode.rewards[:-1] == 2.0) and episode.rewards[-1] in (1.0, 2.0)
    every_frame = _doom_cfg(tmp_path, 4)
    with pytest.raises(WmlabError, match="action repeat"):
        collect(every_frame, progress=False)
    assert len(EpisodeStore.open(cfg.store_url()).episode_ids()) == 3
    # a store of every frame says nothing new, and reads as before
    plain = _doom_cfg(tmp_path / "plain", 1)
    collect(plain, progress=False)
    manifest = json.loads(Path(f"{plain.store_url()}/store.json").read_text())
    assert "action_repeat" not in manifest
    assert EpisodeStore.open(plain.store_url()).manifest.action_repeat == 1


def test_the_dream_pays_each_step_alive_its_frames(tmp_path):
    cfg = load_config("doom", "quick", [f"run.root={tmp_path}", "env.action_repeat=4"])
    settings = DreamSettings.from_config(cfg)
    assert settings.alive_reward == 4.0
    assert DreamSettings.from_config(load_config("doom", "quick")).alive_reward == 1.0
    # identity (the fingerprints) keeps dreams of every frame as they were
    assert "alive_reward" not in DreamSettings(1.0, 10).identity()
    assert settings.identity()["alive_reward"] == 4.0
    model = constant_heads(make_model(), done=-5.0)  # never dies: runs to the cap
    dream = BatchedDream(model, starts(), DreamSettings(1.0, 25, alive_reward=4.0))
    returns, lengths = dream.rollout(lambda d: torch.zeros(d.batch, 1), np.arange(3))
    assert np.all(lengths == 25) and np.all(returns == 100.0)


def test_rollouts_and_evaluations_carry_the_repeat(tmp_path):
    cfg = load_config("doom", "quick", [f"run.root={tmp_path}", "env.action_repeat=2",
                                        "env.max_steps=40"])
    workload = workload_from_config(cfg, "real")
    assert workload.action_repeat == 2
    assert workload.env_options() == {"max_steps": 40, "action_repeat": 2}
    assert config_slice(cfg, ("env",))["env.action_repeat"] == 2
    assert "env.action_repeat" not in config_slice(load_config("doom", "quick"), ("env",))
    out = str(tmp_path / "noop.json")
    result = evaluate_random_policy(cfg, episodes=2, policy="noop", out=out)
    assert result.extra["action_repeat"] == 2
    assert all(length <= 20 for length in result.extra["lengths"])
    # the same seeds at every frame: the saved result is not taken for this one
    plain = load_config("doom", "quick", [f"run.root={tmp_path}", "env.max_steps=40"])
    again = evaluate_random_policy(plain, episodes=2, policy="noop", out=out, reuse=True)
    assert "action_repeat" not in again.extra
    assert again.returns == pytest.approx(result.returns)  # Doom pays +1 a frame either way
    assert max(again.extra["lengths"]) > max(result.extra["lengths"])


def test_a_controller_trains_in_the_dream_and_plays_the_game_k_frames_an_action(tmp_path):
    from agent_fixtures import make_run
    from wmlab.agent import Agent
    from wmlab.config import with_overrides
    from wmlab.evaluate import evaluate_controller
    from wmlab.pipeline.controller_stage import train_controller

    cfg = make_run(tmp_path, overrides=("env.action_repeat=2", "env.max_steps=40",
                                        "es.population=8", "es.rollouts=2",
                                        "es.generations=2", "es.eval_every=2",
                                        "es.eval_rollouts=2", "dream.max_steps=30"))
    with pytest.raises(WmlabError, match="set dream.max_steps=20"):
        train_controller(cfg, progress=False)
    cfg = with_overrides(cfg, ["dream.max_steps=20"])
    assert train_controller(cfg, progress=False).generation == 2
    assert Agent.of_run(cfg).action_repeat == 2
    result = evaluate_controller(cfg, episodes=2)
    assert result.extra["action_repeat"] == 2
    # 40 frames at most, 2 a step: the returns count frames alive, the lengths steps
    assert all(length <= 20 for length in result.extra["lengths"])
    assert all(r == 2 * n or r == 2 * n - 1
               for r, n in zip(result.returns, result.extra["lengths"], strict=True))
