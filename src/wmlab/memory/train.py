"""Training M on the encoded series, with checkpoints and exact resume.

Every batch is a pure function of (seed, step) (episodes regime) or (seed, epoch, chunk)
(streams regime), and so is the noise that samples z; the checkpoint holds the weights, the
optimiser and, for streams, the LSTM state carried into the next chunk. A killed run resumes
at the step after its last checkpoint and continues the same learning curve.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from wmlab.checkpoint import (
    checkpoint_exists,
    load_checkpoint,
    load_weights_into,
    save_checkpoint,
)
from wmlab.config import Config
from wmlab.data import EpisodeStore
from wmlab.data.series import Series, SeriesStore
from wmlab.device import resolve_device
from wmlab.errors import WmlabError
from wmlab.memory.data import SeriesBatch, episode_batch, locate_chunk, stream_batch
from wmlab.memory.model import MDNRNN, MdrnnShape, done_loss, mixture_nll
from wmlab.metrics import MetricsLogger

TRAIN_CHECKPOINT = "train"
FINAL_WEIGHTS = "mdrnn"
INITIAL_Z = "initial_z"
LOG_EVERY = 10
VALIDATE_EVERY = 100


def memory_dir(cfg: Config) -> str:
    return f"{cfg.run_dir()}/memory"


def shape_from_config(cfg: Config, z_dim: int, action_dim: int) -> MdrnnShape:
    m = cfg.mdrnn
    return MdrnnShape(z_dim=z_dim, action_dim=action_dim, hidden=m.hidden,
                      gaussians=m.gaussians, done_head=m.done_head, reward_head=m.reward_head,
                      restart_input=m.restart_input)


@dataclass
class MdrnnTrainResult:
    folder: str
    steps: int
    resumed_from: int
    history: list[dict[str, float]] = field(default_factory=list)
    sequences_per_second: float = 0.0
    finished: bool = True


def learning_rate(cfg: Config, step: int) -> float:
    m = cfg.mdrnn
    return (m.lr - m.lr_min) * m.lr_decay ** step + m.lr_min


def batch_losses(model: MDNRNN, batch: SeriesBatch, z_in: torch.Tensor, z_next: torch.Tensor,
                 done_weight: float, state=None) -> tuple[torch.Tensor, dict[str, Any], Any]:
    """Total loss, its parts (floats, plus done counts for precision/recall), next state."""
    restart = batch.restart if model.shape.restart_input else None
    out, _, state = model(z_in, batch.actions, restart=restart, state=state)
    nll = mixture_nll(out, z_next, batch.mask)
    total = nll
    parts: dict[str, Any] = {"z_nll": float(nll)}
    if out.done_logit is not None:
        d_loss = done_loss(out.done_logit, batch.dones, done_weight, batch.mask)
        total = total + d_loss
        predicted = (out.done_logit > 0) & (batch.mask > 0)
        actual = (batch.dones > 0) & (batch.mask > 0)
        parts.update(done_loss=float(d_loss), tp=int((predicted & actual).sum()),
                     fp=int((predicted & ~actual).sum()), fn=int((~predicted & actual).sum()))
    if out.reward is not None:
        r_err = ((out.reward - batch.rewards).pow(2) * batch.mask).sum() / batch.mask.sum()
        total = total + r_err
        parts["reward_mse"] = float(r_err)
    parts["loss"] = float(total)
    return total, parts, state


def _precision_recall(parts: dict[str, Any]) -> dict[str, float]:
    if "tp" not in parts:
        return {}
    tp, fp, fn = parts.pop("tp"), parts.pop("fp"), parts.pop("fn")
    return {"done_precision": tp / (tp + fp) if tp + fp else float("nan"),
            "done_recall": tp / (tp + fn) if tp + fn else float("nan")}


def load_series(cfg: Config) -> tuple[list[Series], list[Series]]:
    """(train, validation) series of the run, split by whole episodes as V's data were."""
    series_store = SeriesStore.current(cfg.store_url())
    ids = set(series_store.ids())
    store = EpisodeStore.open(cfg.store_url())
    if cfg.vae.val_fraction > 0 and len(ids) >= 2:
        train_ids, val_ids = store.split(cfg.vae.val_fraction, seed=cfg.run.seed)
    else:
        train_ids, val_ids = sorted(ids), []
    train = [series_store.load(i) for i in train_ids if i in ids]
    val = [series_store.load(i) for i in val_ids if i in ids]
    if not train:
        raise WmlabError(f"no encoded series in {cfg.store_url()}: run `wmlab encode` first")
    return train, val


def train_mdrnn(cfg: Config, *, progress: bool = True, stop_after_steps: int | None = None,
                on_step: Callable[[int, dict[str, float]], None] | None = None,
                series: tuple[list[Series], list[Series]] | None = None) -> MdrnnTrainResult:
    m = cfg.mdrnn
    device = resolve_device(cfg.run.device)
    train, val = series if series is not None else load_series(cfg)
    z_dim, action_dim = train[0].mu.shape[1], train[0].actions.shape[1]
    shape = shape_from_config(cfg, z_dim, action_dim)
    model = MDNRNN(shape).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=m.lr)
    folder = memory_dir(cfg)
    step, carried = 0, None
    if checkpoint_exists(folder, TRAIN_CHECKPOINT):
        ckpt = load_checkpoint(folder, TRAIN_CHECKPOINT, map_location=device)
        load_weights_into(model, ckpt.weights, f"{folder}/{TRAIN_CHECKPOINT}")
        optimizer.load_state_dict(ckpt.state["optimizer"])
        step = int(ckpt.info["step"])
        if "h" in ckpt.state:
            carried = (ckpt.state["h"].to(device), ckpt.state["c"].to(device))
    resumed_from = step
    write_initial_z(cfg, train)
    logger = MetricsLogger(folder, resume_step=step)
    result = MdrnnTrainResult(folder=folder, steps=step, resumed_from=step)

    def save() -> None:
        state: dict[str, Any] = {"optimizer": optimizer.state_dict()}
        if carried is not None:
            state["h"], state["c"] = carried[0].detach().cpu(), carried[1].detach().cpu()
        save_checkpoint(folder, TRAIN_CHECKPOINT, step, model.state_dict(), state,
                        {"shape": shape.__dict__, "regime": m.regime})

    plan = None
    from tqdm.auto import tqdm

    bar = tqdm(total=m.steps, initial=step, desc="train M", unit="step",
               disable=not progress, dynamic_ncols=True)
    started, sequences = time.monotonic(), 0
    try:
        while step < m.steps:
            if m.regime == "episodes":
                batch = episode_batch(train, m.batch_size, m.seq_len, cfg.run.seed, step)
                state_in = None
            else:
                plan, chunk = locate_chunk(train, m.batch_size, m.seq_len, cfg.run.seed, step,
                                           plan)
                batch = stream_batch(train, plan, chunk, m.seq_len)
                state_in = None if batch.new_streams else carried
            batch = batch.to(device)
            generator = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + step)
            z_in, z_next = batch.sample_z(generator)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, step)
            loss, parts, state_out = batch_losses(model, batch, z_in, z_next, m.done_weight,
                                                  state_in)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_value_(model.parameters(), m.grad_clip)
            optimizer.step()
            if m.regime == "streams":
                carried = (state_out[0].detach(), state_out[1].detach())
            step += 1
            sequences += m.batch_size
            bar.update(1)
            parts.update(_precision_recall(parts))
            if on_step is not None:
                on_step(step, parts)
            if step % LOG_EVERY == 0 or step == m.steps:
                rate = sequences / max(time.monotonic() - started, 1e-9)
                logger.log(step, {**{f"train/{k}": v for k, v in parts.items()},
                                  "train/sequences_per_s": rate,
                                  "lr": learning_rate(cfg, step)})
                bar.set_postfix(nll=f"{parts['z_nll']:.3f}", refresh=False)
            if val and (step % VALIDATE_EVERY == 0 or step == m.steps):
                metrics = validate(model, val, cfg, device)
                logger.log(step, {f"val/{k}": v for k, v in metrics.items()})
                result.history.append({"step": step, **metrics})
            if step % m.checkpoint_every == 0 or step == m.steps:
                save()
            if stop_after_steps is not None and step >= stop_after_steps:
                save()
                result.finished = step >= m.steps
                break
        if step >= m.steps:
            save_checkpoint(folder, FINAL_WEIGHTS, step, model.state_dict(), None,
                            {"shape": shape.__dict__, "regime": m.regime})
    finally:
        bar.close()
        logger.close()
    result.steps, result.resumed_from = step, resumed_from
    result.sequences_per_second = sequences / max(time.monotonic() - started, 1e-9)
    return result


@torch.no_grad()
def validate(model: MDNRNN, val: list[Series], cfg: Config, device: torch.device
             ) -> dict[str, float]:
    """Teacher-forced metrics on held-out whole episodes (fixed noise)."""
    model.eval()
    m = cfg.mdrnn
    totals: dict[str, float] = {}
    counts = {"tp": 0, "fp": 0, "fn": 0}
    batches = 0
    for start in range(0, min(len(val), 4 * m.batch_size), m.batch_size):
        chunk = val[start:start + m.batch_size]
        length = min(max(s.length for s in chunk), 2 * max(m.seq_len, 1))
        batch = episode_batch(chunk, len(chunk), length, seed=12345, step=start).to(device)
        z_in, z_next = batch.sample_z(torch.Generator().manual_seed(start))
        _, parts, _ = batch_losses(model, batch, z_in, z_next, m.done_weight)
        for key in ("tp", "fp", "fn"):
            counts[key] += parts.pop(key, 0)
        for key, value in parts.items():
            totals[key] = totals.get(key, 0.0) + value
        batches += 1
    model.train()
    metrics = {k: v / max(batches, 1) for k, v in totals.items()}
    if m.done_head:
        metrics.update(_precision_recall(dict(counts)))
    return metrics


def write_initial_z(cfg: Config, train: list[Series]) -> None:
    """The first-frame (mu, logvar) of up to ``initial_z`` episodes: where dreams start."""
    keep = train[: cfg.mdrnn.initial_z]
    mu = torch.from_numpy(np.stack([s.mu[0] for s in keep]).astype(np.float32))
    logvar = torch.from_numpy(np.stack([s.logvar[0] for s in keep]).astype(np.float32))
    save_checkpoint(memory_dir(cfg), INITIAL_Z, len(keep), {"mu": mu, "logvar": logvar}, None,
                    {"episodes": len(keep)})


def load_mdrnn(folder: str, device: torch.device | str = "cpu") -> tuple[MDNRNN, dict]:
    ckpt = load_checkpoint(folder, FINAL_WEIGHTS, with_state=False)
    shape = MdrnnShape(**ckpt.info["shape"])
    model = MDNRNN(shape)
    load_weights_into(model, ckpt.weights, f"{folder}/{FINAL_WEIGHTS}")
    return model.to(device).eval(), ckpt.info
