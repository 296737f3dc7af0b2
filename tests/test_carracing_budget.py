"""Issue 9's groundwork: the CarRacing budget profiles, the backend transfer reported by the
evaluate stage, and the mixed schedule (dream generations, then real ones, one CMA-ES run)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from agent_fixtures import RecordingFitness, make_run
from wmlab.agent import workload_from_config
from wmlab.config import EsConfig, load_config
from wmlab.controller.cmaes import generation_seeds, run_es
from wmlab.errors import WmlabError
from wmlab.evaluate import backend_gap, gap_from_evals
from wmlab.evaluators import Evaluator
from wmlab.memory.model import MDNRNN, MdrnnShape
from wmlab.pipeline.controller_stage import train_controller
from wmlab.runs import RunLayout

# --- the profiles -----------------------------------------------------------------------------


def test_budget_profiles_load_and_fit_three_hours():
    budget = load_config("carracing", "budget")
    dream = load_config("carracing", "budget-dream")
    assert budget.env.backend == dream.env.backend == "envpool"
    assert budget.eval.backend == "gymnasium" and budget.eval.episodes == 100
    assert budget.es.fitness == "real" and dream.es.fitness == "dream"
    # one world model serves both: the budget's M already has the dream's heads
    for cfg in (budget, dream):
        assert cfg.mdrnn.reward_head and cfg.mdrnn.done_head
        assert (cfg.vae.z_dim, cfg.mdrnn.hidden) == (32, 256)  # the paper's sizes
    assert dream.collect == budget.collect and dream.vae == budget.vae
    assert dream.mdrnn == budget.mdrnn and dream.dream.max_steps == 1000
    # the profile's own arithmetic, at the rates its run measured on a slow 2-core machine
    # (AVX2-only, fp32 V; docs/results/carracing.md), so it fits there, and faster ones
    steps = 1000
    seconds = (budget.collect.episodes * steps / 440
               + budget.vae.max_frames / 74
               + budget.collect.episodes * steps / 1100
               + budget.mdrnn.steps * budget.mdrnn.batch_size * budget.mdrnn.seq_len / 8500
               + 10 * 60  # the dream calibration's reference episodes
               + (budget.es.generations * budget.es.population * budget.es.rollouts
                  + budget.es.generations // budget.es.eval_every * budget.es.eval_rollouts)
               * steps / 670
               + 45 * 60)  # evaluation: 100 Gymnasium + 100 EnvPool episodes, random policy
    assert seconds < 3 * 3600 * 0.9, seconds / 3600  # with a margin for load
    # the job cut keeps both workers busy: whole rounds of 2 jobs
    assert (budget.es.population // budget.es.job_members) % 2 == 0


# --- the backend gap --------------------------------------------------------------------------


def test_backend_gap_unpaired_uses_the_standard_error_of_two_means():
    envpool, gymnasium = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.0, 10.0]
    gap = backend_gap(envpool, gymnasium, "envpool", "gymnasium", paired=False)
    assert gap.gap == pytest.approx(6.0 - 2.5)
    # sample variances 5/3 and 10 over 4 and 5 episodes
    assert gap.stderr == pytest.approx(math.sqrt((5 / 3) / 4 + 10 / 5))
    assert gap.train_std == pytest.approx(np.std(envpool))
    line = gap.line()
    assert line.startswith("backend transfer: envpool 2.5 +- 1.1, gymnasium 6.0 +- 2.8, "
                           "gap gymnasium - envpool +3.5 +- 1.6 (two different sets of 4 and 5 "
                           "episodes")
    assert "paired" not in line and "difference of means" in line


def test_backend_gap_paired_uses_the_differences_per_episode():
    a, b = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.0]
    gap = backend_gap(a, b, "envpool", "gymnasium", paired=True)
    assert gap.gap == pytest.approx(2.5)
    assert gap.stderr == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2)
    assert "paired over the same seeds: mean difference +- standard error" in gap.line()
    with pytest.raises(WmlabError, match="as many on both"):
        backend_gap(a, b[:3], "envpool", "gymnasium", paired=True)
    with pytest.raises(WmlabError, match="at least 2 episodes"):
        backend_gap([1.0], b, "envpool", "gymnasium", paired=False)


def test_different_backends_are_never_paired_even_on_the_same_seeds():
    seeds = [1000000, 1000001, 1000002]
    envpool = {"backend": "envpool", "seeds": seeds, "returns": [1.0, 5.0, 3.0]}
    gymnasium = {"backend": "gymnasium", "seeds": seeds, "returns": [2.0, 3.0, 7.0]}
    assert not gap_from_evals("carracing", envpool, gymnasium).paired
    same = {**envpool, "returns": [0.0, 4.0, 3.0]}
    assert gap_from_evals("carracing", envpool, same).paired


# --- the mixed schedule on test functions -------------------------------------------------------


class Target:
    """Fitness -|w - target|^2; counts its calls by the generation whose seeds it got."""

    def __init__(self, target: float, n: int, es: EsConfig) -> None:
        self.target, self.es = np.full(n, target), es
        self.generations: list[int] = []
        self.other_calls = 0

    def evaluate(self, params: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        for g in range(self.es.generations):
            if np.array_equal(seeds, generation_seeds(0, g, self.es.population,
                                                      self.es.rollouts, self.es.antithetic)):
                self.generations.append(g + 1)
                break
        else:
            self.other_calls += 1  # the mean's scoring on fixed seeds
        return -np.sum((params - self.target) ** 2, axis=1)


def _es(**changes) -> EsConfig:
    es = EsConfig(population=8, rollouts=2, generations=5, eval_every=2, eval_rollouts=4,
                  sigma0=0.3, l2=0.0, dream_generations=2)
    for key, value in changes.items():
        setattr(es, key, value)
    return es


def _rows(folder: Path) -> list[dict[str, str]]:
    rows = list(csv.DictReader((folder / "metrics.csv").read_text().splitlines()))
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_mixed_schedule_dreams_first_then_real_and_resumes_exactly(tmp_path):
    es = _es()
    real, dream = Target(0.5, 6, es), Target(-0.5, 6, es)
    whole = run_es(real, 6, es, str(tmp_path / "a"), progress=False, dream_fitness=dream)
    assert dream.generations == [1, 2] and dream.other_calls == 0
    assert real.generations == [3, 4, 5] and real.other_calls == 3  # means of 2, 4, 5
    assert [h["in_dream"] for h in whole.history] == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert [r["in_dream"] for r in _rows(tmp_path / "a")] == ["1.0", "1.0", "0.0", "0.0",
                                                              "0.0"]
    # killed after the first (dream) generation, resumed: the same future
    real2, dream2 = Target(0.5, 6, es), Target(-0.5, 6, es)
    first = run_es(real2, 6, es, str(tmp_path / "b"), progress=False, dream_fitness=dream2,
                   stop_after_generations=1)
    assert not first.finished and dream2.generations == [1]
    resumed = run_es(real2, 6, es, str(tmp_path / "b"), progress=False, dream_fitness=dream2)
    assert resumed.resumed_from == 1 and dream2.generations == [1, 2]
    assert real2.generations == [3, 4, 5]
    np.testing.assert_array_equal(whole.mean, resumed.mean)
    assert whole.best_score == resumed.best_score
    assert _rows(tmp_path / "a") == _rows(tmp_path / "b")
    # the schedule is not a no-op: the dream's target pulled the mean elsewhere
    plain = run_es(Target(0.5, 6, es), 6, _es(dream_generations=0), str(tmp_path / "c"),
                   progress=False)
    assert not np.array_equal(plain.mean, whole.mean)


def test_the_dream_generations_take_their_own_rollouts(tmp_path):
    class Shapes:
        def __init__(self) -> None:
            self.shapes: list[tuple[int, int]] = []

        def evaluate(self, params: np.ndarray, seeds: np.ndarray) -> np.ndarray:
            self.shapes.append(seeds.shape)
            return -np.sum(params ** 2, axis=1)

    es = _es(dream_rollouts=5, eval_every=10)
    real, dream = Shapes(), Shapes()
    run_es(real, 6, es, str(tmp_path), progress=False, dream_fitness=dream)
    assert dream.shapes == [(8, 5), (8, 5)]
    # the real generations keep es.rollouts, and the final scoring its fixed rows
    assert real.shapes[:3] == [(8, 2), (8, 2), (8, 2)] and len(real.shapes) == 4
    with pytest.raises(WmlabError, match="es.dream_rollouts"):
        run_es(Shapes(), 6, _es(dream_rollouts=5, dream_generations=0), str(tmp_path / "b"),
               progress=False)


def test_mixed_schedule_needs_a_real_run_and_a_dream(tmp_path):
    with pytest.raises(WmlabError, match="no dream fitness"):
        run_es(Target(0.0, 4, _es()), 4, _es(), str(tmp_path / "a"), progress=False)
    with pytest.raises(WmlabError, match="es.fitness = \"real\""):
        run_es(Target(0.0, 4, _es()), 4, _es(fitness="dream"), str(tmp_path / "b"),
               progress=False, dream_fitness=Target(0.0, 4, _es()))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --- the mixed schedule on CarRacing ------------------------------------------------------------


def carracing_mdrnn(heads: bool) -> MDNRNN:
    torch.manual_seed(3)
    return MDNRNN(MdrnnShape(z_dim=8, action_dim=3, hidden=16, gaussians=2,
                             reward_head=heads, done_head=heads)).eval()


TINY_CAR = ('env.backend="gymnasium"', "env.max_steps=12", "dream.max_steps=12",
            'es.fitness="real"', "es.population=4", "es.rollouts=1", "es.generations=2",
            "es.eval_every=1", "es.eval_rollouts=2", "es.dream_generations=1")


def test_mixed_schedule_on_carracing_dreams_generation_1_and_drives_generation_2(
        tmp_path, one_thread):
    cfg = make_run(tmp_path / "a", "carracing", TINY_CAR, mdrnn=carracing_mdrnn(True))
    with Evaluator(workload_from_config(cfg, "real"), "serial") as evaluator:
        real = RecordingFitness(evaluator)
        result = train_controller(cfg, progress=False, fitness=real)
    assert [h["in_dream"] for h in result.history] == [1.0, 0.0]
    generation_calls = [s for s in real.calls if len(s) == cfg.es.population]
    assert len(generation_calls) == 1  # generation 2 only: generation 1 ran in the dream
    np.testing.assert_array_equal(generation_calls[0],
                                  generation_seeds(0, 1, 4, 1, True))
    assert len(real.calls) == 3  # plus the mean scored on real tracks after each generation
    info = json.loads(Path(RunLayout.of(cfg).controller, "controller.json").read_text())
    assert info["dream_generations"] == 1
    # killed after the dream generation and resumed: the same controller as straight through
    other = make_run(tmp_path / "b", "carracing", TINY_CAR, mdrnn=carracing_mdrnn(True))
    first = train_controller(other, progress=False, stop_after_generations=1)
    assert first.generation == 1 and not first.finished
    resumed = train_controller(other, progress=False)
    assert resumed.resumed_from == 1
    np.testing.assert_array_equal(result.mean, resumed.mean)
    assert _rows(Path(RunLayout.of(cfg).controller)) == _rows(Path(RunLayout.of(other).controller))


def test_mixed_schedule_refused_when_m_has_no_reward_or_done_head(tmp_path, capsys):
    from wmlab.cli import main

    cfg = make_run(tmp_path, "carracing", TINY_CAR, mdrnn=carracing_mdrnn(False))
    with pytest.raises(WmlabError, match="no reward_head and no done_head.*"
                                         "--set mdrnn.reward_head=true"):
        train_controller(cfg, progress=False)
    assert not Path(RunLayout.of(cfg).controller).exists()
    args = ["train-controller", "--preset", "carracing", "--profile", "quick",
            "--no-progress", "--set", f'run.root="{tmp_path}"', "--set", 'run.name="r"']
    for item in TINY_CAR:
        args += ["--set", item]
    assert main(args) == 2
    assert "no reward_head and no done_head" in capsys.readouterr().err
    assert not Path(cfg.run_dir(), "config.toml").exists()  # refused before anything is written


# --- the evaluate stage and the report ---------------------------------------------------------


def test_evaluate_stage_scores_the_training_backend_and_the_report_shows_the_gap(
        tmp_path, one_thread):
    from wmlab.pipeline.stages import _run_evaluate
    from wmlab.report import write_report
    from wmlab.runs import prepare_run_dir

    cfg = make_run(tmp_path, "carracing", (
        'env.backend="envpool"', "env.max_steps=12", 'es.fitness="real"', "es.population=2",
        "es.rollouts=1", "es.generations=1", "es.eval_rollouts=1", "eval.episodes=3"),
        mdrnn=carracing_mdrnn(False))
    prepare_run_dir(cfg)
    train_controller(cfg, progress=False)
    summary = _run_evaluate(cfg, False)
    run = Path(cfg.run_dir())
    gym = json.loads((run / "eval/eval-gymnasium.json").read_text())
    pool = json.loads((run / "eval/eval-envpool.json").read_text())
    assert gym["seeds"] == pool["seeds"] == [1000000, 1000001, 1000002]
    assert (gym["backend"], pool["backend"]) == ("gymnasium", "envpool")
    # the same controller on different tracks: the returns differ
    assert gym["returns"] != pool["returns"]
    assert summary["transfer"].startswith(f"backend transfer: envpool {pool['mean']:.1f}")
    assert "two different sets of 3 episodes" in summary["transfer"]
    write_report(cfg.run_dir())
    report = (run / "report.md").read_text()
    assert summary["transfer"] in report
    rows = [line for line in report.splitlines() if "eval-" in line or "controller" in line]
    assert any("| envpool |" in line for line in rows)
    assert any("| gymnasium |" in line for line in rows)


def test_no_transfer_when_trained_on_the_reference_backend(tmp_path, one_thread):
    from wmlab.pipeline.stages import _run_evaluate

    cfg = make_run(tmp_path, "carracing", (
        'env.backend="gymnasium"', "env.max_steps=8", 'es.fitness="real"', "es.population=2",
        "es.rollouts=1", "es.generations=1", "es.eval_rollouts=1", "eval.episodes=2"),
        mdrnn=carracing_mdrnn(False))
    train_controller(cfg, progress=False)
    summary = _run_evaluate(cfg, False)
    assert "transfer" not in summary
    assert sorted(p.name for p in Path(cfg.run_dir(), "eval").glob("*.json")) == [
        "eval-gymnasium.json", "random-gymnasium.json"]


def test_tau_chosen_by_the_dreams_fidelity_before_the_dream_generations(tmp_path, one_thread,
                                                                          monkeypatch):
    """dream.tau_from_fidelity: the C stage measures, once, at which of eval.fidelity_taus
    M's dream ranks the previous run's scored controllers most like the game, and its
    dream generations run at that tau (resumed runs read the choice back)."""
    import wmlab.pipeline.controller_stage as stage

    first = make_run(tmp_path / "first", "carracing", TINY_CAR, mdrnn=carracing_mdrnn(True))
    train_controller(first, progress=False)  # scored means: the controllers compared
    overrides = (*TINY_CAR, f'es.init_from="{RunLayout.of(first).controller}"',
                 "dream.tau_from_fidelity=true", "eval.fidelity_taus=[0.5, 1.5]",
                 "eval.fidelity_dreams=2", "dream.tau=1.0")
    cfg = make_run(tmp_path / "second", "carracing", overrides, mdrnn=carracing_mdrnn(True))
    measured = []
    real_measure = stage.measure_fidelity

    def measure(*args, **kwargs):
        results = real_measure(*args, **kwargs)
        measured.append({r.tau: r.rank_correlation for r in results})
        return results

    monkeypatch.setattr(stage, "measure_fidelity", measure)
    result = train_controller(cfg, progress=False, stop_after_generations=1)
    assert len(measured) == 1 and set(measured[0]) == {0.5, 1.5}
    choice = json.loads(Path(RunLayout.of(cfg).tau_choice).read_text())
    ranked = {tau: rho for tau, rho in measured[0].items() if rho == rho}  # not NaN
    assert choice["tau"] == max(ranked, key=lambda tau: (ranked[tau], -tau))
    info = json.loads(Path(RunLayout.of(cfg).controller, "controller.json").read_text())
    assert info["tau"] == choice["tau"] != cfg.dream.tau  # C's dreams ran at the choice
    # resumed: the choice is read back, not measured again
    train_controller(cfg, progress=False)
    assert len(measured) == 1 and result.generation == 1
    # without the controllers to rank, one line naming what to set
    bare = make_run(tmp_path / "bare", "carracing",
                    (*TINY_CAR, "dream.tau_from_fidelity=true"), mdrnn=carracing_mdrnn(True))
    with pytest.raises(WmlabError, match="eval.fidelity_taus"):
        train_controller(bare, progress=False)
