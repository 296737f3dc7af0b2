"""Turning simulator screens into the 64x64x3 uint8 frames V sees (SPEC.md section 2)."""

from __future__ import annotations

import cv2
import numpy as np

FRAME_SIZE = 64
CARRACING_ROWS = 84  # rows 84..95 of CarRacing's 96x96 frame are the dashboard bar


def resize_frame(frame: np.ndarray) -> np.ndarray:
    """Any (H, W, 3) uint8 screen -> (64, 64, 3) uint8, area-averaged (no aliasing)."""
    if frame.shape[:2] == (FRAME_SIZE, FRAME_SIZE):
        return np.ascontiguousarray(frame)
    return cv2.resize(frame, (FRAME_SIZE, FRAME_SIZE), interpolation=cv2.INTER_AREA)


def preprocess_carracing(obs: np.ndarray) -> np.ndarray:
    """(96, 96, 3) -> keep rows 0..83 (drop the dashboard) -> (64, 64, 3)."""
    return resize_frame(obs[:CARRACING_ROWS])


def resize_batch(frames: np.ndarray, crop_rows: int | None = None) -> np.ndarray:
    """(B, H, W, 3) -> (B, 64, 64, 3), optionally keeping only the first ``crop_rows`` rows."""
    out = np.empty((len(frames), FRAME_SIZE, FRAME_SIZE, 3), dtype=np.uint8)
    for i, frame in enumerate(frames):
        out[i] = resize_frame(frame[:crop_rows] if crop_rows else frame)
    return out
