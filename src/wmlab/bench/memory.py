"""M's throughput: training steps per second and dream steps per second, each against the
naive way of doing the same work.

- Training: wmlab's M (the recurrence in ``lstm_scan``, mixture NLL) against a plain
  ``torch.nn.LSTM`` + ``nn.Linear`` with the same loss on the same batch, for the CarRacing
  size (LSTM 256, z 32, batch 100 x 999 in full runs) and the Doom size (LSTM 512, z 64,
  100 streams x 500-step chunks, with restart flags, which plain ``nn.LSTM`` cannot honour).
  Also the achieved GFLOP/s and its fraction of the machine's attainable float32 peak
  (measured here with a large matmul).
- Dream: ``BatchedDream`` at B = 1, 64 and 1,024 against a loop of single dreams (what the
  original did: one dream per process per call), for the Doom size (and CarRacing at 1,024).

``device`` ("cpu", "cuda", "cuda:N") is where every case runs. On a GPU the naive
training step is cuDNN's LSTM, the cases that split rows over CPU threads or use wmlab's C
kernels do not apply, and the thread counts are not varied.

Figures depend on the load of the machine; they are printed, never asserted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from wmlab import native
from wmlab.bench.tables import section
from wmlab.device import bf16_is_native, device_name, synchronize
from wmlab.dream import BatchedDream, DreamSettings, DreamStart
from wmlab.memory.data import SeriesBatch
from wmlab.memory.model import MDNRNN, MdrnnShape, mixture_nll, mixture_nll_reference
from wmlab.memory.scan import lstm_kernels
from wmlab.memory.train import BatchBackward

CPU = torch.device("cpu")
SIZES = {
    "carracing": MdrnnShape(z_dim=32, action_dim=3, hidden=256),
    "doom": MdrnnShape(z_dim=64, action_dim=1, hidden=512, done_head=True, restart_input=True),
}


def _timed(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Seconds per call (the best of ``repeats``: the least disturbed by other load)."""
    for _ in range(warmup):
        fn()
    synchronize()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        synchronize()
        best = min(best, time.perf_counter() - started)
    return best


def matmul_peak(size: int = 2048, repeats: int = 5, device: torch.device | None = None
                ) -> float:
    """Attainable float32 GFLOP/s: on a CPU the faster of a large square matmul through
    PyTorch's default BLAS and through oneDNN; on a GPU V's benchmark's peak (8192^3
    products; TF32 off, as M trains)."""
    from wmlab.bench.vision import peak_gflops
    from wmlab.memory.fastlinear import FastLinear

    device = device or CPU
    if device.type != "cpu":
        return peak_gflops("float32", device=str(device))
    a, b = torch.randn(size, size), torch.randn(size, size)
    onednn = FastLinear(b)
    seconds = min(_timed(lambda: torch.mm(a, b.t()), repeats),
                  _timed(lambda: onednn(a), repeats))
    return 2 * size ** 3 / seconds / 1e9


def training_flops(shape: MdrnnShape, batch: int, steps: int) -> float:
    """Forward + backward FLOPs of one batch (backward ~ 2x forward)."""
    lstm = 2 * batch * (shape.input_size + shape.hidden) * 4 * shape.hidden
    head = 2 * batch * shape.hidden * shape.output_size
    return 3.0 * (lstm + head) * steps


@dataclass
class _Batch:
    """A synthetic training batch of M's sizes: inputs, targets and episode starts."""

    z: torch.Tensor
    actions: torch.Tensor
    target: torch.Tensor
    restart: torch.Tensor

    @classmethod
    def draw(cls, shape: MdrnnShape, batch: int, steps: int,
             device: torch.device | None = None) -> _Batch:
        """From torch's global generator (the caller seeds it), moved to ``device``."""
        z = torch.randn(batch, steps, shape.z_dim)
        actions = torch.randn(batch, steps, shape.action_dim)
        target = torch.randn(batch, steps, shape.z_dim)
        restart = torch.zeros(batch, steps)
        restart[:, 0] = 1.0
        restart[torch.arange(batch), torch.randint(0, steps, (batch,))] = 1.0  # episode starts
        return cls(*(t.to(device or "cpu") for t in (z, actions, target, restart)))


def _wmlab_step(model: MDNRNN, optimizer: torch.optim.Optimizer, data: _Batch
                ) -> Callable[[bool], None]:
    """One training step of wmlab's M (``bf16``: under autocast, as ``mdrnn.bf16``)."""
    restart = data.restart if model.shape.restart_input else None

    def step(bf16: bool = False) -> None:
        with torch.autocast(data.z.device.type, dtype=torch.bfloat16, enabled=bf16):
            out, _, _ = model(data.z, data.actions, restart=restart)
        loss = mixture_nll(out, data.target)
        if out.done_logit is not None:
            loss = loss + out.done_logit.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_value_(model.parameters(), 1.0)
        optimizer.step()
    return step


def _plain_step(model: MDNRNN, data: _Batch) -> Callable[[], None]:
    """The naive step: ``nn.LSTM`` + ``nn.Linear`` (initialised from torch's global
    generator) with the reference loss; ``model`` only splits the head's output."""
    shape = model.shape
    lstm = nn.LSTM(shape.input_size, shape.hidden, batch_first=True).to(data.z.device)
    head = nn.Linear(shape.hidden, shape.output_size).to(data.z.device)
    params = list(lstm.parameters()) + list(head.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-4)
    parts = [data.z, data.actions] + ([data.restart.unsqueeze(-1)] if shape.restart_input
                                      else [])
    x = torch.cat(parts, -1)

    def step() -> None:
        hidden, _ = lstm(x)
        out = model.split_output(head(hidden))
        loss = mixture_nll_reference(out, data.target)
        if out.done_logit is not None:
            loss = loss + out.done_logit.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_value_(params, 1.0)
        optimizer.step()
    return step


def _split_step(model: MDNRNN, optimizer: torch.optim.Optimizer, data: _Batch,
                split: BatchBackward) -> Callable[[bool], None]:
    """The training loop's own step (``mdrnn.batch_parts``): the batch's rows split over
    threads."""
    batch, steps = data.z.shape[:2]
    series = SeriesBatch(mu=torch.zeros(batch, steps, 2, model.shape.z_dim),
                         logvar=torch.zeros(batch, steps, 2, model.shape.z_dim),
                         actions=data.actions, rewards=torch.zeros(batch, steps),
                         dones=data.restart.roll(-1, 1), restart=data.restart,
                         mask=torch.ones(batch, steps))

    def step(bf16: bool) -> None:
        optimizer.zero_grad(set_to_none=True)
        split(model, series, data.z, data.target, 10.0, None, bf16)
        torch.nn.utils.clip_grad_value_(model.parameters(), 1.0)
        optimizer.step()
    return step


def _train_cases(wmlab_step: Callable[[bool], None], plain_step: Callable[[], None],
                 split_step: Callable[[bool], None], device: torch.device
                 ) -> tuple[tuple[str, Callable[[], None]], ...]:
    """(label, step) of every case this machine can run."""
    bf16 = bf16_is_native(device)  # emulated bf16 would only measure emulation
    plain = "plain nn.LSTM + Linear (cuDNN)" if device.type == "cuda" else \
        "plain nn.LSTM + Linear (naive)"
    cases: tuple[tuple[str, Callable[[], None]], ...] = (
        (plain, plain_step), ("wmlab M", wmlab_step))
    if bf16:
        cases += (("wmlab M, bf16 (mdrnn.bf16)", lambda: wmlab_step(True)),)
    if device.type == "cpu" and torch.get_num_threads() >= 2:
        label = "wmlab M, bf16, rows split over 2 threads" if bf16 else \
            "wmlab M, rows split over 2 threads"
        cases += ((f"{label} (mdrnn.batch_parts)", lambda: split_step(bf16)),)
        if lstm_kernels() is not None:  # the same step without the C kernels

            def torch_only() -> None:
                with native.disabled():
                    split_step(bf16)

            cases += ((f"{label}, PyTorch ops only (WMLAB_NATIVE=0)", torch_only),)
    return cases


def _best_times(cases: tuple[tuple[str, Callable[[], None]], ...], repeats: int
                ) -> dict[str, float]:
    """Each case's best seconds per step over ``repeats`` rounds."""
    best = {label: float("inf") for label, _ in cases}
    for _label, fn in cases:
        fn()  # warm-up
    for _ in range(repeats):  # interleaved, so both see the same background load
        for label, fn in cases:
            best[label] = min(best[label], _timed(fn, 1, warmup=0))
    return best


def _train_case(size: str, batch: int, steps: int, repeats: int,
                device: torch.device = CPU) -> list[dict[str, Any]]:
    shape = SIZES[size]
    torch.manual_seed(0)
    model = MDNRNN(shape).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    data = _Batch.draw(shape, batch, steps, device)
    plain_step = _plain_step(model, data)  # after the batch: its weights draw from the seed too
    split = BatchBackward(2 if torch.get_num_threads() >= 2 else 1)
    cases = _train_cases(_wmlab_step(model, optimizer, data), plain_step,
                         _split_step(model, optimizer, data, split), device)
    best = _best_times(cases, repeats)
    split.close()
    flops = training_flops(shape, batch, steps)
    return [{"bench": "train", "size": size, "case": label, "batch": batch, "seq_len": steps,
             "steps_per_s": batch * steps / best[label], "gflops": flops / best[label] / 1e9}
            for label, _ in cases]


def _dream_rate(model: MDNRNN, start: DreamStart, batch: int, steps: int,
                dtype: str = "float32", device: torch.device | None = None) -> float:
    dream = BatchedDream(model, start, DreamSettings(1.15, 10 ** 9, precision=dtype),
                         device=device or "cpu")
    dream.reset(np.arange(batch))
    actions = torch.zeros(batch, model.shape.action_dim, device=dream.device)
    dream.step(actions)

    def run() -> None:
        for _ in range(steps):
            dream.step(actions)
    return batch * steps / _timed(run, 2, warmup=0)


def _single_loop_rate(model: MDNRNN, start: DreamStart, dreams: int, steps: int,
                      device: torch.device | None = None) -> float:
    """The naive way: each dream its own object, stepped one after another."""
    singles = [BatchedDream(model, start, DreamSettings(1.15, 10 ** 9), device=device or "cpu")
               for _ in range(dreams)]
    for i, dream in enumerate(singles):
        dream.reset([i])
    actions = torch.zeros(1, model.shape.action_dim, device=singles[0].device)

    def run() -> None:
        for _ in range(steps):
            for dream in singles:
                dream.step(actions)
    return dreams * steps / _timed(run, 2, warmup=0)


def _dream_cases(quick: bool, device: torch.device = CPU
                 ) -> list[dict[str, Any]]:
    rows = []
    for size in ("doom", "carracing"):
        shape = SIZES[size]
        torch.manual_seed(0)
        model = MDNRNN(shape).eval()
        if shape.done_head:  # a dream that never ends, so every step is timed
            with torch.no_grad():
                model.head.bias[3 * shape.z_dim * shape.gaussians] = -1e4
        start = DreamStart(torch.randn(16, shape.z_dim), torch.full((16, shape.z_dim), -2.0))
        single = _single_loop_rate(model, start, 8, 10 if quick else 40, device)
        rows.append({"bench": "dream", "size": size, "case": "loop of single dreams (naive)",
                     "batch": 1, "steps_per_s": single})
        batches = (1, 64, 1024) if size == "doom" else (1024,)
        for batch in batches:
            steps = (16 if quick else 64) if batch == 1024 else (50 if quick else 200)
            for dtype in ("float32", "bfloat16"):
                if dtype == "bfloat16" and batch < 64:
                    continue
                rate = _dream_rate(model, start, batch, steps, dtype, device)
                rows.append({"bench": "dream", "size": size, "case": f"BatchedDream {dtype}",
                             "batch": batch, "steps_per_s": rate, "speedup": rate / single})
    return rows


def _with_threads(threads: int, fn: Callable[[], list[dict[str, Any]]]
                  ) -> list[dict[str, Any]]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows = fn()
    finally:
        torch.set_num_threads(before)
    for row in rows:
        row["threads"] = threads
    return rows


def run(quick: bool = False, device: str = "cpu") -> list[dict[str, Any]]:
    """Every case with one intra-op thread (one process per core, as the evaluator pools
    run) and with all of them (one process using the whole machine); on a GPU once."""
    from wmlab.device import resolve_device

    where = resolve_device(device)
    rows: list[dict[str, Any]] = []
    thread_counts = sorted({1, torch.get_num_threads()}) if where.type == "cpu" else \
        [torch.get_num_threads()]
    for threads in thread_counts:
        peak = _with_threads(threads, lambda: [{"bench": "peak", "gflops": matmul_peak(
            1024 if quick else 2048, device=where), "device": device_name(where)}])
        rows.extend(peak)
        train_steps = {"carracing": 100 if quick else 999, "doom": 50 if quick else 500}
        for size, steps in train_steps.items():
            case = _with_threads(threads, lambda size=size, steps=steps: _train_case(
                size, 100, steps, 2 if quick else 3, where))
            plain = case[0]["steps_per_s"]
            for row in case:
                row["vs_plain"] = row["steps_per_s"] / plain
                row["peak_fraction"] = row["gflops"] / peak[0]["gflops"]
            rows.extend(case)
        rows.extend(_with_threads(threads, lambda: _dream_cases(quick, where)))
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    def case(row: dict[str, Any]) -> str:
        return f"{row['threads']:>3} {row['size']:<10} {row['case']:<32} "

    def dream(row: dict[str, Any]) -> str:
        speedup = f"{row['speedup']:.0f}x" if "speedup" in row else ""
        return f"{case(row)}{row['batch']:>6} {row['steps_per_s']:>14,.0f} {speedup:>8}"

    lines = section(rows, "bench", "peak", [], lambda row: (
        f"attainable float32 matmul peak, {row.get('device', 'CPU')}, {row['threads']} "
        f"thread(s): {row['gflops']:.0f} GFLOP/s"))
    lines += section(rows, "bench", "train", [
        "", "training M (forward + backward + Adam, one batch):",
        f"{'thr':>3} {'size':<10} {'case':<32} {'batch x T':>11} {'steps/s':>10} "
        f"{'vs plain':>9} {'GFLOP/s':>8} {'of peak':>8}"], lambda row: (
        f"{case(row)}{row['batch']:>5} x {row['seq_len']:<4} {row['steps_per_s']:>10,.0f} "
        f"{row['vs_plain']:>8.2f}x {row['gflops']:>8.0f} {100 * row['peak_fraction']:>7.0f}%"))
    lines += section(rows, "bench", "dream", [
        "", "dream (M stepped at tau 1.15, sampling included):",
        f"{'thr':>3} {'size':<10} {'case':<32} {'B':>6} {'dream steps/s':>14} {'vs loop':>8}"],
        dream)
    return "\n".join(lines)
