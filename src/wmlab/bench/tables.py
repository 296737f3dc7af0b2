"""Plain-text tables of benchmark rows, one section per kind of row."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def section(rows: list[dict[str, Any]], key: str, kind: str, header: list[str],
            line: Callable[[dict[str, Any]], str]) -> list[str]:
    """``header``, then one ``line`` per row whose ``key`` is ``kind``."""
    return [*header, *(line(row) for row in rows if row[key] == kind)]


def ruled(header: str) -> list[str]:
    """A header line and a rule as wide."""
    return [header, "-" * len(header)]
