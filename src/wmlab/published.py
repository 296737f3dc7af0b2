"""Published results: what the World Models paper (SPEC.md section 7), other implementations
and the bin packing paper report, for the report and the temperature sweep to put a run's
numbers beside.

Facts only: no reading of runs, no plotting. The paper's temperature table is written once
here (``PAPER_TAU_TABLE``); the Doom rows of ``PUBLISHED`` are made from it, and the sweep
reads it for its own table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def format_number(value: float | None, digits: int = 1) -> str:
    """A number as the report writes it: '-' for none or NaN, whole numbers from 10 up
    without decimals, ``digits`` decimals from 100 up, else four significant digits.

    It lives here because a published score prints itself with it, so the published
    figures read like the run's own in the same table."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if float(value).is_integer() and abs(value) >= 10:
        return str(int(value))
    if abs(value) >= 100:
        return f"{value:.{digits}f}"
    return f"{value:.4g}"


@dataclass(frozen=True)
class PublishedScore:
    method: str
    mean: float
    std: float | None = None
    where: str = "real"  # "real" env or "dream"
    approximate: bool = False

    def score(self) -> str:
        mean = f"{'~' if self.approximate else ''}{format_number(self.mean)}"
        return mean if self.std is None else f"{mean} +- {format_number(self.std)}"


# SPEC section 7: DoomTakeCover, C trained only in the dream at each temperature tau, scored
# over 100 episodes in the dream ("virtual") and in the real game ("actual"): (mean, std).
PAPER_TAU_TABLE: dict[float, dict[str, tuple[float, float]]] = {
    0.10: {"dream": (2086, 140), "real": (193, 58)},
    0.50: {"dream": (2060, 277), "real": (196, 50)},
    1.00: {"dream": (1145, 690), "real": (868, 511)},
    1.15: {"dream": (918, 546), "real": (1092, 556)},
    1.30: {"dream": (732, 269), "real": (753, 139)},
}


def _dream_trained_scores() -> tuple[PublishedScore, ...]:
    """The temperature table as published scores: per tau its real score, then its dream
    score."""
    scores = []
    for tau, row in PAPER_TAU_TABLE.items():
        method = f"World Models, C trained in the dream, tau {tau:.2f}"
        scores.append(PublishedScore(method, *row["real"]))
        scores.append(PublishedScore(method, *row["dream"], "dream"))
    return tuple(scores)


PUBLISHED: dict[str, tuple[PublishedScore, ...]] = {
    "carracing": (
        PublishedScore("World Models: full world model (z, h)", 906, 21),
        PublishedScore("World Models: V only (z)", 632, 251),
        PublishedScore("World Models: V only (z) + 40 hidden units", 788, 141),
        PublishedScore("PyTorch reimplementation", 860, 120),
        PublishedScore("Gym leaderboard", 838, 11),
        PublishedScore("A3C (discrete)", 652, 10),
        PublishedScore("A3C (continuous)", 591, 45),
        PublishedScore("DQN", 343, 18),
    ),
    "doom": (
        *_dream_trained_scores(),
        PublishedScore("World Models: released agent", 973, 540),
        PublishedScore("Random policy", 210, 108),
    ),
    "binpacking": (
        PublishedScore("World Models", -104.5),
        PublishedScore("Best fit", -26, approximate=True),
        PublishedScore("Sum of squares", -26, approximate=True),
        PublishedScore("Rainbow", -96),
    ),
}

# The figure each env's report leads with (the paper's best result on it).
HEADLINE: dict[str, str] = {"carracing": "World Models: full world model (z, h)",
                            "doom": "World Models, C trained in the dream, tau 1.15",
                            "binpacking": "World Models"}

PUBLISHED_SETTING: dict[str, str] = {
    "carracing": "CarRacing, 100 random tracks",
    "doom": "DoomTakeCover, 100 episodes in the real game (and in the dream where marked)",
    "binpacking": "bin packing, capacity 30, perfectly packable item distribution",
}

# The published compute behind a score, in hours of a 2-core machine (SPEC.md section 7:
# ~200 generations, ~4 days on 64 cores, gave ~890), and each task's "solved" line.
PUBLISHED_COMPUTE: dict[str, tuple[float, float, str]] = {
    "carracing": (4 * 24 * 64 / 2, 890.0, "paper: ~890 after ~4 days of 64 cores"),
}
SOLVED: dict[str, float] = {"carracing": 900.0, "doom": 750.0}
