"""Robust, paired statistics over benchmark rounds.

Every figure is a median over rounds of a difference or ratio taken *within* a
round, so a slow moment of the shared machine hits all variants of that round
alike and cancels out.
"""

from __future__ import annotations

import math
import random
import statistics
import typing as t


def median(values: t.Sequence[float]) -> float:
    """The median, or NaN for no values."""
    return statistics.median(values) if values else math.nan


def trimmed_mean(values: t.Sequence[float], cut: float = 0.1) -> float:
    """The mean without the lowest and the highest ``cut`` of ``values``.

    Nearly as steady as the mean on well-behaved samples, yet a few stalls of
    several milliseconds (a timer-driven proxy has them) cannot move it.
    """
    ordered = sorted(values)
    k = int(len(ordered) * cut)
    kept = ordered[k : len(ordered) - k] or ordered
    return sum(kept) / len(kept)


def quartiles(values: t.Sequence[float]) -> tuple[float, float]:
    """The first and third quartiles (NaN with fewer than two values)."""
    if len(values) < 2:
        return math.nan, math.nan
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def bootstrap_ci(
    values: t.Sequence[float], *, level: float = 0.95, resamples: int = 2000
) -> tuple[float, float]:
    """A percentile-bootstrap confidence interval of the median of ``values``."""
    if len(values) < 3:
        return math.nan, math.nan
    rng = random.Random(1234)  # fixed: the interval must not change between reads
    n = len(values)
    medians = sorted(
        statistics.median(rng.choices(values, k=n)) for _ in range(resamples)
    )
    low = medians[int((1 - level) / 2 * resamples)]
    high = medians[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return low, high


def paired(a: t.Sequence[float], b: t.Sequence[float]) -> list[float]:
    """Per-round differences ``a - b`` (the two lists are aligned by round)."""
    return [x - y for x, y in zip(a, b)]


def ratios(num: t.Sequence[float], den: t.Sequence[float]) -> list[float]:
    """Per-round ratios, skipping rounds whose denominator is not positive."""
    return [x / y for x, y in zip(num, den) if y > 0]


def summary(values: t.Sequence[float]) -> dict[str, float]:
    """Median, bootstrap 95 % interval of the median, and quartiles."""
    low, high = bootstrap_ci(values)
    q1, q3 = quartiles(values)
    return {
        "median": median(values),
        "ci95_low": low,
        "ci95_high": high,
        "q1": q1,
        "q3": q3,
        "n": float(len(values)),
    }
