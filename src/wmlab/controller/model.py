"""C: the tiny controller, as a flat parameter vector that CMA-ES searches.

A controller maps features [z, h] (or [z, c, h] for Doom, or z alone) to raw outputs in
[-1, 1] through tanh, optionally with a hidden tanh layer (the paper's 40-unit variant);
the env's spec maps raw outputs to actions. A whole population evaluates as one batched
matrix product: parameters (P, n) and features (P, N, in) give outputs (P, N, out).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from wmlab.errors import WmlabError


@dataclass(frozen=True)
class ControllerShape:
    inputs: int
    outputs: int
    hidden: int = 0
    bias: bool = True

    @property
    def num_params(self) -> int:
        if self.hidden:
            return (self.inputs + 1) * self.hidden + self.hidden * self.outputs + (
                self.outputs if self.bias else 0)
        return self.inputs * self.outputs + (self.outputs if self.bias else 0)


def feature_size(kind: str, z_dim: int, hidden: int) -> int:
    """Size of what C observes: z, [z, h] or [z, c, h]."""
    sizes = {"z": z_dim, "zh": z_dim + hidden, "zch": z_dim + 2 * hidden}
    if kind not in sizes:
        raise WmlabError(f"controller.inputs: '{kind}' is not one of z, zh, zch")
    return sizes[kind]


def controller_features(kind: str, z: torch.Tensor, h: torch.Tensor | None,
                        c: torch.Tensor | None) -> torch.Tensor:
    """Concatenate what C observes (any leading batch shape)."""
    if kind == "z":
        return z
    if kind == "zh":
        return torch.cat([z, h], dim=-1)
    return torch.cat([z, c, h], dim=-1)


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
    x = features
    for weight, bias in _unpack(shape, params.to(features.dtype)):
        x = torch.bmm(x, weight.transpose(1, 2))
        if bias is not None:
            x = x + bias.unsqueeze(1)
        x = torch.tanh(x)
    return x


def controller_shape(kind: str, z_dim: int, m_hidden: int, outputs: int, hidden: int = 0,
                     bias: bool = True) -> ControllerShape:
    """The controller that fits a V of ``z_dim`` and an M of ``m_hidden`` units."""
    return ControllerShape(inputs=feature_size(kind, z_dim, m_hidden), outputs=outputs,
                           hidden=hidden, bias=bias)


def shape_info(shape: ControllerShape, kind: str) -> dict:
    """What a controller checkpoint records so that a mismatch is named on loading."""
    return {"inputs": shape.inputs, "outputs": shape.outputs, "hidden": shape.hidden,
            "bias": shape.bias, "features": kind, "num_params": shape.num_params}


def check_shape(info: dict, shape: ControllerShape, kind: str, source: str) -> None:
    """Refuse a controller saved for another V, M or controller config, saying which."""
    saved = {k: info.get(k) for k in ("inputs", "outputs", "hidden", "bias", "features")}
    wanted = {k: v for k, v in shape_info(shape, kind).items() if k in saved}
    if saved != wanted:
        diff = ", ".join(f"{k} {saved[k]!r} in the file but {wanted[k]!r} here"
                         for k in saved if saved[k] != wanted[k])
        raise WmlabError(f"controller {source} does not fit this run's V, M and controller "
                         f"config ({diff}): evaluate it with the config it was trained with, "
                         "or train a controller for these V and M")
