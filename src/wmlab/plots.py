"""What the stages' pyplot figures share: rendering to PNG bytes and letting the figure go."""

from __future__ import annotations

import io
from typing import Any


def pyplot_png(fig: Any) -> bytes:
    """A pyplot figure as PNG bytes; the figure is closed so pyplot does not keep it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
