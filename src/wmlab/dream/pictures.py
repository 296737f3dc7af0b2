"""Seeing the dream: GIFs of dreams decoded by V, and real vs reconstruction vs dream.
(Playing inside the dream is ``wmlab.play.DreamSession``.)

The dream is stepped with ``BatchedDream`` (batch 1 for pictures) and every latent is decoded
by V in one batched call at the end, so making a GIF costs about as much as the dream itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from wmlab.dream.batched import BatchedDream, DreamStart
from wmlab.dream.reference import reference_policy
from wmlab.dream.settings import DreamSettings
from wmlab.errors import WmlabError
from wmlab.fsio import atomic_write_bytes
from wmlab.memory.model import MDNRNN
from wmlab.plots import gif_bytes

SCALE = 3  # GIF pixels per frame pixel: 64x64 frames are too small to read


@torch.no_grad()
def decode_latents(vae, z: torch.Tensor, batch: int = 256) -> np.ndarray:
    """(N, z) latents -> (N, 64, 64, 3) uint8 frames through V's decoder."""
    frames = []
    device = next(vae.parameters()).device
    for start in range(0, len(z), batch):
        x = vae.decode(z[start:start + batch].to(device).float()).float().clamp(0, 1)
        frames.append((x * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(frames) if frames else np.zeros((0, 64, 64, 3), np.uint8)


def _enlarge(frame: np.ndarray, scale: int = SCALE) -> np.ndarray:
    return frame.repeat(scale, axis=0).repeat(scale, axis=1)


def write_gif(url: str, frames: list[np.ndarray] | np.ndarray, fps: int = 20) -> None:
    """Frames (H, W, 3) uint8 -> an animated GIF at ``url`` (written atomically)."""
    if len(frames) == 0:
        raise WmlabError("no frames to write: the dream ended before its first step")
    atomic_write_bytes(url, gif_bytes(list(frames), duration_ms=1000 / fps))


@dataclass
class DreamTrace:
    latents: torch.Tensor  # (T+1, z): the start and every step's z
    rewards: np.ndarray  # (T,)
    done_at: int | None  # the step at which the dream ended, if it did


@torch.no_grad()
def trace_dream(model: MDNRNN, start: DreamStart, settings: DreamSettings, steps: int,
                seed: int, policy: Callable[[BatchedDream], torch.Tensor]) -> DreamTrace:
    """One dream of at most ``steps`` steps under ``policy``, keeping every latent."""
    dream = BatchedDream(model, start, dataclasses.replace(settings, max_steps=steps))
    latents = [dream.reset([seed])[0].clone()]
    rewards = []
    while not bool(dream.done[0]):
        z, reward, _ = dream.step(policy(dream))
        latents.append(z[0].clone())
        rewards.append(float(reward[0]))
    ended = bool(dream.terminated[0])
    return DreamTrace(torch.stack(latents), np.asarray(rewards, np.float32),
                      len(rewards) if ended else None)


def dream_gif(url: str, model: MDNRNN, vae, start: DreamStart, settings: DreamSettings,
              steps: int, seed: int, policy: Callable[[BatchedDream], torch.Tensor],
              fps: int = 20) -> DreamTrace:
    """A GIF of one dream decoded by V; the last frame is tinted red if the dream died."""
    trace = trace_dream(model, start, settings, steps, seed, policy)
    frames = [_enlarge(f) for f in decode_latents(vae, trace.latents)]
    if trace.done_at is not None:
        frames[-1] = (frames[-1] * np.array([1.0, 0.4, 0.4])).astype(np.uint8)
    write_gif(url, frames, fps)
    return trace


@torch.no_grad()
def compare_gif(url: str, model: MDNRNN, vae, frames: np.ndarray, mu: np.ndarray,
                logvar: np.ndarray, actions: np.ndarray, settings: DreamSettings, seed: int,
                steps: int | None = None, fps: int = 20) -> int:
    """Side by side: a real episode | V's reconstruction | M's imagined continuation.

    The dream starts from the episode's first latent and is driven by the episode's own
    actions, so the three panels show the same moments as far as M's imagination holds.
    Returns the number of frames written.
    """
    steps = min(len(actions), steps or len(actions))
    if steps < 1:
        raise WmlabError("the episode has no steps to compare")
    start = DreamStart(torch.as_tensor(mu[:1], dtype=torch.float32),
                       torch.as_tensor(logvar[:1], dtype=torch.float32))
    recorded = torch.as_tensor(np.asarray(actions[:steps], np.float32))

    def replay(dream: BatchedDream) -> torch.Tensor:
        return recorded[min(int(dream.t[0]), steps - 1)].unsqueeze(0)

    trace = trace_dream(model, start, settings, steps, seed, replay)
    recon = decode_latents(vae, torch.as_tensor(np.asarray(mu[:steps + 1], np.float32)))
    imagined = decode_latents(vae, trace.latents)
    out = []
    for t in range(steps + 1):
        dreamt = imagined[min(t, len(imagined) - 1)]
        if t >= len(imagined):  # M's episode ended before the real one: grey it out
            dreamt = (dreamt * 0.3).astype(np.uint8)
        row = np.concatenate([frames[t], recon[t], dreamt], axis=1)
        out.append(_enlarge(row))
    write_gif(url, out, fps)
    return len(out)


def random_policy(action_dim: int, seed: int,
                  to_vector: Callable[[torch.Tensor], torch.Tensor] | None = None
                  ) -> Callable[[BatchedDream], torch.Tensor]:
    return reference_policy("random", action_dim, seed, to_vector)
