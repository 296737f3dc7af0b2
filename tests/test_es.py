"""CMA-ES plumbing, dream training, exact resume, and the three evaluator engines."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from agent_fixtures import RecordingFitness, SlowQuadratic, live_processes, make_run
from wmlab.agent import workload_from_config
from wmlab.checkpoint import load_checkpoint
from wmlab.config import EsConfig
from wmlab.controller.cmaes import finished_generations, generation_seeds, l2_penalty, run_es
from wmlab.errors import WmlabError
from wmlab.evaluators import Evaluator
from wmlab.pipeline.controller_stage import train_controller
from wmlab.raycluster import check_ray_address, version_mismatch
from wmlab.runs import RunLayout

DREAM = ("es.population=16", "es.rollouts=2", "es.generations=8", "es.eval_every=4",
         "es.eval_rollouts=8", "dream.max_steps=30")


class Quadratic:
    """Fitness -|w - target|^2 (seeds ignored): the optimum is known."""

    def __init__(self, n: int) -> None:
        self.target = np.linspace(-0.5, 0.5, n)
        self.calls = 0

    def evaluate(self, params: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        self.calls += 1
        assert seeds.shape[0] == params.shape[0]
        return -np.sum((params - self.target) ** 2, axis=1)


def test_cma_es_improves_a_quadratic(tmp_path):
    es = EsConfig(population=8, rollouts=2, generations=25, eval_every=5, eval_rollouts=4,
                  sigma0=0.1, l2=0.0)
    fitness = Quadratic(10)
    result = run_es(fitness, 10, es, str(tmp_path), progress=False)
    start = -np.sum(fitness.target ** 2)
    assert result.best_score > 0.2 * start  # the scored mean got 5x closer to the optimum
    assert np.sum((result.mean - fitness.target) ** 2) < 0.2 * -start
    assert result.history[-1]["mean"] > result.history[0]["mean"]
    assert (tmp_path / "progress.png").stat().st_size > 1000
    rows = list(csv.DictReader((tmp_path / "metrics.csv").read_text().splitlines()))
    assert len(rows) == 25 and {"best", "mean", "worst", "sigma", "seconds"} <= set(rows[0])


def test_diagonal_covariance_learns_and_keeps_a_linear_size_checkpoint(tmp_path):
    es = EsConfig(population=8, rollouts=1, generations=30, eval_every=10, eval_rollouts=1,
                  sigma0=0.1, l2=0.0, covariance="diagonal")
    fitness = Quadratic(20)
    result = run_es(fitness, 20, es, str(tmp_path / "learn"), progress=False)
    start = np.sum(fitness.target ** 2)
    assert np.sum((result.mean - fitness.target) ** 2) < 0.3 * start
    n = 1500
    es.generations = 2
    run_es(Quadratic(n), n, es, str(tmp_path / "big"), progress=False)
    full_covariance_bytes = 8 * n * n  # what the full strategy would pickle (18 MB)
    assert (tmp_path / "big" / "es-state.pkl").stat().st_size < full_covariance_bytes / 8
    es.generations = 3  # resume reads the same kind of strategy back
    again = run_es(Quadratic(n), n, es, str(tmp_path / "big"), progress=False)
    assert again.resumed_from == 2 and again.generation == 3


def test_finished_generations_reads_the_checkpoint_and_names_a_damaged_one(tmp_path):
    assert finished_generations(str(tmp_path / "none")) == 0
    es = EsConfig(population=8, rollouts=1, generations=3, eval_every=3, eval_rollouts=1,
                  sigma0=0.1, l2=0.0)
    run_es(Quadratic(4), 4, es, str(tmp_path / "es"), progress=False)
    assert finished_generations(str(tmp_path / "es")) == 3
    (tmp_path / "es" / "es-state.pkl").write_bytes(b"not a pickle")
    with pytest.raises(WmlabError, match="es-state.pkl is damaged.*delete"):
        finished_generations(str(tmp_path / "es"))


def test_l2_penalises_large_weights(tmp_path):
    params = np.array([[0.0, 0.0], [1.0, -1.0]])
    np.testing.assert_allclose(l2_penalty(params, 0.01), [0.0, 0.01])
    # With a flat fitness only the penalty matters: CMA-ES must shrink the weights.
    es = EsConfig(population=8, rollouts=1, generations=15, eval_every=15, eval_rollouts=1,
                  sigma0=0.5, l2=1.0)

    class Flat:
        def evaluate(self, p, s):
            return np.zeros(len(p))

    result = run_es(Flat(), 6, es, str(tmp_path), progress=False)
    assert float(np.abs(result.mean).max()) < 0.5


def test_antithetic_seeds():
    seeds = generation_seeds(3, 7, 8, 4, antithetic=True)
    np.testing.assert_array_equal(seeds[:4], seeds[4:])
    assert len(np.unique(seeds[:4])) == 16
    other = generation_seeds(3, 8, 8, 4, antithetic=False)
    assert len(np.unique(other)) == 32 and not np.array_equal(other[:4], seeds[:4])


def test_common_seeds_put_every_member_on_the_same_episodes(tmp_path):
    """es.common_seeds: the fitness sees one row of seeds repeated for every member, new
    ones each generation (common random numbers rank members, not their luck)."""
    from wmlab.config import EsConfig
    from wmlab.controller.cmaes import run_es

    seen = []

    class Recording:
        def evaluate(self, params, seeds):
            seen.append(seeds.copy())
            return -np.square(params).sum(axis=1)

    es = EsConfig(population=6, rollouts=3, generations=2, eval_every=10, eval_rollouts=3,
                  common_seeds=True)
    run_es(Recording(), 4, es, str(tmp_path), progress=False)
    generations = [s for s in seen if s.shape == (6, 3)]
    assert len(generations) == 2
    for seeds in generations:
        assert (seeds == seeds[0]).all() and len(np.unique(seeds[0])) == 3
    assert not np.array_equal(generations[0][0], generations[1][0])


@pytest.mark.parametrize("mirrored", [True, False])
def test_mirrored_members_come_in_pairs_on_the_same_seeds(tmp_path, mirrored):
    """es.mirrored: members 2k and 2k + 1 are mean + d and mean - d (so every pair sums to
    twice the mean) and play the same rollout seeds; without it they are independent."""
    seen = []

    class Recording:
        def evaluate(self, params, seeds):
            seen.append((params.astype(np.float64), seeds.copy()))
            return -np.square(params - 0.3).sum(axis=1)

    es = EsConfig(population=6, rollouts=2, generations=3, eval_every=10, eval_rollouts=2,
                  mirrored=mirrored)
    run_es(Recording(), 5, es, str(tmp_path), progress=False)
    generations = [(p, s) for p, s in seen if p.shape == (6, 5)]
    assert len(generations) == 3
    for params, seeds in generations:
        sums = params[0::2] + params[1::2]
        pairs_mirror = np.allclose(sums, sums[0], atol=1e-6)
        pairs_share = np.array_equal(seeds[0::2], seeds[1::2])
        assert pairs_mirror == mirrored and pairs_share == mirrored
        assert len(np.unique(seeds[0::2])) == 6  # the three pairs play different episodes


def test_mirrored_refuses_a_state_made_without_it(tmp_path):
    class Quadratic:
        def evaluate(self, params, seeds):
            return -np.square(params).sum(axis=1)

    es = EsConfig(population=4, rollouts=1, generations=1, eval_every=10, eval_rollouts=1)
    run_es(Quadratic(), 3, es, str(tmp_path), progress=False)
    mirrored = EsConfig(population=4, rollouts=1, generations=2, eval_every=10,
                        eval_rollouts=1, mirrored=True)
    with pytest.raises(WmlabError, match="es.mirrored = false"):
        run_es(Quadratic(), 3, mirrored, str(tmp_path), progress=False)


def test_dream_training_improves_survival(tmp_path):
    cfg = make_run(tmp_path, overrides=DREAM)
    result = train_controller(cfg, progress=False)
    scored = [h["eval_mean"] for h in result.history if "eval_mean" in h]
    assert len(scored) == 2
    # The zero controller (the initial mean) never moves and dies on the first step.
    assert result.best_score == max(scored) and result.best_score > 10
    assert result.history[-1]["mean"] > result.history[0]["mean"] + 5
    best = load_checkpoint(RunLayout.of(cfg).controller, "best", with_state=False)
    assert best.weights["params"].shape == (8 + 32,)
    assert best.info["inputs"] == 40 and best.info["bias"] is False


def test_doom_members_in_the_dream_means_scored_in_the_game(tmp_path, one_thread):
    # Doom's reward is survival, so its dream needs only M's done head: a mixed schedule
    # whose every generation dreams is dream training with the means picked in the game.
    mixed = ("es.population=4", "es.rollouts=2", "es.generations=2", "es.eval_every=1",
             "es.eval_rollouts=2", "dream.max_steps=30", "env.max_steps=30")
    cfg = make_run(tmp_path / "mixed", overrides=(*mixed, 'es.fitness="real"',
                                                  "es.dream_generations=2"))
    with Evaluator(workload_from_config(cfg, "real"), "serial") as evaluator:
        game = RecordingFitness(evaluator)
        result = train_controller(cfg, progress=False, fitness=game)
    assert [h["in_dream"] for h in result.history] == [1.0, 1.0]
    assert [s.size for s in game.calls] == [2, 2]  # the game scored the two means only
    dreamed = train_controller(make_run(tmp_path / "dream", overrides=mixed),
                               progress=False)
    for a, b in zip(result.history, dreamed.history, strict=True):
        assert (a["best"], a["mean"], a["worst"]) == (b["best"], b["mean"], b["worst"])
    np.testing.assert_array_equal(result.mean, dreamed.mean)


def test_resume_equals_uninterrupted_run(tmp_path):
    whole = make_run(tmp_path / "a", overrides=DREAM)
    parts = make_run(tmp_path / "b", overrides=DREAM)
    straight = train_controller(whole, progress=False)
    first = train_controller(parts, progress=False, stop_after_generations=3)
    assert not first.finished and first.generation == 3
    resumed = train_controller(parts, progress=False)
    assert resumed.resumed_from == 3 and resumed.generation == 8
    np.testing.assert_array_equal(straight.mean, resumed.mean)
    assert straight.best_score == resumed.best_score

    def metrics(cfg):
        text = Path(RunLayout.of(cfg).controller, "metrics.csv").read_text()
        rows = list(csv.DictReader(text.splitlines()))
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    assert metrics(whole) == metrics(parts)
    a = load_checkpoint(RunLayout.of(whole).controller, "controller", with_state=False)
    b = load_checkpoint(RunLayout.of(parts).controller, "controller", with_state=False)
    assert a.info["fingerprint"] == b.info["fingerprint"]


class LuckyFirstScoring(Quadratic):
    """The quadratic, plus 1.0 of luck on the first scoring of the mean (the fixed seeds'
    first call): the best scored mean is then the earliest, not the best controller."""

    def __init__(self, n: int, fixed: np.ndarray) -> None:
        super().__init__(n)
        self.fixed, self.lucky, self.final_calls = fixed, True, 0

    def evaluate(self, params: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        value = super().evaluate(params, seeds)
        if np.array_equal(seeds, self.fixed) and self.lucky:
            self.lucky = False
            return value + 1.0
        if len(seeds) == 24 // 2:  # the final choice's 24 episodes, in rows of 2
            self.final_calls += 1
        return value


FINAL = EsConfig(population=8, rollouts=2, generations=20, eval_every=5, eval_rollouts=4,
                 sigma0=0.1, l2=0.0, final_candidates=3, final_rollouts=24)


def test_final_choice_scores_the_best_means_again_and_keeps_the_best(tmp_path):
    from wmlab.controller.cmaes import eval_seeds, load_controller_params, score_mean

    fixed = eval_seeds(0, 4, 2)
    plain = run_es(LuckyFirstScoring(10, fixed), 10,
                   EsConfig(**{**FINAL.__dict__, "final_candidates": 0}),
                   str(tmp_path / "plain"), progress=False)
    assert plain.best_generation == 5 and plain.final_choice is None  # the lucky one
    assert not (tmp_path / "plain" / "final-choice.json").exists()

    fitness = LuckyFirstScoring(10, fixed)
    result = run_es(fitness, 10, FINAL, str(tmp_path / "chosen"), progress=False)
    choice = json.loads((tmp_path / "chosen" / "final-choice.json").read_text())
    rows = choice["candidates"]
    assert [r["generation"] for r in rows][0] == 5 and len(rows) == 3
    assert [r["eval_mean"] for r in rows] == sorted((r["eval_mean"] for r in rows),
                                                    reverse=True)
    # the second scoring has no luck: a later, truly better mean wins it
    assert choice["chosen_generation"] == result.best_generation != 5
    assert max(r["final_mean"] for r in rows) == next(
        r["final_mean"] for r in rows if r["generation"] == result.best_generation)
    params, info = load_controller_params(str(tmp_path / "chosen"))
    np.testing.assert_allclose(params, result.best_params, rtol=1e-6)
    assert info["generation"] == result.best_generation and info["final_rollouts"] == 24
    # its score is the mean over episodes of its own seeds, not the scorings' ones
    final_seeds = eval_seeds(0, 24, 2, stream=1_000_033)
    assert not set(final_seeds.ravel()) & set(fixed.ravel())
    assert score_mean(Quadratic(10), params, final_seeds) == pytest.approx(
        max(r["final_mean"] for r in rows), rel=1e-6)
    assert fitness.final_calls == 3


def test_a_killed_final_choice_resumes_with_the_scores_it_had(tmp_path):
    from wmlab.controller.cmaes import eval_seeds

    fixed = eval_seeds(0, 4, 2)
    whole = run_es(LuckyFirstScoring(10, fixed), 10, FINAL, str(tmp_path / "a"),
                   progress=False)

    class DiesOnSecondCandidate(LuckyFirstScoring):
        def evaluate(self, params, seeds):
            value = super().evaluate(params, seeds)
            if self.final_calls == 2:
                raise KeyboardInterrupt  # as a kill would, mid-choice
            return value

    with pytest.raises(KeyboardInterrupt):
        run_es(DiesOnSecondCandidate(10, fixed), 10, FINAL, str(tmp_path / "b"),
               progress=False)
    kept = json.loads((tmp_path / "b" / "final-choice.json").read_text())
    assert len(kept["candidates"]) == 1 and kept["chosen_generation"] is None
    again = LuckyFirstScoring(10, fixed)
    again.lucky = False  # the resumed run scores no mean again: no first scoring left
    resumed = run_es(again, 10, FINAL, str(tmp_path / "b"), progress=False)
    assert again.final_calls == 2  # the first candidate's score was kept
    assert resumed.best_generation == whole.best_generation
    np.testing.assert_array_equal(resumed.best_params, whole.best_params)
    assert json.loads((tmp_path / "b" / "final-choice.json").read_text()) == \
        json.loads((tmp_path / "a" / "final-choice.json").read_text())


def test_bad_es_config_writes_nothing(tmp_path):
    cfg = make_run(tmp_path, overrides=DREAM)
    cfg.es.population = 1
    with pytest.raises(WmlabError, match="at least 2 members"):
        train_controller(cfg, progress=False)
    assert not os.path.exists(RunLayout.of(cfg).controller)
    from wmlab.config import load_config

    with pytest.raises(WmlabError, match="es.population"):
        load_config("doom", "quick", ["es.population=1"])


def _params_and_seeds(members: int = 6, n: int = 40):
    rng = np.random.default_rng(0)
    return (rng.normal(0, 0.5, (members, n)).astype(np.float32),
            rng.integers(0, 10_000, (members, 3)))


@pytest.mark.ray  # starts a local Ray instance
def test_engines_agree_on_the_same_seeds(tmp_path):
    cfg = make_run(tmp_path, overrides=DREAM)
    workload = workload_from_config(cfg, "dream")
    params, seeds = _params_and_seeds()
    params[:2, :8] += 0.6  # some members survive a while, so returns differ
    results = {}
    with Evaluator(workload, "serial", members_per_job=2) as ev:
        results["serial"] = ev.run(params, seeds)
    with Evaluator(workload, "process", workers=2, timeout=120, members_per_job=2) as ev:
        results["process"] = ev.run(params, seeds)
    assert len(np.unique(results["serial"])) > 1
    np.testing.assert_array_equal(results["serial"], results["process"])
    try:
        import ray  # noqa: F401
    except ImportError:
        pytest.skip("ray is not installed: pip install 'wmlab[ray]'")
    with Evaluator(workload, "ray", workers=2, timeout=120, members_per_job=2) as ev:
        np.testing.assert_array_equal(results["serial"], ev.run(params, seeds))


def test_killed_worker_does_not_lose_the_generation():
    params, seeds = _params_and_seeds(8, 5)
    expected = SlowQuadratic().run(params, seeds)
    with Evaluator(SlowQuadratic(delay=0.5), "process", workers=2, timeout=120,
                   members_per_job=1) as ev:
        ev.wait_ready()
        victim = ev.worker_pids()[0]
        killer = threading.Timer(0.7, os.kill, (victim, signal.SIGKILL))
        killer.start()
        got = ev.run(params, seeds)
        killer.join()
        assert ev.retries >= 1 and victim not in ev.worker_pids()
    np.testing.assert_array_equal(got, expected)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl and /proc are Linux's")
def test_workers_stop_mid_job_when_the_run_that_started_them_is_killed(tmp_path):
    pids = tmp_path / "workers"
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import os
        import sys

        import numpy as np
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from agent_fixtures import SlowQuadratic
        from wmlab.evaluators import Evaluator

        if __name__ == "__main__":
            with Evaluator(SlowQuadratic(delay=120), "process", workers=2, timeout=600,
                           members_per_job=1) as ev:
                ev.wait_ready()
                with open({str(pids)!r} + ".tmp", "w") as handle:
                    handle.write(" ".join(map(str, ev.worker_pids())))
                os.replace({str(pids)!r} + ".tmp", {str(pids)!r})
                ev.run(np.zeros((2, 3)), np.zeros((2, 1), dtype=np.int64))
    """))
    run = subprocess.Popen([sys.executable, str(script)])
    deadline = time.monotonic() + 120
    while not pids.exists() and time.monotonic() < deadline:
        assert run.poll() is None, "the run stopped before its workers were ready"
        time.sleep(0.2)
    workers = [int(p) for p in pids.read_text().split()]
    time.sleep(1.0)  # both are now two minutes into one job each
    run.kill()  # kill -9: no finally, no goodbye to the workers
    run.wait()
    deadline = time.monotonic() + 20
    while set(workers) & live_processes().keys() and time.monotonic() < deadline:
        time.sleep(0.2)
    left = sorted(set(workers) & live_processes().keys())
    for pid in left:  # leave nothing behind, pass or fail
        os.kill(pid, signal.SIGKILL)
    assert not left, "workers outlived the run mid-job"


def test_hanging_worker_times_out_and_its_job_is_retried(tmp_path):
    params, seeds = _params_and_seeds(4, 5)
    flag = tmp_path / "hung"
    started = time.monotonic()
    with Evaluator(SlowQuadratic(hang_flag=str(flag)), "process", workers=2, timeout=3.0,
                   members_per_job=1) as ev:
        # both workers ready: their first jobs start together, and exactly one hangs (the
        # flag is claimed atomically; two jobs both finding it absent once hung both)
        ev.wait_ready()
        got = ev.run(params, seeds)
        assert ev.retries == 1
    assert flag.exists() and time.monotonic() - started < 50  # not the 60 s hang
    np.testing.assert_array_equal(got, SlowQuadratic().run(params, seeds))


def test_worker_that_cannot_start_stops_with_a_message(tmp_path):
    workload = workload_from_config(make_run(tmp_path), "dream")
    broken = type(workload)(**{**workload.__dict__, "memory_folder": str(tmp_path / "nope")})
    with pytest.raises(WmlabError, match="could not start: .*nope"):
        Evaluator(broken, "process", workers=1, timeout=60).run(*_params_and_seeds(2))


def test_unreachable_ray_address_is_refused_quickly():
    started = time.monotonic()
    with pytest.raises(WmlabError, match="does not answer"):
        check_ray_address("127.0.0.1:1")
    with pytest.raises(WmlabError, match="not host:port"):
        check_ray_address("nonsense")
    assert time.monotonic() - started < 20


def test_a_version_mismatch_follows_rays_rule():
    assert version_mismatch("2.60.0", "3.11.7", "2.60.0", "3.11.7") is None
    assert "runs Ray 2.59.0 on Python 3.11.7, this machine Ray 2.60.0 on Python 3.11.7: " \
        "install the cluster's versions here (pip install 'ray[default]==2.59.0'" in \
        version_mismatch("2.59.0", "3.11.7", "2.60.0", "3.11.7")
    assert version_mismatch("2.60.0", "3.11.7", "2.60.0", "3.11.8") is not None  # to the patch
    assert version_mismatch("2.60.0", "3.11.7", "2.60.0", "3.11.8", "minor") is None
    assert version_mismatch("2.60.0", "3.11.7", "2.60.0", "3.12.1", "minor") is not None
    assert version_mismatch(None, None, "2.60.0", "3.11.7") is None  # no metadata: Ray checks
