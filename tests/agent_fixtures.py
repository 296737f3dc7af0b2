"""Tiny V and M saved where a run's loaders look for them, and workloads and fitnesses for
engine and ES tests.

Nothing here is trained: V is a randomly initialised ConvVAE, M a small MDN-RNN whose weights
are set by hand so that survival in its dream depends on the action (moving right keeps the
done logit negative), which makes dream training of C learnable in a few generations.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from wmlab.checkpoint import save_checkpoint
from wmlab.config import Config, load_config
from wmlab.evaluators import Evaluator
from wmlab.memory.model import FINAL_WEIGHTS as M_WEIGHTS
from wmlab.memory.model import INITIAL_Z, MDNRNN, MdrnnShape
from wmlab.runs import RunLayout
from wmlab.vision.model import FINAL_WEIGHTS as V_WEIGHTS
from wmlab.vision.model import ConvVAE

Z_DIM = 8
M_HIDDEN = 16


def survival_mdrnn(z_dim: int = Z_DIM, hidden: int = M_HIDDEN) -> MDNRNN:
    """A Doom-shaped M (action 1, restart input, done head) where only 'right' survives.

    Every hidden unit follows the action (cell input tanh(3 a), gates open, forget gate
    half open); the done logit is 0.5 - 2.5 mean(h), positive (death) within a few steps
    unless the agent keeps moving right (a = +1).
    """
    torch.manual_seed(0)
    model = MDNRNN(MdrnnShape(z_dim=z_dim, action_dim=1, hidden=hidden, gaussians=2,
                              done_head=True, restart_input=True))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        lstm = model.lstm
        action_col = z_dim  # input = [z, action, restart]
        # Gate order i, f, g, o: input and output gates open, forget gate half open.
        lstm.bias_ih_l0[:hidden] = 4.0
        lstm.weight_ih_l0[2 * hidden: 3 * hidden, action_col] = 3.0
        lstm.bias_ih_l0[3 * hidden:] = 4.0
        done_row = 3 * z_dim * 2
        model.head.bias[done_row] = 0.5
        model.head.weight[done_row, :] = -2.5 / hidden
        # Sharp predictions (sigma = e^-3): after the first step C sees mostly M's state.
        log_sigmas = model.head.bias[: 3 * z_dim * 2].view(z_dim, 3, 2)[:, 2]
        log_sigmas.fill_(-3.0)
    return model.eval()


def make_run(tmp_path: Path, preset: str = "doom", overrides: tuple[str, ...] = (),
             mdrnn: MDNRNN | None = None, z_dim: int = Z_DIM) -> Config:
    """A run directory holding a random V, the given (or survival) M and initial_z."""
    # the survival M below is built for the original's done rule (logit > 0)
    cfg = load_config(preset, "quick", [f'run.root="{tmp_path}"', 'run.name="r"',
                                        "es.engine=\"serial\"", 'dream.done="threshold"',
                                        *overrides])
    torch.manual_seed(1)
    vae = ConvVAE(z_dim)
    save_checkpoint(RunLayout.of(cfg).vision, V_WEIGHTS, 1, vae.state_dict(), None,
                    {"z_dim": z_dim, "kind": "vae"})
    if mdrnn is None:
        mdrnn = survival_mdrnn(z_dim)
    shape = mdrnn.shape
    save_checkpoint(RunLayout.of(cfg).memory, M_WEIGHTS, 1, mdrnn.state_dict(), None,
                    {"shape": {k: getattr(shape, k) for k in shape.__dataclass_fields__}})
    gen = torch.Generator().manual_seed(2)
    save_checkpoint(RunLayout.of(cfg).memory, INITIAL_Z, 10,
                    {"mu": 1.0 + 0.1 * torch.randn(10, shape.z_dim, generator=gen),
                     "logvar": torch.full((10, shape.z_dim), -4.0)}, None, {"episodes": 10})
    return cfg


def record_car_episodes(cfg: Config, z_dim: int, collection: str, count: int = 3,
                        steps: int = 12) -> None:
    """A CarRacing run's recorded data: ``count`` blank episodes of ``steps`` random
    actions in the episode store, and their series (random z) marked current, as the
    collect and encode stages leave them for the C stage's fits."""
    from wmlab.data.episode_file import Episode
    from wmlab.data.series import Series, SeriesStore
    from wmlab.data.store import EpisodeStore

    rng = np.random.default_rng(0)
    store = EpisodeStore.create_or_open(cfg.store_url(), "carracing", "gymnasium", count)
    series = SeriesStore(cfg.store_url(), "v0")
    for k in range(count):
        store.append(Episode(np.zeros((steps + 1, 64, 64, 3), np.uint8),
                             rng.uniform(-1, 1, (steps, 3)).astype(np.float32),
                             np.zeros(steps, np.float32), np.zeros(steps, bool),
                             {"collection": collection, "index": k}))
        mu = rng.normal(size=(steps + 1, z_dim)).astype(np.float16)
        series.write(Series(f"{collection}-{k:07d}", mu, np.zeros_like(mu),
                            rng.uniform(-1, 1, (steps, 3)).astype(np.float32),
                            np.zeros(steps, np.float32), np.zeros(steps, bool)))
    series.mark_current({})


class RecordingFitness:
    """A fitness that records the seeds of every call (their shape says who was scored)."""

    def __init__(self, evaluator: Evaluator) -> None:
        self.evaluator, self.calls = evaluator, []

    def evaluate(self, params: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        self.calls.append(np.array(seeds))
        return self.evaluator.evaluate(params, seeds)

    @property
    def last_steps(self) -> np.ndarray | None:  # what the ES loop logs as env_steps
        return self.evaluator.last_steps


def live_processes() -> dict[int, list[str]]:
    """Every live process on this machine (not a zombie, not dead), from /proc (Linux): pid
    -> its stat fields after the command name (state, ppid, pgrp, session, ...)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:  # gone while we looked
            continue
        if fields[0] not in ("Z", "X"):
            found[int(entry)] = fields
    return found


class SlowQuadratic:
    """A workload for engine tests: a quadratic fitness with a little seed-dependent noise,
    each job taking ``delay`` seconds; with ``hang_flag`` set, the first job to run (anywhere)
    creates that file and then hangs for a minute, as a stuck worker would."""

    def __init__(self, delay: float = 0.0, hang_flag: str = "") -> None:
        self.delay, self.hang_flag = delay, hang_flag

    def build(self) -> SlowQuadratic:
        return self

    @staticmethod
    def _first_to_claim(flag: str) -> bool:
        """Create ``flag`` atomically: of jobs that start together, exactly one hangs."""
        try:
            handle = os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.write(handle, str(os.getpid()).encode())
        os.close(handle)
        return True

    def run(self, params: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        if self.hang_flag and self._first_to_claim(self.hang_flag):
            time.sleep(60)
        time.sleep(self.delay)
        target = np.linspace(-1.0, 1.0, params.shape[1])
        base = -np.sum((params - target) ** 2, axis=1, keepdims=True)
        return base + (seeds % 7) * 1e-3

