"""M's dream beside the real game: the M stage's calibration and the C stage's gate.

The dream side (``wmlab.dream.calibration``) runs reference policies (random, no-op, left) in
M's dream; this module runs the same policies in the real game, writes both sides to
``memory/calibration.json``, refreshes the dream side when the dream changed (another tau,
done rule, done bias or M), refuses to train C in a dream far from the game
(``dream.calibration_tolerance``) and fits the done-logit shift of ``dream.fit_done_bias``.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch

from wmlab.config import Config
from wmlab.device import resolve_device
from wmlab.dream.calibration import (
    calibration_dreams,
    far_policies,
    is_current,
    read_calibration,
)
from wmlab.errors import WmlabError
from wmlab.evaluate import evaluate_random_policy
from wmlab.fsio import atomic_write_bytes, exists
from wmlab.memory.model import load_mdrnn
from wmlab.runs import RunLayout

# Real calibration episodes start here: away from the evaluation seeds (eval.seed ..
# eval.seed + episodes) so that the check never looks at the episodes C is scored on.
REAL_SEED_OFFSET = 500_000
# The dream's reference policies and the real-env policies that act the same way.
REAL_POLICY = {"random": "uniform", "noop": "noop", "left": "left", "sweep": "sweep"}
REAL_KEYS = ("real_survival_mean", "real_survival_std", "real_return_mean", "real_return_std")
NOTE = ("a dream where a fixed behaviour survives much longer than it does in the game is a "
        "hole CMA-ES will find")


def _write(cfg: Config, report: dict[str, Any]) -> dict[str, Any]:
    atomic_write_bytes(RunLayout.of(cfg).calibration, json.dumps(report, indent=2).encode())
    return report


def _survival_ratio(row: dict[str, Any]) -> float:
    """Dream survival over the game's, for one reference policy's row."""
    return row["survival_mean"] / max(row["real_survival_mean"], 1.0)


def add_real_game(cfg: Config, report: dict[str, Any], episodes: int) -> dict[str, Any]:
    """Run each reference policy of ``report`` for ``episodes`` real episodes and add its
    survival, and the ratio dream / real, to the report (returned, not written)."""
    first_seed = cfg.eval.seed + REAL_SEED_OFFSET
    for name, row in report["policies"].items():
        if name not in REAL_POLICY:
            continue
        real = evaluate_random_policy(
            cfg, episodes=episodes, policy=REAL_POLICY[name], first_seed=first_seed,
            out=RunLayout.of(cfg).reference_real(name))
        row["real_survival_mean"] = real.extra["length_mean"]
        row["real_survival_std"] = real.extra["length_std"]
        row["real_return_mean"] = real.mean
        row["real_return_std"] = real.std
        row["survival_ratio"] = _survival_ratio(row)
        report["real_backend"] = real.backend
    report["real_episodes"] = episodes
    report["real_first_seed"] = first_seed
    return report


def write_calibration(cfg: Config, model: Any = None, device: torch.device | str = "cpu"
                      ) -> dict[str, Any]:
    """Both sides of the calibration of the run's M (``model``, or loaded from the run),
    written to ``memory/calibration.json``; the M stage's last step."""
    if model is None:
        model, _ = load_mdrnn(RunLayout.of(cfg).memory, device)
    report = calibration_dreams(cfg, model, device)
    report["note"] = NOTE
    if cfg.mdrnn.calibration_real_episodes > 0:
        report = add_real_game(cfg, report, cfg.mdrnn.calibration_real_episodes)
    return _write(cfg, report)


def calibrate_trained_memory(cfg: Config) -> dict[str, Any] | None:
    """The M stage's last step: the calibration of the run's trained M, where M has a done
    head and ``mdrnn.calibration_episodes`` > 0 (else None)."""
    if not cfg.mdrnn.done_head or cfg.mdrnn.calibration_episodes <= 0:
        return None
    return write_calibration(cfg, device=resolve_device(cfg.run.device))


def current_calibration(cfg: Config, save: bool = True) -> dict[str, Any] | None:
    """The run's calibration in the dream ``cfg`` describes now: measured again on the dream
    side when tau, the done rule, the done bias or M changed (the real game's side, which
    none of them touch, is kept), and written back where ``save`` (a sweep's other taus
    leave the run's file alone). None when M was trained without one."""
    report = read_calibration(cfg)
    if report is None or is_current(cfg, report):
        return report
    device = resolve_device(cfg.run.device)
    model, _ = load_mdrnn(RunLayout.of(cfg).memory, device)
    fresh = calibration_dreams(cfg, model, device, policies=tuple(report["policies"]))
    fresh["note"] = NOTE
    for key in ("real_backend", "real_episodes", "real_first_seed"):
        if key in report:
            fresh[key] = report[key]
    for name, row in fresh["policies"].items():
        old = report["policies"].get(name, {})
        if all(key in old for key in REAL_KEYS):
            row.update({key: old[key] for key in REAL_KEYS})
            row["survival_ratio"] = _survival_ratio(row)
    return _write(cfg, fresh) if save else fresh


def calibrate_real(cfg: Config, episodes: int | None = None) -> dict[str, Any]:
    """Measure the real-game side of the run's calibration and write it back."""
    report = current_calibration(cfg)
    if report is None:
        raise WmlabError(f"no {RunLayout.of(cfg).calibration}: M has no done head, or was "
                         "trained with mdrnn.calibration_episodes = 0; train M with a done "
                         "head first")
    episodes = cfg.mdrnn.calibration_real_episodes if episodes is None else episodes
    if episodes < 1:
        raise WmlabError(f"real calibration episodes must be at least 1, got {episodes}")
    return _write(cfg, add_real_game(cfg, report, episodes))


def check_dream_calibration(cfg: Config, save: bool = True) -> dict[str, Any] | None:
    """Refuse to train C in a dream that is far from the game (see the module docstring).

    Measures the real side first if the report lacks it (runs trained before it existed).
    """
    tolerance = cfg.dream.calibration_tolerance
    if tolerance <= 0:
        return None
    report = current_calibration(cfg, save)
    if report is None:
        return None
    if any("survival_ratio" not in row for row in report["policies"].values()):
        if cfg.mdrnn.calibration_real_episodes < 1:
            return report
        report = calibrate_real(cfg)
    far = far_policies(report, tolerance)
    if far:
        raise WmlabError(
            "M's dream is too far from the game to train C in it (CMA-ES would learn its "
            "holes): " + "; ".join(far) + f". Tolerance is {tolerance:g}x. Train M longer or "
            "on more episodes (e.g. --set mdrnn.steps=... or collect.episodes=...), try "
            "another dream.tau, or accept this dream with --set dream.calibration_tolerance=0")
    return report


def fit_done_bias(cfg: Config) -> dict[str, Any]:
    """The shift of M's done logit (on top of ``dream.done_bias``) for C's dreams:
    ln(dream / game survival of random play), from M's calibration.

    For a constant per-step hazard p, adding ln r to the logit multiplies a small p by ~r
    and so divides survival by r. Dreams are not constant-hazard: a lenient dream's long
    tail barely moves, and matching random play's mean survival exactly needed shifts of
    1.9 and 4.0, which end dreams at random everywhere; C then learned nothing
    (docs/results/doom-quick.md, seventh pass). A hand-set log-ratio shift (0.54 and 1.0
    there) rescued both of those failed runs once; the same shifts set by this function
    (0.005 away) did not, so it is an opt-in knob, not a remedy.
    """
    report = current_calibration(cfg)
    if report is None or "random" not in report.get("policies", {}):
        raise WmlabError("dream.fit_done_bias needs M's calibration (memory/calibration.json "
                         "with random play): train M with a done head and "
                         "mdrnn.calibration_episodes > 0, or set dream.fit_done_bias=false")
    if "real_survival_mean" not in report["policies"]["random"]:
        episodes = cfg.mdrnn.calibration_real_episodes
        if episodes < 1:
            raise WmlabError("dream.fit_done_bias needs random play's survival in the game: "
                             "set mdrnn.calibration_real_episodes to 1 or more")
        report = calibrate_real(cfg, episodes)
    row = report["policies"]["random"]
    real, dreamt = float(row["real_survival_mean"]), float(row["survival_mean"])
    shift = math.log(max(dreamt, 1.0) / max(real, 1.0))
    # random play's survival at the new bias, for the record (the calibration's dreams)
    device = resolve_device(cfg.run.device)
    model, _ = load_mdrnn(RunLayout.of(cfg).memory, device)
    after = calibration_dreams(cfg, model, device, shift, ("random",))
    return {"base": cfg.dream.done_bias, "fitted": shift, "real_survival": real,
            "dream_survival_before": dreamt,
            "dream_survival_after": after["policies"]["random"]["survival_mean"],
            "episodes": after["episodes"]}


def ensure_fitted_done_bias(cfg: Config) -> None:
    """With ``dream.fit_done_bias``, fit the shift once per C stage (before C's dreams are
    built; read back by ``wmlab.dream.calibration.dream_done_bias``)."""
    path = RunLayout.of(cfg).fitted_done_bias
    if not cfg.dream.fit_done_bias or exists(path):
        return
    atomic_write_bytes(path, json.dumps(fit_done_bias(cfg), indent=2).encode())
