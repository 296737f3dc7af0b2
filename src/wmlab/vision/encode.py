"""Encoding every episode of the store to (mu, logvar) series with the trained V.

Resumable by construction: each episode's series is one file written atomically under the
V's fingerprint, so a re-run encodes only the episodes without one. The next episode is read
and decompressed in a background thread while the current one is encoded; batches run
across episode boundaries (``BatchedEncoder``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from wmlab.config import Config
from wmlab.data import EpisodeStore
from wmlab.data.series import Series, SeriesStore
from wmlab.device import resolve_bf16, resolve_device
from wmlab.envs.frames import FRAME_SHAPE
from wmlab.errors import WmlabError
from wmlab.native import keep_freed_memory
from wmlab.runs import RunLayout
from wmlab.vision.model import ConvVAE, frames_to_tensor, load_vae, read_vae_info

# Small batches keep each layer's activations in cache: 256 encodes ~2x faster than 1024.
ENCODE_BATCH = 256


@dataclass
class EncodeSummary:
    series_url: str
    fingerprint: str
    episodes: int
    encoded: int
    frames: int
    seconds: float

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        if self.encoded == 0:
            return f"{self.series_url}: all {self.episodes} episodes already encoded"
        return (f"{self.series_url}: encoded {self.encoded} episodes ({self.frames} frames) in "
                f"{self.seconds:.1f} s = {self.frames_per_second:.0f} frames/s; "
                f"{self.episodes} in all")


@torch.inference_mode()
def encode_frames(model: ConvVAE, frames: np.ndarray, device: torch.device,
                  channels_last: bool = True, batch: int = ENCODE_BATCH, bf16: bool = False
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(N, 64, 64, 3) uint8 -> mu, logvar as (N, z) float32, in batches.

    ``bf16`` runs the convolutions in bfloat16 (1.5x faster where native): on a trained
    Doom V, mu moves by 0.2 posterior standard deviations at the 99th percentile, well inside
    the noise of the z that M is trained on, which is sampled from the posterior.
    """
    mus, logvars = [], []
    for start in range(0, len(frames), batch):
        chunk = torch.from_numpy(np.ascontiguousarray(frames[start:start + batch])).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            mu, logvar = model.encode(frames_to_tensor(chunk, channels_last))
        mus.append(mu.float().cpu().numpy())
        logvars.append(logvar.float().cpu().numpy())
    return np.concatenate(mus), np.concatenate(logvars)


class BatchedEncoder:
    """Encodes consecutive episodes in full batches that run across episode boundaries.

    Batches cut per episode end in a remainder of a new size for almost every episode, and
    oneDNN builds (and JIT-compiles) its kernels per shape: with 3,000 Doom episodes that
    was a fifth of the encode stage. Here every batch but the last has ``batch`` frames.
    ``add(key, episode)`` returns (key, episode, mu, logvar) for each episode whose frames
    are all encoded, oldest first.
    """

    def __init__(self, encode: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
                 batch: int = ENCODE_BATCH) -> None:
        self.encode, self.batch = encode, batch
        self.episodes: deque[tuple[str, Any]] = deque()  # added, not yet returned
        self.frames: list[np.ndarray] = []  # frames not yet encoded, in order
        self.waiting = 0  # how many
        self.outputs: list[tuple[np.ndarray, np.ndarray]] = []  # encoded, not yet returned
        self.ready = 0  # encoded frames in outputs

    def add(self, key: str, episode: Any) -> list[tuple[str, Any, np.ndarray, np.ndarray]]:
        self.episodes.append((key, episode))
        self.frames.append(episode.frames)
        self.waiting += len(episode.frames)
        while self.waiting >= self.batch:
            self._encode(self.batch)
        return self._finished()

    def flush(self) -> list[tuple[str, Any, np.ndarray, np.ndarray]]:
        if self.waiting:
            self._encode(self.waiting)
        return self._finished()

    def _encode(self, count: int) -> None:
        taken, need = [], count
        while need:
            head = self.frames[0]
            taken.append(head[:need])
            if len(head) <= need:
                self.frames.pop(0)
            else:
                self.frames[0] = head[need:]
            need -= len(taken[-1])
        self.outputs.append(self.encode(np.concatenate(taken)))
        self.waiting -= count
        self.ready += count

    def _finished(self) -> list[tuple[str, Any, np.ndarray, np.ndarray]]:
        if not self.episodes or len(self.episodes[0][1].frames) > self.ready:
            return []
        mu = np.concatenate([m for m, _ in self.outputs])
        logvar = np.concatenate([v for _, v in self.outputs])
        done, start = [], 0
        while self.episodes and start + len(self.episodes[0][1].frames) <= self.ready:
            key, episode = self.episodes.popleft()
            end = start + len(episode.frames)
            done.append((key, episode, mu[start:end], logvar[start:end]))
            start = end
        self.outputs = [(mu[start:], logvar[start:])]
        self.ready -= start
        return done


def check_encodable(cfg: Config) -> EpisodeStore:
    """The run's store, after checking that it and the trained V can be encoded."""
    store = EpisodeStore.open(cfg.store_url())
    if tuple(store.frame_shape) != FRAME_SHAPE:
        raise WmlabError(f"store {store.url} holds frames of shape {tuple(store.frame_shape)}, "
                         f"V takes {FRAME_SHAPE}: encode a store collected for V")
    if not store.episode_ids():
        raise WmlabError(f"store {store.url} has no episodes: run `wmlab collect` first")
    info = read_vae_info(RunLayout.of(cfg).vision)
    if int(info.get("z_dim", -1)) != cfg.vae.z_dim:
        raise WmlabError(f"the V in {RunLayout.of(cfg).vision} has z_dim {info.get('z_dim')}, the config "
                         f"asks for {cfg.vae.z_dim}: set vae.z_dim={info.get('z_dim')} or train V "
                         "again in another run")
    return store


def encode_store(cfg: Config, *, progress: bool = True) -> EncodeSummary:
    """Encode every episode of the run's store that has no series under the trained V yet."""
    device = resolve_device(cfg.run.device)
    keep_freed_memory(device.type)  # the same large tensors every step: no page faults
    store = check_encodable(cfg)
    all_ids = store.episode_ids()
    series, made_by, summary = _encode_episodes(cfg, RunLayout.of(cfg).vision, store,
                                                all_ids, device, progress)
    series.mark_current({"z_dim": made_by["z_dim"], "episodes": len(all_ids),
                         "vae_step": made_by["vae_step"]})
    return summary


def encode_with(cfg: Config, vision_folder: str, ids: list[str]) -> SeriesStore:
    """The series of the run's episodes ``ids`` under another V (``vision_folder``'s, e.g.
    the previous iteration's), written beside the run's own under that V's fingerprint
    (resumable; the run's current series stay current)."""
    device = resolve_device(cfg.run.device)
    store = EpisodeStore.open(cfg.store_url())
    return _encode_episodes(cfg, vision_folder, store, ids, device, progress=False)[0]


def _encode_episodes(cfg: Config, vision_folder: str, store: EpisodeStore, ids: list[str],
                     device: torch.device, progress: bool
                     ) -> tuple[SeriesStore, dict[str, Any], EncodeSummary]:
    """Each of ``ids`` without a series under ``vision_folder``'s V encoded by it: that V's
    series store, what it records of the V (z_dim, step...) and the summary."""
    model, info = load_vae(vision_folder, device, z_dim=cfg.vae.z_dim)
    channels_last = cfg.vae.channels_last
    bf16 = resolve_bf16(cfg.vae.bf16, device)  # as V was trained, where the hardware has it
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    series = SeriesStore(cfg.store_url(), info["fingerprint"])
    made_by = {"z_dim": model.z_dim, "kind": info.get("kind", "vae"),
               "vae_step": info.get("step"), "vae_folder": vision_folder}
    series.write_info(made_by)
    done = set(series.ids())
    todo = [episode_id for episode_id in ids if episode_id not in done]

    from tqdm.auto import tqdm

    started, frames = time.monotonic(), 0
    bar = tqdm(total=len(ids), initial=len(ids) - len(todo), desc="encode",
               unit="ep", disable=not progress, dynamic_ncols=True)
    encoder = BatchedEncoder(lambda batch: encode_frames(model, batch, device, channels_last,
                                                        bf16=bf16))

    def write(finished: list[tuple[str, Any, np.ndarray, np.ndarray]]) -> None:
        nonlocal frames
        for episode_id, episode, mu, logvar in finished:
            series.write(Series(episode_id=episode_id, mu=mu, logvar=logvar,
                                actions=episode.actions, rewards=episode.rewards,
                                dones=episode.dones))
            frames += len(episode.frames)
            bar.update(1)
        bar.set_postfix(fps=f"{frames / max(time.monotonic() - started, 1e-9):.0f}",
                        refresh=False)

    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(store.load, todo[0]) if todo else None
        for position in range(len(todo)):
            episode = pending.result()
            if position + 1 < len(todo):
                pending = reader.submit(store.load, todo[position + 1])
            write(encoder.add(todo[position], episode))
        write(encoder.flush())
    bar.close()
    return series, made_by, EncodeSummary(
        series_url=series.url, fingerprint=series.fingerprint, episodes=len(ids),
        encoded=len(todo), frames=frames, seconds=time.monotonic() - started)
