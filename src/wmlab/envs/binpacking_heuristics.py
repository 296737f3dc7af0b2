"""Bin packing's classic online heuristics, as pure functions of (counts, item, capacity).

- best fit: the highest level the item fits into (a bag of level k with k + s <= C), else a
  new bag.
- sum of squares (Csirik et al.): the placement that minimises sum_h N_h^2 afterwards
  (full bags leave the count); ties go to the fullest existing bag, a new bag last.
- sum-of-squares-orl: what the reference repository's baseline code does (see
  ``sum_of_squares_orl``), for comparison with numbers reported from it.

``wmlab.baselines`` scores them; ``wmlab.policies.HeuristicPolicy`` collects data with them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from wmlab.config import HEURISTIC_POLICIES as HEURISTICS  # the names collect.policy takes
from wmlab.errors import WmlabError

Rule = Callable[[np.ndarray, int, int], int]  # (counts, item, capacity) -> action


def best_fit(counts: np.ndarray, item: int, capacity: int) -> int:
    """The highest existing level the item fits into, else 0 (a new bag)."""
    fitting = np.flatnonzero(counts[1:capacity - item + 1]) + 1
    return int(fitting[-1]) if len(fitting) else 0


def sum_of_squares(counts: np.ndarray, item: int, capacity: int) -> int:
    """The placement minimising sum_h N_h^2 afterwards (ties: fullest bag, new bag last)."""
    levels = np.arange(capacity - item, 0, -1)  # existing candidates, fullest first
    n = counts[levels]
    target = levels + item
    grows = target < capacity  # a bag reaching C is full and leaves the count
    # (N_k - 1)^2 - N_k^2 = 1 - 2 N_k, plus (N_t + 1)^2 - N_t^2 = 2 N_t + 1 if it stays open.
    delta = 1 - 2 * n + np.where(grows, 2 * counts[np.minimum(target, capacity - 1)] + 1, 0)
    delta = np.where(n > 0, delta, np.iinfo(np.int64).max)
    new_bag = 2 * counts[item] + 1 if item < capacity else 0
    if len(levels):
        best = int(np.argmin(delta))
        if delta[best] <= new_bag:
            return int(levels[best])
    return 0


def sum_of_squares_orl(counts: np.ndarray, item: int, capacity: int) -> int:
    """The reference repository's "sum of squares" code, which differs from the rule: it
    never opens a new bag while an existing one fits. A bag the item fills exactly wins;
    otherwise the fitting level k with the least N_{k+s} - N_k (ties to the lower level)."""
    if item >= capacity:
        return 0
    if counts[capacity - item] > 0:
        return capacity - item
    levels = np.arange(1, capacity - item)
    n = counts[levels]
    if not n.any():
        return 0
    score = np.where(n > 0, counts[levels + item] - n, np.iinfo(np.int64).max)
    return int(levels[np.argmin(score)])


def heuristic_rule(name: str) -> Rule:
    """The heuristic called ``name``, one of ``HEURISTICS``."""
    rules = {"best-fit": best_fit, "sum-of-squares": sum_of_squares,
             "sum-of-squares-orl": sum_of_squares_orl}
    if name not in rules:
        raise WmlabError(f"unknown bin packing heuristic '{name}': choose one of "
                         f"{', '.join(HEURISTICS)}")
    return rules[name]
