"""M: the MDN-RNN. An LSTM over [z, action(, restart)] whose output is, for every z
dimension, an independent mixture of Gaussians over the next z, plus optional heads for the
episode's end ("done", Doom's restart) and the reward.

Parameter counts use PyTorch's LSTM with two bias vectors (b_ih and b_hh): 423,392 for the
CarRacing size and 1,680,833 for Doom; the original's single-bias form has 1,024 and 2,048
fewer (422,368 and 1,678,785) and computes the same function (b = b_ih + b_hh).
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wmlab.checkpoint import checkpoint_exists, load_checkpoint, load_weights_into
from wmlab.errors import WmlabError
from wmlab.memory.fastlinear import linear
from wmlab.memory.scan import lstm_scan
from wmlab.native import load_library

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass(frozen=True)
class MdrnnShape:
    """Everything that fixes M's tensor shapes (and so which checkpoints fit)."""

    z_dim: int = 32
    action_dim: int = 3
    hidden: int = 256
    gaussians: int = 5
    done_head: bool = False
    reward_head: bool = False
    restart_input: bool = False

    @property
    def input_size(self) -> int:
        return self.z_dim + self.action_dim + int(self.restart_input)

    @property
    def output_size(self) -> int:
        return 3 * self.z_dim * self.gaussians + int(self.done_head) + int(self.reward_head)


@dataclass
class MdrnnOutput:
    logits: torch.Tensor  # (B, T, z, K) mixture weights, unnormalised
    means: torch.Tensor  # (B, T, z, K)
    log_sigmas: torch.Tensor  # (B, T, z, K)
    done_logit: torch.Tensor | None  # (B, T)
    reward: torch.Tensor | None  # (B, T)
    head: torch.Tensor | None = None  # (B, T, output_size) the head output split above


LstmState = tuple[torch.Tensor, torch.Tensor]  # (h, c), each (1, B, hidden)


def check_dropout(p: float) -> float:
    """A dropout probability: 0 <= p < 1 (p = 1 would drop every unit and divide by 0)."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise WmlabError(f"dropout must be a probability in [0, 1), got {p!r}: use e.g. "
                         "--set mdrnn.dropout=0.1")
    return float(p)


def inverted_dropout(hidden: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """``hidden`` with the units where ``keep`` (bool, same shape) is False zeroed and the
    others scaled by 1/(1-p), so the head sees on average what it sees without dropout.
    Training and both dream paths apply it through this one function: the same float ops,
    so the dream's two paths stay in step."""
    return hidden * keep.to(hidden.dtype) * (1.0 / (1.0 - p))


class MDNRNN(nn.Module):
    """``dropout``: the probability with which, in training mode only, units of the LSTM's
    output are dropped on their way to the head (``read_out``); the recurrent state and
    the hidden states returned (what C reads) are never dropped. No parameters: it changes
    no checkpoint's shapes."""

    def __init__(self, shape: MdrnnShape, dropout: float = 0.0) -> None:
        super().__init__()
        self.shape = shape
        self.dropout = check_dropout(dropout)
        self.lstm = nn.LSTM(shape.input_size, shape.hidden, batch_first=True)
        self.head = nn.Linear(shape.hidden, shape.output_size)

    def initial_state(self, batch: int, device: torch.device | str = "cpu") -> LstmState:
        zeros = torch.zeros(1, batch, self.shape.hidden, device=device)
        return zeros, zeros.clone()

    def forward(self, z: torch.Tensor, actions: torch.Tensor,
                restart: torch.Tensor | None = None, state: LstmState | None = None,
                dropout_mask: torch.Tensor | None = None
                ) -> tuple[MdrnnOutput, torch.Tensor, LstmState]:
        """(B, T, z), (B, T, A)[, (B, T) restart] -> outputs, hidden states (B, T, H), state.

        ``dropout_mask``: the units (B, T, H) of h that ``read_out`` passes to the head in
        training mode (None: drawn from torch's global generator); unused in eval mode.

        A restart of 1 at step t zeroes the LSTM state before step t is processed: that
        step starts a new episode, and nothing of the previous one may leak into it. The
        restart flag zeroes the state whether or not it is also an input (restart_input).
        The weights live in an ``nn.LSTM`` (the standard layout and parameter count); a
        batch with resets after its first step runs in ``lstm_scan``, which can zero the
        state mid-sequence (``nn.LSTM`` cannot), any other batch in ``nn.LSTM`` itself.
        """
        parts = [z, actions]
        if self.shape.restart_input:
            if restart is None:
                restart = torch.zeros(z.shape[:2], device=z.device)
            parts.append(restart.unsqueeze(-1).to(z.dtype))
        x = torch.cat(parts, dim=-1)
        batch, steps = x.shape[:2]
        if state is None:
            state = self.initial_state(batch, x.device)
        keep = torch.ones(batch, steps, device=x.device, dtype=x.dtype) if restart is None \
            else 1.0 - restart.to(x.dtype)
        if steps == 1 and not torch.is_autocast_enabled(x.device.type):
            h, c = self._cell(x[:, 0], keep[:, 0], state[0][0], state[1][0])
            hidden = h.unsqueeze(1)
            return self.read_out(hidden, dropout_mask), hidden, (h.unsqueeze(0), c.unsqueeze(0))
        if steps == 1 or not bool((keep[:, 1:] < 1).any()):
            # no reset after the first step: PyTorch's fused (oneDNN) LSTM, the fastest,
            # from the state zeroed where the first step restarts
            first = keep[:, 0].view(1, batch, 1)
            hidden, (h, c) = self.lstm(x, (state[0] * first, state[1] * first))
            return self.read_out(hidden, dropout_mask), hidden, (h, c)
        if x.device.type == "cuda":
            hidden, (h, c) = self.segments_lstm(x, keep, state)
            return self.read_out(hidden, dropout_mask), hidden, (h, c)
        lstm = self.lstm
        # the scan has its own backward: under bf16 autocast (mdrnn.bf16) it runs only its
        # recurrent products (and their weight gradient) in bf16, states and gates in float32
        device = x.device.type
        low = torch.bfloat16 if torch.is_autocast_enabled(device) and \
            torch.get_autocast_dtype(device) == torch.bfloat16 else torch.float32
        with torch.autocast(device, enabled=False):
            hidden, h, c = lstm_scan(x.float(), lstm.weight_ih_l0, lstm.weight_hh_l0,
                                     lstm.bias_ih_l0 + lstm.bias_hh_l0, state[0][0].float(),
                                     state[1][0].float(), keep.float(), low)
        return self.read_out(hidden, dropout_mask), hidden, (h.unsqueeze(0), c.unsqueeze(0))

    def segments_lstm(self, x: torch.Tensor, keep: torch.Tensor, state: LstmState
                      ) -> tuple[torch.Tensor, LstmState]:
        """The LSTM over a batch with resets mid-sequence as one call of ``nn.LSTM`` (cuDNN
        on a GPU): every row is cut where its state is zeroed, and the pieces run as one
        packed batch of variable-length sequences, each from its own initial state (the
        row's carried state for a row's first piece, unless it restarts, else zeros).

        ``lstm_scan`` steps the recurrence one time step at a time, which on a GPU is
        bound by kernel launches: at Doom's size (100 x 500) it ran at 0.22x of cuDNN
        without resets (`wmlab bench memory --device cuda`); this ran 1.9x the scan there.
        The same recurrence as the scan: the same hidden states and final state, up to
        rounding (the scan's tanh is approximated, cuDNN multiplies in TF32 by default).
        """
        batch, steps, inputs = x.shape
        starts = keep < 1
        starts[:, 0] = True  # every row begins a piece, from its carried state or zeros
        flat = starts.reshape(-1)
        first = flat.nonzero().squeeze(1)  # flat position of each piece's first step
        piece = torch.cumsum(flat.long(), 0) - 1  # the piece of every flat position
        position = torch.arange(batch * steps, device=x.device) - first[piece]
        ends = torch.cat([first[1:], first.new_tensor([batch * steps])])
        lengths = (ends - first).cpu()
        padded = x.new_zeros(len(first), int(lengths.max()), inputs)
        padded[piece, position] = x.reshape(-1, inputs)
        carried = keep.reshape(-1)[first].to(state[0].dtype).view(-1, 1)
        rows = torch.div(first, steps, rounding_mode="floor")
        h0 = (state[0][0][rows] * carried).unsqueeze(0)
        c0 = (state[1][0][rows] * carried).unsqueeze(0)
        packed = nn.utils.rnn.pack_padded_sequence(padded, lengths, batch_first=True,
                                                   enforce_sorted=False)
        out, (h_n, c_n) = self.lstm(packed, (h0, c0))
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True)
        hidden = out[piece, position].view(batch, steps, -1)
        last = piece.view(batch, steps)[:, -1]  # each row's state is its last piece's
        return hidden, (h_n[:, last], c_n[:, last])

    def _cell(self, x: torch.Tensor, keep: torch.Tensor, h: torch.Tensor, c: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step for (B, inputs) from (h, c) zeroed where ``keep`` (B,) is 0: the cell
        itself, without oneDNN's fused LSTM, which sets up a primitive per call (3x the
        time at a rollout's batch sizes)."""
        first = keep.view(-1, 1)
        lstm = self.lstm
        return torch.lstm_cell(x, (h * first, c * first), lstm.weight_ih_l0,
                               lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0)

    def advance(self, z: torch.Tensor, actions: torch.Tensor, restart: torch.Tensor,
                h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of an agent acting: (B, z), (B, A), restart (B, 1), (h, c) each (B, H)
        -> the new (h, c), without the mixture head (the agent reads only h): the same
        state as ``forward`` on one step."""
        parts = [z, actions, restart.to(z.dtype)] if self.shape.restart_input \
            else [z, actions]
        return self._cell(torch.cat(parts, dim=-1), 1.0 - restart.view(-1).to(z.dtype), h, c)

    def advance_each(self, z: torch.Tensor, candidates: torch.Tensor, restart: torch.Tensor,
                     h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """M's next (h, c) for every one of A candidate actions from the same state:
        (B, z), candidates (A, action_dim), restart (B,) or (B, 1), (h, c) each (B, H) ->
        (h', c') each (B, A, H); row (b, a) is ``advance`` on (z_b, candidate a).

        The gates are linear in the input, so the part every candidate shares (z, restart,
        h) is one matmul for the batch and each candidate's part one small (A, 4H) product:
        the cost of one step plus A elementwise cell updates, not of A steps.
        """
        s, lstm = self.shape, self.lstm
        flag = restart.reshape(-1, 1).to(z.dtype)
        h, c = h * (1.0 - flag), c * (1.0 - flag)  # a restart starts from a zero state
        w_ih = lstm.weight_ih_l0  # columns: [z, action(, restart)], as ``advance`` reads
        shared = torch.addmm(lstm.bias_ih_l0 + lstm.bias_hh_l0, z, w_ih[:, :s.z_dim].T)
        shared = torch.addmm(shared, h, lstm.weight_hh_l0.T)
        if s.restart_input:
            shared = shared + flag * w_ih[:, -1]
        own = candidates.to(z.dtype) @ w_ih[:, s.z_dim:s.z_dim + s.action_dim].T
        gates = shared.unsqueeze(1) + own.unsqueeze(0)  # (B, A, 4H), gate order i, f, g, o
        i, f, g, o = gates.chunk(4, dim=-1)
        c_next = torch.sigmoid(f) * c.unsqueeze(1) + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c_next), c_next

    def predicted_reward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The reward head alone on ``hidden`` (..., H) -> (...): the reward M predicts for
        the step that produced ``hidden``; None without that head. One column of the head,
        not its 3 z K mixture outputs (eval mode: no dropout)."""
        s = self.shape
        if not s.reward_head:
            return None
        column = 3 * s.z_dim * s.gaussians + int(s.done_head)
        return hidden @ self.head.weight[column] + self.head.bias[column]

    def read_out(self, hidden: torch.Tensor, dropout_mask: torch.Tensor | None = None
                 ) -> MdrnnOutput:
        """The head on ``hidden`` (..., H), through dropout in training mode when
        ``self.dropout`` > 0: with ``dropout_mask`` (bool, like ``hidden``: the units kept)
        where given (training draws it from its (seed, step) generator, for exact resume),
        else a fresh one."""
        if self.training and self.dropout > 0.0:
            if dropout_mask is None:
                dropout_mask = torch.rand(hidden.shape, device=hidden.device) >= self.dropout
            hidden = inverted_dropout(hidden, dropout_mask, self.dropout)
        # the head's matmuls through oneDNN (2x MKL's sgemm on this project's CPUs); under
        # bf16 autocast (mdrnn.bf16) the mixture parameters go on in float32 so the losses
        # keep their precision
        return self.split_output(linear(hidden, self.head.weight, self.head.bias).float())

    def split_output(self, out: torch.Tensor) -> MdrnnOutput:
        """The head's raw outputs (..., output_size) as mixture parameters and heads."""
        s = self.shape
        mixture = 3 * s.z_dim * s.gaussians
        # split/unbind rather than slicing: their backward assembles the gradient in one
        # op, where each slice's backward would zero-fill a full-size tensor
        params, extra = out.split([mixture, out.shape[-1] - mixture], dim=-1)
        params = params.reshape(*out.shape[:-1], s.z_dim, 3, s.gaussians)
        logits, means, log_sigmas = params.unbind(-2)
        heads = extra.unbind(-1)
        done = heads[0] if s.done_head else None
        reward = heads[int(s.done_head)] if s.reward_head else None
        return MdrnnOutput(logits=logits, means=means, log_sigmas=log_sigmas, done_logit=done,
                           reward=reward, head=out)


def mixture_kernel() -> ctypes.CDLL | None:
    """The fused loss kernel (``mixture_nll.c``), or None where it cannot be built."""
    lib = load_library("wmlab.memory", "mixture_nll.c")
    if lib is not None and not getattr(lib, "wmlab_ready", False):
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.mixture_nll_rows.argtypes = [i64, i64, i64, i64, ptr, ptr, ptr, ctypes.c_float,
                                         ptr]
        lib.mixture_nll_rows.restype = ctypes.c_double
        lib.wmlab_ready = True
    return lib


class _FusedMixtureNll(torch.autograd.Function):
    """``mixture_nll`` from the head's raw output in one C pass that also writes the
    gradient (saved for backward): the same function to float rounding, ~10x fewer passes
    over memory than its ~25 PyTorch ops."""

    @staticmethod
    def forward(ctx: Any, head: torch.Tensor, target: torch.Tensor,
                mask: torch.Tensor | None, z_dim: int, gaussians: int) -> torch.Tensor:
        lib = mixture_kernel()
        head_c = head.contiguous()
        width = head_c.shape[-1]
        rows = head_c.numel() // width
        target_c = target.float().contiguous()
        weight = mask.float().contiguous() if mask is not None else None
        count = float(weight.sum()) * z_dim if weight is not None else float(rows * z_dim)
        scale = 1.0 / max(count, 1.0)
        grad = torch.empty_like(head_c)
        grad[..., 3 * z_dim * gaussians:] = 0.0  # the done/reward columns: not this loss's
        total = lib.mixture_nll_rows(rows, z_dim, gaussians, width, head_c.data_ptr(),
                                     target_c.data_ptr(),
                                     weight.data_ptr() if weight is not None else None,
                                     scale, grad.data_ptr())
        ctx.save_for_backward(grad)
        return head.new_tensor(total * scale)

    @staticmethod
    def backward(ctx: Any, d_loss: torch.Tensor):
        (grad,) = ctx.saved_tensors
        if d_loss.numel() == 1 and float(d_loss) == 1.0:  # the usual case: no 12 MB product
            return grad, None, None, None, None
        return grad * d_loss, None, None, None, None


def _fused_applies(out: MdrnnOutput, target: torch.Tensor, mask: torch.Tensor | None) -> bool:
    head = out.head
    if head is None or head.device.type != "cpu" or head.dtype != torch.float32:
        return False
    # the views must still be the head's (not replaced or rescaled since the split)
    roots = {id(head)} | ({id(head._base)} if head._base is not None else set())
    if any(v._base is None or id(v._base) not in roots
           for v in (out.logits, out.means, out.log_sigmas)):
        return False
    z_dim, gaussians = out.logits.shape[-2:]
    if z_dim > 1024 or gaussians > 16 or target.shape != out.means.shape[:-1]:  # the C limits
        return False
    if mask is not None and mask.shape != target.shape[:-1]:
        return False
    return mixture_kernel() is not None


def mixture_nll(out: MdrnnOutput, target: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean negative log-likelihood of ``target`` (B, T, z) under the per-dimension mixtures,
    averaged over dimensions and the (unmasked) steps. On the CPU, for an output straight
    from M's head, one fused C pass (``_FusedMixtureNll``); ``mixture_nll_reference``
    otherwise."""
    if _fused_applies(out, target, mask):
        z_dim, gaussians = out.means.shape[-2:]
        return _FusedMixtureNll.apply(out.head, target, mask, z_dim, gaussians)
    return mixture_nll_reference(out, target, mask)


def mixture_nll_reference(out: MdrnnOutput, target: torch.Tensor,
                          mask: torch.Tensor | None = None) -> torch.Tensor:
    """``mixture_nll`` in PyTorch ops (any device, any head)."""
    log_weights = F.log_softmax(out.logits, dim=-1)
    y = target.unsqueeze(-1)
    log_prob = (-0.5 * ((y - out.means) * torch.exp(-out.log_sigmas)).pow(2)
                - out.log_sigmas - _LOG_SQRT_2PI)
    nll = -torch.logsumexp(log_weights + log_prob, dim=-1)  # (B, T, z)
    if mask is None:
        return nll.mean()
    weights = mask.to(nll.dtype).unsqueeze(-1).expand_as(nll)
    return (nll * weights).sum() / weights.sum().clamp(min=1)


def done_loss(done_logit: torch.Tensor, target: torch.Tensor, positive_weight: float,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy of the done head, positive (death) steps weighted."""
    weight = torch.tensor(positive_weight, device=done_logit.device, dtype=done_logit.dtype)
    loss = F.binary_cross_entropy_with_logits(done_logit, target.to(done_logit.dtype),
                                              pos_weight=weight, reduction="none")
    if mask is None:
        return loss.mean()
    mask = mask.to(loss.dtype)
    return (loss * mask).sum() / mask.sum().clamp(min=1)


def check_tau(tau: float) -> float:
    """tau must be positive: it divides the mixture logits and scales the noise."""
    if not isinstance(tau, (int, float)) or isinstance(tau, bool) or not tau > 0 or \
            not math.isfinite(tau):
        raise WmlabError(f"temperature tau must be a positive number, got {tau!r}: use e.g. "
                         "--tau 1.15 or --set dream.tau=1.15")
    return float(tau)


def select_and_sample(out: MdrnnOutput, tau: float, uniform: torch.Tensor,
                      normal: torch.Tensor) -> torch.Tensor:
    """z' from given noise: per dimension the component whose cumulative softmax(logits/tau)
    first exceeds ``uniform`` (inverse-CDF draw), then mean + sigma * sqrt(tau) * ``normal``.

    ``uniform`` and ``normal`` have the shape of z (..., z); taking the noise as an argument
    lets the dream draw it from per-dream streams.
    """
    logits = out.logits.float() / tau
    # unnormalised softmax: comparing u * total with the cumulative sums is the same draw
    # as comparing u with the normalised CDF, without the division (the dream's hot path)
    weights = torch.exp(logits - logits.amax(-1, keepdim=True))
    cdf = weights.cumsum(-1)
    threshold = uniform.unsqueeze(-1) * cdf[..., -1:]
    component = (threshold >= cdf).sum(-1, keepdim=True)
    component = component.clamp_(max=weights.shape[-1] - 1)  # u * total may round up
    mean = out.means.gather(-1, component).squeeze(-1)
    sigma = out.log_sigmas.gather(-1, component).squeeze(-1).exp()
    return mean + sigma * math.sqrt(tau) * normal


def sample_next_z(out: MdrnnOutput, tau: float, generator: torch.Generator | None = None
                  ) -> torch.Tensor:
    """Sample z' at temperature tau: logits / tau, a component drawn per dimension, then
    mean + sigma * sqrt(tau) * N(0, 1). Works on any leading shape (..., z, K) -> (..., z)."""
    tau = check_tau(tau)
    shape, device = out.means.shape[:-1], out.means.device
    uniform = torch.rand(shape, generator=generator, device=device)
    normal = torch.randn(shape, generator=generator, device=device)
    return select_and_sample(out, tau, uniform, normal)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class DreamStart:
    """The first-frame latent distributions dreams start from."""

    mu: torch.Tensor  # (N, z)
    logvar: torch.Tensor  # (N, z)

    def __post_init__(self) -> None:
        if self.mu.ndim != 2 or self.mu.shape != self.logvar.shape or len(self.mu) == 0:
            raise WmlabError("the initial-z store is empty or malformed: run `wmlab "
                             "train-mdrnn` again to rewrite it")


# ---------------------------------------------------------------------------------------------
# Loading a trained M (the M stage's checkpoints)

FINAL_WEIGHTS = "mdrnn"  # the trained M that later stages load
INITIAL_Z = "initial_z"  # the first-frame latents dreams start from


def load_initial_z(folder: str) -> DreamStart:
    """The dream starts of a memory folder (``DreamStart``), or a message saying why not."""
    if not checkpoint_exists(folder, INITIAL_Z):
        raise WmlabError(f"no initial-z store in {folder}: dreams start from it; run `wmlab "
                         "train-mdrnn` (it writes the store before training)")
    ckpt = load_checkpoint(folder, INITIAL_Z, with_state=False)
    if "mu" not in ckpt.weights or "logvar" not in ckpt.weights:
        raise WmlabError(f"the initial-z store in {folder} is damaged: run `wmlab "
                         "train-mdrnn` again to rewrite it")
    return DreamStart(ckpt.weights["mu"].float(), ckpt.weights["logvar"].float())


def load_mdrnn(folder: str, device: torch.device | str = "cpu") -> tuple[MDNRNN, dict]:
    if not checkpoint_exists(folder, FINAL_WEIGHTS):
        raise WmlabError(f"no trained M in {folder}: run `wmlab train-mdrnn` to the end first")
    ckpt = load_checkpoint(folder, FINAL_WEIGHTS, with_state=False)
    shape = MdrnnShape(**ckpt.info["shape"])
    model = MDNRNN(shape, float(ckpt.info.get("dropout", 0.0)))  # trained before: none
    load_weights_into(model, ckpt.weights, f"{folder}/{FINAL_WEIGHTS}")
    return model.to(device).eval(), ckpt.info
