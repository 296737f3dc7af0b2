"""Issue 26: the solve profile, real rollouts at the env's speed (V's encoder packed for
acting, M's state without its head), rollouts that end when they can no longer score."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wmlab.agent import build_models, run_real
from wmlab.bench.controller import CountingBatch, RecordingBatch, replay
from wmlab.controller.carry_over import RIDGES
from wmlab.dream import DreamSettings
from wmlab.envs import get_spec, make_batch
from wmlab.memory.model import MDNRNN, MdrnnShape
from wmlab.runs import RunLayout
from wmlab.vision.model import ConvVAE, PackedEncoder, frames_to_tensor

pytest.importorskip("envpool")


@pytest.fixture
def carracing_models():
    torch.manual_seed(3)
    vae = ConvVAE(32)
    mdrnn = MDNRNN(MdrnnShape(z_dim=32, action_dim=3, hidden=32, gaussians=2,
                              reward_head=True, done_head=True))

    def build(packed: bool = False):
        return build_models(get_spec("carracing"), mdrnn, vae, "zh", 0, True,
                            packed_encoder=packed)

    return build


# --- V's encoder packed for acting ------------------------------------------------------------


def test_packed_encoder_equals_the_convolutions():
    torch.manual_seed(0)
    vae = ConvVAE(32).eval()
    frames = torch.randint(0, 256, (5, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        mu, logvar = vae.encode(frames_to_tensor(frames))
        packed_mu, packed_logvar = PackedEncoder(vae.encoder, torch.float32)(frames)
    # the same arithmetic in another order of float sums
    torch.testing.assert_close(packed_mu, mu, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(packed_logvar, logvar, atol=1e-6, rtol=1e-5)
    # bf16: as V under autocast, within bf16 rounding of the float32 result
    with torch.no_grad():
        low_mu, low_logvar = PackedEncoder(vae.encoder)(frames)
    assert low_mu.dtype == torch.float32
    scale = float(mu.abs().max())
    assert float((low_mu - mu).abs().max()) < 0.02 * scale
    assert float((low_mu - mu).abs().max()) > 0  # it did run in bf16


def test_packed_encoder_reads_pixels_as_float32_cast_to_its_dtype():
    frames = torch.arange(256, dtype=torch.uint8).repeat(48).view(1, 64, 64, 3)
    reference = frames_to_tensor(frames, channels_last=True)
    for dtype in (torch.bfloat16, torch.float32):
        pixels = PackedEncoder(ConvVAE(32, width=4).encoder, dtype).pixels(frames)
        assert pixels.dtype == dtype and pixels.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(pixels, reference.to(dtype))  # every byte value, bit for bit


def test_packed_encoder_reads_the_weights_once_at_build():
    torch.manual_seed(0)
    vae = ConvVAE(32, width=16).eval()
    frames = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    packed = PackedEncoder(vae.encoder, torch.float32)
    before = packed(frames)[0]
    with torch.no_grad():
        vae.encoder.mu.bias.add_(1.0)  # a later change to V does not reach the packed copy
    torch.testing.assert_close(packed(frames)[0], before)
    with torch.no_grad():
        mu, _ = vae.encode(frames_to_tensor(frames))
    torch.testing.assert_close(PackedEncoder(vae.encoder, torch.float32)(frames)[0], mu,
                               atol=1e-6, rtol=1e-5)


def test_advance_gives_the_state_of_a_forward_step():
    torch.manual_seed(0)
    for restart_input in (False, True):
        m = MDNRNN(MdrnnShape(z_dim=4, action_dim=2, hidden=8, gaussians=2,
                              restart_input=restart_input)).eval()
        z, a = torch.randn(3, 4), torch.randn(3, 2)
        h, c = torch.randn(3, 8), torch.randn(3, 8)
        restart = torch.tensor([[1.0], [0.0], [1.0]])
        with torch.no_grad():
            flag = restart if restart_input else None
            _, _, (h_ref, c_ref) = m(z[:, None], a[:, None], restart=flag,
                                     state=(h[None], c[None]))
            h_new, c_new = m.advance(z, a, restart, h, c)
        if restart_input:
            torch.testing.assert_close(h_new, h_ref[0], rtol=0, atol=0)
            torch.testing.assert_close(c_new, c_ref[0], rtol=0, atol=0)
        else:  # forward without the flag as input keeps the state; advance zeroes it
            torch.testing.assert_close(h_new[1], h_ref[0][1], rtol=0, atol=0)


def test_real_rollouts_with_the_packed_encoder_agree(carracing_models):
    params = np.random.default_rng(0).normal(0, 0.1, (2, build_shape(carracing_models)))
    seeds = np.array([[11, 12], [11, 12]])
    with make_batch("carracing", 4, "envpool", max_steps=60) as batch:
        plain = run_real(carracing_models(False), batch, params, seeds)
        packed = run_real(carracing_models(True), batch, params, seeds)
    # float32 packing changes only the order of float sums: the same driving, to a hair
    np.testing.assert_allclose(packed, plain, atol=0.5)


def build_shape(build) -> int:
    return build().shape.num_params


# --- rollouts that end when they stop scoring -------------------------------------------------


def _parked(models) -> np.ndarray:
    """A controller that brakes and never gives gas: the car sits still, no tile comes."""
    shape = models.shape
    params = np.zeros(shape.num_params, dtype=np.float32)
    bias = params[-shape.outputs:]  # the output layer's bias comes last
    bias[1], bias[2] = -5.0, 5.0  # gas (a1 + 1) / 2 -> 0, brake -> 1
    return params[None]


def test_stalled_rollouts_end_and_are_charged_what_the_whole_episode_pays(carracing_models):
    models = carracing_models()
    parked = _parked(models)
    mover = np.random.default_rng(1).normal(0, 0.3, parked.shape)
    params = np.concatenate([parked, mover])
    seeds = np.array([[21, 22], [21, 22]])
    with make_batch("carracing", 4, "envpool", max_steps=300) as inner:
        whole = CountingBatch(inner)
        full = run_real(models, whole, params, seeds)
        cut = CountingBatch(inner)
        short = run_real(models, cut, params, seeds, stall_steps=40, cap=300)
        never = run_real(models, inner, params, seeds, stall_steps=10_000, cap=300)
    # the parked car earns -0.1 a frame all episode: ending it after 40 such steps and
    # charging the 260 left at that rate gives the whole episode's return
    np.testing.assert_allclose(short[0], full[0], atol=1e-3)
    assert cut.steps < whole.steps - 2 * 200
    # a limit never reached changes nothing, to the last bit
    np.testing.assert_array_equal(never, full)


def test_recorded_episodes_replay_to_the_same_returns(carracing_models):
    """The benchmark's bare-env case steps the agent's recorded episodes again: the same
    trajectories, so the same steps and rewards, without V, M or C."""
    models = carracing_models(packed=True)
    params = np.random.default_rng(0).normal(0, 0.3, (2, models.shape.num_params))
    seeds = np.array([[31], [32]])

    class Summing(CountingBatch):
        def __init__(self, inner):
            super().__init__(inner)
            self.total = np.zeros(inner.num_envs)

        def step(self, actions):
            running = self.inner.running.copy()
            out = super().step(actions)
            self.total += np.where(running, out[1], 0.0)
            return out

    with make_batch("carracing", 2, "envpool", max_steps=40) as inner:
        recorder = RecordingBatch(inner)
        returns = run_real(models, recorder, params.astype(np.float32), seeds)
        again = Summing(inner)
        replay(again, recorder.episodes)
    assert recorder.episodes[0][0] == [31, 32] and len(recorder.episodes[0][1]) == 40
    assert again.steps == recorder.steps == 80
    np.testing.assert_allclose(again.total, returns.ravel(), rtol=0, atol=1e-4)


# --- the dream's fidelity ---------------------------------------------------------------------


def test_side_by_side_ratios_pair_each_round_and_take_the_median():
    """The rollout benchmark's ratios compare minutes measured next to each other: each
    round's rate against the same round's reference, the median of the rounds reported with
    their range; a row's figures add every round's steps and times."""
    from wmlab.bench.controller import _rate, _ratio_text, _ratios, _summed

    # two workers a round: (steps, seconds); the slower worker sets the round's time
    reference = [[(1000, 1.0), (1000, 2.0)], [(3000, 1.0), (3000, 2.0)]]
    agent = [[(800, 2.0), (800, 2.0)], [(2000, 2.0), (2000, 2.0)]]
    assert _rate(reference[0]) == 1000.0 and _rate(agent[0]) == 800.0
    ratios = _ratios(agent, reference)
    assert ratios == [0.8, 2000.0 / 3000.0]
    assert _ratio_text(ratios, "EnvPool") == "0.73x EnvPool (median of 2 rounds, 0.67-0.80)"
    assert _ratio_text([0.8], "EnvPool") == "0.80x EnvPool"
    # a row: every round's steps over every round's time (the slower worker's each round)
    assert _summed(agent) == {"steps": 5600, "seconds": 4.0, "per_second": 1400.0}
    assert _summed(reference)["per_second"] == 2000.0


def test_rank_correlation():
    from wmlab.fidelity import average_ranks, rank_correlation

    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert rank_correlation([1, 2, 3, 4], [1, 100, 2, 3]) == pytest.approx(0.4)
    np.testing.assert_array_equal(average_ranks([5, 1, 5, 2]), [3.5, 1, 3.5, 2])
    assert np.isnan(rank_correlation([1, 2], [1, 2]))  # too few to rank
    assert np.isnan(rank_correlation([1, 2, 3], [7, 7, 7]))  # no order to agree with


class _SameDreams:
    """A fitness that plays every member on the same fixed seeds, whatever it is given: a
    deterministic function of the controller, so two of them agree exactly."""

    def __init__(self, inner, seeds, scale: float = 1.0) -> None:
        self.inner, self.seeds, self.scale = inner, np.asarray(seeds), scale

    def evaluate(self, params, seeds):
        rows = np.repeat(self.seeds[None], len(params), axis=0)
        return self.scale * self.inner.evaluate(params, rows)


def test_a_dream_that_copies_the_game_ranks_controllers_perfectly(tmp_path, one_thread):
    """A tiny M (survival depends on the action) trained on by CMA-ES: its scored means are
    the controllers; a 'game' that is the same dream ranks them exactly as the dream."""
    import json
    import shutil

    from agent_fixtures import make_run
    from wmlab.agent import workload_from_config
    from wmlab.controller.cmaes import load_snapshots, run_es
    from wmlab.evaluators import Evaluator
    from wmlab.fidelity import measure_fidelity

    cfg = make_run(tmp_path, overrides=("es.population=16", "es.rollouts=2",
                                        "es.generations=6", "es.eval_every=1",
                                        "es.eval_rollouts=4", "es.sigma0=0.5",
                                        "dream.max_steps=30"))
    with Evaluator(workload_from_config(cfg, "dream"), "serial") as dream:
        game = _SameDreams(dream, [1, 2, 3])
        n = dream.engine.runner.models.shape.num_params
        run_es(game, n, cfg.es, RunLayout.of(cfg).controller, seed=0, progress=False)
        snapshots = load_snapshots(RunLayout.of(cfg).controller)
        assert [s.generation for s in snapshots] == [1, 2, 3, 4, 5, 6]
        (same,) = measure_fidelity(cfg, 3, real=game, dream=game)
        (flattering,) = measure_fidelity(cfg, 3, real=game,
                                         dream=_SameDreams(dream, [1, 2, 3], scale=2.0))
        # snapshots of another run are scored again in this run's game
        shutil.copytree(RunLayout.of(cfg).controller, tmp_path / "other")
        scored = []
        again = measure_fidelity(cfg, 3, taus=(1.0, 1.2), snapshots_from=str(
            tmp_path / "other"), real=_Recording(game, scored), dream=game)
        saved = json.loads((Path(RunLayout.of(cfg).eval) / "fidelity.json").read_text())[
            "results"]
        # a C trained in the dream alone scored its means there: they are scored in the game
        for path in (Path(RunLayout.of(cfg).controller) / "snapshots").glob("*.json"):
            path.write_text(json.dumps({**json.loads(path.read_text()), "fitness": "dream"}))
        dreamt = []
        measure_fidelity(cfg, 3, real=_Recording(game, dreamt), dream=game)
        assert len(dreamt) == 8
    names = [row.controller for row in same.rows]
    assert names == [f"generation {g}" for g in range(1, 7)] + ["zero", "random"]
    returns = [row.real for row in same.rows]
    assert len(set(returns)) > 2  # controllers that differ, or ranking proves nothing
    assert same.rank_correlation == pytest.approx(1.0)
    assert same.ratio == pytest.approx(1.0)
    # a dream that pays twice the game's returns: the same order, half the ratio
    assert flattering.rank_correlation == pytest.approx(1.0)
    assert flattering.ratio == pytest.approx(0.5)
    assert [r.tau for r in again] == [1.0, 1.2]
    assert len(scored) == 8  # every controller scored in the real env, the copy's too
    assert again[0].rank_correlation == pytest.approx(1.0)
    assert [s["tau"] for s in saved] == [1.0, 1.2] and len(saved[0]["rows"]) == 8


class _Halves:
    """A game whose two halves of the tracks disagree: the first half plays the dream on
    fixed seeds, the second pays the sum of C's weights."""

    def __init__(self, inner, first_track: int) -> None:
        self.inner, self.first_track = inner, first_track
        self.calls: list[np.ndarray] = []

    def evaluate(self, params, seeds):
        self.calls.append(np.asarray(seeds))
        if seeds[0, 0] == self.first_track:
            return self.inner.evaluate(params, np.repeat([list(range(1, 9))], len(params),
                                                         axis=0))
        return np.asarray(params, np.float64).sum(1)


def test_neighbours_are_drawn_around_the_center_at_the_step_size():
    from wmlab.errors import WmlabError
    from wmlab.fidelity import neighbour_controllers

    center = np.linspace(-1.0, 1.0, 2000)
    drawn = neighbour_controllers(center, 0.05, 4, seed=3)
    assert list(drawn) == ["best", "sigma 0.05 #1", "sigma 0.05 #2", "sigma 0.05 #3",
                           "sigma 0.05 #4"]
    np.testing.assert_array_equal(drawn["best"], center)
    steps = np.stack([drawn[name] - center for name in list(drawn)[1:]])
    assert steps.std() == pytest.approx(0.05, rel=0.05) and abs(steps.mean()) < 0.005
    again = neighbour_controllers(center, 0.05, 4, seed=3)
    np.testing.assert_array_equal(again["sigma 0.05 #2"], drawn["sigma 0.05 #2"])
    other = neighbour_controllers(center, 0.05, 4, seed=4)
    assert not np.array_equal(other["sigma 0.05 #2"], drawn["sigma 0.05 #2"])
    with pytest.raises(WmlabError, match="> 0"):
        neighbour_controllers(center, 0.0, 4, seed=3)
    with pytest.raises(WmlabError, match="2 or more"):
        neighbour_controllers(center, 0.05, 1, seed=3)


def test_neighbour_fidelity_ranks_the_draws_around_the_best_c(tmp_path, one_thread):
    """Around a tiny M's trained C: a dream that copies the game ranks the neighbours
    perfectly, and the game's two halves are compared with each other (the ceiling)."""
    import json

    from agent_fixtures import make_run
    from wmlab.agent import workload_from_config
    from wmlab.controller.cmaes import eval_seeds, load_controller_params, run_es
    from wmlab.evaluators import Evaluator
    from wmlab.fidelity import (
        held_out_tracks,
        measure_neighbour_fidelity,
        neighbour_controllers,
        rank_correlation,
    )

    cfg = make_run(tmp_path, overrides=("es.population=8", "es.rollouts=2",
                                        "es.generations=2", "es.eval_every=1",
                                        "es.eval_rollouts=4", "es.sigma0=0.5",
                                        "dream.max_steps=30"))
    tracks = held_out_tracks(cfg.run.seed, 4)
    # not the tracks the scored means (and so the best C) were chosen on
    assert not set(tracks) & set(eval_seeds(cfg.run.seed, 4, 2).ravel())
    with Evaluator(workload_from_config(cfg, "dream"), "serial") as dream:
        game = _SameDreams(dream, list(range(1, 9)))
        n = dream.engine.runner.models.shape.num_params
        run_es(game, n, cfg.es, RunLayout.of(cfg).controller, seed=0, progress=False)
        (same,) = measure_neighbour_fidelity(cfg, 3, 0.2, 6, real=game, dream=game)
        halves = _Halves(dream, int(tracks[0]))
        (split,) = measure_neighbour_fidelity(cfg, 3, 0.2, 6, real=halves, dream=game)
    assert [row.controller for row in same.rows][:2] == ["best", "sigma 0.2 #1"]
    assert len(same.rows) == 7 and len({row.real for row in same.rows}) > 2
    assert same.rank_correlation == pytest.approx(1.0)
    assert same.notes["game_split_half"] == pytest.approx(1.0)
    # each half of the tracks scored on its own: the first two, then the last two
    assert [list(call[0]) for call in halves.calls] == [list(tracks[:2]), list(tracks[2:])]
    center, _ = load_controller_params(RunLayout.of(cfg).controller)
    sums = [p.astype(np.float32).sum(dtype=np.float64)
            for p in neighbour_controllers(center, 0.2, 6, cfg.run.seed).values()]
    expected = rank_correlation([row.real for row in same.rows], sums)
    assert split.notes["game_split_half"] == pytest.approx(expected)
    assert abs(expected) < 0.99  # halves that disagree, or the check proves nothing
    saved = json.loads((Path(RunLayout.of(cfg).eval) / "fidelity-neighbours.json")
                       .read_text())["results"]
    assert saved[0]["notes"]["sigma"] == 0.2 and len(saved[0]["rows"]) == 7
    assert "agree at" in split.line()


class _Recording:
    def __init__(self, inner, calls) -> None:
        self.inner, self.calls = inner, calls

    def evaluate(self, params, seeds):
        self.calls.append(len(params))
        return self.inner.evaluate(params, seeds)


# --- iterations one after another in one run --------------------------------------------------


def test_later_iterations_take_their_overrides_and_keep_their_own_keys(tmp_path):
    from wmlab.checkpoint import save_checkpoint
    from wmlab.config import load_config
    from wmlab.errors import ConfigError
    from wmlab.pipeline import iteration_config

    cfg = load_config("carracing", "solve", [f'run.root="{tmp_path}"', 'run.name="r"',
                                             "run.iterations=2",
                                             'run.later=["vae.epochs=0", "es.generations=7",'
                                             ' "vae.init_from=elsewhere",'
                                             ' "es.init_from=previous"]'])
    save_checkpoint(RunLayout.of(cfg).controller, "controller", 1,
                    {"params": torch.zeros(3)}, None, {})
    second = iteration_config(cfg, 2)
    assert second.vae.epochs == 0 and second.es.generations == 7
    assert cfg.vae.epochs == 2 and cfg.es.generations == 60  # the first is untouched
    # what makes it the next iteration cannot be overridden
    assert second.vae.init_from == f"{cfg.run_dir()}/vision"
    assert second.collect.agent_run == cfg.run_dir()
    assert second.es.init_from == f"{cfg.run_dir()}/controller"
    with pytest.raises(ConfigError, match="run.later: unknown config key 'vae.epoch'"):
        load_config("carracing", "solve", ['run.later=["vae.epoch=0"]'])


def test_a_set_that_run_later_sets_again_is_named_before_later_iterations_run(tmp_path, capsys):
    from wmlab.cli import main
    from wmlab.config import load_config
    from wmlab.pipeline import shadowed_by_later

    cfg = load_config("doom", "shield")
    lines = shadowed_by_later(cfg, ["collect.episodes=3000", "mdrnn.steps=1500",
                                    "collect.explore=0.20", "es.generations=5"])
    # only the key later sets to another value; the same value or a key it leaves: silent
    assert len(lines) == 1 and lines[0].startswith(
        "collect.episodes=3000 applies to iteration 1 only: run.later sets "
        "collect.episodes=1500 for iterations 2+")
    code = main(["run", "--preset", "doom", "--profile", "shield", "--iteration", "3",
                 "--run", str(tmp_path / "r"), "--set", "collect.episodes=3000"])
    err = capsys.readouterr().err
    assert "note: collect.episodes=3000 applies to iteration 1 only" in err
    assert code != 0 and "iteration 2 first" in err  # and nothing ran: no iteration 2 yet
    code = main(["run", "--preset", "doom", "--profile", "shield", "--iteration", "1",
                 "--run", str(tmp_path / "r"), "--set", "collect.episodes=3000",
                 "--until", "nothing"])  # refused before any stage runs
    err = capsys.readouterr().err
    assert code != 0 and "no stage 'nothing'" in err
    assert "note:" not in err  # iteration 1 alone takes the --set


# --- the profile and its budget ---------------------------------------------------------------

# Rates measured in the solve run on the reference machine (2 cores of an Intel Xeon with
# AVX512-BF16 and AMX; its stage records), per second of 2-core wall-clock, with other work
# on the cores part of the time:
RATES = {"collect": 2130,       # brown-noise env steps (EnvPool, 2 workers x 8 envs)
         "vision": 895,         # V training frames (bf16)
         "encode": 15400,       # frames encoded
         "memory": 50000,       # M training frame-steps (bf16, batch 32 x 999; 74,000 idle)
         "controller": 1950,    # agent steps in C's real rollouts (packed V, 8 envs a job)
         "gymnasium": 250,      # Gymnasium CarRacing steps with the agent (2 workers)
         "dream": 30000}        # dream steps of C's members (bf16, 32 dreams a job)


def test_solve_profile_plans_within_eight_hours():
    from wmlab.pipeline import iteration_config

    cfg = load_config_solve()
    assert cfg.env.backend == "envpool" and cfg.eval.backend == "gymnasium"
    assert cfg.eval.episodes == 100 and cfg.es.fitness == "real"
    assert (cfg.vae.z_dim, cfg.mdrnn.hidden, cfg.controller.inputs) == (32, 256, "zh")
    assert cfg.mdrnn.reward_head and cfg.mdrnn.done_head  # the dream needs both
    assert cfg.controller.packed_encoder and cfg.es.stall_steps > 0
    assert cfg.controller.z_noise == 0  # C on V's mean: 22 of z's 32 dimensions are noise
    # 8 envs per job (EnvPool's best batch per core) and whole rounds of 2 jobs
    assert cfg.es.job_members * cfg.es.rollouts == 8
    assert (cfg.es.population // cfg.es.job_members) % 2 == 0
    first = _planned_seconds(cfg, 0)
    # the first iteration leaves a quarter of the 8 hours to the next one
    assert sum(first.values()) < 6 * 3600, {k: round(v / 3600, 2) for k, v in first.items()}

    cfg.run.name = "/nowhere/solve"  # iteration 2's settings, without a trained iteration 1
    later = iteration_config_unchecked(cfg, iteration_config)
    assert cfg.run.iterations == 2 and later.vae.epochs == 0
    assert later.collect.agent_fraction > 0 and later.mdrnn.init_from.endswith("/memory")
    assert later.es.init_from.endswith("/controller")
    assert later.dream.tau_from_fidelity and len(later.eval.fidelity_taus) >= 3
    # C carried over to the retrained M; the dream, at the paper's 16 rollouts a member,
    # ends when the game stops rewarding it, and the game gets 8 tracks a member
    assert later.es.carry_over and later.es.dream_patience > 0
    assert later.es.dream_rollouts == 16 and later.es.rollouts == 8
    assert later.es.job_members * later.es.rollouts == 8
    second = _planned_seconds(later, cfg.es.generations // cfg.es.eval_every)
    total = sum(first.values()) + sum(second.values())
    assert total < 8 * 3600, {k: round(v / 3600, 2) for k, v in second.items()}


def iteration_config_unchecked(cfg, iteration_config):
    """``iteration_config(cfg, 2)`` with iteration 1's trained C taken as there."""
    from unittest import mock

    with mock.patch("wmlab.checkpoint.checkpoint_exists", return_value=True):
        return iteration_config(cfg, 2)


def _planned_seconds(cfg, scored_before: int) -> dict[str, float]:
    """Each stage's compute at the rates the solve run measured (whole tracks of 1,000);
    ``scored_before``: the previous iteration's scored means (the dream's fidelity)."""
    steps = 1000
    frames = cfg.collect.episodes * steps
    es = cfg.es
    # the dream's generations at most; the real ones as if it ended at its first chance
    in_dream = es.dream_generations
    earliest_end = es.eval_every * es.dream_patience if es.dream_patience else in_dream
    real_members = (es.generations - earliest_end) * es.population * es.rollouts
    dream_members = in_dream * es.population * (es.dream_rollouts or es.rollouts)
    scored = es.generations // es.eval_every * es.eval_rollouts
    if es.carry_over:  # every ridge strength and the controller as it was, scored
        scored += (len(RIDGES) + 1) * es.eval_rollouts
    if cfg.dream.tau_from_fidelity:  # iteration 1's scored means, zero and random:
        compared = scored_before + 2  # scored again in this game, and dreamt at each tau
        scored += compared * es.eval_rollouts
        dream_members += compared * cfg.eval.fidelity_dreams * len(cfg.eval.fidelity_taus)
    return {
        "collect": frames / RATES["collect"],
        "vision": cfg.vae.epochs * 0.95 * frames / RATES["vision"],  # 5% held out
        "encode": frames / RATES["encode"],
        "memory": cfg.mdrnn.steps * cfg.mdrnn.batch_size * cfg.mdrnn.seq_len
        / RATES["memory"] + 120,  # and the dream's calibration
        # every member's rollouts run whole here: stalled ones end sooner
        "controller": (real_members + scored) * steps / RATES["controller"]
        + dream_members * steps / RATES["dream"],
        # C and the random policy on 100 Gymnasium tracks, C on 100 EnvPool tracks, the
        # dream's fidelity
        "evaluate": 2 * cfg.eval.episodes * steps / RATES["gymnasium"]
        + cfg.eval.episodes * steps / RATES["controller"] + 120,
    }


def load_config_solve():
    from wmlab.config import load_config

    return load_config("carracing", "solve")


def test_cma_es_can_start_at_a_given_controller(tmp_path):
    from wmlab.config import EsConfig
    from wmlab.controller.cmaes import new_strategy, run_es

    es = EsConfig(population=8, rollouts=1, generations=1, eval_every=1, eval_rollouts=1,
                  sigma0=1e-6, l2=0.0)
    start = np.linspace(-1, 1, 5)
    np.testing.assert_array_equal(new_strategy(5, es, 0, start).mean, start)

    class Flat:
        def evaluate(self, params, seeds):
            return np.zeros(len(params))

    result = run_es(Flat(), 5, es, str(tmp_path), progress=False, start=start)
    np.testing.assert_allclose(result.mean, start, atol=1e-4)  # a tiny step from there


def test_generations_record_their_env_steps(tmp_path, one_thread):
    """Each generation logs the steps its members took (in the dream here), what the
    budget's share of dream steps is computed from."""
    import csv

    from agent_fixtures import make_run
    from wmlab.agent import run_dream, workload_from_config
    from wmlab.pipeline.controller_stage import train_controller

    cfg = make_run(tmp_path, overrides=("es.population=4", "es.rollouts=2", "es.generations=2",
                                        "es.eval_every=2", "es.eval_rollouts=2",
                                        'es.fitness="dream"', "dream.max_steps=30"))
    models = workload_from_config(cfg, "dream").load()
    params = np.zeros((2, models.shape.num_params))
    params[1, :8] = 1.0  # z starts near +1: move right, which survives this M to the cap
    params[1, 8:] = 2.0  # c and h follow the action: keep moving right
    seeds = np.array([[1, 2], [1, 2]])
    steps = np.zeros(seeds.shape, dtype=np.int64)
    returns = run_dream(models, params, seeds, DreamSettings(1.0, 30), steps=steps)
    np.testing.assert_array_equal(steps, returns)  # +1 a step alive: return = length
    assert steps[1].tolist() == [30, 30] and steps[0].max() < 30
    train_controller(cfg, progress=False)
    text = Path(f"{RunLayout.of(cfg).controller}/metrics.csv").read_text()
    rows = list(csv.DictReader(text.splitlines()))
    assert all(float(r["env_steps"]) >= 8 for r in rows)  # 8 dreams of at least a step


def test_fidelity_refuses_an_m_without_the_dream_heads(tmp_path):
    from agent_fixtures import make_run
    from wmlab.controller.cmaes import SNAPSHOTS
    from wmlab.errors import WmlabError
    from wmlab.fidelity import measure_fidelity

    plain = MDNRNN(MdrnnShape(z_dim=8, action_dim=1, hidden=16, gaussians=2,
                              restart_input=True))
    cfg = make_run(tmp_path, mdrnn=plain)
    from wmlab.checkpoint import save_checkpoint

    save_checkpoint(f"{RunLayout.of(cfg).controller}/{SNAPSHOTS}", "g00001", 1,
                    {"params": torch.zeros(8)}, None, {"generation": 1, "eval_mean": 1.0})
    with pytest.raises(WmlabError, match="needs M's done_head"):
        measure_fidelity(cfg, 4)
    assert not (Path(cfg.run_dir()) / "eval").exists()  # nothing written


# --- what the stall option does to C's fitness ------------------------------------------------


def test_stall_effect_summary_pairs_tracks_and_counts_the_steps_saved():
    from wmlab.stall import summarize

    whole = np.array([[100.0, 300.0], [500.0, 700.0], [200.0, 0.0]])
    stalled = whole - np.array([[10.0, 30.0], [0.0, 0.0], [20.0, 0.0]])
    effect = summarize(100, [10, 20, 30], whole, stalled, np.full((3, 2), 1000),
                       np.array([[500, 1000], [1000, 1000], [900, 1000]]))
    assert [r.generation for r in effect.rows] == [10, 20, 30]
    assert effect.rows[0].whole == 200.0 and effect.rows[0].stalled == 180.0
    assert effect.rank_correlation == pytest.approx(1.0)  # the same order: 2 > 1 > 3
    assert effect.difference == pytest.approx(-10.0)
    assert effect.difference_se == pytest.approx(np.std([-10, -30, 0, 0, -20, 0], ddof=1)
                                                 / np.sqrt(6))
    assert effect.steps_saved == pytest.approx(600 / 6000)
    assert "rank correlation with whole episodes +1.00" in effect.line()


def test_stall_effect_plays_the_snapshots_whole_and_stalled(tmp_path, one_thread):
    import json

    from agent_fixtures import make_run
    from wmlab.checkpoint import save_checkpoint
    from wmlab.controller.cmaes import SNAPSHOTS
    from wmlab.errors import WmlabError
    from wmlab.stall import measure_stall_effect

    m = MDNRNN(MdrnnShape(z_dim=8, action_dim=3, hidden=16, gaussians=2))
    cfg = make_run(tmp_path, "carracing", ('env.backend="gymnasium"', "env.max_steps=60",
                                           "es.workers=1", "es.stall_steps=0"), mdrnn=m)
    layout = RunLayout.of(cfg)
    with pytest.raises(WmlabError, match="no stall to measure"):
        measure_stall_effect(cfg, tracks=2)
    with pytest.raises(WmlabError, match="holds 0 scored means"):
        measure_stall_effect(cfg, tracks=2, stall_steps=5)
    n = (8 + 16) * 3 + 3
    for g, scale in ((10, 0.0), (20, 0.5)):
        params = scale * torch.linspace(-1, 1, n)
        save_checkpoint(f"{layout.controller}/{SNAPSHOTS}", f"g{g:05d}", g,
                        {"params": params}, None, {"generation": g, "eval_mean": 0.0})
    short = measure_stall_effect(cfg, tracks=2, stall_steps=5)
    assert [r.generation for r in short.rows] == [10, 20] and short.tracks == 2
    assert all(r.stalled_steps <= r.whole_steps == 2 * 60 for r in short.rows)
    saved = json.loads(Path(layout.stall_effect).read_text())
    assert saved["stall_steps"] == 5 and len(saved["rows"]) == 2
    # a stall longer than the episode ends nothing: the fitness is the whole episodes'
    never = measure_stall_effect(cfg, tracks=2, stall_steps=1000)
    assert never.steps_saved == 0.0 and never.difference == 0.0
    assert [r.stalled for r in never.rows] == [r.whole for r in never.rows]


# --- a shorter horizon for the members' rollouts ----------------------------------------------


def test_members_play_the_shorter_horizon_and_the_mean_is_scored_on_whole_tracks(
        tmp_path, one_thread):
    """es.max_steps: every member's track ends at the horizon (CarRacing never ends sooner
    here: a 30-frame track has no lap to finish), the scored mean plays the whole 30."""
    import csv

    from agent_fixtures import make_run
    from test_carracing_budget import carracing_mdrnn
    from wmlab.agent import workload_from_config
    from wmlab.controller.cmaes import eval_seeds, load_controller_params
    from wmlab.evaluators import Evaluator
    from wmlab.pipeline.controller_stage import member_workload, train_controller

    tiny = ('env.backend="envpool"', "env.max_steps=30", "es.population=4", "es.rollouts=2",
            "es.generations=1", "es.eval_every=1", "es.eval_rollouts=2", "es.engine=\"serial\"")
    whole = make_run(tmp_path / "whole", "carracing", tiny, mdrnn=carracing_mdrnn(True))
    short = make_run(tmp_path / "short", "carracing", (*tiny, "es.max_steps=12"),
                     mdrnn=carracing_mdrnn(True))
    # off: the members' rollouts are the workload as it was, to the last field
    assert member_workload(workload_from_config(whole), whole.es) == workload_from_config(whole)
    assert member_workload(workload_from_config(short), short.es).max_steps == 12
    for cfg in (whole, short):
        train_controller(cfg, progress=False)
    rows = {name: next(csv.DictReader(Path(f"{RunLayout.of(cfg).controller}/metrics.csv")
                                      .read_text().splitlines()))
            for name, cfg in (("whole", whole), ("short", short))}
    assert float(rows["whole"]["env_steps"]) == 4 * 2 * 30
    assert float(rows["short"]["env_steps"]) == 4 * 2 * 12
    assert float(rows["short"]["best"]) != float(rows["whole"]["best"])
    # the scored mean played whole tracks: its score is the mean's return over all 30 frames
    mean, _ = load_controller_params(RunLayout.of(short).controller)
    seeds = eval_seeds(short.run.seed, short.es.eval_rollouts, short.es.rollouts)
    with Evaluator(workload_from_config(short), "serial") as game:
        whole_tracks = game.run(mean[None].astype(np.float32), seeds.reshape(1, -1))
    assert float(rows["short"]["eval_mean"]) == pytest.approx(float(whole_tracks.mean()))
    assert game.last_steps.sum() == 30 * short.es.eval_rollouts


def test_a_horizon_no_shorter_than_the_episodes_is_refused(tmp_path):
    from agent_fixtures import make_run
    from test_carracing_budget import carracing_mdrnn
    from wmlab.errors import WmlabError
    from wmlab.pipeline.controller_stage import train_controller

    cfg = make_run(tmp_path, "carracing", ('env.backend="envpool"', "env.max_steps=30",
                                           "es.max_steps=30"), mdrnn=carracing_mdrnn(True))
    with pytest.raises(WmlabError, match="below 30"):
        train_controller(cfg, progress=False)
    assert not Path(RunLayout.of(cfg).controller).exists()  # nothing written


def test_a_horizon_for_dream_training_is_refused():
    from wmlab.config import load_config
    from wmlab.controller.cmaes import check_es_config
    from wmlab.errors import WmlabError

    cfg = load_config("doom", "budget", ["es.max_steps=100"])
    with pytest.raises(WmlabError, match="dream.max_steps"):
        check_es_config(cfg.es)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_convolution_gives_the_two_ops_values_bit_for_bit(dtype):
    from wmlab.vision.model import conv_relu

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 64, 64, generator=gen).to(dtype).contiguous(
        memory_format=torch.channels_last)
    weight = torch.randn(32, 3, 4, 4, generator=gen).to(dtype).contiguous(
        memory_format=torch.channels_last)
    bias = torch.randn(32, generator=gen).to(dtype)
    out = conv_relu(x, weight, bias, stride=2)
    assert torch.equal(out, F.conv2d(x, weight, bias, stride=2).relu_())
    assert out.dtype == dtype and (out == 0).any() and (out > 0).any()


def test_the_repeat_profile_is_the_solve_profile_at_half_the_decisions():
    from wmlab.config import load_config
    from wmlab.errors import WmlabError
    from wmlab.pipeline import iteration_config
    from wmlab.pipeline.controller_stage import check_dream_length

    cfg = load_config("carracing", "solve-repeat")
    solve = load_config_solve()
    assert cfg.env.action_repeat == 2 and solve.env.action_repeat == 1
    assert cfg.mdrnn.seq_len + 1 == (solve.mdrnn.seq_len + 1) // 2
    assert cfg.es.stall_steps * 2 == solve.es.stall_steps
    assert cfg.run.later == solve.run.later
    cfg.run.name = "/nowhere/solve-repeat"
    later = iteration_config_unchecked(cfg, iteration_config)
    assert later.es.dream_generations > 0 and later.env.action_repeat == 2
    check_dream_length(later, get_spec("carracing").max_steps)  # the dream fits the episode
    later.dream.max_steps = 501
    with pytest.raises(WmlabError, match="dream.max_steps=500"):
        check_dream_length(later, get_spec("carracing").max_steps)
