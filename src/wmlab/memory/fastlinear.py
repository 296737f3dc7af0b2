"""Dense float32 matmuls through oneDNN where PyTorch would call MKL's sgemm.

On this project's AMD CPUs MKL's sgemm runs its generic code path (~90 GFLOP/s per core
measured) while oneDNN uses AVX-512 (~190 GFLOP/s) for the same (B, K) x (K, N) products;
``nn.LSTM`` already trains through oneDNN, which is why it beats a loop of ``addmm``.
``FastLinear``, ``matmul`` and ``linear`` (with autograd) call oneDNN's linear on ordinary
dense tensors. Wherever oneDNN is unavailable (other builds, GPUs, other dtypes) it is
``F.linear``; results agree to float32 rounding either way.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                   ) -> torch.Tensor:
    # oneDNN's linear on ordinary dense tensors (the op PyTorch's compiler emits on CPU)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@functools.cache
def onednn_works() -> bool:
    """Whether this torch build runs oneDNN linear layers (checked once, on a tiny case)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        x, w, b = torch.randn(3, 5), torch.randn(4, 5), torch.randn(4)
        good = torch.allclose(_onednn_linear(x, w, b), F.linear(x, w, b), atol=1e-5)
        return bool(good and torch.allclose(_onednn_linear(x, w, None), x @ w.t(), atol=1e-5))
    except (RuntimeError, AttributeError):
        return False


class FastLinear:
    """y = x @ weight.T (+ bias) for 2-D float32 CPU inputs, without autograd."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight = weight.detach().contiguous()
        self.bias = bias.detach().contiguous() if bias is not None else None
        self.onednn = (self.weight.device.type == "cpu" and self.weight.dtype == torch.float32
                       and onednn_works())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.onednn and x.dtype == torch.float32 and x.device.type == "cpu":
            return _onednn_linear(x.contiguous(), self.weight, self.bias)
        return F.linear(x, self.weight.to(x.dtype),
                        None if self.bias is None else self.bias.to(x.dtype))


@functools.cache
def packing_works(dtype: torch.dtype) -> bool:
    """Whether oneDNN here multiplies by a weight packed once into its own layout
    (``torch.ops.mkldnn._reorder_linear_weight``) and gets the plain product."""
    if not onednn_works():
        return False
    try:
        x, w = torch.randn(3, 8).to(dtype), torch.randn(16, 8).to(dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 3)
        return bool(torch.allclose(_onednn_linear(x, packed, None).float(),
                                   F.linear(x, w).float(), atol=1e-2))
    except (RuntimeError, AttributeError):
        return False


class PackedLinear:
    """y = x @ weight.T for a weight used many times at one batch size (a recurrence's
    steps), packed once into oneDNN's blocked layout; a plain call re-packs it every time
    (a 2,048 x 512 bf16 step: 170 against 222 us). Float32 or bfloat16 on the CPU; elsewhere
    ``FastLinear``. The output has the input's dtype."""

    def __init__(self, weight: torch.Tensor, batch: int) -> None:
        self.plain = FastLinear(weight)
        self.packed = None
        w = self.plain.weight
        if w.device.type == "cpu" and w.dtype in (torch.float32, torch.bfloat16) and \
                packing_works(w.dtype):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(w, batch)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.dtype == self.plain.weight.dtype and \
                x.device.type == "cpu":
            return _onednn_linear(x.contiguous(), self.packed, None)
        return self.plain(x)


def _usable(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors) and \
        onednn_works()


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (M, K) @ b (K, N) for 2-D tensors, through oneDNN where usable (no autograd).

    A transposed ``a`` (a weight gradient's d_y.T) goes to ``torch.mm`` as it is: oneDNN's
    linear would need it copied contiguous first, and that transposing copy of a (2,048 x
    3,200) gradient took longer (38 ms) than the product itself."""
    if _usable(a, b) and not (a.t().is_contiguous() and not a.is_contiguous()):
        return _onednn_linear(a.contiguous(), b.t().contiguous(), None)
    return a @ b


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return FastLinear(weight, bias)(x)

    @staticmethod
    def backward(ctx, d_y: torch.Tensor):
        x, weight = ctx.saved_tensors
        d_x = matmul(d_y, weight) if ctx.needs_input_grad[0] else None
        d_w = matmul(d_y.t(), x) if ctx.needs_input_grad[1] else None
        d_b = d_y.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return d_x, d_w, d_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """``F.linear`` with autograd, its three matmuls through oneDNN where usable.

    Under autocast it is ``F.linear``: autocast lowers oneDNN's forward op to bf16, which the
    float32 matmuls of this backward cannot take."""
    if not _usable(x, weight) or torch.is_autocast_enabled(x.device.type):
        return F.linear(x, weight, bias)
    lead = x.shape[:-1]
    y = _Linear.apply(x.reshape(-1, x.shape[-1]), weight, bias)
    return y.reshape(*lead, weight.shape[0])
