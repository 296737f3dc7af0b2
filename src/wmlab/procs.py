"""Worker processes that leave nothing behind.

ViZDoom runs each game as a child process of the Python process that made it. If a worker
is terminated before it closes its envs, that child is orphaned and keeps running (it
ignores SIGTERM), holding files and pipes open. So each worker (1) turns SIGTERM into an
ordinary exit, so its ``finally`` blocks close the envs, (2) leads its own process group,
so that whoever stops it can also kill anything it started, even after a SIGKILL, and (3) on
Linux asks for that SIGTERM when its parent dies: a run killed with ``kill -9`` takes its
workers with it now, not when their jobs end (a paper-size job runs for minutes).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # prctl option, <linux/prctl.h>


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def init_worker_process() -> None:
    """Call first thing in a worker process (POSIX; a no-op elsewhere)."""
    if sys.platform == "win32":  # pragma: no cover
        return
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    _exit_with_parent()


def _exit_with_parent() -> None:
    """Linux: the kernel sends SIGTERM (an exit, above) when the parent dies; a parent that
    died before the request was made is caught by its pid. The kernel follows the thread that
    started the worker, so an engine belongs to the thread that keeps it. Elsewhere a worker
    notices its parent when its next message fails."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:
        raise SystemExit(0)


def kill_process_group(pid: int | None) -> None:
    """SIGKILL whatever is left in the process group a worker led (its env children)."""
    if pid is None or sys.platform == "win32":  # pragma: no cover
        return
    with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
        os.killpg(pid, signal.SIGKILL)
