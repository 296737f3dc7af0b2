"""The Doom agent shipped inside the package: it loads offline, has the paper's sizes,
drives a real ViZDoom episode, and its recorded score is the one docs/results/doom.md gives."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from safetensors.torch import load_file

from wmlab.evaluate import evaluate_controller
from wmlab.pretrained import agent_folder, available, materialize, read_metadata

DOCS = Path(__file__).resolve().parents[1] / "docs" / "results" / "doom.md"
# The paper's sizes (SPEC.md): V 4,446,915 for Doom's 64-d z; M 1,680,833 in PyTorch's
# two-bias LSTM form (1,678,785 single-bias); C 1,088 = (64 + 512 + 512) x 1, no bias.
DOOM_SIZES = {"vision": 4_446_915, "memory": 1_680_833, "controller": 1_088}


@pytest.fixture()
def shipped(monkeypatch):
    monkeypatch.delenv("WMLAB_PRETRAINED_PATH", raising=False)  # the package's own folder
    return read_metadata("doom")


def test_doom_agent_is_shipped_small_with_the_papers_sizes(shipped):
    assert "doom" in available()
    assert shipped["parameters"] == DOOM_SIZES
    assert shipped["preset"] == "doom" and shipped["profile"] == "budget"
    folder = agent_folder("doom")
    total = sum(p.stat().st_size for p in folder.iterdir())
    assert total <= 15 * 1024 * 1024  # the budget for the package
    counted = {}
    for path in folder.glob("*.safetensors"):
        tensors = load_file(str(path))
        counted[path.stem] = sum(t.numel() for t in tensors.values())
    assert DOOM_SIZES["vision"] in counted.values()
    assert DOOM_SIZES["memory"] in counted.values()


def test_recorded_score_is_the_one_in_the_results_page(shipped):
    score = shipped["score"]
    assert score["episodes"] == 100 and score["where"] == "real"
    assert len(score["returns"]) == 100
    text = DOCS.read_text()
    found = re.search(r"shipped agent[^\n]*?([\d,]+\.\d) \+- ([\d,]+\.\d) over (\d+) real",
                      text)
    assert found, "docs/results/doom.md must state the shipped agent's recorded score"
    mean, std, episodes = (float(found[1].replace(",", "")), float(found[2].replace(",", "")),
                           int(found[3]))
    assert (mean, std, episodes) == (round(score["mean"], 1), round(score["std"], 1),
                                     score["episodes"])


def test_shipped_agent_plays_a_real_doom_episode(shipped, tmp_path, one_thread):
    cfg = materialize("doom", runs_root=str(tmp_path), overrides=[
        "env.max_steps=60", 'es.engine="serial"'], recorded_protocol=False)
    result = evaluate_controller(cfg, episodes=2, out=str(tmp_path / "eval.json"))
    assert result.episodes == 2 and result.env == "doom" and result.backend == "vizdoom"
    # each episode ran to its end: death (fewer steps) or the 60-step cap
    assert all(1 <= r <= 60 for r in result.returns)
