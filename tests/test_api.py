"""The public Python API (``import wmlab``): what it exports, that it loads lazily, and that
an agent loaded through it acts as the evaluation's rollouts do."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import wmlab
from agent_fixtures import Z_DIM, make_run
from wmlab.checkpoint import save_checkpoint
from wmlab.controller import BEST_WEIGHTS, controller_shape, shape_info
from wmlab.runs import RunLayout, prepare_run_dir


def test_the_public_names_resolve_and_nothing_else_does():
    from wmlab.agent import Agent
    from wmlab.config import load_config
    from wmlab.pipeline import Pipeline

    assert wmlab.Agent is Agent and wmlab.Pipeline is Pipeline
    assert wmlab.load_config is load_config
    assert {"Agent", "DreamEnv", "Pipeline", "load_config", "make_env",
            "available_pretrained"} <= set(dir(wmlab)) and set(wmlab.__all__) <= set(dir(wmlab))
    assert {"carracing", "doom"} <= set(wmlab.available_pretrained())
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        wmlab.nothing  # noqa: B018


def test_importing_wmlab_does_not_load_torch():
    code = "import sys, wmlab; assert 'torch' not in sys.modules; wmlab.Agent; " \
           "assert 'torch' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def _trained_run(tmp_path):
    cfg = make_run(tmp_path, overrides=("env.max_steps=40",))
    shape = controller_shape("zch", Z_DIM, 16, 1, bias=False)
    params = np.random.default_rng(3).normal(0, 1.0, shape.num_params)
    save_checkpoint(RunLayout.of(cfg).controller, BEST_WEIGHTS, 1,
                    {"params": torch.as_tensor(params, dtype=torch.float32)}, None,
                    {**shape_info(shape, "zch"), "generation": 1})
    prepare_run_dir(cfg)
    return cfg, params


def test_an_agent_loaded_by_path_plays_one_env_as_the_batched_rollouts_do(tmp_path):
    from wmlab.agent import run_real, workload_from_config
    from wmlab.envs import make_batch

    cfg, params = _trained_run(tmp_path)
    agent = wmlab.Agent.load(RunLayout.of(cfg).root)
    env = wmlab.make_env("doom", max_steps=40)
    total = []
    for seed in (11, 12):
        frame, _ = env.reset(seed=seed)
        agent.reset(seed=seed)
        done, score = False, 0.0
        while not done:
            frame, reward, terminated, truncated, _ = env.step(agent.act(frame))
            score, done = score + reward, terminated or truncated
        total.append(score)
    env.close()
    models = workload_from_config(cfg, "real").load()
    batch = make_batch("doom", 2, None, max_steps=40)
    batched = run_real(models, batch, params[None], np.array([[11, 12]]))
    batch.close()
    assert total == batched[0].tolist()
    with pytest.raises(wmlab.WmlabError, match="neither a shipped agent"):
        wmlab.Agent.load(str(tmp_path / "nowhere"))


def test_the_dream_env_of_a_run(tmp_path):
    cfg, _ = _trained_run(tmp_path)
    env = wmlab.DreamEnv.load(RunLayout.of(cfg).root, num_envs=3)
    obs, _ = env.reset(seed=4)
    assert obs.shape == (3, Z_DIM + 2 * 16)  # Doom's C reads [z, c, h]
    obs, reward, terminated, truncated, _ = env.step(np.zeros((3, 1), np.float32))
    assert obs.shape == (3, Z_DIM + 32) and reward.shape == (3,)
    assert env.dream.settings.tau == cfg.dream.tau  # the dream C trains in
