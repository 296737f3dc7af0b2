"""The LSTM recurrence as one autograd function, with a per-step state reset.

PyTorch's ``nn.LSTM`` cannot zero its state in the middle of a sequence, and the obvious
replacement (a Python loop of cell steps under autograd) records ~10 graph nodes per step and
is an order of magnitude slower. Here the input projection of all steps is one matmul done
outside (by autograd), the loop runs time-major without recording a graph, everything that
does not depend on the previous step (activation derivatives) is computed for all steps at
once, and the weight gradient of the recurrent matrix is a single matmul over all steps.
Gate order and weights are those of ``nn.LSTM`` (i, f, g, o), so the two are interchangeable.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch

from wmlab.memory.fastlinear import FastLinear, PackedLinear, linear, matmul
from wmlab.native import load_library


def tanh(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """tanh(x) as 2 sigmoid(2x) - 1 on the CPU, where PyTorch's float32 tanh is ~6x slower
    than its sigmoid (~2.6 against ~0.4 ns per value on the Zen 4 EPYC, both vectorised):
    3.5x faster, within 2e-7 of torch.tanh everywhere (absolute: float rounding near 0,
    far below the bf16 products it follows). ``torch.tanh`` elsewhere."""
    if x.device.type != "cpu":
        return torch.tanh(x, out=out)
    y = torch.mul(x, 2.0, out=out)
    torch.sigmoid_(y)
    return y.mul_(2.0).sub_(1.0)


def lstm_kernels() -> ctypes.CDLL | None:
    """The C step kernels of the scan and the dream (``lstm_steps.c``), or None where they
    cannot be built."""
    lib = load_library("wmlab.memory", "lstm_steps.c")
    if lib is not None and not getattr(lib, "wmlab_ready", False):
        i64, ptr, flag = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        lib.lstm_forward_step.argtypes = [i64, i64, ptr, ptr, flag, ptr, ptr, ptr, ptr, ptr,
                                          ptr, ptr, flag, ptr]
        lib.lstm_forward_step.restype = None
        lib.lstm_backward_step.argtypes = [i64, i64, ptr, flag, ptr, ptr, ptr, ptr, ptr, ptr,
                                           ptr, ptr, ptr, flag, ptr]
        lib.lstm_backward_step.restype = None
        # the dream's step (wmlab.dream): the cell after its matmul, then the draws
        f32 = ctypes.c_float
        lib.dream_lstm_step.argtypes = [i64, i64, ptr, flag, ptr, ptr, ptr, ptr, flag, ptr]
        lib.dream_lstm_step.restype = None
        lib.dream_sample.argtypes = [i64, i64, i64, i64, ptr, flag, f32, ptr, ptr, ptr, ptr,
                                     i64, flag, f32, f32, ptr, ptr, ptr]
        lib.dream_sample.restype = None
        lib.wmlab_ready = True
    return lib


class _Rows:
    """Addresses of a contiguous (T, ...) tensor's steps, without building a view per step
    (the step loop's Python overhead is a good part of what the kernels save)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        assert tensor.is_contiguous()
        self.base = tensor.data_ptr()
        self.stride = tensor[0].numel() * tensor.element_size() if len(tensor) else 0

    def __getitem__(self, t: int) -> int:
        return self.base + t * self.stride


def _native_usable(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def _forward_native(lib: ctypes.CDLL, proj: torch.Tensor, w_hh: torch.Tensor,
                    h0: torch.Tensor, c0: torch.Tensor, keep: torch.Tensor,
                    low: torch.dtype):
    """The forward loop with each step's elementwise work in one C call. Returns the saved
    tensors of ``_backward_native``: acts, cells, outputs and the matmul inputs h_low
    ((T + 1, B, H) in the low dtype: step t's state after its reset)."""
    steps, batch, four_h = proj.shape
    hidden = four_h // 4
    bf16 = int(low == torch.bfloat16)
    acts = torch.empty_like(proj)
    cells = proj.new_empty(steps, batch, hidden)
    outputs = proj.new_empty(steps, batch, hidden)
    h_low = torch.empty(steps + 1, batch, hidden, dtype=low)
    h_low[0] = (h0 * keep[0].unsqueeze(-1)).to(low)
    scratch = proj.new_empty(5 * hidden)
    recurrent = PackedLinear(w_hh.to(low), batch)
    p_proj, p_keep, p_acts = _Rows(proj), _Rows(keep), _Rows(acts)
    p_cells, p_out, p_low = _Rows(cells), _Rows(outputs), _Rows(h_low)
    c_prev = c0.data_ptr()
    for t in range(steps):
        rec = recurrent(h_low[t])
        lib.lstm_forward_step(batch, hidden, p_proj[t], rec.data_ptr(), bf16, c_prev,
                              p_keep[t], p_keep[t + 1] if t + 1 < steps else None,
                              p_acts[t], p_cells[t], p_out[t], p_low[t + 1], bf16,
                              scratch.data_ptr())
        c_prev = p_cells[t]
    return acts, cells, outputs, h_low


def _backward_native(lib: ctypes.CDLL, acts: torch.Tensor, cells: torch.Tensor,
                     h_low: torch.Tensor, w_hh: torch.Tensor, keep: torch.Tensor,
                     c0: torch.Tensor, d_out: torch.Tensor | None, d_h: torch.Tensor | None,
                     d_c: torch.Tensor | None):
    steps, batch, hidden = cells.shape
    low = h_low.dtype
    bf16 = int(low == torch.bfloat16)
    d_out = d_out.contiguous() if d_out is not None else None
    dc = d_c.float().contiguous().clone() if d_c is not None else cells.new_zeros(batch, hidden)
    dh = d_h.float().contiguous() if d_h is not None else cells.new_zeros(batch, hidden)
    d_gates = torch.empty_like(acts)
    d_low = torch.empty(acts.shape, dtype=low) if bf16 else d_gates
    scratch = cells.new_empty(hidden)
    back = PackedLinear(w_hh.t().to(low), batch)  # dG @ w_hh
    p_acts, p_cells, p_keep = _Rows(acts), _Rows(cells), _Rows(keep)
    p_gates, p_low = _Rows(d_gates), _Rows(d_low)
    p_out = _Rows(d_out) if d_out is not None else None
    dh_bf16 = 0
    for t in range(steps - 1, -1, -1):
        lib.lstm_backward_step(batch, hidden, dh.data_ptr(), dh_bf16,
                               p_keep[t + 1] if t + 1 < steps else None,
                               p_out[t] if p_out is not None else None, p_acts[t],
                               p_cells[t], p_cells[t - 1] if t > 0 else c0.data_ptr(),
                               p_keep[t], dc.data_ptr(), p_gates[t],
                               p_low[t] if bf16 else None, bf16, scratch.data_ptr())
        dh, dh_bf16 = back(d_low[t]), bf16
    dh = dh.float() * keep[0].unsqueeze(-1)
    d_w_hh = matmul(d_low.view(-1, 4 * hidden).t(), h_low[:steps].view(-1, hidden)).float()
    return d_gates, d_w_hh, dh, dc


class _LstmScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, projected: torch.Tensor, w_hh: torch.Tensor, h0: torch.Tensor,
                c0: torch.Tensor, keep: torch.Tensor, matmul_dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # time-major, so each step reads and writes contiguous (B, .) blocks
        proj = projected.contiguous()  # (T, B, 4H)
        lib = lstm_kernels() if _native_usable(proj, w_hh, h0, c0, keep) else None
        ctx.native = lib
        ctx.matmul_dtype = matmul_dtype
        if lib is not None:
            keep_c = keep.contiguous()
            h0c, c0c = h0.contiguous(), c0.contiguous()
            acts, cells, outputs, h_low = _forward_native(lib, proj, w_hh, h0c, c0c, keep_c,
                                                          matmul_dtype)
            ctx.save_for_backward(acts, cells, h_low, w_hh, keep_c, c0c)
            return outputs, outputs[-1].clone(), cells[-1].clone()
        keep_t = keep.contiguous().unsqueeze(-1)  # (T, B, 1)
        steps, batch, four_h = proj.shape
        hidden = four_h // 4
        resets = (keep_t.reshape(steps, -1) < 1).any(1).tolist()  # steps needing a reset
        acts = torch.empty_like(proj)  # i, f, g, o after activation
        cells = proj.new_empty(steps, batch, hidden)
        outputs = proj.new_empty(steps, batch, hidden)
        # h @ w_hh.T, through oneDNN where it is faster; in bf16 under mdrnn.bf16 (the
        # state, gates and sums stay float32: only the products are rounded)
        recurrent = FastLinear(w_hh.to(matmul_dtype))
        h, c = h0, c0
        for t in range(steps):
            if resets[t]:
                h, c = h * keep_t[t], c * keep_t[t]
            a = torch.add(proj[t], recurrent(h.to(matmul_dtype)), out=acts[t])
            torch.sigmoid_(a[:, :2 * hidden])
            g_part = a[:, 2 * hidden:3 * hidden]
            tanh(g_part, out=g_part)
            torch.sigmoid_(a[:, 3 * hidden:])
            i, f, g, o = a.chunk(4, dim=1)
            c = torch.addcmul(f * c, i, g, out=cells[t])
            h = torch.mul(o, tanh(c), out=outputs[t])
        ctx.save_for_backward(acts, cells, outputs, w_hh, keep_t, h0, c0)
        ctx.resets = resets
        return outputs, h.clone(), c.clone()

    @staticmethod
    def backward(ctx: Any, d_out: torch.Tensor | None, d_h: torch.Tensor | None,
                 d_c: torch.Tensor | None):
        if ctx.native is not None:
            acts, cells, h_low, w_hh, keep, c0 = ctx.saved_tensors
            d_gates, d_w_hh, dh, dc = _backward_native(ctx.native, acts, cells, h_low, w_hh,
                                                       keep, c0, d_out, d_h, d_c)
            return d_gates, d_w_hh, dh, dc, None, None
        acts, cells, outputs, w_hh, keep_t, h0, c0 = ctx.saved_tensors
        steps, batch, hidden = cells.shape
        # the states entering each step (after any reset), for all steps at once
        h_prev = torch.cat([h0.unsqueeze(0), outputs[:-1]]) * keep_t
        c_prev = torch.cat([c0.unsqueeze(0), cells[:-1]]) * keep_t
        i, f, g, o = acts.chunk(4, dim=2)
        tanh_c = tanh(cells)
        # dL/d(pre-activation) = factor * (dc for i, f, g; dh for o); dc += dh * o * tanh'(c)
        factors = torch.cat([g * i * (1 - i), c_prev * f * (1 - f), i * (1 - g * g),
                             tanh_c * o * (1 - o)], dim=2).view(steps, batch, 4, hidden)
        through = o * (1 - tanh_c * tanh_c)
        d_seq = d_out
        dh = d_h.clone() if d_h is not None else cells.new_zeros(batch, hidden)
        dc = d_c.clone() if d_c is not None else cells.new_zeros(batch, hidden)
        d_gates = torch.empty_like(acts).view(steps, batch, 4, hidden)
        low = ctx.matmul_dtype
        back = FastLinear(w_hh.t().to(low))  # dG @ w_hh
        for t in range(steps - 1, -1, -1):
            if d_seq is not None:
                dh = dh + d_seq[t]
            dc = torch.addcmul(dc, dh, through[t])
            torch.mul(dc.unsqueeze(1), factors[t, :, :3], out=d_gates[t, :, :3])
            torch.mul(dh, factors[t, :, 3], out=d_gates[t, :, 3])
            dh = back(d_gates[t].view(batch, 4 * hidden).to(low)).float()
            dc = dc * f[t]
            if ctx.resets[t]:
                dh, dc = dh * keep_t[t], dc * keep_t[t]
        d_gates = d_gates.view(steps, batch, 4 * hidden)
        # one large matmul over all steps; under bf16 its operands are rounded like every
        # other weight gradient's under autocast (oneDNN sums the products in float32)
        d_w_hh = matmul(d_gates.reshape(-1, 4 * hidden).t().to(low),
                        h_prev.reshape(-1, hidden).to(low)).float()
        return d_gates, d_w_hh, dh, dc, None, None


def lstm_scan(x: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor, bias: torch.Tensor,
              h0: torch.Tensor, c0: torch.Tensor, keep: torch.Tensor,
              matmul_dtype: torch.dtype = torch.float32
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run an LSTM over x (B, T, in) from (h0, c0) (B, H); ``keep`` (B, T) multiplies the
    state entering each step (0 = restart). Returns outputs (B, T, H), h_T, c_T.
    ``matmul_dtype`` bfloat16 runs the recurrent products (forward and backward) in bf16,
    about twice as fast where the hardware has bf16 units; everything else stays float32.

    The outputs are a (B, T) view of a time-major (T, B, H) tensor: the whole computation
    runs time-major without transposing copies, and whatever reads the outputs elementwise
    (the head, the losses) does not care about the layout.
    """
    projected = linear(x.transpose(0, 1), w_ih, bias)  # every step's input part at once
    outputs, h, c = _LstmScan.apply(projected, w_hh, h0, c0, keep.to(x.dtype).t(),
                                    matmul_dtype)
    return outputs.transpose(0, 1), h, c
