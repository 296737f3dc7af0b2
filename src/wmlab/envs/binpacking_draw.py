"""Drawing a bin packing state: a 64x64x3 frame for V and a larger picture for people.

The 64x64 frame is a histogram over fill levels. Column k (k = 1..C-1, left to right) holds
a bar whose height encodes N_k, the number of open bags at level k: two pixels per bag up to
``LINEAR_COUNTS`` bags (one pixel with C = 100, whose two bands are half as tall), then a
logarithmic scale (4 pixels per doubling), so a single bag is clearly visible and hundreds
still fit (counts above 512 reach the top; with C = 100, above 76). Bars of levels the incoming item fits into (k + s <= C) are
green on a dark green column; the others are blue on black. The strip at the bottom shows
the incoming item as an orange bar on the same axis, s levels long, so "level k plus the
item" reads off directly. With more than 64 levels (C = 100) the histogram is split into two
bands of levels stacked one above the other; columns 1-2 pixels wide have no gaps, so
neighbouring bars alternate between two shades. Everything is a pure function of (counts, item,
capacity), with no fonts or anti-aliasing, so the same state always gives the same bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

FRAME = 64
LINEAR_COUNTS = 16  # counts up to this are drawn one pixel per bag
LOG_PIXELS = 4  # pixels per doubling above LINEAR_COUNTS
ITEM_ROWS = (56, 63)  # rows of the item strip [first, last)
AXIS_ROW = 53  # the grey base line under the bars

BACKGROUND = (0, 0, 0)
FIT_COLUMN = (0, 48, 16)
FIT_BAR = (70, 230, 90)
NOFIT_BAR = (80, 110, 235)
ITEM = (255, 160, 20)
AXIS = (110, 110, 110)


@dataclass(frozen=True)
class Layout:
    """Where each level's column sits: ``bands`` stacked histograms, ``per_band`` levels each."""

    capacity: int
    bands: int
    per_band: int
    col_width: int
    band_height: int
    unit: int  # pixels per bag in the linear part of the scale

    def column(self, level: int) -> tuple[int, int, int]:
        """(band, first x, last x exclusive) of ``level`` (1..C-1)."""
        index = level - 1
        band, slot = divmod(index, self.per_band)
        x0 = slot * self.col_width
        return band, x0, x0 + self.col_width

    def band_bottom(self, band: int) -> int:
        """Row just below the bars of ``band`` (bars grow upward from here)."""
        return (band + 1) * self.band_height


def layout(capacity: int) -> Layout:
    levels = capacity - 1
    bands = max(1, math.ceil(levels / FRAME))
    per_band = math.ceil(levels / bands)
    col_width = max(1, FRAME // per_band)
    band_height = AXIS_ROW // bands
    unit = 2 if bands == 1 else 1
    return Layout(capacity, bands, per_band, col_width, band_height, unit)


def bar_height(count: int, limit: int, unit: int = 1) -> int:
    """Pixels for ``count`` bags: ``unit`` per bag up to LINEAR_COUNTS, then logarithmic,
    capped at ``limit``."""
    if count <= 0:
        return 0
    if count <= LINEAR_COUNTS:
        height = unit * count
    else:
        height = unit * LINEAR_COUNTS + math.ceil(LOG_PIXELS
                                                  * math.log2(count / LINEAR_COUNTS))
    return min(height, limit)


def draw_frame(counts: np.ndarray, item: int, capacity: int) -> np.ndarray:
    """The 64x64x3 uint8 frame of a state: counts N_0..N_{C-1} and the incoming item size."""
    frame = np.zeros((FRAME, FRAME, 3), dtype=np.uint8)
    frame[:] = BACKGROUND
    geometry = layout(capacity)
    limit = geometry.band_height - 1  # keep one empty row between stacked bands
    for level in range(1, capacity):
        band, x0, x1 = geometry.column(level)
        # Leave a one-pixel gap between columns when they are wide enough to afford it.
        bar_x1 = x1 - 1 if geometry.col_width >= 3 else x1
        bottom = geometry.band_bottom(band)
        fits = level + item <= capacity
        if fits:
            frame[bottom - limit:bottom, x0:bar_x1] = FIT_COLUMN
        height = bar_height(int(counts[level]), limit, geometry.unit)
        if height:
            color = np.array(FIT_BAR if fits else NOFIT_BAR)
            if geometry.col_width < 3 and level % 2 == 0:
                color = color * 3 // 4  # no room for gaps: alternate shades tell columns apart
            frame[bottom - height:bottom, x0:bar_x1] = color
    frame[AXIS_ROW, :] = AXIS
    # The item, on the level axis of the first band: s levels long from the left edge.
    width = min(FRAME, item * geometry.col_width)
    frame[ITEM_ROWS[0]:ITEM_ROWS[1], :width] = ITEM
    return frame


def draw_human(counts: np.ndarray, item: int, capacity: int, *, score: float,
               waste: int, full_bags: int, step: int, horizon: int,
               message: str = "") -> np.ndarray:
    """A larger picture with numbers: every level's count, the item, score and waste.

    Text is drawn with PIL's built-in bitmap font, so the picture needs no font files.
    """
    from PIL import Image, ImageDraw, ImageFont

    levels = capacity - 1
    col = max(8, min(48, 900 // levels))
    plot_h = 240
    width = max(480, col * levels + 40)
    height = plot_h + 170
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=14)
    small = ImageFont.load_default(size=10 if col < 20 else 13)
    left, base = 20, 40 + plot_h
    top_count = max(int(np.max(counts[1:capacity])), 1) if levels else 1
    scale = (plot_h - 20) / max(top_count, 5)
    for level in range(1, capacity):
        x0 = left + (level - 1) * col
        fits = level + item <= capacity
        if fits:
            draw.rectangle([x0, 40, x0 + col - 2, base], fill=FIT_COLUMN)
        count = int(counts[level])
        if count:
            bar_top = base - max(2, round(count * scale))
            draw.rectangle([x0, bar_top, x0 + col - 2, base],
                           fill=FIT_BAR if fits else NOFIT_BAR)
            draw.text((x0 + 1, bar_top - 14), str(count), fill=(255, 255, 255), font=small)
        if levels <= 40 or level % 5 == 0:
            draw.text((x0 + 1, base + 4), str(level), fill=AXIS, font=small)
    draw.line([left, base, left + levels * col, base], fill=AXIS)
    item_top = base + 26
    draw.rectangle([left, item_top, left + item * col - 2, item_top + 16], fill=ITEM)
    draw.text((left + item * col + 6, item_top), f"item {item}", fill=ITEM, font=font)
    lines = [f"step {step}/{horizon}   score {score:g}   waste {waste}   full bags {full_bags}",
             f"capacity {capacity}: green levels take the item; 0 = new bag"]
    draw.text((left, 10), lines[0], fill=(255, 255, 255), font=font)
    draw.text((left, item_top + 26), lines[1], fill=AXIS, font=font)
    if message:
        draw.text((left, item_top + 48), message, fill=(255, 120, 120), font=font)
    return np.asarray(image, dtype=np.uint8)
