"""Issue 28: the Doom profile that trains C only in the dream and plans within 3 hours."""

from __future__ import annotations

from unittest import mock

from wmlab.config import load_config

# Rates on 2 cores, per second of compute. Measured: the budget run's stage records
# (docs/results/doom.md; V's rate there was halved by a job beside it, so twice it here).
# Estimated from benchmarks, to be replaced by the best run's own records: M's LSTM and the
# dream in bf16 (1.5x and 2.5x their float32 rates on a CPU with AVX512-BF16).
RATES = {"collect": 8484,        # held-policy frames (2 workers)
         "agent_collect": 2000,  # frames played by the trained agent (V and M each step)
         "vision": 600,          # V training frames, bf16
         "encode": 7372,         # frames encoded
         "memory": 12000 * 1.5,  # M frame-steps, bf16
         "memory_float32": 12000,
         "generation": 34.6 / 2.5,  # seconds per C generation of 64 x 16 dreams, bf16
         "generation_float32": 34.6,
         # 100 real episodes with M's look-ahead every 5 steps, on 2 AMD EPYC cores: 562 s
         # for the shield profile's C at margin 0.05, 1,147 s for another C at 0.1 (the
         # holds are dreamt only where C's own risk passes the margin); the larger, with room
         "shielded_evaluate": 1500}
FRAMES_PER_EPISODE = 325          # the held policy's mean episode (1.3M frames / 4,000)


def _planned_seconds(cfg, iteration: int) -> dict[str, float]:
    generation = RATES["generation" if cfg.dream.precision == "bfloat16" else
                       "generation_float32"]
    episodes = cfg.collect.episodes
    by_agent = episodes * (cfg.collect.agent_fraction if iteration > 1 else 0.0)
    frames = episodes * FRAMES_PER_EPISODE
    return {
        "collect": (episodes - by_agent) * FRAMES_PER_EPISODE / RATES["collect"]
        + by_agent * FRAMES_PER_EPISODE / RATES["agent_collect"],
        "vision": cfg.vae.epochs and min(cfg.vae.max_frames, frames) / RATES["vision"],
        "encode": frames / RATES["encode"],
        "memory": cfg.mdrnn.steps * cfg.mdrnn.batch_size * cfg.mdrnn.seq_len
        / RATES["memory" if cfg.mdrnn.bf16 else "memory_float32"] + 120,  # and the dream's calibration
        "controller": cfg.es.generations * generation,
        # 100 real episodes of C and of random play, 100 dreams
        "evaluate": RATES["shielded_evaluate"] if cfg.shield.window else 100,
    }


def test_best_profile_trains_c_only_in_the_dream_and_plans_within_three_hours():
    from wmlab.pipeline import iteration_config

    cfg = load_config("doom", "best")
    # the paper's models at full size, C only in the dream, at the paper's best tau
    assert (cfg.vae.z_dim, cfg.mdrnn.hidden, cfg.controller.inputs) == (64, 512, "zch")
    assert cfg.es.fitness == "dream" and cfg.es.dream_generations == 0
    assert (cfg.es.population, cfg.es.rollouts) == (64, 16) and cfg.dream.tau == 1.15
    assert cfg.mdrnn.dropout > 0 and cfg.dream.dropout
    assert cfg.eval.episodes == 100
    first = _planned_seconds(cfg, 1)

    cfg.run.name = "/nowhere/best"  # iteration 2's settings, without a trained iteration 1
    with mock.patch("wmlab.checkpoint.checkpoint_exists", return_value=True):
        later = iteration_config(cfg, 2)
    assert later.es.fitness == "dream"  # the agent plays to collect data, C never learns there
    assert later.vae.epochs == 0 and later.collect.agent_fraction > 0
    assert later.es.carry_over  # C's start refitted to the retrained M's state
    assert later.mdrnn.init_from.endswith("/memory") and later.es.init_from.endswith(
        "/controller")
    second = _planned_seconds(later, 2)
    total = sum(first.values()) + sum(second.values())
    assert total < 3 * 3600, ({k: round(v / 60) for k, v in first.items()},
                              {k: round(v / 60) for k, v in second.items()})


def test_shield_profile_learns_from_sweeps_then_lets_m_overrule_c_within_three_hours():
    from wmlab.agent import shield_settings
    from wmlab.pipeline import iteration_config

    cfg = load_config("doom", "shield")
    budget = load_config("doom", "budget")
    # iteration 1 is the budget profile, scored without the shield
    assert cfg.run.iterations == 2 and shield_settings(cfg) is None
    assert (cfg.collect, cfg.vae, cfg.mdrnn, cfg.es, cfg.dream) == (
        budget.collect, budget.vae, budget.mdrnn, budget.es, budget.dream)
    cfg.run.name = "/nowhere/shield"
    with mock.patch("wmlab.checkpoint.checkpoint_exists", return_value=True):
        later = iteration_config(cfg, 2)
    # iteration 2: sweeps only (no episode of the agent), V kept, M continued, C from zero
    # and still trained only in the dream; M overrules C in the game
    assert later.collect.policy == "sweeps" and later.collect.agent_fraction == 0
    assert later.vae.epochs == 0 and later.mdrnn.init_from == "/nowhere/shield/memory"
    assert later.es.init_from == "" and later.es.fitness == "dream"
    shield = shield_settings(later)
    assert shield is not None and (shield.window, shield.margin) == (25, 0.05)
    assert shield.tau == later.dream.tau
    total = sum(_planned_seconds(cfg, 1).values()) + sum(_planned_seconds(later, 2).values())
    assert total < 3 * 3600, round(total / 60)
