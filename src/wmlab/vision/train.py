"""Training V by streaming shuffled frame batches from the episode store.

Memory stays bounded whatever the dataset: batches come from a shuffle pool of compressed
chunks (see ``EpisodeStore.frame_batches``), never from the whole store loaded at once, the
most reported failure of the original trainer. A checkpoint (weights, optimiser, RNG and the
data position: epoch and batch) is written every ``checkpoint_every`` batches and at every
epoch end; a killed run resumes at that batch with the batches and noise it would have seen,
so the learning curve continues as if it had never stopped.
"""

from __future__ import annotations

import io
import math
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
from wmlab.device import resolve_device
from wmlab.errors import WmlabError
from wmlab.fsio import atomic_write_bytes
from wmlab.metrics import MetricsLogger
from wmlab.vision.model import (
    ConvVAE,
    Discriminator,
    critic_loss,
    frames_to_tensor,
    generator_loss,
    sample_latent,
    vae_loss,
)

TRAIN_CHECKPOINT = "train"  # weights + optimiser + position, for resuming
FINAL_WEIGHTS = "vae"  # the trained V that later stages load
VAL_FRAMES = 2048  # validation frames per epoch: enough for a stable estimate, cheap
LOG_EVERY = 10


def vision_dir(cfg: Config) -> str:
    return f"{cfg.run_dir()}/vision"


@dataclass
class VaeTrainResult:
    folder: str
    steps: int
    epochs: int
    resumed_from: int
    history: list[dict[str, float]] = field(default_factory=list)
    frames_per_second: float = 0.0
    finished: bool = True


@dataclass
class _Trainer:
    """The model(s), their optimisers and how a batch is turned into a loss."""

    cfg: Config
    device: torch.device
    model: ConvVAE
    optimizer: torch.optim.Optimizer
    discriminator: Discriminator | None = None
    critic_optimizer: torch.optim.Optimizer | None = None

    @property
    def channels_last(self) -> bool:
        return self.cfg.vae.channels_last

    def to_input(self, frames: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(frames).to(self.device, non_blocking=True)
        return frames_to_tensor(tensor, self.channels_last)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.cfg.vae.bf16)

    def step(self, frames: np.ndarray) -> dict[str, float]:
        x = self.to_input(frames)
        with self.autocast():
            recon, mu, logvar = self.model(x)
        parts = vae_loss(x, recon, mu, logvar, self.cfg.vae.kl_tolerance)
        total = parts.total
        logs = {"loss": 0.0, "reconstruction": float(parts.reconstruction),
                "kl": float(parts.kl)}
        if self.discriminator is not None:
            with self.autocast():
                adversarial = generator_loss(self.discriminator, x, recon)
            # Scaled by the pixel count so the weight reads against the per-pixel error.
            total = total + self.cfg.vae.gan_weight * x[0].numel() * adversarial.float() / 100
            logs["generator"] = float(adversarial)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        if self.discriminator is not None:
            with self.autocast():
                critic = critic_loss(self.discriminator, x, recon.detach())
            self.critic_optimizer.zero_grad(set_to_none=True)
            critic.float().backward()
            self.critic_optimizer.step()
            logs["critic"] = float(critic)
        logs["loss"] = float(total)
        return logs

    def weights(self) -> dict[str, torch.Tensor]:
        out = {f"vae.{k}": v for k, v in self.model.state_dict().items()}
        if self.discriminator is not None:
            out.update({f"disc.{k}": v for k, v in self.discriminator.state_dict().items()})
        return out

    def state(self) -> dict[str, Any]:
        state = {"optimizer": self.optimizer.state_dict(), "rng": torch.get_rng_state()}
        if self.critic_optimizer is not None:
            state["critic_optimizer"] = self.critic_optimizer.state_dict()
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def restore(self, weights: dict[str, torch.Tensor], state: dict[str, Any], source: str):
        load_weights_into(self.model, _strip(weights, "vae."), source)
        if self.discriminator is not None:
            load_weights_into(self.discriminator, _strip(weights, "disc."), source)
            self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)


def _strip(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def build_trainer(cfg: Config, device: torch.device) -> _Trainer:
    c = cfg.vae
    model = ConvVAE(c.z_dim).to(device)
    if c.channels_last:
        model = model.to(memory_format=torch.channels_last)
    trainer = _Trainer(cfg, device, model, torch.optim.Adam(model.parameters(), lr=c.lr))
    if c.kind == "vae-gan":
        disc = Discriminator().to(device)
        if c.channels_last:
            disc = disc.to(memory_format=torch.channels_last)
        trainer.discriminator = disc
        trainer.critic_optimizer = torch.optim.Adam(disc.parameters(), lr=c.lr,
                                                    betas=(0.5, 0.999))
    return trainer


def _shape_info(cfg: Config) -> dict[str, Any]:
    return {"z_dim": cfg.vae.z_dim, "kind": cfg.vae.kind}


def train_vae(cfg: Config, *, progress: bool = True, stop_after_steps: int | None = None,
              on_step: Callable[[int, dict[str, float]], None] | None = None
              ) -> VaeTrainResult:
    """Train (or resume training) V for ``cfg.vae.epochs`` epochs over the run's store.

    ``stop_after_steps`` stops (with a checkpoint) after that many optimiser steps in
    total, as a kill would; calling again resumes.
    """
    c = cfg.vae
    device = resolve_device(cfg.run.device)
    torch.manual_seed(cfg.run.seed)
    store = EpisodeStore.open(cfg.store_url())
    train_ids, val_ids = _split(store, c.val_fraction, cfg.run.seed)
    train_frames = store.num_frames(train_ids)
    frames_per_epoch = min(train_frames, c.max_frames) if c.max_frames else train_frames
    batches_per_epoch = math.ceil(frames_per_epoch / c.batch_size)
    folder = vision_dir(cfg)
    trainer = build_trainer(cfg, device)

    epoch, batch_in_epoch, step = 0, 0, 0
    if checkpoint_exists(folder, TRAIN_CHECKPOINT):
        ckpt = load_checkpoint(folder, TRAIN_CHECKPOINT, map_location=device)
        recorded = {k: ckpt.info.get(k) for k in _shape_info(cfg)}
        if recorded != _shape_info(cfg):
            raise WmlabError(f"{folder} holds a V checkpoint with {recorded}, but the config "
                             f"asks for {_shape_info(cfg)}: use another run directory or "
                             "delete that folder")
        trainer.restore(ckpt.weights, ckpt.state, f"{folder}/{TRAIN_CHECKPOINT}")
        epoch, batch_in_epoch, step = (ckpt.info["epoch"], ckpt.info["batch"],
                                       ckpt.info["step"])
    resumed_from = step
    logger = MetricsLogger(folder, resume_step=step)
    result = VaeTrainResult(folder=folder, steps=step, epochs=epoch, resumed_from=step)

    def save(next_epoch: int, next_batch: int) -> None:
        save_checkpoint(folder, TRAIN_CHECKPOINT, step, trainer.weights(), trainer.state(),
                        {**_shape_info(cfg), "epoch": next_epoch, "batch": next_batch,
                         "batches_per_epoch": batches_per_epoch, "store": cfg.store_url()})

    from tqdm.auto import tqdm

    total_batches = c.epochs * batches_per_epoch
    bar = tqdm(total=total_batches, initial=min(step, total_batches), desc="train V",
               unit="batch", disable=not progress, dynamic_ncols=True)
    started, frames_seen = time.monotonic(), 0
    trainer.model.train()
    try:
        while epoch < c.epochs:
            batches = store.frame_batches(c.batch_size, seed=cfg.run.seed, epoch=epoch,
                                          ids=train_ids, pool_chunks=c.pool_chunks,
                                          start_batch=batch_in_epoch)
            for frames in batches:
                if batch_in_epoch >= batches_per_epoch:
                    break
                logs = trainer.step(frames)
                step += 1
                batch_in_epoch += 1
                frames_seen += len(frames)
                bar.update(1)
                rate = frames_seen / max(time.monotonic() - started, 1e-9)
                if step % LOG_EVERY == 0 or batch_in_epoch == batches_per_epoch:
                    logger.log(step, {**{f"train/{k}": v for k, v in logs.items()},
                                      "train/frames_per_s": rate, "epoch": epoch})
                    bar.set_postfix(loss=f"{logs['loss']:.1f}", fps=f"{rate:.0f}",
                                    refresh=False)
                if on_step is not None:
                    on_step(step, logs)
                if step % c.checkpoint_every == 0:
                    save(epoch, batch_in_epoch)
                if stop_after_steps is not None and step >= stop_after_steps:
                    save(epoch, batch_in_epoch)
                    result.finished = False
                    return _finish(result, step, epoch, frames_seen, started)
            batches.close()
            val = evaluate_vae(trainer, store, val_ids or train_ids, seed=cfg.run.seed)
            logger.log(step, {f"val/{k}": v for k, v in val.items()} | {"epoch": epoch})
            result.history.append({"epoch": epoch, "step": step, **val})
            write_reconstructions(trainer, store, val_ids or train_ids,
                                  f"{folder}/recon-epoch{epoch + 1:03d}.png")
            epoch, batch_in_epoch = epoch + 1, 0
            save(epoch, 0)
        export_vae(trainer, folder, step, cfg)
    finally:
        bar.close()
        logger.close()
    result.resumed_from = resumed_from
    return _finish(result, step, epoch, frames_seen, started)


def _finish(result: VaeTrainResult, step: int, epoch: int, frames: int,
            started: float) -> VaeTrainResult:
    result.steps, result.epochs = step, epoch
    result.frames_per_second = frames / max(time.monotonic() - started, 1e-9)
    return result


def _split(store: EpisodeStore, val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    if val_fraction <= 0:
        return store.episode_ids(), []
    return store.split(val_fraction, seed=seed)


def export_vae(trainer: _Trainer, folder: str, step: int, cfg: Config) -> dict[str, Any]:
    """Write the trained V alone (no optimiser): what encode, M and C load."""
    return save_checkpoint(folder, FINAL_WEIGHTS, step, trainer.model.state_dict(), None,
                           {**_shape_info(cfg), "store": cfg.store_url()})


def _val_frames(store: EpisodeStore, ids: list[str], seed: int) -> np.ndarray:
    """A fixed sample of validation frames (same every epoch, so epochs compare)."""
    frames, count = [], 0
    for batch in store.frame_batches(256, seed=seed + 7919, epoch=0, ids=ids, prefetch=False):
        frames.append(batch)
        count += len(batch)
        if count >= VAL_FRAMES:
            break
    return np.concatenate(frames)[:VAL_FRAMES]


@torch.no_grad()
def evaluate_vae(trainer: _Trainer, store: EpisodeStore, ids: list[str], seed: int
                 ) -> dict[str, float]:
    """Mean loss parts on the validation frames, with fixed noise so epochs compare."""
    trainer.model.eval()
    generator = torch.Generator(device=trainer.device).manual_seed(seed)
    frames = _val_frames(store, ids, seed)
    sums = {"loss": 0.0, "reconstruction": 0.0, "kl": 0.0}
    for start in range(0, len(frames), 256):
        x = trainer.to_input(frames[start:start + 256])
        with trainer.autocast():
            mu, logvar = trainer.model.encode(x)
            recon = trainer.model.decode(sample_latent(mu, logvar, generator))
        parts = vae_loss(x, recon, mu, logvar, trainer.cfg.vae.kl_tolerance)
        n = len(x)
        sums["loss"] += float(parts.total) * n
        sums["reconstruction"] += float(parts.reconstruction) * n
        sums["kl"] += float(parts.kl) * n
    trainer.model.train()
    return {k: v / max(len(frames), 1) for k, v in sums.items()}


@torch.no_grad()
def write_reconstructions(trainer: _Trainer, store: EpisodeStore, ids: list[str], url: str,
                          count: int = 8) -> None:
    """A PNG: validation frames on the top row, V's reconstructions (from mu) below."""
    from PIL import Image

    frames = _val_frames(store, ids, seed=0)[:count]
    trainer.model.eval()
    with trainer.autocast():
        mu, _ = trainer.model.encode(trainer.to_input(frames))
        recon = trainer.model.decode(mu).float()
    trainer.model.train()
    recon_u8 = (recon.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    grid = np.concatenate([np.concatenate(list(frames), axis=1),
                           np.concatenate(list(recon_u8), axis=1)], axis=0)
    image = Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2),
                                         Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(url, buffer.getvalue())


def load_vae(folder: str, device: torch.device | str = "cpu") -> tuple[ConvVAE, dict]:
    """The trained V of a run's vision folder and its sidecar (with its fingerprint)."""
    ckpt = load_checkpoint(folder, FINAL_WEIGHTS, with_state=False)
    model = ConvVAE(int(ckpt.info["z_dim"]))
    load_weights_into(model, ckpt.weights, f"{folder}/{FINAL_WEIGHTS}")
    return model.to(device).eval(), ckpt.info
