"""Dense float32 matmuls through oneDNN where PyTorch would call MKL's sgemm.

On this project's AMD CPUs MKL's sgemm runs its generic code path (~90 GFLOP/s per core
measured) while oneDNN uses AVX-512 (~190 GFLOP/s) for the same (B, K) x (K, N) products;
``nn.LSTM`` already trains through oneDNN, which is why it beats a loop of ``addmm``.
``FastLinear`` keeps the weight in oneDNN's layout once and converts only the activations
each call. Wherever oneDNN is unavailable (other builds, GPUs, other dtypes) it is
``F.linear``; results agree to float32 rounding either way.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.cache
def onednn_works() -> bool:
    """Whether this torch build runs oneDNN linear layers (checked once, on a tiny case)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        x, w, b = torch.randn(3, 5), torch.randn(4, 5), torch.randn(4)
        y = torch._C._nn.mkldnn_linear(x.to_mkldnn(), w.to_mkldnn(), b.to_mkldnn()).to_dense()
        return bool(torch.allclose(y, F.linear(x, w, b), atol=1e-5))
    except (RuntimeError, AttributeError):
        return False


class FastLinear:
    """y = x @ weight.T (+ bias) for 2-D float32 CPU inputs, without autograd."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight = weight.detach()
        self.bias = bias.detach() if bias is not None else None
        self.onednn = (self.weight.device.type == "cpu" and self.weight.dtype == torch.float32
                       and onednn_works())
        if self.onednn:
            self._w = self.weight.contiguous().to_mkldnn()
            self._b = self.bias.contiguous().to_mkldnn() if self.bias is not None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.onednn and x.dtype == torch.float32 and x.device.type == "cpu":
            return torch._C._nn.mkldnn_linear(x.contiguous().to_mkldnn(), self._w,
                                              self._b).to_dense()
        return F.linear(x, self.weight.to(x.dtype),
                        None if self.bias is None else self.bias.to(x.dtype))
