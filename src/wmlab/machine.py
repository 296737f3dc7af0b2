"""What machine a stage ran on, and how much compute it took there.

Budgets are stated in hours of a given CPU, so every stage record names the CPU it ran on
(model, logical cores, the instruction sets that change our speed several-fold) and the
compute it used: wall-clock of its own attempts only (never the pauses between sessions)
and the CPU seconds of its process and of the workers it waited for.
"""

from __future__ import annotations

import functools
import os
import platform
import resource
from pathlib import Path
from typing import Any

# The flags behind our speed differences between machines: AVX2-only machines run V ~5x
# slower than ones with AVX512-BF16; AMX multiplies bf16 matmul throughput again.
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


@functools.cache
def cpu_description() -> dict[str, Any]:
    """{"model", "cores", "flags"} of this machine's CPU (flags: those in SPEED_FLAGS)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine()):
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "cores": os.cpu_count() or 1,
            "flags": [flag for flag in SPEED_FLAGS if flag in flags]}


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its children that have ended."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
