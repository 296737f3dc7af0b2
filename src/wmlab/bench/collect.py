"""Collection throughput, end to end: env step, preprocessing, policy, compression, storage.

Each case runs in a fresh process (so its peak memory is its own) and reports env steps per
second per core. The naive way is what the references did: the Gymnasium CarRacing env or
ViZDoom at its default 320x240, and one ``np.savez_compressed`` file per episode. The two-
worker cases run again with the frames resized by OpenCV instead of wmlab's C area kernel
(``WMLAB_NATIVE=0``; the same bytes).
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class Case:
    label: str
    env: str
    backend: str
    episodes: int
    envs_per_worker: int = 1
    workers: int = 1
    naive: bool = False
    resolution: str = ""
    max_steps: int = 0
    native: bool = True  # False: WMLAB_NATIVE=0, the frames resized by OpenCV


@dataclass
class Row:
    label: str
    steps: int
    seconds: float
    steps_per_second: float
    cores: int
    steps_per_second_per_core: float
    peak_mb: float
    disk_mb: float


def _cases(quick: bool) -> list[Case]:
    scale = 1 if quick else 3
    return [
        Case("carracing gymnasium, 1 env, npz (naive)", "carracing", "gymnasium", scale,
             naive=True, max_steps=300 if quick else 1000),
        Case("carracing gymnasium, 1 env, wmlab", "carracing", "gymnasium", scale,
             max_steps=300 if quick else 1000),
        Case("carracing envpool, 8 envs, wmlab", "carracing", "envpool", 8 * scale,
             envs_per_worker=8),
        Case("carracing envpool, 2 workers x 8 envs, wmlab", "carracing", "envpool",
             16 * scale, envs_per_worker=8, workers=2),
        Case("carracing envpool, 2 workers x 8 envs, OpenCV frames", "carracing",
             "envpool", 16 * scale, envs_per_worker=8, workers=2, native=False),
        Case("doom 320x240, 1 env, npz (naive)", "doom", "vizdoom", 10 * scale, naive=True,
             resolution="320X240"),
        Case("doom 160x120, 1 env, wmlab", "doom", "vizdoom", 20 * scale),
        Case("doom 160x120, 2 workers, wmlab", "doom", "vizdoom", 40 * scale, workers=2),
        Case("doom 160x120, 2 workers, OpenCV frames", "doom", "vizdoom", 40 * scale,
             workers=2, native=False),
    ]


def _run_naive(case: Case, folder: str) -> tuple[int, float]:
    from wmlab import envs
    from wmlab.collect import run_episodes
    from wmlab.policies import PolicyConfig, make_policy

    kwargs = {"resolution": case.resolution} if case.resolution else {}
    batch = envs.make_batch(case.env, 1, case.backend, max_steps=case.max_steps, **kwargs)
    policy = make_policy(PolicyConfig(name="brown" if case.env == "carracing" else "held"), 1,
                         batch.spec.controller_outputs)
    steps, started = 0, time.perf_counter()
    for index in range(case.episodes):
        for _, episode in run_episodes(batch, policy, [(index, index)], case.max_steps):
            np.savez_compressed(f"{folder}/episode-{index}.npz", obs=episode.frames,
                                action=episode.actions, reward=episode.rewards,
                                done=episode.dones)
            steps += episode.length
    seconds = time.perf_counter() - started
    batch.close()
    return steps, seconds


def _run_wmlab(case: Case, folder: str) -> tuple[int, float]:
    from wmlab.collect import collect
    from wmlab.config import load_config

    preset = "carracing" if case.env == "carracing" else "doom"
    cfg = load_config(preset, "quick", [
        f"run.root={folder}", f"env.backend={case.backend}",
        f"collect.episodes={case.episodes}", f"collect.workers={case.workers}",
        f"collect.envs_per_worker={case.envs_per_worker}", "collect.min_length=0",
        f"env.max_steps={case.max_steps}"])
    summary = collect(cfg, progress=False)
    return summary.steps, summary.seconds


def _case_main(case: Case, results: mp.Queue) -> None:
    import os

    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    if not case.native:  # read when the kernels first load, here and in the case's workers
        os.environ["WMLAB_NATIVE"] = "0"
    with tempfile.TemporaryDirectory() as folder:
        steps, seconds = (_run_naive if case.naive else _run_wmlab)(case, folder)
        disk = sum(os.path.getsize(os.path.join(root, f))
                   for root, _, files in os.walk(folder) for f in files)
    peak_kb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    results.put((steps, seconds, peak_kb / 1024, disk / 1e6))


def run(quick: bool = False) -> list[dict]:
    ctx = mp.get_context("spawn")
    rows = []
    for case in _cases(quick):
        if case.backend == "envpool":
            try:
                import envpool  # noqa: F401
            except ImportError:
                continue
        results: mp.Queue = ctx.Queue()
        proc = ctx.Process(target=_case_main, args=(case, results))
        proc.start()
        steps, seconds, peak_mb, disk_mb = results.get()
        proc.join()
        rate = steps / seconds
        rows.append(asdict(Row(case.label, steps, seconds, rate, case.workers,
                               rate / case.workers, peak_mb, disk_mb)))
    return rows


def format_rows(rows: list[dict]) -> str:
    header = (f"{'case':<54} {'steps':>7} {'steps/s':>9} {'per core':>9} {'peak MB':>8} "
              f"{'disk MB':>8}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['label']:<54} {r['steps']:>7} {r['steps_per_second']:>9.0f} "
                     f"{r['steps_per_second_per_core']:>9.0f} {r['peak_mb']:>8.0f} "
                     f"{r['disk_mb']:>8.1f}")
    return "\n".join(lines)
