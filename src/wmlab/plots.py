"""What the stages' pictures share: pyplot figures rendered to PNG bytes (the figure let go),
and animated GIFs."""

from __future__ import annotations

import io
from typing import Any

import numpy as np


def pyplot_png(fig: Any) -> bytes:
    """A pyplot figure as PNG bytes; the figure is closed so pyplot does not keep it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def gif_bytes(frames: Any, duration_ms: float, palette_samples: int = 16) -> bytes:
    """Frames (H, W, 3) uint8 -> an animated GIF (looping), with one palette for all.

    The palette is the median cut of up to ``palette_samples`` frames spread over the
    clip, and every frame is mapped to it without dithering. imageio quantises each frame
    on its own: ~20 ms a frame, 20 s for the 1,000-frame GIF of a long Doom episode,
    against under a second here; the renderings of these small, few-coloured frames look
    the same."""
    from PIL import Image

    frames = [np.ascontiguousarray(f, dtype=np.uint8) for f in frames]
    picks = np.linspace(0, len(frames) - 1, min(palette_samples, len(frames))).round()
    sample = Image.fromarray(np.concatenate([frames[int(i)] for i in picks], axis=0))
    palette = sample.quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    images = [Image.fromarray(f).quantize(palette=palette, dither=Image.Dither.NONE)
              for f in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:],
                   duration=duration_ms, loop=0)
    return buffer.getvalue()
