"""The agents shipped inside the package: each loads offline, has the paper's sizes, drives a
real episode, and its recorded score is the one its results page (docs/results/) gives."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from safetensors.torch import load_file

from wmlab.evaluate import evaluate_controller
from wmlab.shipped import agent_folder, available, materialize, read_metadata

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


@dataclass(frozen=True)
class Shipped:
    name: str
    profile: str
    backend: str  # where its recorded score and the test episode are played
    sizes: dict[str, int]  # parameters per file: the paper's (SPEC.md) plus any heads added


AGENTS = {
    # V 4,446,915 for Doom's 64-d z; M 1,680,833 in PyTorch's two-bias LSTM form (1,678,785
    # single-bias); C 1,088 = (64 + 512 + 512) x 1, no bias.
    "doom": Shipped("doom", "shield", "vizdoom",
                    {"vision": 4_446_915, "memory": 1_680_833, "controller": 1_088}),
    # V 4,348,547 for a 32-d z; C 867 = (32 + 256) x 3 + 3. M is the paper's LSTM 256 with a
    # mixture of 5 (423,392 in two-bias form) plus the reward and done heads the dream needs
    # (257 each), so the same M serves a C trained in the dream.
    "carracing": Shipped("carracing", "solve", "gymnasium",
                         {"vision": 4_348_547, "memory": 423_392 + 2 * 257,
                          "controller": 867}),
}


@pytest.fixture(params=sorted(AGENTS))
def shipped(request, monkeypatch):
    monkeypatch.delenv("WMLAB_PRETRAINED_PATH", raising=False)  # the package's own folder
    agent = AGENTS[request.param]
    return agent, read_metadata(agent.name)


def test_agent_is_shipped_small_with_the_papers_sizes(shipped):
    agent, metadata = shipped
    assert agent.name in available()
    assert metadata["parameters"] == agent.sizes
    assert metadata["preset"] == agent.name and metadata["profile"] == agent.profile
    folder = agent_folder(agent.name)
    total = sum(p.stat().st_size for p in folder.iterdir())
    assert total <= 15 * 1024 * 1024  # the budget an agent may add to the package
    counted = {}
    for path in folder.glob("*.safetensors"):
        tensors = load_file(str(path))
        counted[path.stem] = sum(t.numel() for t in tensors.values())
    assert counted["vision"] == agent.sizes["vision"]
    assert counted["memory"] == agent.sizes["memory"]


def test_recorded_score_is_the_one_in_the_results_page(shipped):
    agent, metadata = shipped
    score = metadata["score"]
    assert score["episodes"] == 100 and score["where"] == "real"
    assert score["backend"] == agent.backend
    assert len(score["returns"]) == 100
    text = (RESULTS / f"{agent.name}.md").read_text()
    found = re.search(r"shipped agent[^\n]*?(-?[\d,]+\.\d) \+- ([\d,]+\.\d) over (\d+) real",
                      text)
    assert found, f"docs/results/{agent.name}.md must state the shipped agent's recorded score"
    mean, std, episodes = (float(found[1].replace(",", "")), float(found[2].replace(",", "")),
                           int(found[3]))
    assert (mean, std, episodes) == (round(score["mean"], 1), round(score["std"], 1),
                                     score["episodes"])


def test_shipped_agent_plays_a_real_episode(shipped, tmp_path, one_thread):
    agent, _ = shipped
    cfg = materialize(agent.name, runs_root=str(tmp_path), overrides=[
        "env.max_steps=60", 'es.engine="serial"', f'eval.backend="{agent.backend}"'],
        recorded_protocol=False)
    # a run of its own: no path into the machine it was trained on, one iteration
    assert (cfg.vae.init_from, cfg.mdrnn.init_from, cfg.es.init_from) == ("", "", "")
    assert cfg.run.iterations == 1 and cfg.run.later == []
    result = evaluate_controller(cfg, episodes=2, out=str(tmp_path / "eval.json"))
    assert result.episodes == 2 and result.env == agent.name
    assert result.backend == agent.backend
    if agent.name == "doom":
        # each episode ran to its end: death (fewer steps) or the 60-step cap
        assert all(1 <= r <= 60 for r in result.returns)
    else:
        # CarRacing: -0.1 a frame plus 1000/N per tile; in 60 frames (the first ~50 are the
        # zoom-in) a car that drives reaches a few tiles, one that stands still loses 6
        assert all(-6.1 <= r <= 60 for r in result.returns)
