"""C carried over to a retrained M.

C reads M's hidden state h, and h changes meaning when M trains on: a controller that drove
at 756 with the M it was trained with drives at ~250 with the same M trained 1,000 steps
more (CarRacing, iteration 2). A linear C = tanh(W [z, h] + b) can be translated instead of
retrained: on episodes the old controller drove (the iteration's agent episodes), run both
Ms over the same (z, action) sequences and fit, by ridge regression, the weights on the new
M's features [z, h_new] that give the old controller's pre-activations W [z, h_old] + b.

A least-squares fit that matches the recorded steps best (R^2 0.99) can still drive worse in
closed loop, where small errors take the car off the recorded tracks; a stronger ridge
drives better. So each ridge strength of ``RIDGES``, and the controller as it was, is scored
on the real env on the run's fixed scoring seeds, and the best is C's starting point. The
choice is written to ``<controller>/carry-over.json`` and read back on resume.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import fsspec
import numpy as np
import torch

from wmlab.controller.model import ControllerShape
from wmlab.data.series import Series
from wmlab.errors import WmlabError
from wmlab.fsio import atomic_write_bytes, exists
from wmlab.memory.model import MDNRNN

RIDGES = (10.0, 100.0, 1_000.0, 10_000.0)  # in units of X^T X over ~300k recorded steps
AS_IT_WAS = "as it was"
CARRY_OVER_FILE = "carry-over.json"


@dataclass
class CarryOverChoice:
    """The starting controller chosen and what every candidate scored on the fixed seeds."""

    chosen: str  # a ridge strength, or AS_IT_WAS
    score: float
    scores: dict[str, float]
    steps: int  # recorded steps the fit used
    fit_r2: dict[str, float]  # per candidate: R^2 of the pre-activations on those steps


def check_carry_over(shape: ControllerShape, inputs: str) -> None:
    if shape.hidden or shape.lookahead or inputs == "z":
        raise WmlabError("es.carry_over translates a linear controller on [z, h] (or "
                         "[z, c, h]) to a retrained M: set controller.hidden = 0, "
                         "controller.lookahead = false and controller.inputs to zh or zch, "
                         "or es.carry_over = false")


@torch.no_grad()
def memory_features(m: MDNRNN, series: Series, inputs: str) -> np.ndarray:
    """What C reads at each step of a recorded episode with M ``m``: [z_t, (c, ) h_{t-1}]
    (T, features), z_t V's posterior mean, the state before step t (zero at the start), as
    the agent acts."""
    z = torch.from_numpy(series.mu[:-1].astype(np.float32))[None]
    actions = torch.from_numpy(series.actions.astype(np.float32))[None]
    restart = torch.zeros(z.shape[:2])
    restart[0, 0] = 1.0  # the episode's first step, as the agent's M sees it
    if inputs == "zch":  # the cell state too: step by step, as the agent advances M
        h, c = (state[0] for state in m.initial_state(1))
        states = []
        for t in range(z.shape[1]):
            states.append(torch.cat([c[0], h[0]]))
            h, c = m.advance(z[:, t], actions[:, t], restart[:, t:t + 1], h, c)
        before = torch.stack(states)
    else:  # h alone: the whole episode in one fused LSTM call
        _, hidden, _ = m(z, actions, restart=restart)
        before = torch.cat([torch.zeros(1, hidden.shape[-1]), hidden[0, :-1]])
    return np.concatenate([z[0].numpy(), before.numpy()], axis=1)


def linear_parts(shape: ControllerShape, params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A linear controller's flat parameters -> W (outputs, inputs), b (outputs,)."""
    weights = shape.inputs * shape.outputs
    w = params[:weights].reshape(shape.outputs, shape.inputs)
    b = params[weights:] if shape.bias else np.zeros(shape.outputs)
    return w, b


def refit(shape: ControllerShape, params: np.ndarray, old: list[np.ndarray],
          new: list[np.ndarray], ridges: Iterable[float] = RIDGES
          ) -> dict[float, tuple[np.ndarray, float]]:
    """Per ridge strength: the parameters whose pre-activations on the ``new`` features
    best match ``params``'s on the ``old`` ones (each a list of (T, inputs) per episode),
    and the R^2 of that match."""
    w, b = linear_parts(shape, np.asarray(params, dtype=np.float64))
    x = np.concatenate(new).astype(np.float64)
    target = np.concatenate(old).astype(np.float64) @ w.T + b
    if shape.bias:
        x = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    gram, cross = x.T @ x, x.T @ target
    spread = ((target - target.mean(0)) ** 2).sum()
    out = {}
    for ridge in ridges:
        solution = np.linalg.solve(gram + ridge * np.eye(len(gram)), cross)
        r2 = 1.0 - float(((x @ solution - target) ** 2).sum() / max(spread, 1e-12))
        fitted = solution[:shape.inputs].T.reshape(-1)
        if shape.bias:
            fitted = np.concatenate([fitted, solution[shape.inputs]])
        out[ridge] = (fitted, r2)
    return out


def carry_over(shape: ControllerShape, inputs: str, params: np.ndarray, old_m: MDNRNN,
               new_m: MDNRNN, episodes: Iterable[Series],
               score: Callable[[np.ndarray], float], path: str
               ) -> tuple[np.ndarray, CarryOverChoice]:
    """The starting controller for ``new_m``: ``params`` (made for ``old_m``) refitted at
    each ridge strength, or as it was, whichever ``score`` (the real return on the fixed
    seeds) rates best. Read back from ``path`` when it was chosen before (only the chosen
    fit is computed again, and nothing for the controller as it was)."""
    check_carry_over(shape, inputs)
    params = np.asarray(params, dtype=np.float64)
    if exists(path):  # resume: the same choice, not scored again
        with fsspec.open(path, "rb") as handle:
            choice = CarryOverChoice(**json.loads(handle.read()))
        if choice.chosen == AS_IT_WAS:
            return params, choice
        ridge = float(choice.chosen)
        old, new = _features(old_m, new_m, episodes, inputs)
        return refit(shape, params, old, new, ridges=(ridge,))[ridge][0], choice
    old, new = _features(old_m, new_m, episodes, inputs)
    fits = refit(shape, params, old, new)
    candidates = {f"{ridge:g}": fitted for ridge, (fitted, _) in fits.items()}
    candidates[AS_IT_WAS] = params
    scores = {name: float(score(candidate)) for name, candidate in candidates.items()}
    chosen = max(scores, key=lambda name: scores[name])  # the first of equals
    choice = CarryOverChoice(chosen, scores[chosen], scores, sum(len(f) for f in old),
                             {f"{ridge:g}": r2 for ridge, (_, r2) in fits.items()})
    atomic_write_bytes(path, json.dumps(asdict(choice), indent=2).encode())
    return candidates[chosen], choice


def _features(old_m: MDNRNN, new_m: MDNRNN, episodes: Iterable[Series], inputs: str
              ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """What C read with the old M and reads with the new one, per recorded episode."""
    old_m, new_m = old_m.eval(), new_m.eval()
    old, new = [], []
    for series in episodes:
        old.append(memory_features(old_m, series, inputs))
        new.append(memory_features(new_m, series, inputs))
    if not old:
        raise WmlabError("es.carry_over found no recorded episodes to fit on: collect "
                         "episodes in this iteration (collect.episodes > 0), or set "
                         "es.carry_over = false")
    return old, new
