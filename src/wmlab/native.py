"""Small C kernels, compiled on first use by the machine's C compiler and cached.

A few hot loops (one LSTM step's elementwise work, run 400 times per training batch) cost
more in PyTorch's per-op overhead than in arithmetic. Their C source ships with the package
and is compiled here, once per source, compiler and CPU, into the user's cache directory
(``$WMLAB_CACHE_DIR``, else ``$XDG_CACHE_HOME/wmlab``, else ``~/.cache/wmlab``), for this
CPU (``-march=native``). Without a working compiler, or with ``WMLAB_NATIVE=0``, the
callers run their PyTorch reference code instead: same results to float rounding, slower.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

_COMMON_FLAGS = ["-O3", "-ffast-math", "-fPIC", "-shared"]
_COMPILE_SECONDS = 120


def native_enabled() -> bool:
    """False when the user turned the C kernels off (``WMLAB_NATIVE=0``)."""
    return os.environ.get("WMLAB_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    root = os.environ.get("WMLAB_CACHE_DIR")
    if root:
        return Path(root) / "kernels"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "wmlab" / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@functools.cache
def _cpu_signature() -> str:
    """What a -march=native build depends on: a shared cache (a home directory on several
    machines) must not hand one CPU's build to another."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


@functools.cache
def _compiler_version(compiler: str) -> str:
    try:
        done = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                              timeout=30, check=False)
        return done.stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _build(compiler: str, source: Path, target: Path) -> bool:
    """Compile into a temporary name beside ``target``, then rename: a killed build or a
    second process building at the same time never leaves a half-written library."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(handle)
    try:
        for arch in (["-march=native"], []):  # some compilers do not know -march=native
            command = [compiler, *_COMMON_FLAGS, *arch, str(source), "-o", temporary, "-lm"]
            try:
                done = subprocess.run(command, capture_output=True, timeout=_COMPILE_SECONDS,
                                      check=False)
            except (OSError, subprocess.SubprocessError):
                return False
            if done.returncode == 0:
                os.replace(temporary, target)
                return True
        return False
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


@functools.cache
def load_library(package: str, filename: str) -> ctypes.CDLL | None:
    """The compiled form of the C file ``filename`` shipped in ``package``, or None when the
    kernels are turned off or cannot be built here."""
    if not native_enabled():
        return None
    compiler = _compiler()
    if compiler is None:
        return None
    try:
        with resources.as_file(resources.files(package).joinpath(filename)) as source:
            text = source.read_bytes()
            key = hashlib.sha256(b"\0".join([
                text, compiler.encode(), _compiler_version(compiler).encode(),
                _cpu_signature().encode(), " ".join(_COMMON_FLAGS).encode(),
            ])).hexdigest()[:16]
            target = cache_dir() / f"{Path(filename).stem}-{key}.so"
            if not target.exists() and not _build(compiler, source, target):
                return None
            return ctypes.CDLL(str(target))
    except OSError:
        return None


@contextmanager
def disabled() -> Iterator[None]:
    """Run the callers' PyTorch code instead of the kernels inside this block (benchmarks
    compare the two in one process)."""
    previous = os.environ.get("WMLAB_NATIVE")
    os.environ["WMLAB_NATIVE"] = "0"
    load_library.cache_clear()
    try:
        yield
    finally:
        if previous is None:
            del os.environ["WMLAB_NATIVE"]
        else:
            os.environ["WMLAB_NATIVE"] = previous
        load_library.cache_clear()


@functools.cache
def keep_freed_memory(device_type: str = "cpu") -> bool:
    """Ask glibc's allocator to keep freed blocks (up to 32 MB each) for reuse, for a stage
    about to run on ``device_type`` (only the CPU's tensors live in glibc's heap).

    By default glibc returns every block over its dynamic threshold to the kernel when it is
    freed, so a training step that allocates the same tens of MB each time pays page faults
    and page zeroing on every step (~9% of an M step measured). The process's peak memory
    is unchanged; it is only not handed back between steps. A no-op (False) elsewhere than
    glibc or for another device."""
    if device_type != "cpu" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trim_threshold, top_pad, mmap_threshold = -1, -2, -3  # glibc's M_* parameter numbers
    return bool(mallopt(mmap_threshold, 32 << 20) and mallopt(trim_threshold, 1 << 30)
                and mallopt(top_pad, 64 << 20))
