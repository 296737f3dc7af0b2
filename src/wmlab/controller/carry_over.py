"""C carried over to a retrained M.

C reads M's hidden state h, and h changes meaning when M trains on: a controller that drove
at 756 with the M it was trained with drives at ~250 with the same M trained 1,000 steps
more (CarRacing, iteration 2). C's first map of what it reads can be translated instead of
retrained: on episodes the old controller drove (the iteration's agent episodes), run both
Ms over the same (z, action) sequences and fit, by ridge regression, the weights on the new
M's features that give the old controller's pre-activations on the old M's features. The
first map is W of a linear C = tanh(W [z, h] + b), the hidden layer's (W, b) of a C with
one (what follows it reads the same hidden units, so it is kept), and for a look-ahead C
(``controller.lookahead``) the shared map of M's state after each action, fitted over every
(step, action) pair: w . x_a for a linear one (a constant shared by the actions cannot
change which wins, so the fit's intercept is dropped and b_a kept), W x_a + b for one with
a hidden layer.

A least-squares fit that matches the recorded steps best (R^2 0.99) can still drive worse in
closed loop, where small errors take the car off the recorded tracks; a stronger ridge
drives better. So each ridge strength of ``RIDGES``, and the controller as it was, is scored
on the real env on the run's fixed scoring seeds, and the best is C's starting point. The
choice is written to ``<controller>/carry-over.json`` and read back on resume.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from itertools import islice

import fsspec
import numpy as np
import torch

from wmlab.controller.model import ControllerShape, clock_features, lookahead_features
from wmlab.data.series import Series
from wmlab.errors import WmlabError
from wmlab.fsio import atomic_write_bytes, exists
from wmlab.memory.model import MDNRNN

RIDGES = (10.0, 100.0, 1_000.0, 10_000.0)  # in units of X^T X over ~300k recorded rows
# a look-ahead C's rows are (step, action) pairs: its fit reads this many recorded steps at
# most (~300k rows for BinPacking's 30 levels), the first episodes' first
LOOKAHEAD_STEPS = 10_000
# episodes run through each M together in the refit (~74 MB of CarRacing's features per M)
EPISODE_CHUNK = 64
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


def check_carry_over(shape: ControllerShape, inputs: str,
                     candidates: torch.Tensor | None = None) -> None:
    if inputs == "z":
        raise WmlabError("es.carry_over translates a controller that reads M's state to a "
                         "retrained M, and controller.inputs = 'z' reads none: set "
                         "controller.inputs to zh or zch, or es.carry_over = false")
    if shape.lookahead and candidates is None:
        raise WmlabError("es.carry_over needs the actions a look-ahead controller scores "
                         "(a discrete env's): set controller.lookahead = false, or "
                         "es.carry_over = false")


@torch.no_grad()
def memory_features(m: MDNRNN, series: Series, inputs: str,
                    clock: tuple[int, ...] = ()) -> np.ndarray:
    """What C reads at each step of a recorded episode with M ``m``: [z_t, (c, ) h_{t-1}]
    (T, features), z_t V's posterior mean, the state before step t (zero at the start), as
    the agent acts; then the clock's inputs at step t where C reads a clock."""
    if inputs != "zch":
        return memory_features_of(m, [series], inputs, clock)[0]
    # the cell state too: step by step, as the agent advances M
    z = torch.from_numpy(series.mu[:-1].astype(np.float32))[None]
    actions = torch.from_numpy(series.actions.astype(np.float32))[None]
    h, c = (state[0] for state in m.initial_state(1))
    states = []
    for t in range(z.shape[1]):
        # the episode's first step restarts M, as the agent's M sees it
        restart = torch.full((1, 1), float(t == 0))
        states.append(torch.cat([c[0], h[0]]))
        h, c = m.advance(z[:, t], actions[:, t], restart, h, c)
    ticks = clock_features(torch.arange(z.shape[1]), clock).numpy()
    return np.concatenate([z[0].numpy(), torch.stack(states).numpy(), ticks], axis=1)


@torch.no_grad()
def memory_features_of(m: MDNRNN, episodes: Sequence[Series], inputs: str,
                       clock: tuple[int, ...] = (), batch: int = 64) -> list[np.ndarray]:
    """``memory_features`` of many episodes; for [z, h] the episodes of one length go
    through M together, up to ``batch`` at a time, in one fused LSTM call (a batch of one
    steps the LSTM one small matrix product at a time)."""
    if inputs == "zch":
        return [memory_features(m, series, inputs, clock) for series in episodes]
    by_length: dict[int, list[int]] = {}
    for index, series in enumerate(episodes):
        by_length.setdefault(len(series.actions), []).append(index)
    features: list[np.ndarray] = [np.empty(0)] * len(episodes)
    for length, indices in by_length.items():
        ticks = clock_features(torch.arange(length), clock).numpy()
        for start in range(0, len(indices), batch):
            chunk = indices[start:start + batch]
            z = torch.from_numpy(np.stack([episodes[i].mu[:-1] for i in chunk]).astype(np.float32))
            actions = torch.from_numpy(
                np.stack([episodes[i].actions for i in chunk]).astype(np.float32))
            restart = torch.zeros(z.shape[:2])
            restart[:, 0] = 1.0  # the episode's first step, as the agent's M sees it
            _, hidden, _ = m(z, actions, restart=restart)
            before = torch.cat([torch.zeros(len(chunk), 1, hidden.shape[-1]), hidden[:, :-1]],
                               dim=1)
            for row, index in enumerate(chunk):
                features[index] = np.concatenate([z[row].numpy(), before[row].numpy(), ticks],
                                                 axis=1)
    return features


@torch.no_grad()
def lookahead_memory_features(m: MDNRNN, series: Series, inputs: str,
                              candidates: torch.Tensor, steps: int | None = None
                              ) -> np.ndarray:
    """What a look-ahead C reads at each step of a recorded episode with M ``m``: M's state
    after each of the A ``candidates`` from the state before step t (and the reward M
    predicts for it), (T, A, features), as the agent scores them; the first ``steps`` steps
    only where given. M then advances on the recorded action."""
    length = len(series.actions) if steps is None else min(steps, len(series.actions))
    z = torch.from_numpy(series.mu[:length].astype(np.float32))
    actions = torch.from_numpy(series.actions[:length].astype(np.float32))
    h, c = (state[0] for state in m.initial_state(1))
    out = []
    for t in range(length):
        restart = torch.full((1, 1), 1.0 if t == 0 else 0.0)
        h_next, c_next = m.advance_each(z[t:t + 1], candidates, restart, h, c)
        out.append(lookahead_features(inputs, h_next, c_next, m.predicted_reward(h_next))[0])
        h, c = m.advance(z[t:t + 1], actions[t:t + 1], restart, h, c)
    return torch.stack(out).numpy() if out else np.zeros((0, len(candidates), 0), np.float32)


def _first_layer_size(shape: ControllerShape) -> tuple[int, bool]:
    """(units, has_bias) of C's first map of its features: the hidden layer, the outputs of
    a linear C, or the one score of a linear look-ahead C (whose biases are per action)."""
    if shape.hidden:
        return shape.hidden, True
    if shape.lookahead:
        return 1, False
    return shape.outputs, shape.bias


def first_layer(shape: ControllerShape, params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """C's flat parameters -> its first map's W (units, inputs) and b (units,), zeros where
    that map has no bias of its own. Every C's parameters start with this map."""
    units, has_bias = _first_layer_size(shape)
    weights = units * shape.inputs
    w = params[:weights].reshape(units, shape.inputs)
    b = params[weights:weights + units] if has_bias else np.zeros(units)
    return w, b


def with_first_layer(shape: ControllerShape, params: np.ndarray, w: np.ndarray,
                     b: np.ndarray) -> np.ndarray:
    """``params`` with its first map replaced by (W, b); the rest of C is kept."""
    units, has_bias = _first_layer_size(shape)
    out = np.array(params, dtype=np.float64)
    weights = units * shape.inputs
    out[:weights] = w.reshape(-1)
    if has_bias:
        out[weights:weights + units] = b
    return out


def refit(shape: ControllerShape, params: np.ndarray,
          pairs: Iterable[tuple[np.ndarray, np.ndarray]], ridges: Iterable[float] = RIDGES
          ) -> tuple[dict[float, tuple[np.ndarray, float]], int]:
    """Per ridge strength: the parameters whose first map on the new features best matches
    ``params``'s on the old ones, and the R^2 of that match; and the rows fitted. ``pairs``
    holds (old, new) feature rows (n, inputs) per episode, read once: the normal equations
    are summed as they come, so a look-ahead C's (step, action) rows never sit in memory
    together. A look-ahead C's fitted intercept is shared by its actions and dropped."""
    params = np.asarray(params, dtype=np.float64)
    w, b = first_layer(shape, params)
    units, has_bias = _first_layer_size(shape)
    intercept = has_bias or shape.lookahead
    size = shape.inputs + int(intercept)
    gram, cross = np.zeros((size, size)), np.zeros((size, units))
    total, squares, rows = np.zeros(units), 0.0, 0
    for old, new in pairs:
        x = new.reshape(-1, shape.inputs).astype(np.float64)
        target = old.reshape(-1, shape.inputs).astype(np.float64) @ w.T + b
        if intercept:
            x = np.concatenate([x, np.ones((len(x), 1))], axis=1)
        gram += x.T @ x
        cross += x.T @ target
        total += target.sum(0)
        squares += float((target ** 2).sum())
        rows += len(x)
    spread = squares - float((total ** 2).sum()) / max(rows, 1)
    out = {}
    for ridge in ridges:
        solution = np.linalg.solve(gram + ridge * np.eye(size), cross)
        # sum of squared residuals from the summed equations: |X s - t|^2
        residual = float((solution * (gram @ solution)).sum() - 2 * (solution * cross).sum()
                         + squares)
        r2 = 1.0 - max(residual, 0.0) / max(spread, 1e-12)
        fitted_w = solution[:shape.inputs].T
        fitted_b = solution[shape.inputs] if has_bias else np.zeros(units)
        out[ridge] = (with_first_layer(shape, params, fitted_w, fitted_b), r2)
    return out, rows


def carry_over(shape: ControllerShape, inputs: str, params: np.ndarray, old_m: MDNRNN,
               new_m: MDNRNN, episodes: Iterable[Series],
               score: Callable[[np.ndarray], float], path: str,
               candidates: torch.Tensor | None = None,
               old_episodes: Iterable[Series] | None = None
               ) -> tuple[np.ndarray, CarryOverChoice]:
    """The starting controller for ``new_m``: ``params`` (made for ``old_m``) refitted at
    each ridge strength, or as it was, whichever ``score`` (the real return on the fixed
    seeds) rates best. Read back from ``path`` when it was chosen before (only the chosen
    fit is computed again, and nothing for the controller as it was). ``candidates``: the
    actions a look-ahead C scores (row a: action a's vector for M). ``old_episodes``: the
    same episodes as the old controller saw them, where V was retrained too (their z from
    the old V; the old features are read from them); None: the same z for both."""
    check_carry_over(shape, inputs, candidates)
    params = np.asarray(params, dtype=np.float64)
    pairs = _features(old_m, new_m, episodes, inputs, candidates if shape.lookahead else None,
                      shape.clock, old_episodes)
    if exists(path):  # resume: the same choice, not scored again
        with fsspec.open(path, "rb") as handle:
            choice = CarryOverChoice(**json.loads(handle.read()))
        if choice.chosen == AS_IT_WAS:
            return params, choice
        ridge = float(choice.chosen)
        return refit(shape, params, pairs, ridges=(ridge,))[0][ridge][0], choice
    fits, rows = refit(shape, params, pairs)
    starts = {f"{ridge:g}": fitted for ridge, (fitted, _) in fits.items()}
    starts[AS_IT_WAS] = params
    scores = {name: float(score(candidate)) for name, candidate in starts.items()}
    chosen = max(scores, key=lambda name: scores[name])  # the first of equals
    steps = rows // (len(candidates) if shape.lookahead else 1)
    choice = CarryOverChoice(chosen, scores[chosen], scores, steps,
                             {f"{ridge:g}": r2 for ridge, (_, r2) in fits.items()})
    atomic_write_bytes(path, json.dumps(asdict(choice), indent=2).encode())
    return starts[chosen], choice


def _features(old_m: MDNRNN, new_m: MDNRNN, episodes: Iterable[Series], inputs: str,
              candidates: torch.Tensor | None = None, clock: tuple[int, ...] = (),
              old_episodes: Iterable[Series] | None = None
              ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """What C read with the old M (on ``old_episodes``, else on ``episodes``) and reads with
    the new one, per recorded episode: the features of every step (the clock's too, the same
    in both), or for a look-ahead C (``candidates``) of every (step, action) pair over the
    first LOOKAHEAD_STEPS recorded steps."""
    old_m, new_m = old_m.eval(), new_m.eval()
    pairs = _episode_pairs(episodes, old_episodes)
    if candidates is None:
        yield from _paired_features(old_m, new_m, pairs, inputs, clock)
        return
    left, any_episode = LOOKAHEAD_STEPS, False
    for old_series, series in pairs:
        any_episode = True
        old = lookahead_memory_features(old_m, old_series, inputs, candidates, left)
        new = lookahead_memory_features(new_m, series, inputs, candidates, left)
        yield old, new
        left -= len(old)
        if left <= 0:
            break
    if not any_episode:
        raise _no_episodes()


def _episode_pairs(episodes: Iterable[Series], old_episodes: Iterable[Series] | None
                   ) -> Iterator[tuple[Series, Series]]:
    """(as the old controller saw it, as the new one sees it) per episode, in order."""
    if old_episodes is None:
        yield from ((series, series) for series in episodes)
        return
    for old, new in zip(old_episodes, episodes, strict=True):
        if old.episode_id != new.episode_id or len(old.actions) != len(new.actions):
            raise WmlabError(f"es.carry_over: the old V's series of {old.episode_id} does "
                             f"not match this V's {new.episode_id}: encode the same "
                             "episodes with both Vs")
        yield old, new


def _paired_features(old_m: MDNRNN, new_m: MDNRNN,
                     pairs: Iterable[tuple[Series, Series]], inputs: str,
                     clock: tuple[int, ...]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(old, new) features per episode pair (old, new series), EPISODE_CHUNK episodes read
    at a time and run through each M together (``memory_features_of``): the episodes are
    streamed, never all held."""
    stream, any_episode = iter(pairs), False
    while chunk := list(islice(stream, EPISODE_CHUNK)):
        any_episode = True
        yield from zip(memory_features_of(old_m, [old for old, _ in chunk], inputs, clock),
                       memory_features_of(new_m, [new for _, new in chunk], inputs, clock),
                       strict=True)
    if not any_episode:
        raise _no_episodes()


def _no_episodes() -> WmlabError:
    return WmlabError("es.carry_over found no recorded episodes to fit on: collect "
                      "episodes in this iteration (collect.episodes > 0), or set "
                      "es.carry_over = false")
