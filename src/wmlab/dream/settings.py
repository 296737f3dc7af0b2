"""How M's dream runs: one object built from the config and used wherever a dream is made
(C's rollouts, the calibration, the pictures, the playable dream, the vector env), so every
dream a user looks at is the dream C is trained in."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from wmlab.config import dream_dropout
from wmlab.errors import WmlabError
from wmlab.memory.model import check_dropout, check_tau

DONE_MODES = ("threshold", "sample")
PRECISIONS = ("float32", "bfloat16")
ENSEMBLE_REWARDS = ("mean", "min")


@dataclass(frozen=True)
class DreamSettings:
    """The rules of a dream.

    >>> DreamSettings(tau=1.15, max_steps=2100).with_tau(1.0).tau
    1.0
    """

    tau: float  # sampling temperature of the next z
    max_steps: int  # the step cap (a dream that reaches it is truncated)
    done_mode: str = "threshold"  # threshold: done logit > 0; sample: drawn from M's odds
    done_weight: float = 1.0  # the done head's positive-class weight, undone by "sample"
    done_bias: float = 0.0  # added to the done logit; positive ends dreams sooner
    precision: str = "float32"  # the two matmuls of a step: float32 or bfloat16
    # M's dropout kept on: the probability that a unit of h is dropped before the head,
    # a fresh mask per dream and step from the dream's own seed; 0 = off
    dropout: float = 0.0
    # an ensemble's reward a step (mdrnn.ensemble > 1): the Ms' mean, or their least
    ensemble_reward: str = "mean"
    # a step's reward where M has no reward head (an env that pays +1 a frame alive, Doom):
    # the env frames one step holds (env.action_repeat), so a dream's return is in frames
    alive_reward: float = 1.0

    def __post_init__(self) -> None:
        check_tau(self.tau)
        check_dropout(self.dropout)
        if self.max_steps < 1:
            raise WmlabError(f"dream max_steps must be at least 1, got {self.max_steps}")
        if self.done_mode not in DONE_MODES:
            raise WmlabError(f"dream done mode must be one of {', '.join(DONE_MODES)}, got "
                             f"'{self.done_mode}'")
        if not self.done_weight > 0:
            raise WmlabError("the done head's positive weight must be > 0, got "
                             f"{self.done_weight}")
        if self.ensemble_reward not in ENSEMBLE_REWARDS:
            raise WmlabError(f"an ensemble dream's reward must be mean or min, got "
                             f"'{self.ensemble_reward}'")
        if self.precision not in PRECISIONS:
            raise WmlabError(f"dream precision must be float32 or bfloat16, got "
                             f"{self.precision}")

    @classmethod
    def from_config(cls, cfg: Any, done_bias: float | None = None) -> DreamSettings:
        """The dream of a run's config (``done_bias`` replaces ``dream.done_bias``, e.g.
        with the fitted shift added)."""
        return cls(tau=cfg.dream.tau, max_steps=cfg.dream.max_steps, done_mode=cfg.dream.done,
                   done_weight=cfg.mdrnn.done_weight,
                   done_bias=cfg.dream.done_bias if done_bias is None else done_bias,
                   precision=cfg.dream.precision, dropout=dream_dropout(cfg),
                   ensemble_reward=cfg.dream.ensemble_reward,
                   alive_reward=float(cfg.env.action_repeat))

    @property
    def done_shift(self) -> float:
        """How far the done logit sits above M's log-odds of an end: the head was trained
        with ends weighted by ``done_weight``, which shifts its logit by ln(done_weight)."""
        return math.log(self.done_weight)

    def with_tau(self, tau: float) -> DreamSettings:
        return dataclasses.replace(self, tau=float(tau))

    def identity(self) -> dict[str, Any]:
        """The settings as a dict for fingerprints: a setting added later is left out at
        the value that gives the dream from before it (so old fingerprints still match)."""
        fields = dataclasses.asdict(self)
        if fields["dropout"] == 0.0:
            del fields["dropout"]
        if fields["ensemble_reward"] == "mean":
            del fields["ensemble_reward"]
        if fields["alive_reward"] == 1.0:
            del fields["alive_reward"]
        return fields


def missing_dream_heads(shape: Any, survival_reward: bool = False) -> list[str]:
    """The heads M lacks for its dream to score C: it must predict when episodes end and,
    unless the env pays just +1 per step alive (Doom, where the dream's reward is that),
    what they pay."""
    needed = ("done_head",) if survival_reward else ("reward_head", "done_head")
    return [name for name in needed if not getattr(shape, name)]
