"""Turning simulator screens into the 64x64x3 uint8 frames V sees (SPEC.md section 2).

Every resize is OpenCV's ``INTER_AREA`` (a box average, no aliasing), bit for bit. These
functions run once per env step, so they resize a whole batch in one call, by a small C
kernel where it provably gives OpenCV's bytes (``_native_is_exact``: CarRacing's and Doom's
screens, 3-4x faster than OpenCV), else by OpenCV's faster float32 area path whenever that
gives the same bytes (``_float_path_is_exact``).
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass
from fractions import Fraction

import cv2
import numpy as np

from wmlab.native import load_library

FRAME_SIZE = 64
FRAME_SHAPE = (FRAME_SIZE, FRAME_SIZE, 3)
CARRACING_ROWS = 84  # rows 84..95 of CarRacing's 96x96 frame are the dashboard bar


def headless_pygame() -> None:
    """Let pygame-drawn envs (CarRacing, classic control) run without a display or a sound
    card; a user's explicit SDL settings win."""
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    os.environ.setdefault("SDL_AUDIODRIVER", "dummy")


def _float_path_is_exact(height: int, width: int) -> bool:
    """Whether resizing via float32 gives the same bytes as OpenCV's uint8 INTER_AREA.

    A non-integer downscale uses OpenCV's generic area code, which sums in float for both
    types and rounds half to even at the end, like ``np.rint``; the float32 variant is ~1.4x
    faster. Integer factors take a uint8 fast path with its own rounding (and are fast
    already); upscaling is bilinear in fixed point for uint8. Both of those stay on uint8.
    """
    if height < FRAME_SIZE or width < FRAME_SIZE:
        return False
    return height % FRAME_SIZE != 0 or width % FRAME_SIZE != 0


# Above this denominator of the box averages, float32 rounding could in principle decide a
# pixel (the nearest half is at least 1 / (2 x denominator) away; float32's error on a sum
# of a few weighted bytes is below 1e-4).
_MAX_EXACT_DENOMINATOR = 500


@functools.cache  # asked once per env step: two Fractions cost ~2 us, a lookup nothing
def _native_is_exact(height: int, width: int) -> bool:
    """Whether the C kernel's bytes are OpenCV's for an (height, width) screen.

    Along an axis shrunk by s = p / q (in lowest terms) every area weight is a multiple of
    1 / p, so each true box average is an integer over p_rows x p_columns. Where that
    denominator is odd, no average is ever exactly a half: rounding the float sums (ours, or
    OpenCV's float path, which is used here only where it is exact) gives the true average's
    nearest byte in both. CarRacing's 84 x 96 crop: 21 x 3 = 63; Doom's 120 x 160: 15 x 5.
    """
    if not _float_path_is_exact(height, width):
        return False
    denominator = (Fraction(height, FRAME_SIZE).numerator
                   * Fraction(width, FRAME_SIZE).numerator)
    return denominator % 2 == 1 and denominator < _MAX_EXACT_DENOMINATOR


@dataclass(frozen=True)
class _AreaTables:
    """The kernel's windows: per output row its first input row and weights (rows, taps), per
    output value of a row its first input value and weights (values, taps)."""

    row_starts: np.ndarray
    row_weights: np.ndarray
    value_starts: np.ndarray
    value_weights: np.ndarray


def _axis_windows(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Along one axis of ``size`` pixels shrunk to 64: each output pixel's first input pixel
    and the exact area weights of the ``taps`` pixels from there (zero past its window; the
    window is moved back, with zeros first, where it would run past the edge)."""
    scale = Fraction(size, FRAME_SIZE)
    windows = []
    for out in range(FRAME_SIZE):
        start, end = out * scale, (out + 1) * scale
        windows.append({pixel: (min(end, pixel + 1) - max(start, pixel)) / scale
                        for pixel in range(int(start), -(-end.numerator // end.denominator))
                        if min(end, pixel + 1) > max(start, pixel)})
    taps = max(len(w) for w in windows)
    starts = np.zeros(FRAME_SIZE, np.int32)
    weights = np.zeros((FRAME_SIZE, taps), np.float32)
    for out, window in enumerate(windows):
        starts[out] = first = min(min(window), size - taps)
        for pixel, weight in window.items():
            weights[out, pixel - first] = float(weight)
    return starts, weights


@functools.cache
def _area_tables(height: int, width: int) -> _AreaTables:
    row_starts, row_weights = _axis_windows(height)
    column_starts, column_weights = _axis_windows(width)
    channels = FRAME_SHAPE[2]
    # each output value of a row: its column's window, in its own channel
    value_starts = (column_starts[:, None] * channels + np.arange(channels)).reshape(-1)
    value_weights = np.repeat(column_weights, channels, axis=0)
    return _AreaTables(row_starts, row_weights, value_starts.astype(np.int32),
                       np.ascontiguousarray(value_weights))


def area_kernel() -> ctypes.CDLL | None:
    """The C area resize (``area_resize.c``), or None where it cannot be built here."""
    lib = load_library("wmlab.envs", "area_resize.c")
    if lib is not None and not getattr(lib, "wmlab_ready", False):
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.area_resize.argtypes = [ptr, i64, i64, i64, i64, ptr, i64, i64, ptr, ptr, i64,
                                    ptr, ptr, i64, i64, ptr]
        lib.area_resize.restype = None
        lib.wmlab_ready = True
    return lib


def _resize_native(lib: ctypes.CDLL, frames: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) uint8 frames whose rows are contiguous (any frame and row strides: a
    crop of a batch is read in place) -> (B, 64, 64, 3), by the C kernel."""
    count, height, width, channels = frames.shape
    tables = _area_tables(height, width)
    out = np.empty((count, *FRAME_SHAPE), np.uint8)
    row = np.empty(width * channels, np.float32)
    lib.area_resize(frames.ctypes.data, frames.strides[0], frames.strides[1], count,
                    width * channels, out.ctypes.data, FRAME_SIZE, FRAME_SIZE * channels,
                    tables.row_starts.ctypes.data, tables.row_weights.ctypes.data,
                    tables.row_weights.shape[1], tables.value_starts.ctypes.data,
                    tables.value_weights.ctypes.data, tables.value_weights.shape[1],
                    channels, row.ctypes.data)
    return out


def _resize_stack(frames: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) -> (B, 64, 64, 3) uint8 with INTER_AREA, in one call."""
    count, height, width, _ = frames.shape
    if count and _native_is_exact(height, width):
        lib = area_kernel()
        if lib is not None:
            if frames.dtype != np.uint8 or frames.strides[2:] != (3, 1):
                frames = np.ascontiguousarray(frames, dtype=np.uint8)
            return _resize_native(lib, frames)
    # Frames stacked vertically resize as one image: the scale H/64 is a dyadic fraction, so
    # OpenCV's area windows fall exactly on frame boundaries and never mix two frames.
    size = (FRAME_SIZE, count * FRAME_SIZE)
    if _float_path_is_exact(height, width):
        tall = frames.astype(np.float32).reshape(count * height, width, 3)
        resized = cv2.resize(tall, size, interpolation=cv2.INTER_AREA)
        out = np.rint(resized, out=resized).astype(np.uint8)
    else:
        tall = np.ascontiguousarray(frames, dtype=np.uint8).reshape(count * height, width, 3)
        out = cv2.resize(tall, size, interpolation=cv2.INTER_AREA)
    return out.reshape(count, *FRAME_SHAPE)


def _check_image(frame: np.ndarray, batched: bool) -> None:
    expected = 4 if batched else 3
    if frame.ndim != expected or frame.shape[-1] != 3:
        layout = "(B, H, W, 3)" if batched else "(H, W, 3)"
        raise ValueError(f"expected RGB frames shaped {layout}, got {frame.shape}")


def resize_frame(frame: np.ndarray) -> np.ndarray:
    """Any (H, W, 3) uint8 screen -> (64, 64, 3) uint8 (Doom: the whole 120x160 screen)."""
    _check_image(frame, batched=False)
    if frame.shape[:2] == (FRAME_SIZE, FRAME_SIZE):
        return np.array(frame, dtype=np.uint8)
    return _resize_stack(frame[None])[0]


def resize_batch(frames: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) uint8 -> (B, 64, 64, 3) uint8, each frame exactly as ``resize_frame``."""
    _check_image(frames, batched=True)
    if len(frames) == 0 or frames.shape[1:3] == (FRAME_SIZE, FRAME_SIZE):
        return np.array(frames, dtype=np.uint8)
    return _resize_stack(frames)


def preprocess_carracing(obs: np.ndarray) -> np.ndarray:
    """(96, 96, 3) CarRacing frame -> keep rows 0..83 (drop the dashboard) -> (64, 64, 3)."""
    return resize_frame(obs[:CARRACING_ROWS])


def preprocess_carracing_batch(obs: np.ndarray) -> np.ndarray:
    """(B, 96, 96, 3) -> (B, 64, 64, 3), each frame exactly as ``preprocess_carracing``."""
    _check_image(obs, batched=True)
    return resize_batch(obs[:, :CARRACING_ROWS])
