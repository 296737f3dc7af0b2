"""Is M's dream close enough to the game to train C in it?

CMA-ES finds whatever behaviour M gets wrong (SPEC section 8): a dream in which always moving
left survives three times longer than it does in the game trains a controller that always
moves left. So before C is trained in a dream, the same reference policies (random, no-op,
left) are run in M's dream and in the real game, and their survival compared.
``memory/calibration.json`` holds both sides; ``check_dream_calibration`` refuses to train
C when a policy's dream survival is more than ``dream.calibration_tolerance`` times off.
"""

from __future__ import annotations

import json
import math
from typing import Any

from wmlab.config import Config
from wmlab.errors import WmlabError
from wmlab.fsio import atomic_write_bytes
from wmlab.runs import RunLayout

# Real calibration episodes start here: away from the evaluation seeds (eval.seed ..
# eval.seed + episodes) so that the check never looks at the episodes C is scored on.
REAL_SEED_OFFSET = 500_000
# The dream's reference policies and the real-env policies that act the same way.
REAL_POLICY = {"random": "uniform", "noop": "noop", "left": "left"}


def read_calibration(cfg: Config) -> dict[str, Any] | None:
    """The run's calibration report, or None when M was trained without one."""
    import fsspec

    path = RunLayout.of(cfg).calibration
    fs, root = fsspec.core.url_to_fs(path)
    if not fs.exists(root):
        return None
    try:
        with fs.open(root, "rb") as handle:
            report = json.loads(handle.read())
        report["policies"].items()
    except (ValueError, KeyError, AttributeError) as exc:
        raise WmlabError(f"{path} is damaged ({exc}): delete it and run `wmlab calibrate` "
                         "to measure it again") from exc
    return report


def add_real_game(cfg: Config, report: dict[str, Any], episodes: int) -> dict[str, Any]:
    """Run each reference policy of ``report`` for ``episodes`` real episodes and add its
    survival, and the ratio dream / real, to the report (returned, not written)."""
    from wmlab.evaluate import evaluate_random_policy

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
        row["survival_ratio"] = row["survival_mean"] / max(real.extra["length_mean"], 1.0)
        report["real_backend"] = real.backend
    report["real_episodes"] = episodes
    report["real_first_seed"] = first_seed
    return report


def calibrate_real(cfg: Config, episodes: int | None = None) -> dict[str, Any]:
    """Measure the real-game side of the run's calibration and write it back."""
    report = read_calibration(cfg)
    if report is None:
        raise WmlabError(f"no {RunLayout.of(cfg).calibration}: M has no done head, or was trained "
                         "with mdrnn.calibration_episodes = 0; train M with a done head first")
    episodes = cfg.mdrnn.calibration_real_episodes if episodes is None else episodes
    if episodes < 1:
        raise WmlabError(f"real calibration episodes must be at least 1, got {episodes}")
    report = add_real_game(cfg, report, episodes)
    atomic_write_bytes(RunLayout.of(cfg).calibration, json.dumps(report, indent=2).encode())
    return report


FITTED_BIAS_FILE = "fitted-done-bias.json"


def dream_done_bias(cfg: Config) -> float:
    """The done bias C's dreams run with: ``dream.done_bias``, plus, with
    ``dream.fit_done_bias``, the fitted shift (computed once per C stage, then read back)."""
    if not cfg.dream.fit_done_bias:
        return cfg.dream.done_bias
    import fsspec

    path = f"{RunLayout.of(cfg).controller}/{FITTED_BIAS_FILE}"
    fs, root = fsspec.core.url_to_fs(path)
    if fs.exists(root):
        try:
            with fs.open(root, "rb") as handle:
                fitted = json.loads(handle.read())
            return float(fitted["base"]) + float(fitted["fitted"])
        except (ValueError, KeyError, TypeError) as exc:
            raise WmlabError(f"{path} is damaged ({exc}): delete it and train C again") from exc
    fitted = fit_done_bias(cfg)
    atomic_write_bytes(path, json.dumps(fitted, indent=2).encode())
    return float(fitted["base"]) + float(fitted["fitted"])


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
    from wmlab.device import resolve_device
    from wmlab.memory.train import calibration_dreams, load_mdrnn

    report = read_calibration(cfg)
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


def check_dream_calibration(cfg: Config) -> dict[str, Any] | None:
    """Refuse to train C in a dream that is far from the game (see the module docstring).

    Measures the real side first if the report lacks it (runs trained before it existed).
    """
    tolerance = cfg.dream.calibration_tolerance
    if tolerance <= 0:
        return None
    report = read_calibration(cfg)
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
