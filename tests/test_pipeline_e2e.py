"""The real pipeline at tiny sizes: every stage, every report artefact, resume and rerun."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from wmlab.cli import main
from wmlab.config import load_config
from wmlab.pipeline import Pipeline

TINY_COMMON = [
    "collect.workers=1", "collect.min_length=0",
    "vae.z_dim=8", "vae.epochs=1", "vae.batch_size=16", "vae.max_frames=96",
    "mdrnn.hidden=16", "mdrnn.steps=6", "mdrnn.batch_size=2", "mdrnn.seq_len=10",
    "mdrnn.checkpoint_every=2", "mdrnn.initial_z=4", "mdrnn.calibration_real_episodes=2",
    "es.population=4", "es.rollouts=2", "es.generations=2", "es.eval_every=1",
    "es.eval_rollouts=2", "es.engine=\"serial\"",
    "eval.episodes=2",
]
TINY = {
    "doom": [*TINY_COMMON, "collect.episodes=3", "env.max_steps=40", "dream.max_steps=30"],
    "carracing": [*TINY_COMMON, "collect.episodes=2", "env.max_steps=25",
                  "env.backend=\"gymnasium\"", "es.fitness=\"real\""],
}


def _cfg(tmp_path: Path, preset: str, *extra: str):
    return load_config(preset, "quick", [f"run.root=\"{tmp_path}\"", *TINY[preset], *extra])


def _statuses(results) -> dict[str, str]:
    return {r.name: r.status for r in results}


@pytest.mark.parametrize("preset", ["doom", "carracing"])
def test_tiny_pipeline_runs_end_to_end_and_writes_every_artefact(tmp_path, preset):
    cfg = _cfg(tmp_path, preset)
    results = Pipeline(cfg, progress=False, log=lambda _: None).run()
    assert [r.name for r in results] == ["collect", "vision", "encode", "memory",
                                         "controller", "evaluate", "report"]
    assert set(_statuses(results).values()) == {"ran"}
    run = Path(cfg.run_dir())
    for path in ["config.toml", "vision/vae.json", "memory/mdrnn.json", "memory/initial_z.json",
                 "controller/metrics.csv", "controller/progress.png", "eval/episode.gif",
                 "report.md", "report.html"]:
        assert (run / path).exists(), path
    backend = "vizdoom" if preset == "doom" else "gymnasium"
    evaluation = json.loads((run / f"eval/eval-{backend}.json").read_text())
    random_policy = json.loads((run / f"eval/random-{backend}.json").read_text())
    assert evaluation["episodes"] == random_policy["episodes"] == 2
    assert evaluation["seeds"] == random_policy["seeds"]  # the same episodes for both
    html = (run / "report.html").read_text()
    assert "data:image/png;base64" in html
    # C against the random policy, episode by episode, in the stage summary and the report
    summary = json.loads((run / "stages/evaluate.json").read_text())["summary"]
    assert summary["versus_random"].startswith("C against the random policy on the same 2")
    assert summary["versus_random"] in (run / "report.md").read_text()
    if preset == "doom":  # its presets also pair C with a sweep that never looks
        sweep = json.loads((run / "eval/sweep-vizdoom.json").read_text())
        assert sweep["seeds"] == evaluation["seeds"]
        assert summary["versus_sweep"].startswith("C against the sweep policy on the same 2")
        assert summary["versus_sweep"] in (run / "report.md").read_text()
    # a second run has nothing left to do
    again = Pipeline(cfg, progress=False, log=lambda _: None).run()
    assert set(_statuses(again).values()) == {"skipped"}


def test_interrupted_stage_resumes_and_config_change_reruns_exactly_what_it_affects(
        tmp_path, monkeypatch):
    import wmlab.memory.train as memory_train

    cfg = _cfg(tmp_path, "doom")
    real_train = memory_train.train_mdrnn

    def killed_midway(cfg, **kwargs):
        real_train(cfg, stop_after_steps=3, **kwargs)
        raise KeyboardInterrupt  # as a kill in the middle of M's training

    monkeypatch.setattr(memory_train, "train_mdrnn", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        Pipeline(cfg, progress=False, log=lambda _: None).run()
    monkeypatch.setattr(memory_train, "train_mdrnn", real_train)
    results = _statuses(Pipeline(cfg, progress=False, log=lambda _: None).run())
    assert results == {"collect": "skipped", "vision": "skipped", "encode": "skipped",
                       "memory": "resumed", "controller": "ran", "evaluate": "ran",
                       "report": "ran"}
    # M resumed from its checkpoint at step 2 rather than starting again
    rows = (Path(cfg.run_dir()) / "memory/metrics.csv").read_text().splitlines()
    assert len(rows) > 1

    changed = _cfg(tmp_path, "doom", "es.sigma0=0.2")
    results = _statuses(Pipeline(changed, progress=False, log=lambda _: None).run())
    assert results == {"collect": "skipped", "vision": "skipped", "encode": "skipped",
                       "memory": "skipped", "controller": "rerun", "evaluate": "rerun",
                       "report": "rerun"}


def test_cli_run_prints_the_report_path_and_refuses_bad_input(tmp_path, capsys):
    args = ["run", "--preset", "doom", "--profile", "quick", "--no-progress",
            "--set", f"run.root=\"{tmp_path}\""]
    for item in TINY["doom"]:
        args += ["--set", item]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "report: " in out and out.strip().endswith("report.html")
    assert main(["run", "--preset", "doom", "--profile", "nope"]) == 2
    assert "has no profile 'nope'" in capsys.readouterr().err
    assert main([*args, "--until", "nothing"]) == 2
    assert "no stage 'nothing'" in capsys.readouterr().err


def test_example_notebook_runs(tmp_path, monkeypatch):
    notebook = Path(__file__).parent.parent / "examples" / "quickstart.ipynb"
    cells = json.loads(notebook.read_text())["cells"]
    monkeypatch.setenv("WMLAB_SMOKE_TEST", "1")
    monkeypatch.setenv("WMLAB_SMOKE_OVERRIDES",
                       ";".join([f"run.root=\"{tmp_path}\"", *TINY["doom"]]))
    code = "".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "code")
    assert "from wmlab." not in code and "import wmlab." not in code  # the public API only
    namespace: dict = {}
    for cell in cells:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), str(notebook), "exec"), namespace)
    assert os.path.exists(namespace["pipeline"].report_path())


def test_second_iteration_collects_with_the_agent_and_starts_from_the_first(tmp_path):
    from wmlab.data import EpisodeStore
    from wmlab.errors import WmlabError

    cfg = _cfg(tmp_path, "doom", "collect.episodes=4", "collect.agent_fraction=0.5")
    with pytest.raises(WmlabError, match="--iteration 1 first"):
        Pipeline(cfg, progress=False, log=lambda _: None, iteration=2)
    Pipeline(cfg, progress=False, log=lambda _: None).run()
    second = Pipeline(cfg, progress=False, log=lambda _: None, iteration=2)
    assert second.run_dir == f"{cfg.run_dir()}/iterations/2"
    assert set(_statuses(second.run()).values()) == {"ran"}
    store = EpisodeStore.open(f"{second.run_dir}/data")
    policies = sorted(store.meta(i)["policy"] for i in store.episode_ids())
    assert policies == ["agent", "agent", "fixed", "held"]  # the profile keeps its fixed fifth
    # new episodes: other seeds than the first iteration's random ones
    first = EpisodeStore.open(f"{cfg.run_dir()}/data")
    assert not {store.meta(i)["seed"] for i in store.episode_ids()} & {
        first.meta(i)["seed"] for i in first.episode_ids()}
    # V and M started from the first iteration's weights, not from scratch
    assert second.cfg.vae.init_from == f"{cfg.run_dir()}/vision"
    assert second.cfg.mdrnn.init_from == f"{cfg.run_dir()}/memory"
    report = (Path(cfg.run_dir()) / "report.md").read_text()
    assert "iterations/2" in report or "iteration 2" in report
    with pytest.raises(WmlabError, match="--iteration 0|must be 1 or more"):
        Pipeline(cfg, progress=False, log=lambda _: None, iteration=0)


def test_fixed_fraction_collects_constant_behaviours_beside_the_random_policy(tmp_path):
    from wmlab.collect import collection_shares
    from wmlab.data import EpisodeStore

    cfg = _cfg(tmp_path, "doom", "collect.episodes=6", "collect.fixed_fraction=0.5")
    assert collection_shares(cfg) == [("fixed", 3), ("held", 3)]
    Pipeline(cfg, progress=False, log=lambda _: None).run(until="collect")
    store = EpisodeStore.open(f"{cfg.run_dir()}/data")
    by_policy: dict[str, list] = {}
    for episode_id in store.episode_ids():
        by_policy.setdefault(store.meta(episode_id)["policy"], []).append(
            store.load(episode_id).actions)
    assert sorted((k, len(v)) for k, v in by_policy.items()) == [("fixed", 3), ("held", 3)]
    assert all(len(np.unique(a, axis=0)) == 1 for a in by_policy["fixed"])
    assert any(len(np.unique(a, axis=0)) > 1 for a in by_policy["held"])


def test_vae_init_from_starts_training_at_the_previous_weights(tmp_path):
    import torch

    from wmlab.vision.model import load_vae
    from wmlab.vision.train import build_trainer

    cfg = _cfg(tmp_path, "doom")
    Pipeline(cfg, progress=False, log=lambda _: None).run(until="vision")
    trained, _ = load_vae(f"{cfg.run_dir()}/vision")
    started = build_trainer(_cfg(tmp_path, "doom",
                                 f"vae.init_from=\"{cfg.run_dir()}/vision\""),
                            torch.device("cpu"))
    for key, value in trained.state_dict().items():
        assert (started.model.state_dict()[key] == value).all(), key


def test_more_generations_or_steps_continue_the_trained_stage(tmp_path):
    cfg = _cfg(tmp_path, "doom")
    Pipeline(cfg, progress=False, log=lambda _: None).run(until="controller")
    run = Path(cfg.run_dir())
    before = (run / "controller/metrics.csv").read_text().splitlines()
    assert len(before) == 3  # header + 2 generations

    longer = _cfg(tmp_path, "doom", "es.generations=3")
    results = Pipeline(longer, progress=False, log=lambda _: None).run(until="controller")
    assert _statuses(results)["controller"] == "extended"
    after = (run / "controller/metrics.csv").read_text().splitlines()
    assert len(after) == 4 and after[:3] == before  # the same CMA-ES, one generation on

    # a final choice added to the finished stage scores its best means again, no generation
    chosen = _cfg(tmp_path, "doom", "es.generations=3", "es.final_candidates=2")
    results = Pipeline(chosen, progress=False, log=lambda _: None).run(until="controller")
    assert _statuses(results)["controller"] == "extended"
    assert (run / "controller/metrics.csv").read_text().splitlines() == after
    choice = json.loads((run / "controller/final-choice.json").read_text())
    assert len(choice["candidates"]) == 2 and choice["chosen_generation"] in (1, 2, 3)
    best = json.loads((run / "controller/best.json").read_text())
    assert best["generation"] == choice["chosen_generation"] and best["final_rollouts"] == 128

    deeper = _cfg(tmp_path, "doom", "es.generations=3", "mdrnn.steps=8")
    results = Pipeline(deeper, progress=False, log=lambda _: None).run(until="memory")
    assert _statuses(results)["memory"] == "extended"
    assert json.loads((run / "memory/mdrnn.json").read_text())["step"] == 8


def test_an_ensemble_of_ms_is_trained_calibrated_and_dreamed_in(tmp_path):
    cfg = _cfg(tmp_path, "doom", "mdrnn.ensemble=2")
    results = Pipeline(cfg, progress=False, log=lambda _: None).run()
    assert set(_statuses(results).values()) == {"ran"}
    run = Path(cfg.run_dir())
    assert (run / "memory/ensemble/1/mdrnn.json").exists()
    assert not (run / "memory/ensemble/1/initial_z.json").exists()
    assert json.loads((run / "memory/calibration.json").read_text())["ensemble"] == 2
    # a second member's weights are part of M's output: losing them makes M stale
    for path in (run / "memory/ensemble/1").glob("mdrnn*"):
        path.unlink()
    again = _statuses(Pipeline(cfg, progress=False, log=lambda _: None).run())
    assert again["memory"] != "skipped" and again["collect"] == "skipped"
