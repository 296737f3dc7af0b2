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
# A pixel is salient where some channel differs from the mean validation frame by more than
# this (of the 0..1 range): in Doom the monsters and fireballs, in CarRacing the road's bends,
# the parts of a frame that change and that C must see, where walls and grass do not.
SALIENT_THRESHOLD = 0.1


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
    runs with and without bf16) compare; and the squared error per pixel where the frame
    differs from the mean frame (``salient_mse``) and where it does not (``background_mse``):
    a V can score a low loss by drawing walls and floor while losing the small things."""
    trainer.model.eval()
    mean_frame = sample_mean_frame(trainer, store, ids, seed, pool_chunks)
    generator = torch.Generator(device=trainer.device).manual_seed(seed)
    sums = dict.fromkeys(("loss", "reconstruction", "kl"), 0.0)
    pixels = dict.fromkeys(("salient", "background", "salient_error", "background_error"), 0.0)
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
        for key, value in salient_error_sums(x, recon, mean_frame).items():
            pixels[key] += value
        frames += n
    trainer.model.train()
    out = {k: v / max(frames, 1) for k, v in sums.items()}
    out["salient_mse"] = pixels["salient_error"] / max(pixels["salient"], 1.0)
    out["background_mse"] = pixels["background_error"] / max(pixels["background"], 1.0)
    out["salient_share"] = pixels["salient"] / max(pixels["salient"] + pixels["background"], 1.0)
    return out


def sample_mean_frame(trainer: Any, store: EpisodeStore, ids: list[str], seed: int,
                      pool_chunks: int) -> torch.Tensor:
    """The mean of a fixed sample of the episodes' frames (the validation sample of
    ``ids``), (3, H, W) in V's input range: the same tensor every time it is computed."""
    total, count = None, 0
    for batch in val_batches(store, ids, seed, pool_chunks):
        x = trainer.to_input(batch).float()
        total = x.sum(0) if total is None else total + x.sum(0)
        count += len(x)
    return total / max(count, 1)


def salient_mask(x: torch.Tensor, mean_frame: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) booleans: the pixels where some channel of the frame differs from the
    mean frame by more than SALIENT_THRESHOLD."""
    return (x.float() - mean_frame).abs().amax(1, keepdim=True) > SALIENT_THRESHOLD


def salient_error_sums(x: torch.Tensor, recon: torch.Tensor, mean_frame: torch.Tensor
                       ) -> dict[str, float]:
    """Squared reconstruction error summed over the salient and the other pixel-channels of
    a batch (B, 3, H, W), and how many of each (a pixel is salient in all its channels)."""
    x, recon = x.float(), recon.float()
    salient = salient_mask(x, mean_frame).expand_as(x)
    error = (recon - x).pow(2)
    count = float(salient.sum())
    return {"salient": count, "background": float(x.numel()) - count,
            "salient_error": float(error[salient].sum()),
            "background_error": float(error[~salient].sum())}


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
