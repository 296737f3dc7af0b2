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

from typing import Any

import torch

from wmlab.memory.fastlinear import FastLinear, linear, matmul


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


class _LstmScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, projected: torch.Tensor, w_hh: torch.Tensor, h0: torch.Tensor,
                c0: torch.Tensor, keep: torch.Tensor, matmul_dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # time-major, so each step reads and writes contiguous (B, .) blocks
        proj = projected.contiguous()  # (T, B, 4H)
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
        ctx.matmul_dtype = matmul_dtype
        return outputs, h.clone(), c.clone()

    @staticmethod
    def backward(ctx: Any, d_out: torch.Tensor | None, d_h: torch.Tensor | None,
                 d_c: torch.Tensor | None):
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
