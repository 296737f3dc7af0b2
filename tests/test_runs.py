"""The run directory's layout: one object knows every path, iterations included."""

from __future__ import annotations

from wmlab.config import load_config
from wmlab.runs import RunLayout, config_drift, prepare_run_dir


def test_layout_of_a_config_under_its_root_or_at_a_path_or_url():
    cfg = load_config("carracing", "quick", ["run.root=/tmp/r"])
    assert RunLayout.of(cfg).root == "/tmp/r/carracing-quick"
    cfg = load_config("carracing", "quick", ["run.name=s3://bucket/runs/a/"])
    layout = RunLayout.of(cfg)
    assert layout.controller == "s3://bucket/runs/a/controller"
    assert layout.calibration == "s3://bucket/runs/a/memory/calibration.json"
    assert layout.fidelity == "s3://bucket/runs/a/eval/fidelity.json"
    assert layout.config == "s3://bucket/runs/a/config.toml"


def test_iterations_live_inside_the_first_run():
    first = RunLayout("runs/x")
    second = first.iteration(2)
    assert second.root == "runs/x/iterations/2"
    assert second.vision == "runs/x/iterations/2/vision"
    assert second.base == first and first.base == first
    assert (first.iteration_number, second.iteration_number) == (1, 2)
    # from any iteration, another iteration is a sibling, and iteration 1 the run itself
    assert second.iteration(3).root == "runs/x/iterations/3"
    assert second.iteration(1) == first


def test_an_empty_root_names_paths_relative_to_any_run():
    relative = RunLayout("")
    assert relative.calibration == "memory/calibration.json"
    assert relative.stages == "stages" and relative.config == "config.toml"
    assert relative.iteration(2).controller == "iterations/2/controller"
    assert relative.iteration(2).base == relative
    assert relative.iteration(3).iteration_number == 3
    assert RunLayout("/abs/x/iterations/2").base.root == "/abs/x"
    assert RunLayout("s3://b/x/iterations/4").base.root == "s3://b/x"


def test_config_drift_names_each_setting_that_differs_from_the_recorded_config(tmp_path):
    run = ["run.name=" + repr(str(tmp_path / "r")).replace("'", '"')]
    cfg = load_config("doom", "quick", run + ["shield.window=25", "dream.tau=1.0"])
    assert config_drift(cfg, ("shield",), "evaluate") == []  # nothing recorded yet
    prepare_run_dir(cfg)
    assert config_drift(cfg, ("shield", "dream"), "evaluate") == []
    now = load_config("doom", "quick", run + ["dream.tau=1.3"])
    assert config_drift(now, ("shield", "dream"), "evaluate") == [
        "shield.window: run 25, evaluate 0", "dream.tau: run 1.0, evaluate 1.3"]
    assert config_drift(now, ("shield",), "sweep") == ["shield.window: run 25, sweep 0"]
    assert config_drift(now, ("shield", "dream"), "sweep",
                        lambda section, key: key in ("tau", "window")) == []
