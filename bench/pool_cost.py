"""Scenario 1: the added cost per request-shaped checkout, variants interleaved.

One request is ``app context + checkout + SELECT 1 + checkin``
(:meth:`BenchApp.request`). A round runs ``requests`` requests of every variant
in micro-blocks of ``block`` requests, the variant order shuffled for every
micro-block, so all variants of a round see the same state of the shared machine.
Per round and variant the per-request time is the block time summed over the
round divided by the requests (also kept: the round's median request and its
10 %-trimmed mean request); the
figure reported is the median over rounds of the per-round difference from
``bare`` (wall clock, and this thread's CPU time).
"""

from __future__ import annotations

import gc
import random
import statistics
import time
import typing as t

from . import stats
from .variants import BenchApp

#: Per-round statistic -> its key in the raw figures: the round's mean request
#: (round time / requests), its median request, its 10 %-trimmed mean request.
PER_ROUND = {"mean": "wall_us", "p50": "p50_us", "trim": "trim_us"}

#: How many error messages to keep per variant in the raw output.
_KEEP_ERRORS = 5


def _block(
    bench_app: BenchApp, n: int, errors: list[str], times: list[int] | None = None
) -> int:
    """Run ``n`` requests; return how many failed (their messages go to ``errors``).

    With ``times``, each request's wall time in ns is appended to it.
    """
    failed = 0
    request = bench_app.request
    clock = time.perf_counter_ns
    for _ in range(n):
        t0 = clock()
        try:
            request()
        except Exception as e:  # a stale-connection error is a result, not a crash
            failed += 1
            if len(errors) < _KEEP_ERRORS:
                errors.append(f"{type(e).__name__}: {e}"[:300])
        if times is not None:
            times.append(clock() - t0)
    return failed


def measure(
    apps: t.Mapping[str, BenchApp],
    *,
    rounds: int,
    requests: int,
    block: int = 10,
    warmup: int = 200,
    time_limit: float = 120.0,
    min_rounds: int = 5,
    seed: int = 0,
    progress: t.Callable[[str], None] | None = None,
) -> dict[str, t.Any]:
    """Run the interleaved rounds; return raw per-round figures for every variant.

    Stops early, after at least ``min_rounds`` rounds, once ``time_limit`` seconds
    have passed, so a slow machine or network cannot run away with the clock.
    """
    rng = random.Random(seed)
    names = list(apps)
    raw: dict[str, t.Any] = {
        "config": {
            "rounds_requested": rounds,
            "requests_per_round": requests,
            "block": block,
            "warmup": warmup,
            "time_limit_s": time_limit,
            "seed": seed,
        },
        "wall_us": {v: [] for v in names},
        "p50_us": {v: [] for v in names},
        "trim_us": {v: [] for v in names},
        "cpu_us": {v: [] for v in names},
        "errors": {v: 0 for v in names},
        "error_messages": {v: [] for v in names},
    }
    for name in names:  # fill the pools, compile the statement, warm the caches
        raw["errors"][name] += _block(apps[name], warmup, raw["error_messages"][name])
    blocks = max(1, requests // block)
    started = time.monotonic()
    wall = time.perf_counter_ns
    cpu = time.thread_time_ns
    for r in range(rounds):
        if r >= min_rounds and time.monotonic() - started > time_limit:
            break
        gc.collect()
        wall_ns = dict.fromkeys(names, 0)
        cpu_ns = dict.fromkeys(names, 0)
        times: dict[str, list[int]] = {v: [] for v in names}
        for _ in range(blocks):
            order = names[:]
            rng.shuffle(order)
            for name in order:
                w0, c0 = wall(), cpu()
                failed = _block(
                    apps[name], block, raw["error_messages"][name], times[name]
                )
                cpu_ns[name] += cpu() - c0
                wall_ns[name] += wall() - w0
                raw["errors"][name] += failed
        n = blocks * block
        for name in names:
            raw["wall_us"][name].append(wall_ns[name] / n / 1000)
            raw["cpu_us"][name].append(cpu_ns[name] / n / 1000)
            raw["p50_us"][name].append(statistics.median(times[name]) / 1000)
            raw["trim_us"][name].append(stats.trimmed_mean(times[name]) / 1000)
        if progress is not None:
            progress(
                f"round {r + 1}/{rounds}: "
                + ", ".join(f"{v} {raw['wall_us'][v][-1]:.0f}" for v in names)
                + " µs/request"
            )
    raw["rounds_done"] = len(raw["wall_us"][names[0]])
    raw["elapsed_s"] = round(time.monotonic() - started, 2)
    return raw


def summarize(
    raw: t.Mapping[str, t.Any],
    *,
    baseline: str = "bare",
    reference: str = "pre_ping",
    statistic: str = "mean",
) -> dict[str, t.Any]:
    """Per variant: median µs/request, and the paired added cost over ``baseline``.

    ``statistic`` is the per-round figure of a variant: ``"mean"`` (round time /
    requests, the default), ``"p50"`` (the round's median request) or ``"trim"``
    (its 10 %-trimmed mean request: robust to the rare multi-millisecond stalls
    of a timer-driven proxy, and steadier than the median). All are kept:
    ``added_us`` uses ``statistic``; ``added_us_mean``, ``added_us_p50`` and
    ``added_us_trim`` are always there. ``ratio_to_ref`` is the median over rounds of
    ``(variant - baseline) / (reference - baseline)``; ``ratio_of_medians``
    divides the two median added costs instead (less sensitive to a round where
    the reference's added cost happened to be tiny).
    """
    out: dict[str, t.Any] = {}
    wall = raw[PER_ROUND[statistic]]
    cpu = raw["cpu_us"]
    base_w, base_c = wall[baseline], cpu[baseline]
    ref_added = stats.paired(wall[reference], base_w) if reference in wall else []
    ref_median = stats.median(ref_added)
    for name in wall:
        added = stats.paired(wall[name], base_w)
        added_cpu = stats.paired(cpu[name], base_c)
        entry: dict[str, t.Any] = {
            "statistic": statistic,
            "per_request_us": stats.median(wall[name]),
            **{
                f"added_us_{kind}": stats.summary(
                    stats.paired(raw[key][name], raw[key][baseline])
                )
                for kind, key in PER_ROUND.items()
            },
            "cpu_per_request_us": stats.median(cpu[name]),
            "added_us": stats.summary(added),
            "added_cpu_us": stats.summary(added_cpu),
            "errors": raw["errors"][name],
        }
        if ref_added and name != baseline:
            per_round = stats.ratios(added, ref_added)
            entry["ratio_to_ref"] = stats.median(per_round)
            entry["ratio_to_ref_summary"] = stats.summary(per_round)
            entry["ratio_of_medians"] = (
                stats.median(added) / ref_median if ref_median > 0 else float("nan")
            )
        out[name] = entry
    return out
