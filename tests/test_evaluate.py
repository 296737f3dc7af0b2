"""`wmlab evaluate` and `train-controller`: the protocol on the real game, and bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from agent_fixtures import Z_DIM, make_run
from wmlab.checkpoint import save_checkpoint
from wmlab.cli import main
from wmlab.controller import controller_shape, shape_info
from wmlab.errors import WmlabError
from wmlab.es import BEST_WEIGHTS, controller_dir
from wmlab.evaluate import episode_rows, eval_dir, evaluate_controller

EVAL = ("env.max_steps=12", "eval.episodes=3", "eval.seed=500")


def _save_controller(cfg, params: np.ndarray, z_dim: int = Z_DIM, hidden: int = 16) -> None:
    shape = controller_shape("zch", z_dim, hidden, 1, bias=False)
    save_checkpoint(controller_dir(cfg), BEST_WEIGHTS, 1,
                    {"params": torch.as_tensor(params, dtype=torch.float32)}, None,
                    {**shape_info(shape, "zch"), "generation": 1})


def test_evaluate_real_doom_writes_every_episode(tmp_path):
    cfg = make_run(tmp_path, overrides=EVAL)
    params = np.random.default_rng(0).normal(0, 1.0, Z_DIM + 32)
    _save_controller(cfg, params)
    video = tmp_path / "episode.gif"
    result = evaluate_controller(cfg, video=str(video))
    assert result.episodes == 3 and result.seeds == [500, 501, 502]
    assert result.backend == "vizdoom" and result.where == "real"
    path = f"{eval_dir(cfg)}/eval-vizdoom.json"
    saved = json.loads(Path(path).read_text())
    assert saved["returns"] == result.returns and len(saved["returns"]) == 3
    assert all(1 <= r <= 12 for r in saved["returns"])
    assert saved["mean"] == pytest.approx(np.mean(saved["returns"]))
    assert saved["std"] == pytest.approx(np.std(saved["returns"]))
    assert video.read_bytes()[:6] in (b"GIF89a", b"GIF87a")
    # Same seeds, same controller: the same returns (fixed, recorded protocol).
    again = evaluate_controller(cfg, out=str(tmp_path / "again.json"))
    assert again.returns == result.returns


def test_evaluate_in_the_dream_and_through_the_cli(tmp_path, capsys):
    cfg = make_run(tmp_path, overrides=EVAL)
    params = np.zeros(Z_DIM + 32)
    params[:Z_DIM], params[Z_DIM:] = 1.0, 2.0  # keeps moving right: survives the dream
    _save_controller(cfg, params)
    code = main(["evaluate", "--preset", "doom", "--profile", "quick", "--run", "r",
                 "--set", f"run.root={tmp_path}", "--set", "es.engine=serial",
                 "--set", "dream.max_steps=20", "--set", "dream.done=threshold",
                 "--episodes", "4", "--dream"])
    assert code == 0
    assert "20.0 +- 0.0 over 4 episodes" in capsys.readouterr().out
    saved = json.loads(Path(eval_dir(cfg), "eval-dream.json").read_text())
    assert saved["returns"] == [20.0] * 4 and saved["tau"] == cfg.dream.tau


def test_controller_of_another_shape_is_refused(tmp_path):
    cfg = make_run(tmp_path, overrides=EVAL)
    _save_controller(cfg, np.zeros(64 + 1024), z_dim=64, hidden=512)
    with pytest.raises(WmlabError, match="does not fit this run's V, M"):
        evaluate_controller(cfg)
    assert not os.path.exists(eval_dir(cfg))


def test_bad_episode_counts_and_ray_address_are_refused(tmp_path, capsys):
    cfg = make_run(tmp_path, overrides=EVAL)
    _save_controller(cfg, np.zeros(Z_DIM + 32))
    for bad in (0, -3):
        with pytest.raises(WmlabError, match="positive integer"):
            evaluate_controller(cfg, episodes=bad)
    assert not os.path.exists(eval_dir(cfg))
    base = ["--preset", "doom", "--profile", "quick", "--run", "r", "--set",
            f"run.root={tmp_path}"]
    assert main(["evaluate", *base, "--episodes", "0"]) == 2
    assert "--episodes must be at least 1" in capsys.readouterr().err
    pytest.importorskip("ray")
    assert main(["train-controller", *base, "--ray-address", "127.0.0.1:1",
                 "--no-progress"]) == 2
    assert "does not answer" in capsys.readouterr().err
    assert not os.path.exists(f"{controller_dir(cfg)}/es-state.pkl")
    assert not os.path.exists(f"{tmp_path}/r/config.toml")


def test_train_controller_cli_runs_and_resumes(tmp_path, capsys):
    base = ["train-controller", "--preset", "doom", "--profile", "quick", "--run", "r",
            "--set", f"run.root={tmp_path}", "--set", "es.engine=serial",
            "--set", "es.population=4", "--set", "es.rollouts=1", "--set", "es.eval_every=2",
            "--set", "es.eval_rollouts=2", "--set", "dream.max_steps=10", "--no-progress"]
    make_run(tmp_path)
    assert main([*base, "--generations", "2"]) == 0
    assert main([*base, "--generations", "3"]) == 0
    out = capsys.readouterr().out
    assert "3 generations (resumed at 2)" in out
    assert os.path.exists(f"{tmp_path}/r/controller/progress.png")


def test_episode_rows_keep_every_seed_once():
    rows = episode_rows(10, 100)
    assert rows.shape == (10, 10) and rows.ravel().tolist() == list(range(10, 110))
    assert episode_rows(0, 7).shape == (1, 7)
