"""Fixed reference policies run in M's dream (SPEC section 8): their survival, compared with
the real game's, says whether the dream is close enough to train C in."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from wmlab.dream.batched import BatchedDream, DreamStart
from wmlab.dream.ensemble import EnsembleDream
from wmlab.dream.settings import DreamSettings
from wmlab.envs import get_spec
from wmlab.errors import WmlabError
from wmlab.memory.model import MDNRNN
from wmlab.policies import sweep_output


def reference_policy(name: str, action_dim: int, seed: int = 0,
                     to_vector: Callable[[torch.Tensor], torch.Tensor] | None = None
                     ) -> Callable[[BatchedDream], torch.Tensor]:
    """Fixed policies whose survival in the dream is compared with the real game.

    Outputs are raw controller outputs in [-1, 1] (random: uniform each step; noop: 0;
    left: -1 on the first output, 0 elsewhere; sweep: the first output on the clock of
    ``wmlab.policies.SweepPolicy``, each dream's own step count), turned into M's action
    vectors by ``to_vector`` (e.g. Doom's -1/3, +1/3 thresholds); identity when not given.
    """
    convert = to_vector or (lambda raw: raw)
    if name == "random":
        generator = torch.Generator().manual_seed(seed)

        def act(dream: BatchedDream) -> torch.Tensor:
            raw = torch.rand(dream.batch, action_dim, generator=generator) * 2 - 1
            return convert(raw)
        return act
    if name in ("noop", "left"):
        def fixed(dream: BatchedDream) -> torch.Tensor:
            raw = torch.zeros(dream.batch, action_dim)
            if name == "left":
                raw[:, 0] = -1.0
            return convert(raw)
        return fixed
    if name == "sweep":
        def sweep(dream: BatchedDream) -> torch.Tensor:  # on each dream's own clock
            raw = torch.zeros(dream.batch, action_dim)
            raw[:, 0] = torch.from_numpy(sweep_output(dream.t))
            return convert(raw)
        return sweep
    raise WmlabError(f"unknown reference policy '{name}': use random, noop, left or sweep")


def dream_calibration(model: MDNRNN, start: DreamStart, settings: DreamSettings,
                      episodes: int = 64, seed: int = 0,
                      policies: tuple[str, ...] = ("random", "noop", "left"),
                      to_vector: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      raw_dim: int | None = None, device: torch.device | str = "cpu",
                      ensemble: tuple[MDNRNN, ...] = ()) -> dict[str, Any]:
    """Survival and return of fixed reference policies in the dream, per policy.

    A dream whose zero/no-op policy survives far longer than a random policy does in the
    real game is exploitable (SPEC section 8): check this before training C in it.
    ``raw_dim`` is the number of raw controller outputs that ``to_vector`` maps to M's
    actions (default: M's action size). ``ensemble``: the other Ms of the dream C trains
    in (``EnsembleDream``).
    """
    dream = EnsembleDream((model, *ensemble), start, settings, device) if ensemble else \
        BatchedDream(model, start, settings, device)
    seeds = np.arange(episodes) + seed * 1_000_003
    report: dict[str, Any] = {"tau": settings.tau, "max_steps": settings.max_steps,
                              "episodes": episodes, "done_mode": settings.done_mode,
                              "done_bias": settings.done_bias, "policies": {}}
    if settings.dropout:  # M's dropout kept on in the dream
        report["dropout"] = settings.dropout
    if ensemble:
        report["ensemble"] = 1 + len(ensemble)
    for name in policies:
        policy = reference_policy(name, raw_dim or model.shape.action_dim, seed, to_vector)
        returns, lengths = dream.rollout(policy, seeds)
        report["policies"][name] = {
            "survival_mean": float(lengths.mean()), "survival_std": float(lengths.std()),
            "survival_min": int(lengths.min()), "survival_max": int(lengths.max()),
            "capped_fraction": float((lengths >= settings.max_steps).mean()),
            "return_mean": float(returns.mean()), "return_std": float(returns.std())}
    return report




def action_converter(env_name: str
                     ) -> tuple[Callable[[torch.Tensor], torch.Tensor] | None, int | None]:
    """(raw controller outputs -> M's action vectors, number of raw outputs) through the
    env's own mapping; (None, None) when the env's spec is not available."""
    try:
        spec = get_spec(env_name)
    except Exception:  # generic ids may need their simulator; identity is the fallback
        return None, None

    def convert(raw: torch.Tensor) -> torch.Tensor:
        vectors = spec.action_vector(spec.to_env_action(raw.cpu().numpy()))
        return torch.from_numpy(np.asarray(vectors, np.float32))
    return convert, int(spec.controller_outputs)
