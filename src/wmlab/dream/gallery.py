"""What ``wmlab dream`` does: load V, M and the dream starts of a run, then draw (``--play``
hands the loaded models to ``wmlab.play.play_dream``).

Everything is loaded and checked (tau, M, the initial-z store, V, the controller) before any
file is written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from wmlab.config import Config
from wmlab.dream.batched import BatchedDream
from wmlab.dream.calibration import dream_settings
from wmlab.dream.pictures import compare_gif, dream_gif, random_policy
from wmlab.dream.reference import action_converter
from wmlab.dream.settings import DreamSettings
from wmlab.errors import StoreError, WmlabError
from wmlab.memory.model import MDNRNN, DreamStart, load_initial_z, load_mdrnn
from wmlab.runs import RunLayout


@dataclass
class DreamRequest:
    steps: int = 300
    seed: int = 0
    controller: str | None = None  # safetensors file with a flat "params" tensor
    out: str | None = None
    episode: str | None = None
    compare: bool = True


@dataclass
class DreamModels:
    mdrnn: MDNRNN
    vae: Any
    start: DreamStart
    info: dict[str, Any]
    settings: DreamSettings  # the dream C trains in (before C's fitted done bias: the base)


def load_dream_models(cfg: Config) -> DreamModels:
    from wmlab.vision.model import load_vae

    settings = dream_settings(cfg, missing_ok=True)
    folder = RunLayout.of(cfg).memory
    mdrnn, info = load_mdrnn(folder)
    start = load_initial_z(folder)
    vae, vae_info = load_vae(RunLayout.of(cfg).vision)
    if info.get("series") and vae_info.get("fingerprint") and \
            info["series"] != vae_info["fingerprint"]:
        raise WmlabError(f"M in {folder} was trained on latents of V {info['series']}, but "
                         f"the run's V is {vae_info['fingerprint']}: its dreams would be "
                         "decoded wrongly; run `wmlab encode` and `wmlab train-mdrnn` again")
    if vae.z_dim != mdrnn.shape.z_dim:
        raise WmlabError(f"V has z of size {vae.z_dim} but M expects {mdrnn.shape.z_dim}: "
                         "they belong to different runs")
    return DreamModels(mdrnn, vae, start, info, settings)


def controller_policy(cfg: Config, path: str, mdrnn: MDNRNN
                      ) -> Callable[[BatchedDream], torch.Tensor]:
    """A saved controller (flat parameter vector) driving the dream through the env's
    action mapping."""
    import fsspec
    from safetensors.torch import load as load_safetensors

    from wmlab.checkpoint import checkpoint_exists, load_checkpoint

    folder = RunLayout.of(cfg).controller
    if not path.endswith(".safetensors") and checkpoint_exists(folder, path):
        # a checkpoint name of the run's controller folder, e.g. "best"
        return _policy_from(cfg, load_checkpoint(folder, path, with_state=False).weights,
                            path, mdrnn)
    try:
        with fsspec.open(path, "rb") as handle:
            tensors = load_safetensors(handle.read())
    except FileNotFoundError:
        raise WmlabError(f"no controller file {path}: train one with `wmlab "
                         "train-controller` or leave out --controller") from None
    except Exception as exc:
        raise WmlabError(f"controller file {path} is unreadable ({type(exc).__name__}): "
                         "pass a .safetensors file with a 'params' tensor") from None
    return _policy_from(cfg, tensors, path, mdrnn)


def _policy_from(cfg: Config, tensors: dict[str, torch.Tensor], path: str, mdrnn: MDNRNN
                 ) -> Callable[[BatchedDream], torch.Tensor]:
    from wmlab.controller.model import (
        clock_features,
        controller_features,
        controller_shape,
        population_forward,
    )

    if cfg.controller.lookahead:  # its features are M's states after each action
        raise WmlabError("the dream pictures drive the dream with a C that reads [z, h]; a "
                         "look-ahead C (controller.lookahead) plays the dream in `wmlab "
                         "evaluate --dream`: leave out --controller here")
    params = tensors.get("params", next(iter(tensors.values()), None))
    if params is None:
        raise WmlabError(f"controller file {path} holds no tensor")
    to_vector, raw_dim = action_converter(cfg.env.name)
    s = mdrnn.shape
    kind = cfg.controller.inputs
    shape = controller_shape(kind, s.z_dim, s.hidden, raw_dim or s.action_dim,
                             cfg.controller.hidden, cfg.controller.bias,
                             clock=tuple(cfg.controller.clock))
    theta = params.float().reshape(1, -1)
    if theta.shape[1] != shape.num_params:
        raise WmlabError(f"controller {path} has {theta.shape[1]} parameters but a '{kind}' "
                         f"controller for this M needs {shape.num_params}: it belongs to "
                         "another run or controller config")

    steps = [0]  # the pictures' dreams all start together: one step count serves them all

    def act(dream: BatchedDream) -> torch.Tensor:
        clock = clock_features(torch.full((len(dream.z),), steps[0]), shape.clock) \
            if shape.clock else None
        feats = controller_features(kind, dream.z, dream.hidden, dream.cell, clock)
        steps[0] += 1
        raw = population_forward(shape, theta, feats.unsqueeze(0))[0]
        return to_vector(raw) if to_vector else raw
    return act


def make_dream_pictures(cfg: Config, request: DreamRequest,
                        models: DreamModels | None = None) -> dict[str, Any]:
    """Write dream.gif (and dream-compare.gif when the episodes are at hand)."""
    if request.steps < 1:
        raise WmlabError(f"--steps must be at least 1, got {request.steps}")
    models = models or load_dream_models(cfg)
    m = models.mdrnn
    if request.controller:
        policy = controller_policy(cfg, request.controller, m)
        driver = "controller"
    else:
        to_vector, raw_dim = action_converter(cfg.env.name)
        policy = random_policy(raw_dim or m.shape.action_dim, request.seed, to_vector)
        driver = "random"
    comparison = _comparison_episode(cfg, request) if request.compare else None
    out = (request.out or RunLayout.of(cfg).memory).rstrip("/")
    steps = min(request.steps, cfg.dream.max_steps)
    trace = dream_gif(f"{out}/dream.gif", m, models.vae, models.start, models.settings, steps,
                      request.seed, policy)
    summary: dict[str, Any] = {"dream_gif": f"{out}/dream.gif", "driver": driver,
                               "tau": models.settings.tau, "steps": len(trace.rewards),
                               "died_at": trace.done_at,
                               "dream_return": float(trace.rewards.sum())}
    if comparison is not None:
        frames, series = comparison
        count = compare_gif(f"{out}/dream-compare.gif", m, models.vae, frames, series.mu,
                            series.logvar, series.actions, models.settings, request.seed,
                            steps=request.steps)
        summary.update(compare_gif=f"{out}/dream-compare.gif", compare_frames=count,
                       episode=series.episode_id)
    return summary


def _comparison_episode(cfg: Config, request: DreamRequest):
    """(frames, series) of the episode to compare with, or None without an episode store."""
    from wmlab.data import EpisodeStore
    from wmlab.data.series import SeriesStore
    from wmlab.memory.train import load_series

    try:
        data = load_series(cfg)
        store = EpisodeStore.open(cfg.store_url())
    except StoreError:
        if request.episode:
            raise
        return None
    pool = data.val + data.train
    if request.episode:
        series = SeriesStore.current(cfg.store_url()).load(request.episode)
    elif pool:
        series = pool[0]
    else:
        return None
    return store.load(series.episode_id).frames, series
