"""Configuration: one dataclass per stage, presets shipped as TOML, ``--set`` overrides.

A run's configuration is resolved in one order, each layer overriding the last:
dataclass defaults -> the preset's profile file (``presets/<env>/<profile>.toml``, which may
``extends`` another profile of the same preset) -> ``--set section.key=value`` overrides.
Every value is checked against its field's type and range, and unknown keys are refused, so
a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from wmlab.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib


def _opt(default: Any, help: str, *, min: float | None = None, max: float | None = None,
         choices: tuple[Any, ...] | None = None) -> Any:
    """A dataclass field carrying its help text and allowed range for validation."""
    meta = {"help": help, "min": min, "max": max, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    name: str = _opt("", "run directory name under root; empty = '<preset>-<profile>'")
    root: str = _opt("runs", "folder (or fsspec URL) that holds run directories")
    seed: int = _opt(0, "master seed; every stage derives its own seeds from it", min=0)
    device: str = _opt("auto", "torch device: auto (CUDA when present), cpu, cuda, cuda:N")
    iterations: int = _opt(1, "agent generations `wmlab run` trains one after another; from "
                           "the 2nd on, the previous one's agent collects part of the data "
                           "(collect.agent_fraction) and V and M start from its weights",
                           min=1, max=100)
    later: list[str] = _opt([], "overrides (section.key=value, as --set) for iterations 2 "
                            "and on, e.g. [\"vae.epochs=0\"] to keep the first V")


@dataclass
class EnvConfig:
    name: str = _opt("carracing", "environment: carracing, doom, binpacking or a Gymnasium id")
    backend: str = _opt("", "simulator backend; empty = the env's default (reference) backend")
    max_steps: int = _opt(0, "episode step cap; 0 = the env's own (CarRacing 1000, Doom 2100)",
                          min=0)
    action_repeat: int = _opt(1, "each of the agent's actions held for this many env frames "
                              "(rewards summed; V, M and C see every k-th frame, and M's "
                              "steps, dream.max_steps and es.stall_steps count the agent's "
                              "steps); 1 = every frame, as in the paper", min=1, max=64)


# bin packing's heuristics as collection policies (wmlab.envs.binpacking_heuristics)
HEURISTIC_POLICIES = ("best-fit", "sum-of-squares", "sum-of-squares-orl")
# behaviours that read nothing, scored beside C on its evaluation seeds (wmlab.policies)
EVAL_REFERENCES = ("noop", "left", "sweep")
# the sweep: the first output at -1 for SWEEP_FIRST steps, then at +1 and -1 in turn for
# SWEEP_PERIOD steps each (DoomTakeCover: from the middle to the left wall, then across the
# room, ~100 steps, and a wait; the period was chosen among 100-300 on seeds never evaluated)
SWEEP_FIRST, SWEEP_PERIOD = 60, 140


@dataclass
class CollectConfig:
    episodes: int = _opt(10000, "episodes to keep in the store (after filtering)", min=0)
    workers: int = _opt(0, "worker processes; 0 = one per CPU core", min=0, max=1024)
    envs_per_worker: int = _opt(1, "envs stepped as one batch inside each worker",
                                min=1, max=4096)
    policy: str = _opt("brown", "collection policy (agent: a trained run's V, M and C; "
                       "best-fit, sum-of-squares, sum-of-squares-orl: bin packing's "
                       "heuristics, reading the env's state; sweeps: Doom sweeps on random "
                       "clocks)",
                       choices=("uniform", "brown", "held", "random-weights", "fixed",
                                "sweeps", "agent", *HEURISTIC_POLICIES))
    agent_run: str = _opt("", "policy agent: run directory whose trained controller acts")
    agent_fraction: float = _opt(0.5, "iterations 2+: fraction of episodes collected by the "
                                 "previous iteration's agent (the rest: collect.policy)",
                                 min=0.0, max=1.0)
    fixed_fraction: float = _opt(0.0, "fraction of episodes collected by policy 'fixed' "
                                 "(one constant behaviour per episode: no-op, left, right) so "
                                 "that M learns where they lead; the rest: collect.policy",
                                 min=0.0, max=1.0)
    explore: float = _opt(0.0, "a heuristic, sweeps or agent policy: probability of a uniform "
                          "(valid) move instead of the policy's at each step (M sees good play "
                          "and what follows a bad move); the agent's: a move held "
                          "collect.explore_hold steps", min=0.0, max=1.0)
    explore_hold: int = _opt(1, "agent policy: steps an exploring move is held before C acts "
                             "again", min=1, max=10000)
    explore_outputs: list[int] = _opt([], "agent policy: the outputs of C an exploring move "
                                      "replaces (CarRacing: [1, 2], the throttle, C steering); "
                                      "empty: all")
    min_length: int = _opt(0, "drop episodes with fewer steps than this (Doom: 101)", min=0)
    out: str = _opt("", "episode store path or URL; empty = <run>/data")
    collection: str = _opt("", "name of this collection inside the store; empty = policy name")
    seed: int = _opt(0, "seed of the collection; episode i uses seeds derived from (seed, i)",
                     min=0)
    brown_sigma: float = _opt(0.2, "step size of the brown-noise random walk (raw units)",
                              min=0.0, max=2.0)
    hold_min: int = _opt(1, "held policy: shortest hold in frames", min=1)
    hold_max: int = _opt(10, "held policy: longest hold in frames", min=1)
    weights_scale: float = _opt(0.01, "random-weights policy: max std of the weights",
                                min=0.0)
    chunk_frames: int = _opt(64, "frames per independently compressed chunk", min=1, max=4096)
    compression_level: int = _opt(3, "zstd level of frame chunks", min=1, max=22)
    allow_mixed_backends: bool = _opt(False, "let one store hold frames of several backends")


@dataclass
class VaeConfig:
    kind: str = _opt("vae", "vision model", choices=("vae", "vae-gan"))
    init_from: str = _opt("", "vision folder whose trained V starts training (iterations)")
    z_dim: int = _opt(32, "latent size (CarRacing 32, Doom 64)", min=1, max=4096)
    width: int = _opt(32, "channels of V's first convolution, doubling per layer (the paper: "
                      "32); 16 is a quarter of the arithmetic", min=4, max=256)
    kl_tolerance: float = _opt(0.5, "KL floor per latent dimension", min=0.0)
    lr: float = _opt(1e-4, "Adam learning rate", min=0.0, max=1.0)
    batch_size: int = _opt(100, "frames per batch", min=1)
    epochs: int = _opt(10, "passes over the training frames (the paper says 1, the code 10)",
                       min=0)
    max_frames: int = _opt(0, "cap on training frames per epoch; 0 = all", min=0)
    val_fraction: float = _opt(0.05, "fraction of episodes held out for validation",
                               min=0.0, max=0.5)
    checkpoint_every: int = _opt(500, "batches between checkpoints", min=1)
    loader_mb: float = _opt(256.0, "memory allowance of the frame loader (its shuffle pools, "
                            "prefetch and batches), whatever the store's size", min=1.0)
    channels_last: bool = _opt(True, "channels-last memory layout (faster on CPU)")
    bf16: bool = _opt(False, "bfloat16 autocast for training V and encoding with it, where the "
                      "hardware runs bf16 natively (float32 elsewhere)")
    gan_weight: float = _opt(0.001, "VAE-GAN: weight per pixel of the adversarial + "
                             "feature-matching terms, against the per-pixel squared error",
                             min=0.0)
    salient_weight: float = _opt(0.0, "extra weight of the squared error on salient pixels "
                                 "(those a frame changes against the mean training frame: "
                                 "Doom's monsters and fireballs); 0 = the paper's plain loss",
                                 min=0.0)


@dataclass
class MdrnnConfig:
    hidden: int = _opt(256, "LSTM units (CarRacing 256, Doom 512)", min=1)
    init_from: str = _opt("", "memory folder whose trained M starts training (iterations)")
    earlier_data: bool = _opt(False, "iteration 2 on: M also trains on the encoded episodes "
                              "of every earlier iteration of the run (latents of the same "
                              "V), not only on this iteration's new ones")
    gaussians: int = _opt(5, "mixture components per z dimension", min=1, max=64)
    done_head: bool = _opt(False, "predict episode end (Doom)")
    reward_head: bool = _opt(False, "predict reward")
    restart_input: bool = _opt(False, "feed the restart flag, which zeroes the LSTM state")
    done_weight: float = _opt(10.0, "weight of positive (death) steps in the done loss",
                              min=0.0)
    reward_over_weight: float = _opt(1.0, "weight of the reward head's squared error where M "
                                     "predicts more than the env paid (a published recipe "
                                     "against dream exploitation uses 5); 1 = plain", min=0.0)
    regime: str = _opt("episodes", "whole episodes per batch, or concatenated streams",
                       choices=("episodes", "streams"))
    batch_size: int = _opt(100, "sequences (or streams) per batch", min=1)
    seq_len: int = _opt(999, "input steps per sequence (episodes) or chunk (streams)", min=1)
    steps: int = _opt(4000, "optimiser steps", min=0)
    lr: float = _opt(1e-3, "initial learning rate", min=0.0, max=1.0)
    lr_min: float = _opt(0.0, "learning-rate floor of the decay schedule", min=0.0)
    lr_decay: float = _opt(1.0, "lr = (lr - lr_min) * decay^step + lr_min", min=0.0, max=1.0)
    grad_clip: float = _opt(1.0, "elementwise gradient clip", min=0.0)
    dropout: float = _opt(0.0, "dropout probability on the LSTM's output h before M's head "
                          "(mixture, done, reward), in training only; the recurrent state "
                          "and what C reads stay whole; 0 = off", min=0.0, max=0.99)
    checkpoint_every: int = _opt(200, "optimiser steps between checkpoints", min=1)
    batch_parts: int = _opt(0, "row groups of each batch trained in parallel threads, one "
                            "core each (same gradient); 0 = 2 for streams on a CPU with 2+ "
                            "threads, else 1", min=0, max=64)
    bf16: bool = _opt(False, "bfloat16 autocast for M's LSTM and head in training, where the "
                      "hardware runs bf16 natively (float32 elsewhere)")
    initial_z: int = _opt(1000, "first-frame latents kept for starting dreams", min=1)
    ensemble: int = _opt(1, "Ms trained on the same data from different seeds; the dream "
                         "steps them all on the same z and actions, ends when any of them "
                         "says the episode ends and takes the next z from each in turn, so "
                         "C cannot win by one M's errors (C reads the first M's state); "
                         "1 = one M", min=1, max=16)
    calibration_episodes: int = _opt(64, "dreams per reference policy (random, no-op, left) "
                                     "in M's calibration report; 0 = skip", min=0)
    calibration_real_episodes: int = _opt(16, "real-game episodes per reference policy, "
                                          "compared with the dreams; 0 = skip", min=0)


# What C may read: z alone, [z, h] or [z, c, h] (controller.inputs)
CONTROLLER_INPUTS = ("z", "zh", "zch")


@dataclass
class ControllerConfig:
    inputs: str = _opt("zh", "what C observes", choices=CONTROLLER_INPUTS)
    hidden: int = _opt(0, "hidden units; 0 = linear (the paper's 40-unit variant: 40)", min=0)
    bias: bool = _opt(True, "bias in C's output layer")
    packed_encoder: bool = _opt(False, "V's encoder packed for acting (weights cast once, the "
                                "late convolutions as patch matmuls): ~1.5-2x faster real "
                                "rollouts, z equal to the convolutions' up to float rounding")
    int8_encoder: bool = _opt(False, "V's encoder as int8 convolutions for acting, calibrated "
                              "on frames V's decoder draws from its prior (takes the place "
                              "of packed_encoder): V 1.6-2x faster where bf16 is not "
                              "native (AVX2), mu moved by ~2% of V's posterior noise")
    lookahead: bool = _opt(False, "discrete actions only: score each action a by w . h'_a "
                           "(+ v r_a where M has a reward head) + b_a, h'_a M's state after a "
                           "and r_a its predicted reward (M stepped once per action); inputs "
                           "zh reads h'_a, zch [c'_a, h'_a]; with hidden = k the score is "
                           "a k-unit tanh layer over them, shared by the actions")
    z_noise: float = _opt(1.0, "scale of V's posterior noise in the z a real-env agent "
                          "acts on: 1 = z sampled from V's posterior (the paper), 0 = V's "
                          "mean (a C's fitness without the sampling noise); the dream's z "
                          "comes from M and is untouched", min=0.0)
    clock: list[int] = _opt([], "periods in env steps of a clock C also reads: the sine and "
                            "cosine of the episode's step count at each (2 inputs a "
                            "period, the same count in the game and the dream), e.g. "
                            "[70, 140, 280, 560]; empty = none, as the paper")


@dataclass
class EsConfig:
    fitness: str = _opt("real", "where rollouts run", choices=("real", "dream"))
    dream_generations: int = _opt(0, "mixed schedule, with fitness = real: the first N "
                                  "generations score members in M's dream (needs "
                                  "mdrnn.done_head, and reward_head unless the env pays "
                                  "+1 per step alive), the rest in the real env, in one "
                                  "CMA-ES run; 0 = off", min=0)
    init_from: str = _opt("", "controller folder whose best (else latest) controller is "
                          "CMA-ES's initial mean; 'previous' = the previous iteration's; "
                          "empty = zero, as the paper")
    carry_over: bool = _opt(False, "with init_from and mdrnn.init_from (iteration 2 on): "
                            "refit init_from's C, made for the previous M, to this M "
                            "(its first map of what it reads: a linear C's weights, the "
                            "hidden layer, a look-ahead C's map of M's state after each "
                            "action) by ridge regression on this iteration's episodes driven "
                            "by the agent; the ridge strength (or the controller as it "
                            "was) whose real score on the fixed seeds is best starts C "
                            "(<run>/controller/carry-over.json)")
    h_components: int = _opt(0, "search a linear C's weights on M's hidden state h only "
                              "along the k directions in which h varies most over the "
                              "iteration's episodes (the agent's where there are any): "
                              "outputs x (z + k) + outputs parameters for CMA-ES instead of "
                              "outputs x (z + h) + outputs, the controller saved whole "
                              "(<run>/controller/h-basis keeps the directions); 0 = every "
                              "weight", min=0)
    standardize: bool = _opt(False, "search a linear C's weights in units of each input's "
                             "spread: CMA-ES moves C on (x - mean) / spread (each spread "
                             "relative to the inputs' root mean square, so es.sigma0 moves "
                             "C as much in all as on the raw inputs), so one step moves "
                             "C's response to every input by as much (M's units "
                             "spread 0.04-0.6, V's used and unused dimensions 0.4-1 and "
                             "~0.02 at its mean); the mean and spread over the iteration's "
                             "episodes (the agent's where there are any), z as the agent "
                             "draws it (<run>/controller/input-scale); the controller saved "
                             "whole")
    population: int = _opt(64, "CMA-ES population", min=2)
    rollouts: int = _opt(16, "rollouts per member; fitness is their mean return", min=1)
    dream_patience: int = _opt(0, "mixed schedule: end the dream generations once this "
                                "many scorings of the mean in a row (every eval_every "
                                "generations) have not beaten the best real score; the "
                                "real generations restart CMA-ES at the best scored mean; "
                                "0 = all dream_generations", min=0)
    dream_rollouts: int = _opt(0, "rollouts per member in the mixed schedule's dream "
                               "generations (a dream step costs ~1/20 of a real one, so "
                               "the dream affords the paper's 16); 0 = es.rollouts", min=0)
    sigma0: float = _opt(0.1, "initial step size", min=0.0)
    covariance: str = _opt("full", "CMA-ES covariance: full (the paper's), or diagonal "
                           "(sep-CMA-ES: linear cost and a small checkpoint, for controllers "
                           "of thousands of parameters)", choices=("full", "diagonal"))
    l2: float = _opt(0.01, "L2 weight penalty subtracted from fitness", min=0.0)
    antithetic: bool = _opt(True, "members i and i + pop/2 share rollout seeds")
    mirrored: bool = _opt(False, "members come in mirrored pairs (mean + d, mean - d: "
                          "cma's unconditional mirroring), each pair on the same rollout "
                          "seeds, so what the pair's returns differ by is d's effect")
    common_seeds: bool = _opt(False, "every member of a generation plays the same rollout "
                              "seeds (common random numbers: ranks members where episodes "
                              "differ more than controllers do, e.g. BinPacking's items)")
    generations: int = _opt(2000, "generations to run", min=0)
    eval_every: int = _opt(25, "generations between scoring the mean", min=1)
    eval_rollouts: int = _opt(1024, "rollouts on fixed seeds when scoring the mean", min=1)
    final_candidates: int = _opt(0, "after the last generation, score this many of the "
                                 "best scored means again on es.final_rollouts episodes of "
                                 "their own and keep the best by that score (the best of "
                                 "many means scored on few episodes is partly luck); larger "
                                 "continues the choice; 0 = the best scored mean", min=0)
    final_rollouts: int = _opt(128, "episodes per candidate of es.final_candidates' second "
                               "scoring (seeds none of the scorings use)", min=1)
    engine: str = _opt("process", "where rollouts are evaluated",
                       choices=("serial", "process", "ray"))
    workers: int = _opt(0, "evaluator workers; 0 = one per CPU core", min=0)
    ray_address: str = _opt("", "Ray cluster address for engine=ray; empty = local")
    timeout: float = _opt(600.0, "seconds before a silent worker is declared dead", min=1.0)
    stall_steps: int = _opt(0, "end a training rollout after this many steps in a row "
                            "without a positive reward (CarRacing: no new tile), charging "
                            "its steps left at its mean reward over the stall; the mean is "
                            "still scored on whole episodes; 0 = off", min=0)
    max_steps: int = _opt(0, "real-env training rollouts end after this many steps (a "
                          "shorter horizon: on CarRacing the pace over the first part of "
                          "each track, at a fraction of a whole track's cost, so more tracks "
                          "a generation for the same compute); the mean is still scored on "
                          "whole episodes; 0 = env.max_steps", min=0)
    real_envs: int = _opt(0, "real-env rollouts of a job step in groups of this many envs, "
                          "one group after another: EnvPool's CarRacing on one core takes "
                          "~670 us an env step in pools of 8 envs, ~730 in 16, ~940 in 32 or "
                          "64, while V's cost per frame falls with the batch (docs/"
                          "benchmarks.md); 0 = every rollout of a job at once", min=0)
    job_members: int = _opt(8, "members per evaluator job (one batch; the unit of retry); "
                            "fixed so every engine computes the same batches", min=1)


@dataclass
class DreamConfig:
    tau: float = _opt(1.25, "sampling temperature (released code 1.25, paper's best 1.15)",
                      min=0.0, max=10.0)
    tau_from_fidelity: bool = _opt(False, "before C trains in the dream, set tau to the one "
                                   "of eval.fidelity_taus whose dream ranks the scored "
                                   "controllers of es.init_from's run most like the game "
                                   "(measured once per C stage, <run>/controller/"
                                   "tau-choice.json)")
    max_steps: int = _opt(2100, "dream episode cap", min=1)
    precision: str = _opt("float32", "dream matmul precision (bfloat16: ~3x faster on CPUs "
                          "with AVX512-BF16, trajectories differ in the last bits; "
                          "float32 where the hardware has no native bf16)",
                          choices=("float32", "bfloat16"))
    done: str = _opt("threshold", "when a dream ends: threshold = done logit > 0 (the "
                     "original), sample = drawn with M's probability (weight undone)",
                     choices=("threshold", "sample"))
    done_bias: float = _opt(0.0, "added to M's done logit in the dream; positive ends "
                            "dreams sooner", min=-20.0, max=20.0)
    dropout: bool = _opt(False, "keep M's training dropout (mdrnn.dropout, which must be "
                         "> 0) on in the dream: h before the head loses each unit with that "
                         "probability, the rest scaled by 1/(1-p), a fresh mask per dream "
                         "and step from the dream's own seed")
    ensemble_reward: str = _opt("mean", "with mdrnn.ensemble > 1, a dream step's reward: "
                                "the Ms' mean, or the least of them (pessimistic: a reward "
                                "only one M predicts pays nothing extra, so C cannot climb "
                                "by one M's optimism)", choices=("mean", "min"))
    fit_done_bias: bool = _opt(False, "before C trains in the dream, add to done_bias "
                               "ln(dream / game survival of random play) from M's "
                               "calibration, so a lenient dream ends sooner")
    calibration_tolerance: float = _opt(
        0.0, "refuse to train C in a dream where a reference policy (random, no-op, left, "
        "eval.references) "
        "survives more than this many times longer, or shorter, than in the game; 0 = off",
        min=0.0)


@dataclass
class ShieldConfig:
    window: int = _opt(0, "M's look-ahead as C's shield when the agent acts in the real env "
                       "(discrete actions, M with a done head): every `period` steps M "
                       "dreams this many steps ahead under C and under each move held, "
                       "and a hold clearly safer than C's move is taken instead; 0 = off, "
                       "as the paper", min=0)
    samples: int = _opt(8, "dreams per candidate move (all candidates share their noise)",
                        min=1)
    period: int = _opt(5, "env steps between looks; an overruling hold lasts this long", min=1)
    margin: float = _opt(0.1, "C is overruled where its chance of the episode ending within "
                         "the window exceeds the safest hold's by more than this", min=0.0,
                         max=1.0)
    hold: int = _opt(0, "dream steps each move is held in the look-ahead before C acts again "
                     "(= period: the dream plays the plan the agent would follow); 0 = held "
                     "for the whole window", min=0)


@dataclass
class EvalConfig:
    episodes: int = _opt(100, "episodes of the reported evaluation", min=1)
    seed: int = _opt(1_000_000, "first of the fixed, recorded evaluation seeds", min=0)
    backend: str = _opt("", "backend of the reported score; empty = the reference backend")
    fidelity_taus: list[float] = _opt([], "taus at which the dream's fidelity is measured "
                                      "(how tau is chosen by measurement); empty = dream.tau")
    fidelity_dreams: int = _opt(0, "dreams per controller for the dream's fidelity (the run's "
                                "scored means, zero and random, in the dream against their "
                                "real returns; needs M's reward and done heads); 0 = skip",
                                min=0)
    references: list[str] = _opt([], "behaviours that read nothing, scored on the evaluation "
                                 "seeds beside the random policy and paired with C: noop, "
                                 "left, sweep (the first output -1 for 60 steps, then +1 and "
                                 "-1 in turn for 140 steps each: on Doom, across the room and "
                                 "back, which survives as long as the trained agents do)")
    validation_episodes: int = _opt(0, "episodes on other seeds (eval.validation_seed on) "
                                    "scored beside the evaluation; a run of several "
                                    "iterations names the one with the best validation mean "
                                    "as its agent, so the evaluation seeds never choose; "
                                    "0 = none", min=0)
    validation_seed: int = _opt(1_500_000, "first of the validation seeds (must not overlap "
                                "the evaluation's)", min=0)


@dataclass
class Config:
    preset: str = _opt("carracing", "preset this config came from")
    profile: str = _opt("paper", "profile of the preset")
    run: RunConfig = field(default_factory=RunConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    vae: VaeConfig = field(default_factory=VaeConfig)
    mdrnn: MdrnnConfig = field(default_factory=MdrnnConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    es: EsConfig = field(default_factory=EsConfig)
    dream: DreamConfig = field(default_factory=DreamConfig)
    shield: ShieldConfig = field(default_factory=ShieldConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def run_dir(self) -> str:
        name = self.run.name or f"{self.preset}-{self.profile}"
        # An absolute path or a URL names the run directory itself, not a name under root.
        if name.startswith("/") or "://" in name:
            return name.rstrip("/")
        return f"{self.run.root.rstrip('/')}/{name}"

    def store_url(self) -> str:
        return self.collect.out or f"{self.run_dir()}/data"


# Names people reach for from the paper's vocabulary ("vision", "memory") map to the sections.
SECTION_ALIASES = {"vision": "vae", "memory": "mdrnn"}


# ---------------------------------------------------------------------------------------------
# Presets


def _presets_root() -> Any:
    return resources.files("wmlab") / "presets"


def list_presets() -> dict[str, list[str]]:
    """Preset name -> its profiles, as shipped in the package."""
    found: dict[str, list[str]] = {}
    for preset_dir in sorted(_presets_root().iterdir(), key=lambda p: p.name):
        if preset_dir.is_dir():
            profiles = sorted(p.name[:-5] for p in preset_dir.iterdir() if p.name.endswith(".toml"))
            if profiles:
                found[preset_dir.name] = profiles
    return found


def _read_profile(preset: str, profile: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    presets = list_presets()
    if preset not in presets:
        raise ConfigError(
            f"unknown preset '{preset}': choose one of {', '.join(presets)}")
    if profile not in presets[preset]:
        raise ConfigError(
            f"preset '{preset}' has no profile '{profile}': choose one of "
            f"{', '.join(presets[preset])}")
    if profile in seen:
        raise ConfigError(f"preset '{preset}': profiles extend each other in a cycle: "
                          f"{' -> '.join((*seen, profile))}")
    text = (_presets_root() / preset / f"{profile}.toml").read_text()
    data = _parse_toml(text, f"preset {preset}/{profile}")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    return _merge(_read_profile(preset, str(parent), (*seen, profile)), data)


def _parse_toml(text: str, where: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where} is not valid TOML: {exc}") from None


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------------------------------------
# Building and validating


def parse_override(text: str) -> tuple[str, Any]:
    """``section.key=value`` -> (``section.key``, value); value is read as TOML, else a string."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form section.key=value "
                          "(e.g. --set vae.epochs=3)")
    key, raw = (part.strip() for part in text.split("=", 1))
    if key.count(".") != 1 or not all(key.split(".")):
        raise ConfigError(f"override key '{key}' must be section.key (e.g. vae.epochs)")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # lets `--set env.backend=envpool` work without quoting
    return key, value


def _check_value(key: str, value: Any, hint: Any, meta: dict[str, Any]) -> Any:
    """Coerce ``value`` to the field's type and check its range, or raise naming ``key``."""
    origin = typing.get_origin(hint)
    if origin is list:
        (item_hint,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check_value(f"{key}[{i}]", v, item_hint, {}) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        value = float(value)
    elif hint is str and not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    low, high, choices = meta.get("min"), meta.get("max"), meta.get("choices")
    if low is not None and value < low:
        raise ConfigError(f"{key}: {value!r} is below the minimum {low}")
    if high is not None and value > high:
        raise ConfigError(f"{key}: {value!r} is above the maximum {high}")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
    return value


def _apply(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    """Set fields of dataclass ``obj`` from nested ``data``, validating each value."""
    hints = typing.get_type_hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for raw_key, value in data.items():
        key = SECTION_ALIASES.get(raw_key, raw_key) if not prefix else raw_key
        path = f"{prefix}{key}"
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key '{prefix}{raw_key}': known keys here are {known}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"'{path}' is a section: set its keys, e.g. {path}.<key>=...")
            _apply(current, value, f"{path}.")
        else:
            setattr(obj, key, _check_value(path, value, hints[key], dict(fields[key].metadata)))


def dream_dropout(cfg: Config) -> float:
    """The dropout probability the dream runs with: mdrnn.dropout where dream.dropout is on,
    else 0 (the dream keeps the rate M was trained with, as the published variant does)."""
    if not cfg.dream.dropout:
        return 0.0
    if cfg.mdrnn.dropout <= 0.0:
        raise ConfigError("dream.dropout = true keeps M's training dropout on in the dream, "
                          "but mdrnn.dropout is 0: set mdrnn.dropout (e.g. --set "
                          "mdrnn.dropout=0.1) or dream.dropout=false")
    return float(cfg.mdrnn.dropout)


def check_lookahead(inputs: str, clock: Sequence[int] = ()) -> None:
    """What controller.lookahead needs of the rest of C's config: it reads M's state after
    each action (no z: the same for every action), and no clock (the same for every action
    too)."""
    if inputs not in ("zh", "zch"):
        raise ConfigError(f"controller.lookahead scores each action by M's state after it: "
                          f"set controller.inputs to zh (h') or zch ([c', h']), not '{inputs}'")
    if len(clock):
        raise ConfigError("controller.lookahead scores each action by M's state after it, "
                          "and a clock reads the same for every action: set "
                          "controller.clock = [] or controller.lookahead = false")


def check_clock(periods: Sequence[Any]) -> None:
    """controller.clock: periods (whole numbers, as loading checks) of at least 2 steps (a
    period of 1 reads the same at every step), no period twice."""
    bad = [p for p in periods if p < 2]
    if bad:
        raise ConfigError(f"controller.clock: periods are whole numbers of env steps, at "
                          f"least 2; got {', '.join(map(repr, bad))}: e.g. "
                          "controller.clock=[70,140,280,560]")
    if len(set(periods)) != len(periods):
        raise ConfigError(f"controller.clock: {list(periods)} names a period twice: give "
                          "each period once")


def check_validation_seeds(ev: EvalConfig) -> None:
    """The validation episodes choose the run's agent, so none may be an evaluation episode:
    the reported score stays on episodes no choice has seen."""
    if not ev.validation_episodes:
        return
    first, last = ev.validation_seed, ev.validation_seed + ev.validation_episodes
    if first < ev.seed + ev.episodes and ev.seed < last:
        raise ConfigError(f"eval.validation_seed: the validation seeds {first}..{last - 1} "
                          f"overlap the evaluation's {ev.seed}..{ev.seed + ev.episodes - 1}, "
                          "and the evaluation must be on episodes the choice never saw: set "
                          "eval.validation_seed outside them (e.g. "
                          f"{ev.seed + ev.episodes + 500_000})")


def _check_consistency(cfg: Config) -> None:
    dream_dropout(cfg)  # refused at load, not after V and M have trained
    check_clock(cfg.controller.clock)
    if cfg.controller.lookahead:
        check_lookahead(cfg.controller.inputs, cfg.controller.clock)
    if cfg.mdrnn.reward_over_weight != 1.0 and not cfg.mdrnn.reward_head:
        raise ConfigError(f"mdrnn.reward_over_weight ({cfg.mdrnn.reward_over_weight:g}) "
                          "weighs the reward head's loss, and M has none: set "
                          "mdrnn.reward_head=true, or leave it at 1")
    if cfg.collect.hold_min > cfg.collect.hold_max:
        raise ConfigError(f"collect.hold_min ({cfg.collect.hold_min}) must not exceed "
                          f"collect.hold_max ({cfg.collect.hold_max})")
    exploring = (*HEURISTIC_POLICIES, "sweeps", "agent")
    agent_share = cfg.collect.agent_run and cfg.collect.agent_fraction > 0
    if cfg.collect.explore > 0 and cfg.collect.policy not in exploring and not agent_share:
        raise ConfigError(f"collect.explore mixes random moves into a heuristic's, the "
                          f"sweeps' or an agent's play, and collect.policy is "
                          f"'{cfg.collect.policy}' with no agent share: set collect.policy to "
                          f"{', '.join(exploring)}, or collect.explore = 0")
    unknown = [name for name in cfg.eval.references if name not in EVAL_REFERENCES]
    if unknown:
        raise ConfigError(f"eval.references: unknown {', '.join(map(repr, unknown))}: choose "
                          f"among {', '.join(EVAL_REFERENCES)}")
    check_validation_seeds(cfg.eval)
    if cfg.mdrnn.lr_min > cfg.mdrnn.lr:
        raise ConfigError(f"mdrnn.lr_min ({cfg.mdrnn.lr_min}) must not exceed mdrnn.lr "
                          f"({cfg.mdrnn.lr})")
    if cfg.run.later:  # the later iterations' overrides, checked now, not hours from now
        # as iteration_config makes them: with the previous iteration's agent to collect
        probe = dataclasses.replace(
            cfg, run=dataclasses.replace(cfg.run, later=[]),
            collect=dataclasses.replace(cfg.collect,
                                        agent_run=cfg.collect.agent_run or "previous"))
        try:
            with_overrides(probe, cfg.run.later)
        except ConfigError as exc:
            raise ConfigError(f"run.later: {exc}") from None
    for key in ("antithetic", "mirrored"):
        if getattr(cfg.es, key) and cfg.es.population % 2:
            raise ConfigError(f"es.population ({cfg.es.population}) must be even with "
                              f"es.{key} = true")


def from_dict(data: dict[str, Any]) -> Config:
    cfg = Config()
    _apply(cfg, data)
    _check_consistency(cfg)
    return cfg


def overrides_to_dict(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for text in overrides:
        key, value = parse_override(text)
        section, name = key.split(".")
        nested.setdefault(section, {})[name] = value
    return nested


def load_config(preset: str, profile: str = "paper",
                overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The resolved config of a preset's profile with ``--set`` overrides applied."""
    data = _read_profile(preset, profile)
    data = _merge(data, {"preset": preset, "profile": profile})
    return from_dict(_merge(data, overrides_to_dict(overrides)))


def with_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """A copy of ``cfg`` with ``section.key=value`` overrides applied and checked."""
    return from_dict(_merge(to_dict(cfg), overrides_to_dict(overrides)))


def load_config_file(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A config saved by a run (``config.toml``), with optional overrides."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    return from_dict(_merge(_parse_toml(text, str(path)), overrides_to_dict(overrides)))


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_toml(cfg: Config) -> str:
    """Serialise a config as TOML (scalars and flat lists are all a config holds)."""
    top, sections = [], []
    for name, value in to_dict(cfg).items():
        if isinstance(value, dict):
            sections.append(f"\n[{name}]")
            sections.extend(f"{k} = {toml_value(v)}" for k, v in value.items())
        else:
            top.append(f"{name} = {toml_value(value)}")
    return "\n".join(top + sections) + "\n"


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def describe(cfg_type: type = Config) -> list[tuple[str, str, str]]:
    """(key, default, help) for every option: the documentation of ``--set``."""
    rows = []
    for f in dataclasses.fields(cfg_type):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            for sub in dataclasses.fields(default):
                rows.append((f"{f.name}.{sub.name}", toml_value(getattr(default, sub.name)),
                             sub.metadata.get("help", "")))
    return rows
