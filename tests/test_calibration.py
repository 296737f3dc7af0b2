"""The dream's calibration against the real game, and the gate before C trains in a dream."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from wmlab.cli import main
from wmlab.config import load_config
from wmlab.dream.calibration import far_policies, noop_order_warning
from wmlab.errors import WmlabError
from wmlab.pipeline import Pipeline
from wmlab.policies import PolicyConfig, make_policy
from wmlab.runs import RunLayout

TINY = [
    "collect.workers=1", "collect.min_length=0", "collect.episodes=3", "env.max_steps=40",
    "vae.z_dim=8", "vae.epochs=1", "vae.batch_size=16", "vae.max_frames=96",
    "mdrnn.hidden=16", "mdrnn.steps=4", "mdrnn.batch_size=2", "mdrnn.seq_len=10",
    "mdrnn.initial_z=4", "mdrnn.calibration_episodes=4", "mdrnn.calibration_real_episodes=2",
    "dream.max_steps=30",
    "es.population=4", "es.rollouts=2", "es.generations=1", "es.eval_every=1",
    "es.eval_rollouts=2", "es.engine=\"serial\"",
]


def _row(dream: float, real: float) -> dict:
    return {"survival_mean": dream, "real_survival_mean": real, "survival_ratio": dream / real}


def test_far_policies_flags_dreams_too_long_and_too_short():
    report = {"policies": {"random": _row(300, 200), "noop": _row(700, 130),
                           "left": _row(40, 165)}}
    far = far_policies(report, 2.0)
    assert len(far) == 2
    assert far[0].startswith("noop survives 700 steps in the dream and 130 in the game")
    assert far[1].startswith("left survives 40")
    assert far_policies(report, 10.0) == []


def test_a_dream_that_favours_the_no_op_is_flagged():
    # seed 1 of the quick profile: the dream ranks the no-op above random, the game below
    misleading = {"policies": {"random": _row(466, 184), "noop": _row(617, 132)}}
    message = noop_order_warning(misleading)
    assert message and "0.76x" in message and "1.39x" in message
    assert "fixed_fraction" in message
    # seed 0: random outlives the no-op in the dream too
    assert noop_order_warning({"policies": {"random": _row(662, 184),
                                            "noop": _row(558, 132)}}) is None
    # not measured in the game yet: nothing to compare
    assert noop_order_warning({"policies": {"random": {"survival_mean": 100.0},
                                            "noop": {"survival_mean": 300.0}}}) is None


def test_reference_policies_act_like_the_dreams():
    noop = make_policy(PolicyConfig(name="noop"), 2, 3)
    left = make_policy(PolicyConfig(name="left"), 2, 3)
    frames = np.zeros((2, 64, 64, 3), dtype=np.uint8)
    assert np.array_equal(noop.act(frames), np.zeros((2, 3), np.float32))
    assert np.array_equal(left.act(frames), np.array([[-1, 0, 0]] * 2, np.float32))


def test_calibration_measures_the_game_and_gates_training_in_the_dream(tmp_path: Path,
                                                                         capsys):
    cfg = load_config("doom", "quick", [f"run.root=\"{tmp_path}\"", *TINY])
    Pipeline(cfg, progress=False, log=lambda _: None).run(until="memory")
    report = json.loads(Path(RunLayout.of(cfg).calibration).read_text())
    assert report["real_episodes"] == 2
    # the Doom presets' eval.references (the sweep) are calibrated too
    assert set(report["policies"]) == {"random", "noop", "left", "sweep"}
    ratios = [row["survival_ratio"] for row in report["policies"].values()]
    assert all(r > 0 for r in ratios)

    from wmlab.pipeline.controller_stage import train_controller

    # a tolerance no dream can meet: refused before any generation, nothing written
    strict = load_config("doom", "quick", [f"run.root=\"{tmp_path}\"", *TINY,
                                           "dream.calibration_tolerance=1.0000001"])
    if any(r != 1.0 for r in ratios):
        with pytest.raises(WmlabError, match="too far from the game"):
            train_controller(strict, progress=False)
        assert not Path(RunLayout.of(strict).controller).exists()
    # off (the default): trains
    result = train_controller(cfg, progress=False)
    assert result.generation == 1

    # the command re-measures the game side and prints both
    base = ["--preset", "doom", "--profile", "quick", "--set", f"run.root=\"{tmp_path}\""]
    for item in TINY:
        base += ["--set", item]
    assert main(["calibrate", *base, "--episodes", "2"]) == 0
    out = capsys.readouterr().out
    assert "dream/game" in out and "noop" in out
    # a damaged report is one clear message
    Path(RunLayout.of(cfg).calibration).write_text("{not json")
    assert main(["calibrate", *base]) == 2
    assert "damaged" in capsys.readouterr().err


def test_fitted_done_bias_shortens_a_lenient_dream_by_the_log_ratio(tmp_path: Path,
                                                                       monkeypatch):
    import math

    from wmlab import calibrate
    from wmlab.agent import workload_from_config
    from wmlab.dream.calibration import dream_done_bias
    from wmlab.pipeline.controller_stage import train_controller

    tiny = [*TINY, "mdrnn.calibration_episodes=32", "dream.max_steps=200"]
    cfg = load_config("doom", "quick", [f"run.root=\"{tmp_path}\"", *tiny,
                                        "dream.fit_done_bias=true"])
    Pipeline(cfg, progress=False, log=lambda _: None).run(until="memory")
    report = json.loads(Path(RunLayout.of(cfg).calibration).read_text())
    before = report["policies"]["random"]["survival_mean"]
    assert before > 4  # room to shorten
    # pretend the game is twice as hard as the dream: the fit must shorten the dreams
    report["policies"]["random"]["real_survival_mean"] = before / 2
    Path(RunLayout.of(cfg).calibration).write_text(json.dumps(report))
    # nothing fits it behind a reader's back: C's dreams are built after the C stage fits it
    with pytest.raises(WmlabError, match="does not exist yet"):
        dream_done_bias(cfg)
    assert dream_done_bias(cfg, missing_ok=True) == 0.0  # pictures before C: the base

    calibrate.ensure_fitted_done_bias(cfg)
    bias = dream_done_bias(cfg)
    fitted = json.loads(Path(RunLayout.of(cfg).fitted_done_bias).read_text())
    assert bias == fitted["fitted"] == pytest.approx(math.log(2))
    assert fitted["dream_survival_after"] < before  # the same dreams, ended sooner
    # read back, not fitted again (a resumed C keeps its dream)
    monkeypatch.setattr(calibrate, "fit_done_bias", lambda *a, **k: pytest.fail("refit"))
    calibrate.ensure_fitted_done_bias(cfg)
    assert dream_done_bias(cfg) == bias
    assert workload_from_config(cfg).dream.done_bias == bias
    assert workload_from_config(cfg, kind="real").dream is None
    assert train_controller(cfg, progress=False).generation == 1
    # without the option the configured bias is used as it is
    plain = load_config("doom", "quick", [f"run.root=\"{tmp_path}\"", *tiny,
                                          "dream.done_bias=0.5"])
    assert dream_done_bias(plain) == 0.5


def test_a_calibration_goes_stale_when_the_dream_changes(tmp_path: Path):
    """The calibration is stamped with what its dream side depends on: another tau
    measures the dream side again (the real game's side is kept); a sweep's taus leave the
    run's file alone."""
    from wmlab.calibrate import current_calibration
    from wmlab.dream.calibration import is_current, read_calibration

    cfg = load_config("doom", "quick", [f"run.root=\"{tmp_path}\"", *TINY])
    Pipeline(cfg, progress=False, log=lambda _: None).run(until="memory")
    measured = read_calibration(cfg)
    assert is_current(cfg, measured) and measured["tau"] == cfg.dream.tau
    assert current_calibration(cfg) == measured  # current: read as it is
    hotter = load_config("doom", "quick", [f"run.root=\"{tmp_path}\"", *TINY,
                                           "dream.tau=1.6"])
    assert not is_current(hotter, measured)
    seen = current_calibration(hotter, save=False)
    assert seen["tau"] == 1.6 and read_calibration(cfg) == measured  # not written
    refreshed = current_calibration(hotter)
    assert refreshed["tau"] == 1.6 and is_current(hotter, read_calibration(cfg))
    for name, row in refreshed["policies"].items():
        old = measured["policies"][name]
        assert row["real_survival_mean"] == old["real_survival_mean"]  # the game's side
        assert row["survival_ratio"] == row["survival_mean"] / max(
            old["real_survival_mean"], 1.0)
