"""Worker processes that leave nothing behind.

ViZDoom runs each game as a child process of the Python process that made it. If a worker
is terminated before it closes its envs, that child is orphaned and keeps running (it
ignores SIGTERM), holding files and pipes open. So each worker (1) turns SIGTERM into an
ordinary exit, so its ``finally`` blocks close the envs, and (2) leads its own process group,
so that whoever stops it can also kill anything it started, even after a SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def init_worker_process() -> None:
    """Call first thing in a worker process (POSIX; a no-op elsewhere)."""
    if sys.platform == "win32":  # pragma: no cover
        return
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)


def kill_process_group(pid: int | None) -> None:
    """SIGKILL whatever is left in the process group a worker led (its env children)."""
    if pid is None or sys.platform == "win32":  # pragma: no cover
        return
    with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
        os.killpg(pid, signal.SIGKILL)
