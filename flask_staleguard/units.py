"""How durations read in logs and output: one spelling everywhere."""

from __future__ import annotations

import math


def seconds_text(value: float | None) -> str:
    """``"28800 s"``, ``"10.8 s"``, ``"0.25 s"``; ``"none"`` for no timer.

    Two decimals at most, never an exponent, and the same figure in a log line,
    a note and a table.
    """
    if value is None or math.isinf(value):
        return "none"
    return f"{value:.2f}".rstrip("0").rstrip(".") + " s"
