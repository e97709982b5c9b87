"""How durations read in logs, output and JSON: one spelling everywhere."""

from __future__ import annotations

import math
import typing as t


def seconds_text(value: float | None) -> str:
    """``"28800 s"``, ``"10.8 s"``, ``"0.25 s"``; ``"none"`` for no timer.

    Two decimals at most, never an exponent, and the same figure in a log line,
    a note and a table.
    """
    if value is None or math.isinf(value):
        return "none"
    return f"{value:.2f}".rstrip("0").rstrip(".") + " s"


def seconds_value(value: object, scale: float = 1.0) -> float | None:
    """A timer as a JSON number of seconds (``scale`` converts from another unit);
    ``None`` (null) for no timer: unset, 0 or infinite.
    """
    if value is None:
        return None
    number = float(t.cast(float, value)) * scale
    return None if number == 0 or math.isinf(number) else number
