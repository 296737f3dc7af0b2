"""Turning simulator screens into the 64x64x3 uint8 frames V sees (SPEC.md section 2).

Every resize is OpenCV's ``INTER_AREA`` (a box average, no aliasing), bit for bit. These
functions run once per env step, so they take OpenCV's faster float32 area path whenever it
gives the same bytes (see ``_float_path_is_exact``) and resize a whole batch in one call.
"""

from __future__ import annotations

import os

import cv2
import numpy as np

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


def _resize_stack(frames: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) -> (B, 64, 64, 3) uint8 with INTER_AREA, in one OpenCV call."""
    count, height, width, _ = frames.shape
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
