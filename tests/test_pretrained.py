"""Pretrained agents: export a tiny real Doom run, ship it, use it through evaluate / play /
dream exactly as a run, and reproduce its recorded score."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from wmlab.cli import main
from wmlab.config import load_config
from wmlab.errors import WmlabError
from wmlab.pipeline import Pipeline

# A tiny but real run: real ViZDoom episodes, V, M and a dream-trained C; episodes capped
# at 120 steps so that some end by death and returns differ between seeds.
TINY_DOOM = [
    "collect.workers=1", "collect.min_length=0", "collect.episodes=3",
    "vae.z_dim=8", "vae.epochs=1", "vae.batch_size=16", "vae.max_frames=96",
    "mdrnn.hidden=16", "mdrnn.steps=6", "mdrnn.batch_size=2", "mdrnn.seq_len=10",
    "mdrnn.checkpoint_every=2", "mdrnn.initial_z=4", "mdrnn.calibration_episodes=2",
    "mdrnn.calibration_real_episodes=2", "es.population=4", "es.rollouts=2", "es.generations=1", "es.eval_every=1",
    "es.eval_rollouts=2", 'es.engine="serial"', "env.max_steps=120", "dream.max_steps=30",
]
EPISODES = 4


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("runs")
    cfg = load_config("doom", "quick", [f'run.root="{root}"', *TINY_DOOM])
    Pipeline(cfg, progress=False, log=lambda _: None).run(until="controller")
    return cfg


@pytest.fixture(scope="module")
def shipped(tiny_run, tmp_path_factory):
    """The tiny run exported as 'tiny' and scored on EPISODES real episodes."""
    from wmlab.pretrained import evaluate_and_record
    from wmlab.shipped import export_agent

    agents = tmp_path_factory.mktemp("agents")
    exported = export_agent(tiny_run.run_dir(), "tiny", agents)
    scored = evaluate_and_record("tiny", EPISODES, source=tiny_run.run_dir(), root=agents,
                                 overrides=['es.engine="serial"'])
    return agents, exported, scored


@pytest.fixture
def use_agents(shipped, monkeypatch, tmp_path):
    agents = shipped[0]
    monkeypatch.setenv("WMLAB_PRETRAINED_PATH", str(agents))
    monkeypatch.chdir(tmp_path)  # materialized runs go to ./runs
    return agents


def test_another_cpu_is_judged_by_the_paired_difference_until_it_records_its_returns(
        shipped, monkeypatch, tmp_path, capsys):
    """Episodes depend on the CPU's last bits: a CPU without a record gets a statistical
    verdict, and once it records its returns they reproduce exactly there."""
    import shutil

    agents = tmp_path / "agents"
    shutil.copytree(shipped[0], agents)  # the module's agents stay as recorded
    monkeypatch.setenv("WMLAB_PRETRAINED_PATH", str(agents))
    monkeypatch.chdir(tmp_path)
    recorded = json.loads((agents / "tiny" / "metadata.json").read_text())["score"]
    assert recorded["machine"]["model"]  # the score names the CPU it was measured on
    monkeypatch.setattr("wmlab.shipped.cpu_description",
                        lambda: {"model": "Other CPU", "cores": 2, "flags": ["avx2"]})

    assert main(["evaluate", "--pretrained", "tiny", "--engine", "serial"]) == 0
    out = capsys.readouterr().out
    assert "this CPU (Other CPU) has no record: paired difference +0.0 +- 0.0" in out
    assert f"({EPISODES} identical), within 2 standard errors" in out

    assert main(["evaluate", "--pretrained", "tiny", "--engine", "serial",
                 "--record-machine"]) == 0
    score = json.loads((agents / "tiny" / "metadata.json").read_text())["score"]
    assert [m["machine"]["model"] for m in score["other_machines"]] == ["Other CPU"]
    assert score["returns"] == recorded["returns"]  # the first record is kept as it was
    capsys.readouterr()
    assert main(["evaluate", "--pretrained", "tiny", "--engine", "serial"]) == 0
    assert "recorded score on this CPU" in capsys.readouterr().out

    # a record that this CPU no longer matches says so, beyond the noise
    score["other_machines"][0]["returns"] = [r + 100.0 + i for i, r in
                                             enumerate(score["returns"])]
    score["other_machines"][0]["mean"] += 101.5
    meta = json.loads((agents / "tiny" / "metadata.json").read_text())
    meta["score"] = score
    (agents / "tiny" / "metadata.json").write_text(json.dumps(meta))
    assert main(["evaluate", "--pretrained", "tiny", "--engine", "serial"]) == 0
    assert "differs by -101.500" in capsys.readouterr().out
    assert main(["evaluate", "--pretrained", "tiny", "--dream", "--record-machine"]) == 2
    assert "--record-machine keeps" in capsys.readouterr().err
    assert main(["evaluate", "--pretrained", "tiny", "--episodes", "2",
                 "--record-machine"]) == 2
    assert "leave out --episodes" in capsys.readouterr().err


def test_export_writes_compact_weights_with_sha256_counts_and_metadata(tiny_run, shipped):
    from wmlab.controller import controller_shape
    from wmlab.envs import get_spec
    from wmlab.memory.model import count_parameters, load_mdrnn
    from wmlab.vision.model import load_vae

    agents, metadata, _ = shipped
    folder = agents / "tiny"
    for file, entry in metadata["files"].items():
        data = (folder / file).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert len(data) == entry["bytes"]
    vision = load_file(folder / "vision.safetensors")
    memory = load_file(folder / "memory.safetensors")
    starts = load_file(folder / "initial_z.safetensors")
    controller = load_file(folder / "controller.safetensors")
    assert {t.dtype for t in [*vision.values(), *memory.values(), *starts.values()]} == \
        {torch.float16}
    assert controller["params"].dtype == torch.float32
    # the counts are those of the run's own models
    run = tiny_run.run_dir()
    vae, _ = load_vae(f"{run}/vision")
    mdrnn, _ = load_mdrnn(f"{run}/memory")
    shape = controller_shape(tiny_run.controller.inputs, 8, 16,
                             get_spec("doom").controller_outputs,
                             tiny_run.controller.hidden, tiny_run.controller.bias)
    assert metadata["parameters"] == {"vision": count_parameters(vae),
                                      "memory": count_parameters(mdrnn),
                                      "controller": shape.num_params}
    assert controller["params"].numel() == shape.num_params
    # float16 rounding of V's weights is small, and nothing had to stay float32
    assert 0 < metadata["float16_rounding"]["max_abs_error"]["vision"] < 1e-3
    assert metadata["float16_rounding"]["kept_float32"]["vision"] == []
    assert metadata["size_bytes"] < 0.6 * 4 * (metadata["parameters"]["vision"]
                                               + metadata["parameters"]["memory"])
    assert (metadata["env"], metadata["preset"], metadata["profile"]) == \
        ("doom", "doom", "quick")
    assert metadata["data"]["episodes"] == 3 and metadata["data"]["frames"] > 3
    assert metadata["seeds"] == {"run": 0, "collect": 0, "eval": tiny_run.eval.seed}
    assert set(metadata["stages"]) >= {"collect", "vision", "memory", "controller"}
    assert metadata["score"] is None
    assert (folder / "config.toml").read_text().startswith('preset = "doom"')


def test_recorded_score_is_reproduced_through_the_cli(shipped, use_agents, capsys):
    _, _, scored = shipped
    score = scored["score"]
    assert score["episodes"] == EPISODES and score["backend"] == "vizdoom"
    assert score["first_seed"] == 1_000_000 and score["max_steps"] == 120
    assert np.isclose(score["mean"], np.mean(score["returns"]))
    assert len(set(score["returns"])) > 1  # real episodes of different lengths
    # float16 V and M score what the run's float32 weights score, episode for episode
    assert score["float32"]["identical_episodes"] == EPISODES
    assert score["float32"]["difference"] == 0.0
    on_disk = json.loads((use_agents / "tiny" / "metadata.json").read_text())
    assert on_disk["score"]["returns"] == score["returns"]

    # the shipped config's engine (a process pool) gives the serial engine's returns
    assert main(["evaluate", "--pretrained", "tiny", "--engine", "process",
                 "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert f"over {EPISODES} episodes" in out and "reproduced exactly" in out
    evaluation = json.loads(Path("runs/pretrained-tiny/eval/eval-vizdoom.json").read_text())
    assert evaluation["returns"] == score["returns"]
    # the materialized run holds float32 weights and is reused while the sha256s match
    vae_file = next(Path("runs/pretrained-tiny/vision").glob("vae-*.safetensors"))
    assert {t.dtype for t in load_file(vae_file).values()} == {torch.float32}
    stamp = vae_file.stat().st_mtime_ns
    assert main(["evaluate", "--pretrained", "tiny", "--engine", "serial",
                 "--episodes", "2"]) == 0
    assert "other episodes" in capsys.readouterr().out
    assert vae_file.stat().st_mtime_ns == stamp


def test_cli_export_scores_the_float16_weights_beside_the_runs_float32_evaluation(
        tiny_run, shipped, tmp_path, capsys):
    from wmlab.evaluate import evaluate_controller

    # the run's own evaluation on the protocol's seeds: export compares with it, not rerun
    own = evaluate_controller(tiny_run, episodes=2)
    dest = tmp_path / "agents"
    assert main(["export", tiny_run.run_dir(), "--name", "cli", "--dest", str(dest),
                 "--evaluate", "2", "--engine", "serial"]) == 0
    out = capsys.readouterr().out
    assert "exported 'cli'" in out and "score (float16 V and M)" in out
    assert "float32 weights on the same seeds" in out and "2 of 2 episodes" in out
    score = json.loads((dest / "cli" / "metadata.json").read_text())["score"]
    assert score["float32"]["from_run_evaluation"] is True
    assert score["float32"]["mean"] == own.mean and score["returns"] == own.returns
    assert main(["export", tiny_run.run_dir(), "--name", "bad name", "--dest",
                 str(dest)]) == 2
    assert "must be letters" in capsys.readouterr().err


def test_play_headless_records_three_panels_and_plays_the_evaluated_episode(
        shipped, use_agents, capsys):
    import imageio.v3 as iio

    from wmlab.pretrained import agent_session
    from wmlab.shipped import materialize

    assert main(["play", "doom", "--pretrained", "tiny", "--max-steps", "12", "--fps", "1000",
                 "--record", "play.gif"]) == 0
    assert "recording: play.gif (13 frames)" in capsys.readouterr().out
    frames = iio.imread("play.gif", index=None)
    assert frames.shape[0] == 13
    width = frames.shape[2]
    assert width == 3 * 192 + 2 * 4  # real frame | V's reconstruction | M's prediction
    third = frames[5, 16:, -192:]
    assert third.std() > 0  # M's prediction is a picture, not the blank of step 0
    # the window's agent is the evaluated agent: the first episode has its recorded return
    cfg = materialize("tiny")
    session = agent_session(cfg)
    try:
        while not session.done:
            session.tick(set())
    finally:
        session.env.close()
    assert session.episodes == [shipped[2]["score"]["returns"][0]]


def test_dream_of_a_pretrained_agent(use_agents, capsys):
    assert main(["dream", "--pretrained", "tiny", "--steps", "8"]) == 0
    out = capsys.readouterr().out
    assert Path("runs/pretrained-tiny/memory/dream.gif").is_file()
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["driver"] == "controller" and summary["steps"] <= 8


def test_bad_names_damaged_files_and_unfinished_runs_are_refused(tiny_run, shipped, use_agents,
                                                                 tmp_path, capsys):
    import shutil

    from wmlab.shipped import export_agent, materialize

    assert main(["evaluate", "--pretrained", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "no pretrained agent 'nope'" in err and "available: tiny" in err
    assert "wmlab export" in err
    assert main(["evaluate"]) == 2
    assert "--pretrained" in capsys.readouterr().err
    assert main(["dream", "--pretrained", "tiny", "--preset", "doom"]) == 2
    assert "do not apply to --pretrained" in capsys.readouterr().err
    assert main(["play", "carracing", "--pretrained", "tiny", "--record", "x.gif"]) == 2
    assert "plays doom, not carracing" in capsys.readouterr().err
    # a damaged shipped file is named, not loaded
    copy = tmp_path / "copy"
    shutil.copytree(use_agents / "tiny", copy / "tiny")
    blob = bytearray((copy / "tiny" / "memory.safetensors").read_bytes())
    blob[-1] ^= 1
    (copy / "tiny" / "memory.safetensors").write_bytes(bytes(blob))
    with pytest.raises(WmlabError, match="sha256"):
        materialize("tiny", str(tmp_path / "runs2"), root=copy)
    # a run without a controller cannot be exported, and nothing is written
    partial = load_config("doom", "quick", [f'run.root="{tmp_path}"', 'run.name="partial"',
                                            *TINY_DOOM])
    shutil.copytree(tiny_run.run_dir(), partial.run_dir(),
                    ignore=shutil.ignore_patterns("controller"))
    with pytest.raises(WmlabError, match="has no scored controller"):
        export_agent(partial.run_dir(), "partial", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_carracing_agent_plays_with_its_actions_shown(tmp_path, monkeypatch, one_thread,
                                                     capsys):
    import imageio.v3 as iio

    from wmlab.pretrained import evaluate_and_record
    from wmlab.shipped import export_agent

    cfg = load_config("carracing", "quick", [
        f'run.root="{tmp_path}"', "collect.workers=1", "collect.min_length=0",
        "collect.episodes=2", "vae.z_dim=8", "vae.epochs=1", "vae.batch_size=16",
        "vae.max_frames=48", "mdrnn.hidden=16", "mdrnn.steps=2", "mdrnn.batch_size=2",
        "mdrnn.seq_len=10", "mdrnn.initial_z=2", "es.population=2", "es.rollouts=1",
        "es.generations=1", "es.eval_rollouts=1", 'es.engine="serial"', "env.max_steps=20",
        'env.backend="gymnasium"', 'es.fitness="real"'])
    Pipeline(cfg, progress=False, log=lambda _: None).run(until="controller")
    agents = tmp_path / "agents"
    export_agent(cfg.run_dir(), "carracing", agents)
    evaluate_and_record("carracing", 2, root=agents)
    monkeypatch.setenv("WMLAB_PRETRAINED_PATH", str(agents))
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", "--pretrained", "carracing"]) == 0
    assert "reproduced exactly" in capsys.readouterr().out
    assert main(["play", "carracing", "--pretrained", "--max-steps", "5", "--fps", "1000",
                 "--record", "car.gif"]) == 0
    frames = iio.imread("car.gif", index=None)
    assert frames.shape[0] == 6 and frames.shape[2] == 3 * 192 + 2 * 4
    bars = frames[-1, 16:, -192:].reshape(-1, 3).astype(int)
    # steer, gas and brake as green (positive) or red (negative) bars
    coloured = (np.abs(bars[:, 1] - bars[:, 0]) > 60).sum()
    assert coloured > 100


def test_action_bars_show_the_valid_action_the_agent_took():
    from wmlab.envs import EnvSpec
    from wmlab.pretrained import _action_bars

    spec = EnvSpec(name="x", gym_id="x", description="", backends=("gymnasium",),
                   default_backend="gymnasium", max_steps=10, action_kind="discrete",
                   action_dim=3, controller_outputs=3)
    raw = np.array([0.9, 0.5, -0.2], np.float32)  # C prefers action 0 ...
    mask = np.array([[False, True, True]])  # ... which the env says is invalid: 1 is played
    played = _action_bars(np.array([-1.0, 1.0, -1.0], np.float32), None, spec)
    np.testing.assert_array_equal(_action_bars(raw, mask, spec), played)
    assert not np.array_equal(_action_bars(raw, None, spec), played)


def test_shipped_metadata_counts_every_iterations_compute(tmp_path):
    """An agent exported from iteration 2 names what the whole profile cost: every stage of
    both iterations, with the compute of attempts discarded on the way."""
    from unittest import mock

    from wmlab.config import load_config
    from wmlab.pipeline import iteration_config
    from wmlab.runs import RunLayout
    from wmlab.shipped import _profile_compute

    cfg = load_config("doom", "quick", [f'run.root="{tmp_path}"', 'run.name="r"'])
    layout = RunLayout.of(cfg)
    cpu = {"model": "Some CPU"}
    for k, records in ((1, {"memory": (100.0, 0.0), "controller": (50.0, 0.0)}),
                       (2, {"controller": (30.0, 20.0)})):
        folder = Path(layout.iteration(k).stages)
        folder.mkdir(parents=True)
        for name, (own, discarded) in records.items():
            (folder / f"{name}.json").write_text(json.dumps(
                {"compute_seconds": own, "discarded_seconds": discarded, "cpu": cpu}))
        (folder / "broken.json").write_text("{not json")
    with mock.patch("wmlab.checkpoint.checkpoint_exists", return_value=True):
        second = iteration_config(cfg, 2)
    compute = _profile_compute(second)
    assert compute["iterations"] == {"1": {"controller": 50.0, "memory": 100.0},
                                     "2": {"controller": 50.0}}
    assert compute["seconds"] == 200.0 and compute["cpus"] == ["Some CPU"]
    assert _profile_compute(cfg)["seconds"] == 150.0  # iteration 1 alone
