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
