"""V's throughput: training frames/s by memory layout and precision, encoding frames/s, the
loader's memory bound, and how close training gets to the machine's peak FLOP rate.

The data are real CarRacing frames collected for the benchmark. Every training case trains
the same V from the same initial weights on the same batches for the same steps, streaming
from the store, so their validation losses compare (bf16 against fp32); "plain" is the VAE
as it is usually written: default (NCHW) memory layout, fp32, eager. Each case runs in a
fresh process so that its peak memory is its own. ``device`` ("cpu", "cuda", "cuda:N") is
where V trains and encodes (``run.device``); the peak is that device's matmul rate.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass

from wmlab.bench.tables import ruled, section
from wmlab.config import toml_value

GFLOP_PER_FRAME = 0.23  # one forward + backward of the 64x64 ConvVAE (SPEC.md section 3)


def training_gflop_per_frame(width: int = 32, z_dim: int = 32) -> float:
    """Forward + backward arithmetic of one frame through V: 3x the forward's multiply-adds,
    2 FLOP each (0.23 for the paper's V, GFLOP_PER_FRAME)."""
    import torch
    from torch import nn

    from wmlab.vision.model import ConvVAE

    macs = 0

    def count(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(module, nn.Conv2d):
            macs += output[0].numel() * module.in_channels * module.weight[0, 0].numel()
        elif isinstance(module, nn.ConvTranspose2d):
            macs += inputs[0][0].numel() * module.out_channels * module.weight[0, 0].numel()
        elif isinstance(module, nn.Linear):
            macs += module.weight.numel()

    model = ConvVAE(z_dim, width)
    hooks = [m.register_forward_hook(count) for m in model.modules()]
    with torch.no_grad():
        model(torch.zeros(1, 3, 64, 64))
    for hook in hooks:
        hook.remove()
    # the first transposed convolution runs as a matmul (Decoder.forward), past the hooks
    macs += model.decoder.deconvs[0].weight.numel()
    return 3 * 2 * macs / 1e9


@dataclass
class TrainCase:
    label: str
    channels_last: bool
    bf16: bool
    fused_adam: bool = True
    kind: str = "vae"
    width: int = 32


TRAIN_CASES = [
    TrainCase("plain (NCHW, fp32, eager Adam)", False, False, fused_adam=False),
    TrainCase("channels-last, fp32", True, False),
    TrainCase("NCHW, bf16 autocast", False, True),
    TrainCase("channels-last, bf16 autocast", True, True),
    TrainCase("VAE-GAN, channels-last, fp32", True, False, kind="vae-gan"),
    TrainCase("width 16, channels-last, fp32", True, False, width=16),
]


def _overrides(folder: str, run: str, device: str, **values) -> list[str]:
    base = {"run.root": folder, "run.name": run, "collect.out": f"{folder}/store",
            "run.device": device, "vae.epochs": 1, "vae.val_fraction": 0.1}
    return [f"{k}={toml_value(v)}" for k, v in {**base, **values}.items()]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run_name(case: TrainCase, attempt: int) -> str:
    return (f"train{attempt}-{int(case.channels_last)}{int(case.bf16)}{int(case.fused_adam)}"
            f"-{case.kind}-w{case.width}")


def _train_case(folder: str, device: str, case: TrainCase, attempt: int, steps: int,
                warmup: int, results: mp.Queue) -> None:
    from wmlab.config import load_config
    from wmlab.device import synchronize
    from wmlab.vision.train import train_vae

    def stamp(step: int, logs: dict) -> None:
        synchronize(device)
        stamps.append(time.perf_counter())

    cfg = load_config("carracing", "paper", _overrides(
        folder, _run_name(case, attempt), device,
        **{"vae.kind": case.kind, "vae.width": case.width, "vae.max_frames": steps * 100,
           "vae.channels_last": case.channels_last,
           "vae.bf16": case.bf16, "vae.checkpoint_every": 10 * steps}))
    stamps: list[float] = []
    result = train_vae(cfg, progress=False, fused_adam=case.fused_adam, on_step=stamp)
    measured = (len(stamps) - 1 - warmup) * cfg.vae.batch_size
    seconds = stamps[-1] - stamps[warmup]
    results.put({"frames_per_s": measured / seconds, "val_loss": result.history[-1]["loss"],
                 "peak_mb": _peak_rss_mb(), "steps": result.steps})


def _interleaved_case(folder: str, device: str, rounds: int, results: mp.Queue) -> None:
    """Every case's optimiser step on the same real batch, taking turns round by round:
    on a shared machine the load drifts over minutes, and the median step of cases that
    alternate sees the same drift, so their ratios hold where separate runs' do not."""
    import statistics

    import torch

    from wmlab.config import load_config
    from wmlab.data import EpisodeStore
    from wmlab.device import synchronize
    from wmlab.vision.train import build_trainer

    frames = next(EpisodeStore.open(f"{folder}/store").frame_batches(100, seed=0))
    trainers = []
    for case in TRAIN_CASES:
        cfg = load_config("carracing", "paper", _overrides(
            folder, "interleaved", device, **{"vae.kind": case.kind, "vae.bf16": case.bf16,
                                              "vae.width": case.width,
                                              "vae.channels_last": case.channels_last}))
        trainer = build_trainer(cfg, torch.device(device), case.fused_adam,
                                log=lambda _: None)
        trainer.bf16 = case.bf16  # measured as asked, even where bf16 is emulated (slow)
        trainers.append(trainer)
    times: list[list[float]] = [[] for _ in TRAIN_CASES]
    for round_ in range(rounds + 2):
        for i, trainer in enumerate(trainers):
            synchronize(device)
            started = time.perf_counter()
            trainer.step(frames)
            synchronize(device)
            if round_ >= 2:  # the first rounds build the kernels
                times[i].append(time.perf_counter() - started)
    results.put([len(frames) / statistics.median(t) for t in times])


def _encode_case(folder: str, device: str, channels_last: bool, results: mp.Queue) -> None:
    from wmlab.config import load_config
    from wmlab.data.series import SeriesStore
    from wmlab.runs import RunLayout
    from wmlab.vision.encode import encode_store
    from wmlab.vision.model import load_vae

    cfg = load_config("carracing", "paper", _overrides(
        folder, _run_name(TRAIN_CASES[1], 0), device, **{"vae.channels_last": channels_last}))
    _, info = load_vae(RunLayout.of(cfg).vision)
    shutil.rmtree(SeriesStore(cfg.store_url(), info["fingerprint"]).url, ignore_errors=True)
    encode_store(cfg, progress=False)  # warms up the kernels; then timed from scratch
    shutil.rmtree(SeriesStore(cfg.store_url(), info["fingerprint"]).url, ignore_errors=True)
    summary = encode_store(cfg, progress=False)
    results.put({"frames_per_s": summary.frames_per_second, "peak_mb": _peak_rss_mb(),
                 "frames": summary.frames})


def _memory_case(folder: str, device: str, allowance_mb: float, results: mp.Queue) -> None:
    """One epoch over the big store under tracemalloc, which sees every numpy buffer the
    loader makes (frames, pools, batches, decompression) but not torch's own tensors."""
    import tracemalloc

    from wmlab.config import load_config
    from wmlab.data import EpisodeStore
    from wmlab.vision.train import train_vae

    cfg = load_config("carracing", "paper", [
        *_overrides(folder, "memory", device, **{"vae.loader_mb": allowance_mb,
                                                 "vae.checkpoint_every": 100000}),
        f"collect.out={toml_value(folder + '/big')}"])
    store_mb = EpisodeStore.open(cfg.store_url()).num_frames() * 64 * 64 * 3 / 2**20
    # One step first, so that what the first step imports (TensorBoard, optimiser kernels:
    # tens of MB of Python objects) is not counted as the loader's.
    warm = load_config("carracing", "paper", [*_overrides(folder, "memory-warm", device),
                                              f"collect.out={toml_value(folder + '/store')}"])
    train_vae(warm, progress=False, stop_after_steps=1)
    peaks: list[int] = []
    tracemalloc.start()
    started = time.perf_counter()
    # read at every step: the peak of the streaming loop, before the epoch-end checkpoint
    # (whose serialised optimiser state is the model's memory, not the loader's)
    result = train_vae(cfg, progress=False, on_step=lambda step, logs: peaks.append(
        tracemalloc.get_traced_memory()[1]))
    seconds = time.perf_counter() - started
    tracemalloc.stop()
    peak = max(peaks)
    results.put({"store_mb": store_mb, "allowance_mb": allowance_mb,
                 "loader_peak_mb": peak / 2**20, "peak_mb": _peak_rss_mb(),
                 "frames_per_s": result.steps * cfg.vae.batch_size / seconds})


def _in_process(target, *args) -> dict:
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, results))
    proc.start()
    out = results.get()
    proc.join()
    return out


def peak_gflops(dtype_name: str = "float32", size: int = 2048, seconds: float = 2.0,
                device: str = "cpu") -> float:
    """The best rate of a large square matmul: what this CPU's BLAS (or this GPU) can
    reach. On a GPU, 8192^3 products: a 2048^3 one is over before the GPU is busy."""
    import torch

    from wmlab.device import synchronize

    dtype = getattr(torch, dtype_name)
    size = 8192 if device.startswith("cuda") else size
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    torch.mm(a, b)
    synchronize(device)
    best, stop = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < stop:
        started = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = max(best, 2 * size**3 / (time.perf_counter() - started) / 1e9)
    return best


def _collect(folder: str, episodes: int, max_steps: int) -> None:
    from wmlab.collect import collect
    from wmlab.config import load_config

    try:
        import envpool  # noqa: F401
        backend = "envpool"
    except ImportError:
        backend = "gymnasium"
    cfg = load_config("carracing", "quick", [
        f"run.root={toml_value(folder)}", f"collect.out={toml_value(folder + '/store')}",
        f"env.backend={backend}", f"collect.episodes={episodes}",
        f"collect.envs_per_worker={min(episodes, 4)}", "collect.workers=1",
        f"env.max_steps={max_steps}"])
    collect(cfg, progress=False)


def _grow_store(folder: str, target_mb: float) -> None:
    """A store of at least ``target_mb`` of raw frames: the real episodes appended again."""
    from wmlab.data import EpisodeStore

    source = EpisodeStore.open(f"{folder}/store")
    big = EpisodeStore.create_or_open(f"{folder}/big", env=source.env,
                                      backend=source.backends[0],
                                      action_dim=source.action_dim)
    needed, frames, index = target_mb * 2**20 / (64 * 64 * 3), 0, 0
    while frames < needed:
        for episode_id in source.episode_ids():
            episode = source.load(episode_id)
            episode.meta = {**episode.meta, "collection": "copy", "index": index}
            big.append(episode)
            frames += len(episode.frames)
            index += 1


def run(quick: bool = False, device: str = "cpu") -> list[dict]:
    import torch

    from wmlab.device import bf16_is_native, device_name, resolve_device

    device = str(resolve_device(device))
    steps, warmup = (30, 5) if quick else (60, 10)
    passes = 1  # the interleaved steps give the ratios; these runs the rest
    allowance_mb = 12.0 if quick else 16.0
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="wmlab-bench-vision-") as folder:
        _collect(folder, episodes=4 if quick else 8, max_steps=500 if quick else 1000)
        peak = peak_gflops("float32", device=device)
        peak_bf16 = peak_gflops("bfloat16", device=device)
        plain_rate = None
        fp32_loss: dict[bool, float] = {}
        # Two passes in opposite orders, best rate of each case: on a shared machine the
        # load drifts, and this keeps the drift from favouring the cases run first or last.
        measured: dict[str, dict] = {}
        orders = [TRAIN_CASES, TRAIN_CASES[::-1]][:passes]
        for attempt, order in enumerate(orders):
            for case in order:
                out = _in_process(_train_case, folder, device, case, attempt, steps, warmup)
                if case.label in measured:
                    out["frames_per_s"] = max(out["frames_per_s"],
                                              measured[case.label]["frames_per_s"])
                measured[case.label] = out
        step_rates = _in_process(_interleaved_case, folder, device, 8 if quick else 24)
        gflop = {w: training_gflop_per_frame(w) for w in {c.width for c in TRAIN_CASES}}
        for case, rate in zip(TRAIN_CASES, step_rates, strict=True):
            rows.append({"what": "step", "label": case.label, "frames_per_s": rate,
                         "speedup": rate / step_rates[0], "gflops": rate * gflop[case.width]})
        # train_vae trains in fp32 where bf16 would be emulated (resolve_bf16): say so in the
        # label, as the interleaved steps above do run bf16 as asked
        native_bf16 = bf16_is_native(torch.device(device))
        for case in TRAIN_CASES:
            out = measured[case.label]
            plain_rate = plain_rate or out["frames_per_s"]
            if not case.bf16 and case.kind == "vae" and case.width == 32:
                fp32_loss[case.channels_last] = out["val_loss"]
            label = case.label if native_bf16 or not case.bf16 else f"{case.label} (ran fp32)"
            rows.append({
                "what": "train", "label": label, "frames_per_s": out["frames_per_s"],
                "speedup": out["frames_per_s"] / plain_rate, "peak_mb": out["peak_mb"],
                "gflops": out["frames_per_s"] * gflop[case.width],
                "val_loss": out["val_loss"],
                "val_vs_fp32": out["val_loss"] / fp32_loss[case.channels_last] - 1,
                "steps": out["steps"]})
        for channels_last in (False, True):
            out = _in_process(_encode_case, folder, device, channels_last)
            rows.append({"what": "encode",
                         "label": f"encode, {'channels-last' if channels_last else 'NCHW'} "
                                  "fp32, store to series", **out})
        _grow_store(folder, 10 * allowance_mb)
        out = _in_process(_memory_case, folder, device, allowance_mb)
        rows.append({"what": "memory", "label": "train 1 epoch, store 10x the allowance",
                     **out})
        peak = max(peak, peak_gflops("float32", device=device))  # the less loaded of two
        for row in rows:
            if row["what"] in ("train", "step"):
                row["of_peak_fp32"] = row["gflops"] / peak
        rows.append({"what": "peak", "label": "matmul", "fp32_gflops": peak,
                     "bf16_gflops": peak_bf16, "threads": torch.get_num_threads(),
                     "load": os.getloadavg()[0], "device": device_name(device)})
    return rows


def format_rows(rows: list[dict]) -> str:
    peak = next((r for r in rows if r["what"] == "peak"), None)
    lines = section(rows, "what", "step", ruled(
        f"{'optimiser step, cases interleaved':<34} {'frames/s':>9} {'vs plain':>9} "
        f"{'GFLOP/s':>8} {'of peak':>8}"), lambda r: (
        f"{r['label']:<34} {r['frames_per_s']:>9.0f} {r['speedup']:>8.2f}x "
        f"{r['gflops']:>8.0f} {r['of_peak_fp32']:>7.0%}"))
    lines += section(rows, "what", "train", ["", *ruled(
        f"{'train_vae, streaming, 1 run':<32} {'frames/s':>9} {'vs plain':>9} {'GFLOP/s':>8} "
        f"{'of peak':>8} {'peak MB':>8} {'val loss':>9} {'vs fp32':>8}")], lambda r: (
        f"{r['label']:<32} {r['frames_per_s']:>9.0f} {r['speedup']:>8.2f}x "
        f"{r['gflops']:>8.0f} {r['of_peak_fp32']:>7.0%} {r['peak_mb']:>8.0f} "
        f"{r['val_loss']:>9.1f} {r['val_vs_fp32']:>+7.1%}"))
    lines += section(rows, "what", "encode", ["", *ruled(
        f"{'encoding case':<44} {'frames':>7} {'frames/s':>9} {'peak MB':>8}")], lambda r: (
        f"{r['label']:<44} {r['frames']:>7} {r['frames_per_s']:>9.0f} {r['peak_mb']:>8.0f}"))
    for r in rows:
        if r["what"] == "memory":
            lines += ["", f"loader memory: a store of {r['store_mb']:.0f} MB of frames, "
                          f"allowance {r['allowance_mb']:.0f} MB -> loader peak "
                          f"{r['loader_peak_mb']:.1f} MB (tracemalloc), process peak "
                          f"{r['peak_mb']:.0f} MB RSS, {r['frames_per_s']:.0f} frames/s"]
    if peak:
        lines += ["", f"peak (square matmul, {peak.get('device', 'CPU')}, "
                      f"{peak['threads']} threads): fp32 "
                      f"{peak['fp32_gflops']:.0f} GFLOP/s, bf16 {peak['bf16_gflops']:.0f} "
                      f"GFLOP/s; 1-min load average during the run {peak['load']:.1f}; "
                      f"{GFLOP_PER_FRAME} GFLOP per training frame (width 16: "
                      f"{training_gflop_per_frame(16):.3f})"]
    return "\n".join(lines)
