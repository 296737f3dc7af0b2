"""The temperature sweep at tiny sizes: real CMA-ES in a hand-made M's dream, real Doom
episodes for the real scores, the table files, resume after a kill, refusals."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import pytest

from agent_fixtures import make_run
from wmlab.cli import main
from wmlab.config import to_toml
from wmlab.errors import WmlabError
from wmlab.runs import RunLayout
from wmlab.sweep import check_taus, parse_taus, tau_label, tau_sweep

TINY = ("es.population=4", "es.rollouts=2", "es.eval_every=1", "es.eval_rollouts=2",
        "dream.max_steps=30", "env.max_steps=40")
SIZES = {"episodes": 2, "dream_episodes": 4, "progress": False}


def _mtimes(root: Path, names: list[str]) -> dict[str, int]:
    return {name: os.stat(root / name).st_mtime_ns for name in names}


def _steps(folder: Path) -> list[int]:
    rows = (folder / "metrics.csv").read_text().splitlines()[1:]
    return [int(row.split(",")[0]) for row in rows]


def test_sweep_resumes_after_a_kill_skips_finished_taus_and_writes_the_table(
        tmp_path, monkeypatch, one_thread):
    import wmlab.pipeline.controller_stage as es

    cfg = make_run(tmp_path, overrides=TINY)
    root = Path(RunLayout.of(cfg).tau_sweep)
    real_train = es.train_controller

    def killed_after_one_generation(cfg, **kwargs):
        real_train(cfg, stop_after_generations=1, **kwargs)
        raise KeyboardInterrupt  # as a kill in the middle of the first tau's CMA-ES

    monkeypatch.setattr(es, "train_controller", killed_after_one_generation)
    with pytest.raises(KeyboardInterrupt):
        tau_sweep(cfg, [0.5, 1.15], generations=2, **SIZES)
    monkeypatch.setattr(es, "train_controller", real_train)
    assert _steps(root / "0.50") == [1]
    assert not (root / "1.15").exists() and not (root / "table.json").exists()

    # the run was made with another env cap than the sweep is given: said, not hidden
    recorded = copy.deepcopy(cfg)
    recorded.env.max_steps = 50
    (Path(cfg.run_dir()) / "config.toml").write_text(to_toml(recorded))
    lines: list[str] = []
    table = tau_sweep(cfg, [0.5, 1.15], generations=2, log=lines.append, **SIZES)
    assert any("env.max_steps: run 50, sweep 40" in line for line in lines)
    # the killed tau continued from its checkpoint (generation 2 only), the other ran fully
    assert "tau 0.50: CMA-ES in the dream, generations 2..2 of 4 x 2 dreams" in lines
    assert "tau 1.15: CMA-ES in the dream, generations 1..2 of 4 x 2 dreams" in lines
    assert _steps(root / "0.50") == [1, 2] and _steps(root / "1.15") == [1, 2]

    for name in ("table.json", "table.md", "table.png", "random.json"):
        assert (root / name).exists(), name
    assert (root / "table.png").read_bytes()[:4] == b"\x89PNG"
    assert [row["tau"] for row in table["rows"]] == [0.5, 1.15]
    assert json.loads((root / "table.json").read_text()) == table
    markdown = (root / "table.md").read_text()
    assert "| 0.50 |" in markdown and "| 1.15 |" in markdown and "| random policy |" in markdown
    assert "1092 +- 556" in markdown  # the paper's actual score at tau 1.15 beside ours
    assert "2 generations of 4 members x 2 dreams" in markdown
    for row in table["rows"]:
        assert row["generations"] == 2
        assert row["real"]["episodes"] == 2 and row["dream"]["episodes"] == 4
        # the random policy faced exactly the episodes the controllers were scored on
        assert row["real_seeds"] == table["random"]["seeds"] == [cfg.eval.seed,
                                                                 cfg.eval.seed + 1]
        dream = json.loads((root / tau_label(row["tau"]) / "eval-dream.json").read_text())
        assert dream["tau"] == row["tau"]  # scored in the dream at its own temperature
        assert row["dream"]["mean"] == pytest.approx(dream["mean"])

    # a rerun trains nothing and reuses every score; the CLI prints the same table
    files = [f"{tau}/{name}" for tau in ("0.50", "1.15")
             for name in ("es-state.pkl", "scores.json")] + ["random.json"]
    before = _mtimes(root, files)
    args = ["sweep-tau", "--preset", "doom", "--profile", "quick", "--run", cfg.run_dir(),
            "--taus", "0.5,1.15", "--generations", "2", "--episodes", "2",
            "--dream-episodes", "4", "--no-progress"]
    for item in ("es.engine=\"serial\"", 'dream.done="threshold"', *TINY):
        args += ["--set", item]
    assert main(args) == 0
    assert _mtimes(root, files) == before
    assert json.loads((root / "table.json").read_text())["rows"] == table["rows"]

    # a changed setting for an existing folder is refused, and nothing is written
    settings = (root / "0.50" / "settings.json").read_text()
    with pytest.raises(WmlabError, match=r"0\.50 was trained with other settings "
                                         r"\(population 4 -> 6\)"):
        tau_sweep(cfg, [0.5], generations=2, population=6, **SIZES)
    with pytest.raises(WmlabError, match="already has 2 generations"):
        tau_sweep(cfg, [0.5], generations=1, **SIZES)
    assert (root / "0.50" / "settings.json").read_text() == settings
    assert _mtimes(root, files) == before


@pytest.mark.parametrize("taus", [[], [0.0], [-1.0], [math.nan], [11.0], ["0.5"], [True],
                                  [0.5, 0.50]])
def test_bad_temperatures_are_refused(taus):
    with pytest.raises(WmlabError, match="temperature|at least one|twice"):
        check_taus(taus)


def test_bad_sweep_input_changes_nothing(tmp_path, capsys):
    cfg = make_run(tmp_path, overrides=TINY)
    with pytest.raises(WmlabError, match="generations must be a positive integer"):
        tau_sweep(cfg, [0.5], generations=0, **SIZES)
    with pytest.raises(WmlabError, match="episodes must be a positive integer"):
        tau_sweep(cfg, [0.5], generations=1, episodes=0, dream_episodes=2, progress=False)
    with pytest.raises(WmlabError, match="dream_episodes must be"):
        tau_sweep(cfg, [0.5], generations=1, episodes=2, dream_episodes=-3, progress=False)
    with pytest.raises(WmlabError, match="population .* even"):
        tau_sweep(cfg, [0.5], generations=1, population=5, **SIZES)
    assert not Path(RunLayout.of(cfg).tau_sweep).exists()
    assert parse_taus(" 0.1, 1.15 ,1.3") == [0.1, 1.15, 1.3]
    with pytest.raises(WmlabError, match="'x' is not a number"):
        parse_taus("0.1,x")
    assert main(["sweep-tau", "--preset", "doom", "--profile", "quick", "--run",
                 cfg.run_dir(), "--taus", "0.1,abc"]) == 2
    assert "'abc' is not a number" in capsys.readouterr().err
    empty = tmp_path / "empty"
    assert main(["sweep-tau", "--preset", "doom", "--profile", "quick", "--run", str(empty),
                 "--taus", "0.5", "--generations", "1"]) == 2
    assert "wmlab: error:" in capsys.readouterr().err
    assert not empty.exists()


def test_sweep_reuses_the_runs_random_policy_only_when_it_played_the_same_episodes(
        tmp_path, one_thread):
    from wmlab.evaluate import evaluate_random_policy

    cfg = make_run(tmp_path, overrides=TINY)
    # the run's evaluate stage played the random policy on 3 episodes: not the sweep's 2
    evaluate_random_policy(cfg, episodes=3)
    stored = Path(RunLayout.of(cfg).eval) / "random-vizdoom.json"
    assert stored.exists()
    lines: list[str] = []
    table = tau_sweep(cfg, [1.15], generations=1, log=lines.append, **SIZES)
    assert "random policy: 2 real episodes on the same seeds" in lines
    assert table["random"]["episodes"] == 2

    # on exactly the sweep's episodes it is reused, not played again
    own = evaluate_random_policy(cfg, episodes=2)
    (Path(RunLayout.of(cfg).tau_sweep) / "random.json").unlink()
    marked = json.loads(stored.read_text())
    marked["mean"] = own.mean + 1000.0  # a mark no replay could produce
    stored.write_text(json.dumps(marked))
    lines.clear()
    table = tau_sweep(cfg, [1.15], generations=1, log=lines.append, **SIZES)
    assert any(line.startswith("random policy: reusing the run's") for line in lines)
    assert table["random"]["mean"] == pytest.approx(own.mean + 1000.0)
    assert table["random"]["seeds"] == table["rows"][0]["real_seeds"]


def test_a_named_sweep_keeps_a_variant_apart_and_dropout_is_a_setting(tmp_path, one_thread):
    """The dream with M's dropout kept on trains another C than the dream without: a sweep
    refuses to mix them in one folder, and ``name`` gives the variant its own table."""
    cfg = make_run(tmp_path, overrides=(*TINY, "mdrnn.dropout=0.1"))
    layout = RunLayout.of(cfg)
    tau_sweep(cfg, [0.5], generations=1, **SIZES)
    with_dropout = copy.deepcopy(cfg)
    with_dropout.dream.dropout = True
    with pytest.raises(WmlabError, match=r"dream_dropout None -> True"):
        tau_sweep(with_dropout, [0.5], generations=1, **SIZES)
    table = tau_sweep(with_dropout, [0.5], generations=1, name="dropout", **SIZES)
    assert table["settings"]["dream_dropout"] is True
    variant = Path(layout.sweep("dropout"))
    assert json.loads((variant / "0.50" / "settings.json").read_text())["dream_dropout"]
    assert "M dropout on" in (variant / "table.md").read_text()
    assert "M dropout on" not in (Path(layout.tau_sweep) / "table.md").read_text()
    for bad in ("", "../up", "a/b", ".hidden"):
        with pytest.raises(WmlabError, match="is not a folder name"):
            tau_sweep(with_dropout, [0.5], generations=1, name=bad, **SIZES)
