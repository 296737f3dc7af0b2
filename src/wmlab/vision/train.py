"""Training V by streaming shuffled frame batches from the episode store.

Memory stays bounded whatever the dataset: batches come from shuffle pools of compressed
chunks (see ``EpisodeStore.frame_batches``) sized to fit ``vae.loader_mb``, never from the
whole store loaded at once, the most reported failure of the original trainer. A checkpoint
(weights, optimiser, noise generator and the data position: epoch and batch) is written
every ``checkpoint_every`` batches and at every epoch end; a killed run resumes at that batch
with the batches and noise it would have seen, so the learning curve continues as if it had
never stopped.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from wmlab.checkpoint import (
    checkpoint_exists,
    load_checkpoint,
    load_weights_into,
    read_info,
    save_checkpoint,
)
from wmlab.config import Config
from wmlab.data import EpisodeStore
from wmlab.device import exact_resume_kernels, resolve_bf16, resolve_device
from wmlab.envs.frames import FRAME_SHAPE
from wmlab.errors import WmlabError
from wmlab.metrics import MetricsLogger
from wmlab.native import keep_freed_memory
from wmlab.runs import RunLayout
from wmlab.vision.evaluation import (
    evaluate_vae,
    salient_mask,
    sample_mean_frame,
    write_reconstructions,
)
from wmlab.vision.model import (
    FINAL_WEIGHTS,
    ConvVAE,
    Discriminator,
    critic_loss,
    frames_to_tensor,
    generator_loss,
    recorded_size,
    vae_loss,
)

TRAIN_CHECKPOINT = "train"  # weights + optimiser + position, for resuming
LOG_EVERY = 10
FRAME_BYTES = math.prod(FRAME_SHAPE)
MB = 1 << 20


@dataclass
class VaeTrainResult:
    folder: str
    steps: int
    epochs: int
    resumed_from: int
    history: list[dict[str, float]] = field(default_factory=list)
    frames_per_second: float = 0.0
    finished: bool = True

    def line(self) -> str:
        state = "trained" if self.finished else "stopped (resume by running again)"
        resumed = f", resumed at step {self.resumed_from}" if self.resumed_from else ""
        val = (f"; validation loss {self.history[-1]['loss']:.1f} "
               f"(reconstruction {self.history[-1]['reconstruction']:.1f}, "
               f"KL {self.history[-1]['kl']:.1f})" if self.history else "")
        return (f"V {state}: {self.epochs} epochs, {self.steps} steps{resumed}, "
                f"{self.frames_per_second:.0f} frames/s{val} -> {self.folder}")


# ---------------------------------------------------------------------------------------------
# The data: which episodes, how many batches, how large a shuffle pool


@dataclass(frozen=True)
class DataPlan:
    """What fixes the order of the batches (so a resumed run must find the same values)."""

    train_ids: list[str]
    val_ids: list[str]
    train_frames: int
    batches_per_epoch: int
    pool_chunks: int

    def fingerprint(self, cfg: Config) -> dict[str, Any]:
        return {"seed": cfg.run.seed, "batch_size": cfg.vae.batch_size,
                "pool_chunks": self.pool_chunks, "max_frames": cfg.vae.max_frames,
                "train_episodes": len(self.train_ids), "train_frames": self.train_frames}


def loader_pool_chunks(allowance_bytes: int, batch_size: int, chunk_frames: int,
                       num_chunks: int = 0, frame_bytes: int = FRAME_BYTES) -> int:
    """Chunks per shuffle pool so that the loader's memory stays within ``allowance_bytes``.

    The loader holds two pools (the next one is read while the current one is served), the
    batch handed out, fewer than a batch of carried frames in each pool and in the carry
    itself, and per reading thread one compressed and one decompressed chunk. Its plan is
    a few integers per chunk of the store: the only part that grows with the store, by
    about 1/10,000 of the frames' size.
    """
    chunk = chunk_frames * frame_bytes
    fixed = 4 * batch_size * frame_bytes + 4 * chunk + 2 * MB + 128 * num_chunks
    pools = (allowance_bytes - fixed) // (2 * chunk)
    if pools < 1:
        need = (fixed + 2 * chunk) / MB
        raise WmlabError(f"vae.loader_mb = {allowance_bytes / MB:g} cannot hold two shuffle "
                         f"pools and the batches of {batch_size} frames: set vae.loader_mb to "
                         f"at least {math.ceil(need)} or lower vae.batch_size")
    return int(pools)


def plan_data(cfg: Config, store: EpisodeStore) -> DataPlan:
    c = cfg.vae
    if tuple(store.frame_shape) != FRAME_SHAPE:
        raise WmlabError(f"store {store.url} holds frames of shape {tuple(store.frame_shape)}, "
                         f"V takes {FRAME_SHAPE}: collect with an env preset that renders "
                         "64x64x3 frames")
    train_ids, val_ids = _split(store, c.val_fraction, cfg.run.seed)
    metas = store.metas(train_ids)
    train_frames = sum(int(m["length"]) + 1 for m in metas)
    chunk_frames = max(int(m["chunk_frames"]) for m in metas)
    num_chunks = sum(-(-(int(m["length"]) + 1) // int(m["chunk_frames"])) for m in metas)
    frames_per_epoch = min(train_frames, c.max_frames) if c.max_frames else train_frames
    pool_chunks = loader_pool_chunks(int(c.loader_mb * MB), c.batch_size, chunk_frames,
                                     num_chunks)
    return DataPlan(train_ids=train_ids, val_ids=val_ids, train_frames=train_frames,
                    batches_per_epoch=math.ceil(frames_per_epoch / c.batch_size),
                    pool_chunks=pool_chunks)


def _split(store: EpisodeStore, val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Whole episodes held out; with one episode (or no fraction) validation reuses train."""
    ids = store.episode_ids()
    if not ids:
        raise WmlabError(f"store {store.url} has no episodes: run `wmlab collect` first "
                         "(or point collect.out at the store that has them)")
    if val_fraction <= 0 or len(ids) < 2:
        return ids, []
    return store.split(val_fraction, seed=seed)


# ---------------------------------------------------------------------------------------------
# The model(s) and one optimiser step


@dataclass
class _Trainer:
    """The model(s), their optimisers, the latent noise and how a batch becomes a loss."""

    cfg: Config
    device: torch.device
    model: ConvVAE
    optimizer: torch.optim.Optimizer
    noise: torch.Generator
    bf16: bool = False  # cfg.vae.bf16 where the hardware runs bf16 natively (resolve_bf16)
    discriminator: Discriminator | None = None
    critic_optimizer: torch.optim.Optimizer | None = None
    # vae.salient_weight > 0: the mean training frame that marks the salient pixels, which
    # weigh 1 + salient_weight in the loss (computed from a fixed sample, so a resume
    # rebuilds the same tensor)
    mean_frame: torch.Tensor | None = None

    def pixel_weight(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.mean_frame is None:
            return None
        return 1.0 + self.cfg.vae.salient_weight * salient_mask(x, self.mean_frame).float()

    @property
    def channels_last(self) -> bool:
        return self.cfg.vae.channels_last

    def to_input(self, frames: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device)
        return frames_to_tensor(tensor, self.channels_last)

    def autocast(self, enabled: bool | None = None):
        on = self.bf16 if enabled is None else enabled
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=on)

    def step(self, frames: np.ndarray) -> dict[str, float]:
        x = self.to_input(frames)
        with self.autocast():
            recon, mu, logvar = self.model(x, self.noise)
        parts = vae_loss(x, recon, mu, logvar, self.cfg.vae.kl_tolerance, self.pixel_weight(x))
        total = parts.total
        logs = {"loss": 0.0, "reconstruction": parts.reconstruction.item(),
                "kl": parts.kl.item()}
        if self.discriminator is not None:
            # the critic's weights are only read here: no gradient is spent on them
            self.discriminator.requires_grad_(False)
            with self.autocast():
                adversarial = generator_loss(self.discriminator, x, recon)
            self.discriminator.requires_grad_(True)
            # per pixel, so gan_weight reads against the per-pixel squared error
            total = total + self.cfg.vae.gan_weight * x[0].numel() * adversarial.float()
            logs["generator"] = adversarial.item()
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        if self.discriminator is not None:
            with self.autocast():
                critic = critic_loss(self.discriminator, x, recon.detach())
            self.critic_optimizer.zero_grad(set_to_none=True)
            critic.float().backward()
            self.critic_optimizer.step()
            logs["critic"] = critic.item()
        logs["loss"] = total.item()
        return logs

    def weights(self) -> dict[str, torch.Tensor]:
        out = {f"vae.{k}": v for k, v in self.model.state_dict().items()}
        if self.discriminator is not None:
            out.update({f"disc.{k}": v for k, v in self.discriminator.state_dict().items()})
        return out

    def state(self) -> dict[str, Any]:
        state = {"optimizer": self.optimizer.state_dict(), "noise": self.noise.get_state()}
        if self.critic_optimizer is not None:
            state["critic_optimizer"] = self.critic_optimizer.state_dict()
        return state

    def restore(self, weights: dict[str, torch.Tensor], state: dict[str, Any], source: str):
        load_weights_into(self.model, _strip(weights, "vae."), source)
        if self.discriminator is not None:
            load_weights_into(self.discriminator, _strip(weights, "disc."), source)
            self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.optimizer.load_state_dict(state["optimizer"])
        # a generator's state is a CPU byte tensor, whatever its device: the checkpoint was
        # loaded onto V's device (map_location), so a GPU run must bring it back
        self.noise.set_state(state["noise"].cpu())


def _strip(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def build_trainer(cfg: Config, device: torch.device, fused_adam: bool = True,
                  log: Callable[[str], None] = print) -> _Trainer:
    """Fresh models initialised from the run's seed (without touching torch's global RNG).

    The fused Adam updates all 4.3M parameters in one kernel, several times faster than the
    default per-tensor loop; ``fused_adam=False`` is the plain optimiser (the benchmark's
    baseline).
    """
    c = cfg.vae
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)
        model = ConvVAE(c.z_dim, c.width)
        disc = Discriminator(c.width) if c.kind == "vae-gan" else None
    memory_format = torch.channels_last if c.channels_last else torch.contiguous_format
    if c.init_from:
        _start_from(model, c.init_from)
    model = model.to(device, memory_format=memory_format)
    noise = torch.Generator(device=device).manual_seed(cfg.run.seed + 1)
    fused = fused_adam or None  # None: torch's default implementation
    trainer = _Trainer(cfg, device, model,
                       torch.optim.Adam(model.parameters(), lr=c.lr, fused=fused), noise,
                       bf16=resolve_bf16(c.bf16, device, log))
    if disc is not None:
        trainer.discriminator = disc.to(device, memory_format=memory_format)
        trainer.critic_optimizer = torch.optim.Adam(disc.parameters(), lr=c.lr,
                                                    betas=(0.5, 0.999), fused=fused)
    return trainer


def _start_from(model: ConvVAE, folder: str) -> None:
    """Begin from a trained V (the previous iteration's) instead of random weights."""
    ckpt = load_checkpoint(folder, FINAL_WEIGHTS, with_state=False)
    recorded = recorded_size(ckpt.info)
    if recorded != (model.z_dim, model.width):
        raise WmlabError(f"vae.init_from: the V in {folder} has z_dim {recorded[0]} and width "
                         f"{recorded[1]}, this run asks for {model.z_dim} and {model.width}: "
                         "use a V of the same size")
    load_weights_into(model, ckpt.weights, f"{folder}/{FINAL_WEIGHTS}")


def _shape_info(cfg: Config) -> dict[str, Any]:
    return {"z_dim": cfg.vae.z_dim, "width": cfg.vae.width, "kind": cfg.vae.kind}


# ---------------------------------------------------------------------------------------------
# The training loop


@dataclass
class _Training:
    """One training of V as it goes: where it reads and writes, and its position (the
    epoch, the batch within it and the optimiser step), which a checkpoint keeps."""

    cfg: Config
    store: EpisodeStore
    data: DataPlan
    trainer: _Trainer
    folder: str
    epoch: int
    batch_in_epoch: int
    step: int
    started: float = 0.0
    frames_seen: int = 0

    def save(self) -> None:
        """The training checkpoint at this position (where a resume goes on from)."""
        save_checkpoint(self.folder, TRAIN_CHECKPOINT, self.step, self.trainer.weights(),
                        self.trainer.state(),
                        {**_shape_info(self.cfg), "epoch": self.epoch,
                         "batch": self.batch_in_epoch, "data": self.data.fingerprint(self.cfg),
                         "store": self.cfg.store_url()})

    def frames_per_second(self) -> float:
        return self.frames_seen / max(time.monotonic() - self.started, 1e-9)


def train_vae(cfg: Config, *, progress: bool = True, stop_after_steps: int | None = None,
              on_step: Callable[[int, dict[str, float]], None] | None = None,
              fused_adam: bool = True) -> VaeTrainResult:
    """Train (or resume training) V for ``cfg.vae.epochs`` epochs over the run's store.

    ``stop_after_steps`` stops (with a checkpoint) after that many optimiser steps in
    total, as a kill would; calling again resumes. ``on_step(step, losses)`` is called
    after every optimiser step.
    """
    c = cfg.vae
    device = resolve_device(cfg.run.device)
    keep_freed_memory(device.type)  # the same large tensors every step: no page faults
    exact_resume_kernels(device)
    store = EpisodeStore.open(cfg.store_url())
    data = plan_data(cfg, store)
    folder = RunLayout.of(cfg).vision
    trainer = build_trainer(cfg, device, fused_adam)
    if c.salient_weight > 0:
        trainer.mean_frame = sample_mean_frame(trainer, store, data.train_ids, cfg.run.seed,
                                               data.pool_chunks)
    epoch, batch_in_epoch, step = _resume(cfg, trainer, data, device)
    logger = MetricsLogger(folder, resume_step=step)
    result = VaeTrainResult(folder=folder, steps=step, epochs=epoch, resumed_from=step)
    training = _Training(cfg, store, data, trainer, folder, epoch, batch_in_epoch, step)
    from tqdm.auto import tqdm

    total_batches = c.epochs * data.batches_per_epoch
    bar = tqdm(total=total_batches, initial=min(step, total_batches), desc="train V",
               unit="batch", disable=not progress, dynamic_ncols=True)
    training.started = time.monotonic()
    stopped = False
    trainer.model.train()
    try:
        while training.epoch < c.epochs:
            stopped = _train_epoch(training, logger, bar, on_step, stop_after_steps)
            if stopped:
                break
            _end_epoch(training, logger, result)
        if not stopped:
            export_vae(trainer, folder, training.step, cfg)
    finally:
        bar.close()
        logger.close()
    result.finished = not stopped
    result.steps, result.epochs = training.step, training.epoch
    result.frames_per_second = training.frames_per_second()
    return result


def _train_epoch(training: _Training, logger: MetricsLogger, bar: Any,
                 on_step: Callable[[int, dict[str, float]], None] | None,
                 stop_after_steps: int | None) -> bool:
    """The current epoch's remaining batches; True when stopped at ``stop_after_steps``
    (with a checkpoint), as a kill would stop it."""
    cfg, data = training.cfg, training.data
    batches = training.store.frame_batches(cfg.vae.batch_size, seed=cfg.run.seed,
                                           epoch=training.epoch, ids=data.train_ids,
                                           pool_chunks=data.pool_chunks,
                                           start_batch=training.batch_in_epoch)
    # closing stops the prefetch thread at once when the loop leaves early
    with contextlib.closing(batches):
        for frames in batches:
            if training.batch_in_epoch >= data.batches_per_epoch:
                break
            logs = training.trainer.step(frames)
            training.step += 1
            training.batch_in_epoch += 1
            training.frames_seen += len(frames)
            bar.update(1)
            rate = training.frames_per_second()
            if training.step % LOG_EVERY == 0 or \
                    training.batch_in_epoch == data.batches_per_epoch:
                logger.log(training.step, {**{f"train/{k}": v for k, v in logs.items()},
                                           "train/frames_per_s": rate,
                                           "epoch": training.epoch})
                bar.set_postfix(loss=f"{logs['loss']:.1f}", fps=f"{rate:.0f}", refresh=False)
            if on_step is not None:
                on_step(training.step, logs)
            if stop_after_steps is not None and training.step >= stop_after_steps:
                training.save()
                return True
            if training.step % cfg.vae.checkpoint_every == 0:
                training.save()
    return False


def _end_epoch(training: _Training, logger: MetricsLogger, result: VaeTrainResult) -> None:
    """Validate, draw V's reconstructions, and checkpoint at the next epoch's start."""
    cfg, data, step = training.cfg, training.data, training.step
    val_ids = data.val_ids or data.train_ids
    val = evaluate_vae(training.trainer, training.store, val_ids, cfg.run.seed,
                       data.pool_chunks)
    logger.log(step, {f"val/{k}": v for k, v in val.items()} | {"epoch": training.epoch})
    result.history.append({"epoch": training.epoch, "step": step, **val})
    write_reconstructions(training.trainer, training.store, val_ids,
                          f"{training.folder}/recon-{cfg.vae.kind}-epoch"
                          f"{training.epoch + 1:03d}.png", data.pool_chunks)
    training.epoch, training.batch_in_epoch = training.epoch + 1, 0
    training.save()


def check_resumable(cfg: Config, data: DataPlan | None = None) -> dict[str, Any] | None:
    """The sidecar of the run's training checkpoint (None if there is none), after checking
    that this config can continue it; raises before anything is written otherwise.

    Refuses a checkpoint of another V, and a mid-epoch one whose batches the current config
    or store would no longer reproduce; at an epoch boundary new data or batch settings are
    fine (the next epoch is planned afresh). ``data`` defaults to the plan of the run's store.
    """
    folder = RunLayout.of(cfg).vision
    if data is None:
        data = plan_data(cfg, EpisodeStore.open(cfg.store_url()))
    if not checkpoint_exists(folder, TRAIN_CHECKPOINT):
        return None
    info = read_info(folder, TRAIN_CHECKPOINT)
    recorded = {**{k: info.get(k) for k in _shape_info(cfg)}, "width": recorded_size(info)[1]}
    if recorded != _shape_info(cfg):
        changed = ", ".join(f"vae.{k} was {recorded[k]!r}, now {v!r}"
                            for k, v in _shape_info(cfg).items() if recorded[k] != v)
        raise WmlabError(f"{folder} holds a V training checkpoint of another model ({changed}):"
                         " set them back to resume, or start a new run with --run NAME")
    if int(info["batch"]) > 0:
        before, now = info.get("data", {}), data.fingerprint(cfg)
        changed = [f"{k} was {before.get(k)!r}, now {v!r}" for k, v in now.items()
                   if before.get(k) != v]
        if changed:
            raise WmlabError(f"{folder} stopped in the middle of epoch {int(info['epoch']) + 1}"
                             f", but the batches would now differ ({'; '.join(changed)}): "
                             "restore the config and store it ran with to resume, or start a "
                             "new run with --run NAME")
    return info


def _resume(cfg: Config, trainer: _Trainer, data: DataPlan, device: torch.device
            ) -> tuple[int, int, int]:
    """(epoch, batch, step) to continue from, after loading the checkpoint if there is one."""
    info = check_resumable(cfg, data)
    if info is None:
        return 0, 0, 0
    folder = RunLayout.of(cfg).vision
    ckpt = load_checkpoint(folder, TRAIN_CHECKPOINT, map_location=device)
    trainer.restore(ckpt.weights, ckpt.state, f"{folder}/{TRAIN_CHECKPOINT}")
    return int(info["epoch"]), int(info["batch"]), int(info["step"])


# ---------------------------------------------------------------------------------------------
# Validation, pictures, export


def export_vae(trainer: _Trainer, folder: str, step: int, cfg: Config) -> dict[str, Any]:
    """Write the trained V alone (no optimiser): what encode, M and C load."""
    return save_checkpoint(folder, FINAL_WEIGHTS, step, trainer.model.state_dict(), None,
                           {**_shape_info(cfg), "store": cfg.store_url(),
                            "config": asdict(cfg.vae)})
