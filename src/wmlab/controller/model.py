"""C: the tiny controller, as a flat parameter vector that CMA-ES searches.

A controller maps features [z, h] (or [z, c, h] for Doom, or z alone) to raw outputs in
[-1, 1] through tanh, optionally with a hidden tanh layer (the paper's 40-unit variant);
the env's spec maps raw outputs to actions. With ``controller.clock`` C also reads the sine and
cosine of the episode's step count at the given periods (the same count in the game and in
the dream). A whole population evaluates as one batched
matrix product: parameters (P, n) and features (P, N, in) give outputs (P, N, out).

A look-ahead controller (``controller.lookahead``, discrete actions) scores each action a
instead by one map of M's state *after* a, shared by the actions, plus a bias of its own:
score_a = w . x_a + b_a with x_a = [(c'_a,) h'_a(, r_a)], r_a the reward M predicts for a;
with ``controller.hidden`` = k, score_a = v . tanh(W x_a + b) + b_a (k hidden units, still
shared by the actions: a value of the next state that need not be linear in it). The agent
steps M for every action (``wmlab.agent``); here are only the shapes and the scoring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from wmlab.config import CONTROLLER_INPUTS, check_lookahead
from wmlab.errors import WmlabError


@dataclass(frozen=True)
class ControllerShape:
    """``inputs``: the features C reads, per action for a look-ahead C (``lookahead``), whose
    ``outputs`` are the actions and ``bias`` their own biases b_a."""

    inputs: int
    outputs: int
    hidden: int = 0
    bias: bool = True
    lookahead: bool = False
    # controller.clock: the periods (env steps) of the clock C also reads; its 2 per period
    # sin / cos inputs are counted in ``inputs``
    clock: tuple[int, ...] = ()

    @property
    def num_params(self) -> int:
        if self.lookahead:  # w (or W, b and v) shared by the actions, then b_a
            shared = (self.inputs + 2) * self.hidden if self.hidden else self.inputs
            return shared + (self.outputs if self.bias else 0)
        if self.hidden:
            return (self.inputs + 1) * self.hidden + self.hidden * self.outputs + (
                self.outputs if self.bias else 0)
        return self.inputs * self.outputs + (self.outputs if self.bias else 0)


def feature_size(kind: str, z_dim: int, hidden: int) -> int:
    """Size of what C observes: z, [z, h] or [z, c, h]."""
    sizes = dict(zip(CONTROLLER_INPUTS, (z_dim, z_dim + hidden, z_dim + 2 * hidden),
                     strict=True))
    if kind not in sizes:
        raise WmlabError(f"controller.inputs: '{kind}' is not one of "
                         f"{', '.join(CONTROLLER_INPUTS)}")
    return sizes[kind]


def lookahead_size(kind: str, m_hidden: int, reward: bool) -> int:
    """Size of what a look-ahead C reads of M's state after one action: h' (``zh``) or
    [c', h'] (``zch``), plus M's predicted reward where M has that head. z is the same for
    every action, so it could not change which one wins: it is left out."""
    return (2 * m_hidden if kind == "zch" else m_hidden) + int(reward)


def lookahead_features(kind: str, h_next: torch.Tensor, c_next: torch.Tensor,
                       reward: torch.Tensor | None) -> torch.Tensor:
    """What a look-ahead C reads per action: (B, A, H) states (and (B, A) predicted
    rewards, or None) -> (B, A, lookahead_size)."""
    parts = [c_next, h_next] if kind == "zch" else [h_next]
    if reward is not None:
        parts.append(reward.unsqueeze(-1))
    return torch.cat(parts, dim=-1)


def controller_features(kind: str, z: torch.Tensor, h: torch.Tensor | None,
                        c: torch.Tensor | None, clock: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """Concatenate what C observes (any leading batch shape), the clock's inputs last."""
    parts = [z] if kind == "z" else [z, h] if kind == "zh" else [z, c, h]
    if clock is not None:
        parts.append(clock.to(z.dtype))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def clock_features(steps: torch.Tensor | np.ndarray, periods: tuple[int, ...]
                   ) -> torch.Tensor:
    """(B,) steps since each episode began -> (B, 2 x len(periods)) float32: sin and cos of
    2 pi t / P for each period P. A C that reads them can act on time as well as on what it
    sees (a timed sweep that never looks outlives the Doom agents that do); sin and cos
    together let it pick any phase of each period."""
    t = torch.as_tensor(steps).to(torch.float64).reshape(-1, 1)
    if not periods:
        return torch.zeros(len(t), 0)
    angle = t * (2.0 * math.pi / torch.tensor(periods, dtype=torch.float64))
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1).float()


def _unpack(shape: ControllerShape, params: torch.Tensor):
    """(P, n) flat parameters -> per-layer weight/bias tensors with a leading P axis."""
    p = params.shape[0]
    if params.shape[1] != shape.num_params:
        raise WmlabError(f"controller parameters have {params.shape[1]} values per member, "
                         f"but this controller needs {shape.num_params}: the file was made "
                         "for another controller, V or M shape")
    offset = 0

    def take(*dims: int) -> torch.Tensor:
        nonlocal offset
        count = 1
        for d in dims:
            count *= d
        block = params[:, offset:offset + count].reshape(p, *dims)
        offset += count
        return block

    if shape.lookahead:  # [(w, b_a)], or with a hidden layer [(W, b), (v, b_a)]
        layers = [(take(shape.hidden, shape.inputs), take(shape.hidden))] if shape.hidden \
            else []
        w = take(shape.hidden or shape.inputs)
        return [*layers, (w, take(shape.outputs) if shape.bias else None)]
    if shape.hidden:
        w1 = take(shape.hidden, shape.inputs)
        b1 = take(shape.hidden)
        w2 = take(shape.outputs, shape.hidden)
        b2 = take(shape.outputs) if shape.bias else None
        return [(w1, b1), (w2, b2)]
    w = take(shape.outputs, shape.inputs)
    b = take(shape.outputs) if shape.bias else None
    return [(w, b)]


def population_forward(shape: ControllerShape, params: torch.Tensor,
                       features: torch.Tensor) -> torch.Tensor:
    """params (P, n), features (P, N, inputs) -> raw outputs (P, N, outputs) in [-1, 1]."""
    if shape.lookahead:
        raise WmlabError("a look-ahead controller scores M's states after each action: "
                         "call lookahead_forward")
    x = features
    for weight, bias in _unpack(shape, params.to(features.dtype)):
        x = torch.bmm(x, weight.transpose(1, 2))
        if bias is not None:
            x = x + bias.unsqueeze(1)
        x = torch.tanh(x)
    return x


def lookahead_forward(shape: ControllerShape, params: torch.Tensor,
                      features: torch.Tensor) -> torch.Tensor:
    """params (P, n), per-action features (P, N, A, inputs) -> scores (P, N, A): w . x_a +
    b_a, or v . tanh(W x_a + b) + b_a with a hidden layer. Not squashed by tanh: they are
    logits for an argmax, and tanh would make large ones equal (1.0 in float32 from about 9
    on), leaving the choice to the first of them."""
    *hidden, (weight, bias) = _unpack(shape, params.to(features.dtype))
    x = features
    for w1, b1 in hidden:  # (P, N, A, in) -> (P, N, A, k), every action through the same W
        x = torch.tanh(x @ w1.transpose(1, 2)[:, None] + b1[:, None, None, :])
    scores = (x @ weight[:, None, :, None]).squeeze(-1)
    return scores if bias is None else scores + bias.unsqueeze(1)


def controller_shape(kind: str, z_dim: int, m_hidden: int, outputs: int, hidden: int = 0,
                     bias: bool = True, lookahead: bool = False,
                     reward: bool = False, clock: tuple[int, ...] = ()) -> ControllerShape:
    """The controller that fits a V of ``z_dim`` and an M of ``m_hidden`` units; with
    ``lookahead``, the look-ahead C over an M with (``reward``) or without a reward head;
    ``clock``: the periods of the clock it also reads (controller.clock)."""
    if not lookahead:
        clock = tuple(int(p) for p in clock)
        return ControllerShape(inputs=feature_size(kind, z_dim, m_hidden) + 2 * len(clock),
                               outputs=outputs, hidden=hidden, bias=bias, clock=clock)
    check_lookahead(kind, clock)
    return ControllerShape(inputs=lookahead_size(kind, m_hidden, reward), outputs=outputs,
                           hidden=hidden, bias=bias, lookahead=True)


def shape_info(shape: ControllerShape, kind: str) -> dict:
    """What a controller checkpoint records so that a mismatch is named on loading."""
    return {"inputs": shape.inputs, "outputs": shape.outputs, "hidden": shape.hidden,
            "bias": shape.bias, "features": kind, "lookahead": shape.lookahead,
            "clock": list(shape.clock), "num_params": shape.num_params}


def with_clock(params: np.ndarray, info: dict, shape: ControllerShape, kind: str,
               source: str) -> np.ndarray:
    """A saved controller's (n,) parameters as a start for ``shape``: as they are where they
    fit, and a C saved without a clock as one with ``shape``'s clock, the clock's weights zero
    (it then acts exactly as it did). Anything else is refused as ``check_shape`` names it."""
    params = np.asarray(params)
    if info.get("clock") or not shape.clock:  # (a look-ahead C never has a clock)
        check_shape(info, shape, kind, source)
        return params
    before = shape_without_clock(shape)
    check_shape(info, before, kind, source)
    first = shape.hidden or shape.outputs  # the rows of the map that reads C's inputs
    reads = first * before.inputs  # that map comes first, row-major; the clock's columns last
    weights = params[:reads].reshape(first, before.inputs)
    clock = np.zeros((first, shape.inputs - before.inputs), params.dtype)
    return np.concatenate([np.concatenate([weights, clock], axis=1).ravel(), params[reads:]])


def shape_without_clock(shape: ControllerShape) -> ControllerShape:
    """``shape`` with no clock: the C it was before its clock's inputs were added."""
    return replace(shape, inputs=shape.inputs - 2 * len(shape.clock), clock=())


def check_shape(info: dict, shape: ControllerShape, kind: str, source: str) -> None:
    """Refuse a controller saved for another V, M or controller config, saying which."""
    saved = {k: info.get(k) for k in ("inputs", "outputs", "hidden", "bias", "features")}
    saved["lookahead"] = bool(info.get("lookahead", False))  # files from before: linear C
    saved["clock"] = list(info.get("clock", []))  # files from before: no clock
    wanted = {k: v for k, v in shape_info(shape, kind).items() if k in saved}
    if saved != wanted:
        diff = ", ".join(f"{k} {saved[k]!r} in the file but {wanted[k]!r} here"
                         for k in saved if saved[k] != wanted[k])
        raise WmlabError(f"controller {source} does not fit this run's V, M and controller "
                         f"config ({diff}): evaluate it with the config it was trained with, "
                         "or train a controller for these V and M")
