"""The dream side of M's calibration (SPEC section 8): fixed reference policies (random,
no-op, left) in the run's dream, read back and judged.

CMA-ES finds whatever behaviour M gets wrong: a dream in which always moving left survives
three times longer than it does in the game trains a controller that always moves left. The
M stage (``wmlab.calibrate``) runs the same policies in the real game too and keeps both
sides in ``memory/calibration.json``, stamped with what the dream side depends on (the
dream's settings, M's weights, the episodes and seed), so a change of tau makes it stale.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import fsspec
import torch

from wmlab.checkpoint import read_info
from wmlab.config import Config
from wmlab.dream.reference import action_converter, dream_calibration
from wmlab.dream.settings import DreamSettings
from wmlab.errors import WmlabError
from wmlab.memory.model import FINAL_WEIGHTS, MDNRNN, load_initial_z, load_mdrnn
from wmlab.runs import RunLayout

REFERENCE_POLICIES = ("random", "noop", "left")


def calibration_policies(cfg: Config) -> tuple[str, ...]:
    """The reference policies a run's calibration plays: random, no-op and left, and the
    behaviours of eval.references (Doom's sweep: the one its trained agents resemble)."""
    return (*REFERENCE_POLICIES,
            *(name for name in cfg.eval.references if name not in REFERENCE_POLICIES))


def _read_json(path: str, damaged: str) -> dict[str, Any] | None:
    fs, root = fsspec.core.url_to_fs(path)
    if not fs.exists(root):
        return None
    try:
        with fs.open(root, "rb") as handle:
            return json.loads(handle.read())
    except ValueError as exc:
        raise WmlabError(f"{path} is damaged ({exc}): {damaged}") from exc


def read_calibration(cfg: Config) -> dict[str, Any] | None:
    """The run's calibration report, or None when M was trained without one."""
    path = RunLayout.of(cfg).calibration
    fix = "delete it and run `wmlab calibrate` to measure it again"
    report = _read_json(path, fix)
    if report is None:
        return None
    if not isinstance(report.get("policies"), dict):
        raise WmlabError(f"{path} is damaged (no policies): {fix}")
    return report


def calibration_fingerprint(cfg: Config, extra_bias: float = 0.0) -> str:
    """What the dream side of the calibration depends on: the dream's settings (its
    dropout included), M's weights, the number of dreams and their seed."""
    settings = DreamSettings.from_config(cfg, cfg.dream.done_bias + extra_bias)
    layout = RunLayout.of(cfg)
    weights = read_info(layout.memory, FINAL_WEIGHTS).get("fingerprint", "")
    key = {"dream": settings.identity(), "memory": weights,
           "episodes": cfg.mdrnn.calibration_episodes, "seed": cfg.run.seed}
    if cfg.mdrnn.ensemble > 1:  # the other Ms dream too (one M keeps its old fingerprint)
        key["ensemble"] = [read_info(folder, FINAL_WEIGHTS).get("fingerprint", "")
                           for folder in layout.memory_members(cfg.mdrnn.ensemble)[1:]]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def is_current(cfg: Config, report: dict[str, Any]) -> bool:
    """Whether ``report`` was measured in the dream ``cfg`` describes now."""
    return report.get("fingerprint") == calibration_fingerprint(cfg)


def calibration_dreams(cfg: Config, model: MDNRNN, device: torch.device | str = "cpu",
                       extra_bias: float = 0.0,
                       policies: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The reference policies' survival in the run's dream (its settings, with
    ``extra_bias`` added to the done bias), on the calibration's seeds; ``policies``
    defaults to the run's (``calibration_policies``)."""
    to_vector, raw_dim = action_converter(cfg.env.name)
    settings = DreamSettings.from_config(cfg, cfg.dream.done_bias + extra_bias)
    layout = RunLayout.of(cfg)
    others = tuple(load_mdrnn(folder, device)[0]
                   for folder in layout.memory_members(cfg.mdrnn.ensemble)[1:])
    report = dream_calibration(model, load_initial_z(layout.memory), settings,
                               episodes=cfg.mdrnn.calibration_episodes, seed=cfg.run.seed,
                               policies=policies or calibration_policies(cfg),
                               to_vector=to_vector, raw_dim=raw_dim,
                               device=device, ensemble=others)
    report["fingerprint"] = calibration_fingerprint(cfg, extra_bias)
    return report


def dream_done_bias(cfg: Config, missing_ok: bool = False) -> float:
    """The done bias C's dreams run with: ``dream.done_bias``, plus, with
    ``dream.fit_done_bias``, the shift the C stage fitted (``wmlab.calibrate``). Before it
    is fitted: ``dream.done_bias`` where ``missing_ok``, else an error naming the fix."""
    if not cfg.dream.fit_done_bias:
        return cfg.dream.done_bias
    path = RunLayout.of(cfg).fitted_done_bias
    fitted = _read_json(path, "delete it and train C again")
    if fitted is None:
        if missing_ok:
            return cfg.dream.done_bias
        raise WmlabError(f"dream.fit_done_bias is on and {path} does not exist yet: train C "
                         "(`wmlab train-controller` fits it first), or set "
                         "dream.fit_done_bias=false")
    try:
        return float(fitted["base"]) + float(fitted["fitted"])
    except (KeyError, TypeError, ValueError) as exc:
        raise WmlabError(f"{path} is damaged ({exc}): delete it and train C again") from exc


def dream_settings(cfg: Config, missing_ok: bool = False) -> DreamSettings:
    """The dream C trains in (the fitted done bias included)."""
    return DreamSettings.from_config(cfg, dream_done_bias(cfg, missing_ok))


def far_policies(report: dict[str, Any], tolerance: float) -> list[str]:
    """One line per reference policy whose dream survival is off by more than tolerance x."""
    lines = []
    for name, row in report["policies"].items():
        ratio = row.get("survival_ratio")
        if ratio is None:
            continue
        if ratio > tolerance or ratio < 1.0 / tolerance:
            lines.append(f"{name} survives {row['survival_mean']:.0f} steps in the dream and "
                         f"{row['real_survival_mean']:.0f} in the game ({ratio:.2f}x)")
    return lines


# The dream must punish standing still at least about as much as random play does, as the
# game does (there a random policy outlives a no-op ~1.4x). Over twelve quick and budget
# Doom runs, every dream whose random / no-op survival ratio was 0.93 or less trained a C
# that did not beat random in the game; of the seven at 0.96 or more, six did (the
# exception at 1.10). A necessary sign, not a sufficient one (docs/results/doom-quick.md).
NOOP_ORDER_THRESHOLD = 0.95


def noop_order_warning(report: dict[str, Any]) -> str | None:
    """A warning when the dream ranks the no-op (where CMA-ES starts) above random play
    while the game ranks it below; None when the order is right or not measured."""
    rows = report.get("policies", {})
    random_row, noop_row = rows.get("random"), rows.get("noop")
    if not random_row or not noop_row or "real_survival_mean" not in random_row:
        return None
    dream = random_row["survival_mean"] / max(noop_row["survival_mean"], 1.0)
    game = random_row["real_survival_mean"] / max(noop_row.get("real_survival_mean", 0.0), 1.0)
    if game <= 1.0 or dream >= NOOP_ORDER_THRESHOLD:
        return None
    return (f"M's dream favours standing still: random play survives {dream:.2f}x as long as a "
            f"no-op there, {game:.2f}x in the game. CMA-ES starts at the no-op, and in the "
            "runs measured so far a C trained in such a dream did not beat random in the game. "
            "Collect a larger share of fixed behaviours (--set collect.fixed_fraction=0.4), train "
            "M on more data, or run a second iteration (--iteration 2)")
