"""Choosing where tensors live: CUDA when present, the CPU otherwise."""

from __future__ import annotations

import torch

from wmlab.errors import WmlabError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise WmlabError(f"run.device: '{name}' is not a device: use auto, cpu, cuda or "
                         "cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise WmlabError(f"run.device is '{name}' but no CUDA GPU is available: use "
                         "run.device=auto or cpu")
    return device


def bf16_is_native(device: torch.device) -> bool:
    """Whether bfloat16 matmuls run in hardware on ``device`` (else autocast only slows down).

    On a CPU without AVX-512 (oneDNN's bf16 path) PyTorch emulates bf16: a V step measured
    6.6x slower than fp32 on an AVX2-only EPYC, where AVX-512 machines run it 1.5x faster.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_bf16(requested: bool, device: torch.device, log=print) -> bool:
    """``requested`` if the hardware runs bf16 natively; otherwise False, saying why."""
    if requested and not bf16_is_native(device):
        log(f"bf16 requested but {device.type} has no native bfloat16 (no AVX-512 / "
            "bf16-capable GPU): running in fp32, which is faster here")
        return False
    return requested


def exact_resume_kernels(device: torch.device) -> None:
    """On a GPU, convolutions with deterministic cuDNN algorithms (and no autotuning, which
    may pick another algorithm in a resumed process): cuDNN's fastest weight gradients add
    in a racing order, so a V killed and resumed would end on other weights than one left
    to run, and "resumes to the same result" would not hold. Measured in `wmlab bench
    vision --device cuda`. Nothing to do on a CPU, whose kernels repeat exactly."""
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for a GPU's queued work, so that a clock read after it times the work itself;
    nothing on a CPU. ``None``: the current GPU, if this process has started CUDA."""
    if device is None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
    elif torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device | str) -> str:
    """What a benchmark ran on: the GPU's name, or "CPU"."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
