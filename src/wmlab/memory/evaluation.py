"""How well M predicts: the losses of a batch (training and validation share them), the
teacher-forced metrics on held-out episodes, and how M's predicted return tracks the real
one."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from wmlab.config import Config
from wmlab.data.series import Series
from wmlab.errors import WmlabError
from wmlab.memory.data import SeriesBatch, episode_batch
from wmlab.memory.model import MDNRNN, done_loss, mixture_nll


def batch_losses(model: MDNRNN, batch: SeriesBatch, z_in: torch.Tensor, z_next: torch.Tensor,
                 done_weight: float, state=None, bf16: bool = False,
                 dropout_mask: torch.Tensor | None = None, reward_over_weight: float = 1.0
                 ) -> tuple[torch.Tensor, dict[str, Any], Any]:
    """Total loss, its parts (floats, plus done counts for precision/recall), next state.

    ``bf16`` runs M's LSTM and head under bfloat16 autocast; the head's outputs, the losses
    and the carried state stay float32. ``dropout_mask``: the units of h kept in a training
    batch (``MDNRNN.read_out``). ``reward_over_weight`` weighs the squared reward error of
    the steps where M predicts more than the env paid (``mdrnn.reward_over_weight``); the
    ``reward_mse`` part stays the plain mean squared error."""
    # the flags always zero the state at episode starts (streams hold several episodes);
    # they are also an input only where M has the restart input
    with torch.autocast(z_in.device.type, dtype=torch.bfloat16, enabled=bf16):
        out, _, state = model(z_in, batch.actions, restart=batch.restart, state=state,
                              dropout_mask=dropout_mask)
    state = (state[0].float(), state[1].float())  # bf16 under autocast
    nll = mixture_nll(out, z_next, batch.mask)
    total = nll
    parts: dict[str, Any] = {"z_nll": float(nll.detach())}
    if out.done_logit is not None:
        d_loss = done_loss(out.done_logit, batch.dones, done_weight, batch.mask)
        total = total + d_loss
        predicted = (out.done_logit > 0) & (batch.mask > 0)
        actual = (batch.dones > 0) & (batch.mask > 0)
        parts.update(done_loss=float(d_loss.detach()), tp=int((predicted & actual).sum()),
                     fp=int((predicted & ~actual).sum()), fn=int((~predicted & actual).sum()))
    if out.reward is not None:
        error = out.reward - batch.rewards
        squared = error.pow(2) * batch.mask
        r_err = squared.sum() / batch.mask.sum()
        if reward_over_weight != 1.0:
            # a C trained in the dream climbs by M's optimism (rewards M promises and the
            # env does not pay), never by its pessimism: over-prediction costs more
            squared = torch.where(error > 0, reward_over_weight, 1.0) * squared
        total = total + squared.sum() / batch.mask.sum()
        parts["reward_mse"] = float(r_err.detach())
    parts["loss"] = float(total.detach())
    return total, parts, state


def precision_recall(parts: dict[str, Any]) -> dict[str, float]:
    if "tp" not in parts:
        return {}
    tp, fp, fn = parts.pop("tp"), parts.pop("fp"), parts.pop("fn")
    return {"done_precision": tp / (tp + fp) if tp + fp else float("nan"),
            "done_recall": tp / (tp + fn) if tp + fn else float("nan")}


@torch.no_grad()
def validate(model: MDNRNN, val: list[Series], cfg: Config, device: torch.device
             ) -> dict[str, float]:
    """Teacher-forced metrics on held-out whole episodes (fixed noise)."""
    model.eval()
    m = cfg.mdrnn
    totals: dict[str, float] = {}
    counts = {"tp": 0, "fp": 0, "fn": 0}
    batches = 0
    size = min(m.batch_size, 32)  # whole episodes (up to 2,100 steps): bounded memory
    for start in range(0, min(len(val), 4 * m.batch_size), size):
        chunk = val[start:start + size]
        length = max(s.length for s in chunk)
        batch = episode_batch(chunk, len(chunk), length, seed=12345, step=start).to(device)
        z_in, z_next = batch.sample_z(torch.Generator().manual_seed(start))
        _, parts, _ = batch_losses(model, batch, z_in, z_next, m.done_weight,
                                   reward_over_weight=m.reward_over_weight)
        for key in ("tp", "fp", "fn"):
            counts[key] += parts.pop(key, 0)
        for key, value in parts.items():
            totals[key] = totals.get(key, 0.0) + value
        batches += 1
    metrics = {k: v / max(batches, 1) for k, v in totals.items()}
    if model.shape.done_head:
        metrics.update(precision_recall(dict(counts)))
    if model.shape.reward_head:
        metrics.update(return_tracking(model, val[:4 * m.batch_size], device))
    model.train()
    return metrics


@torch.no_grad()
def return_tracking(model: MDNRNN, series: list[Series], device: torch.device | str = "cpu",
                    batch_size: int = 64) -> dict[str, float]:
    """How well M's predicted return follows the real one on held-out episodes.

    Teacher-forced: M reads each episode's own latents (their means) and actions, and its
    predicted rewards are summed per episode. Reports the Pearson correlation of predicted
    and real returns across episodes and their mean absolute error.
    """
    if not model.shape.reward_head:
        raise WmlabError("M has no reward head: train it with mdrnn.reward_head = true")
    predicted, real = [], []
    for start in range(0, len(series), batch_size):
        chunk = series[start:start + batch_size]
        length = max(s.length for s in chunk)
        z = np.zeros((len(chunk), length, model.shape.z_dim), np.float32)
        actions = np.zeros((len(chunk), length, model.shape.action_dim), np.float32)
        mask = np.zeros((len(chunk), length), np.float32)
        for row, s in enumerate(chunk):
            z[row, :s.length] = s.mu[:-1]
            actions[row, :s.length] = s.actions
            mask[row, :s.length] = 1.0
            real.append(float(np.sum(s.rewards, dtype=np.float64)))
        out, _, _ = model(torch.from_numpy(z).to(device), torch.from_numpy(actions).to(device))
        sums = (out.reward * torch.from_numpy(mask).to(device)).sum(1)
        predicted.extend(float(v) for v in sums.cpu())
    p, r = np.asarray(predicted), np.asarray(real)
    corr = float(np.corrcoef(p, r)[0, 1]) if len(p) >= 2 and p.std() > 0 and r.std() > 0 \
        else float("nan")
    return {"return_correlation": corr, "return_mae": float(np.abs(p - r).mean()),
            "return_real_mean": float(r.mean()), "return_predicted_mean": float(p.mean())}
