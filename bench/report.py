"""The one statistic the harness computes itself, and the pyperf results file.

Every figure is a median over rounds of a difference or ratio taken *within* a
round, so a slow moment of the shared machine hits all variants of that round
alike. pyperf cannot compute that (its values must be positive, its runs are
independent), so the median and its interval are computed here; the per-round
values of every variant, and the machine and software facts, go to a pyperf
``BenchmarkSuite`` (``python -m pyperf stats|metadata|compare_to`` read it).
"""

from __future__ import annotations

import math
import statistics
import typing as t

import pyperf


def median_ci(
    values: t.Sequence[float], level: float = 0.95
) -> tuple[float, float, float]:
    """The median and a distribution-free interval of it: two order statistics.

    ``[x_(k), x_(n-k+1)]`` with the largest ``k`` for which ``P(Binomial(n, 1/2) <
    k) <= (1 - level) / 2``; NaN bounds when there are too few values (< 6).
    """
    xs = sorted(values)
    n = len(xs)
    if not n:
        return math.nan, math.nan, math.nan
    k, tail = 0, 0.0
    while k < n // 2:
        tail += math.comb(n, k) / 2**n
        if tail > (1 - level) / 2:
            break
        k += 1
    if k == 0:
        return statistics.median(xs), math.nan, math.nan
    return statistics.median(xs), xs[k - 1], xs[n - k]


def fmt(value: float, digits: int = 1) -> str:
    """``value`` with ``digits`` decimals, ``–`` for NaN."""
    return "–" if math.isnan(value) else f"{value:.{digits}f}"


def ci(values: t.Sequence[float], digits: int = 1) -> str:
    """``median [low, high]`` of ``values``."""
    m, low, high = median_ci(values)
    return f"{fmt(m, digits)} [{fmt(low, digits)}, {fmt(high, digits)}]"


def paired(a: t.Sequence[float], b: t.Sequence[float]) -> list[float]:
    """Per-round differences ``a - b`` (both lists are aligned by round)."""
    return [x - y for x, y in zip(a, b)]


def benchmark(name: str, values_us: t.Sequence[float], **metadata: t.Any) -> t.Any:
    """A pyperf benchmark of per-round values in µs (stored in seconds)."""
    meta = {"name": name, "unit": "second", **metadata}
    values = [v / 1e6 for v in values_us if v > 0]
    return pyperf.Benchmark([pyperf.Run(values, metadata=meta)])


def write_suite(benchmarks: t.Sequence[t.Any], path: str) -> None:
    """Write ``benchmarks`` as one pyperf JSON file."""
    pyperf.BenchmarkSuite(list(benchmarks)).dump(path, replace=True)
