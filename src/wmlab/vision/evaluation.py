"""How well V does on held-out frames: the mean loss parts on a fixed validation sample, and
a picture of frames, their reconstructions and frames decoded from random z."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np
import torch

from wmlab.data import EpisodeStore
from wmlab.fsio import atomic_write_bytes
from wmlab.vision.model import sample_latent, vae_loss

VAL_FRAMES = 2048  # validation frames per epoch: enough for a stable estimate, cheap
VAL_BATCH = 256


def val_batches(store: EpisodeStore, ids: list[str], seed: int, pool_chunks: int,
                 limit: int = VAL_FRAMES):
    """A fixed sample of validation frames (the same every epoch, so epochs compare),
    streamed in batches so that validation keeps within the loader's allowance too."""
    count = 0
    batches = store.frame_batches(VAL_BATCH, seed=seed + 7919, epoch=0, ids=ids,
                                  pool_chunks=pool_chunks, prefetch=False)
    with contextlib.closing(batches):
        for batch in batches:
            batch = batch[:limit - count]
            count += len(batch)
            yield batch
            if count >= limit:
                return


@torch.no_grad()
def evaluate_vae(trainer: Any, store: EpisodeStore, ids: list[str], seed: int,
                 pool_chunks: int = 32) -> dict[str, float]:
    """Mean loss parts on the validation frames, in fp32 with fixed noise so epochs (and
    runs with and without bf16) compare."""
    trainer.model.eval()
    generator = torch.Generator(device=trainer.device).manual_seed(seed)
    sums = {"loss": 0.0, "reconstruction": 0.0, "kl": 0.0}
    frames = 0
    for batch in val_batches(store, ids, seed, pool_chunks):
        x = trainer.to_input(batch)
        mu, logvar = trainer.model.encode(x)
        recon = trainer.model.decode(sample_latent(mu, logvar, generator))
        parts = vae_loss(x, recon, mu, logvar, trainer.cfg.vae.kl_tolerance)
        n = len(x)
        sums["loss"] += float(parts.total) * n
        sums["reconstruction"] += float(parts.reconstruction) * n
        sums["kl"] += float(parts.kl) * n
        frames += n
    trainer.model.train()
    return {k: v / max(frames, 1) for k, v in sums.items()}


@torch.no_grad()
def write_reconstructions(trainer: Any, store: EpisodeStore, ids: list[str], url: str,
                          pool_chunks: int = 32, count: int = 8) -> None:
    """A PNG of three rows: validation frames, V's reconstructions of them (from mu), and
    frames decoded from random z ~ N(0, I) (where a VAE-GAN's sharper decoder shows most)."""
    from PIL import Image

    frames = next(val_batches(store, ids, seed=0, pool_chunks=pool_chunks, limit=count))
    trainer.model.eval()
    mu, _ = trainer.model.encode(trainer.to_input(frames))
    prior = torch.randn(len(frames), trainer.model.z_dim, device=trainer.device,
                        generator=torch.Generator(device=trainer.device).manual_seed(0))
    rows = [frames]
    for decoded in (trainer.model.decode(mu), trainer.model.decode(prior)):
        rows.append((decoded.float().clamp(0, 1) * 255).round().byte()
                    .permute(0, 2, 3, 1).cpu().numpy())
    trainer.model.train()
    grid = np.concatenate([np.concatenate(list(row), axis=1) for row in rows], axis=0)
    image = Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2),
                                         Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(url, buffer.getvalue())
