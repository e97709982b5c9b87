"""Scenario ``pool``: the added cost per request-shaped checkout, variants interleaved.

Two units, in a table each: ``checkout`` (:meth:`BenchApp.checkout`: app
context + the session's connection + checkin, with no round trip to the server,
so only the variants' own work differs) and ``request`` (:meth:`BenchApp.request`:
the same with a ``SELECT 1``, whose round trips jitter by more than the guard
costs). A round runs ``requests`` units of every variant in micro-blocks of
``block``, the variant order shuffled for every micro-block, so all variants of a
round see the same state of the shared machine. Per round and variant the time
per unit is the block time summed over the round divided by the units (also kept:
the round's 10 %-trimmed mean unit, which the latency scenario uses); the figure
reported is the median over rounds of the per-round difference from ``bare``
(wall clock, and this thread's CPU time), with an order-statistics 95 % interval
of that median.
"""

from __future__ import annotations

import gc
import random
import time
import typing as t

import sqlalchemy as sa

from . import report
from .variants import ALL
from .variants import BenchApp
from .variants import build_all
from .variants import FLOOR
from .variants import NO_ROUND_TRIP

#: How many error messages to keep per variant.
_KEEP_ERRORS = 5


def _trimmed_mean(values: t.Sequence[int], cut: float = 0.1) -> float:
    """The mean without the lowest and highest ``cut`` of ``values``.

    A few multi-millisecond stalls (a timer-driven proxy has them) cannot move it.
    """
    ordered = sorted(values)
    k = int(len(ordered) * cut)
    kept = ordered[k : len(ordered) - k] or ordered
    return sum(kept) / len(kept)


def _block(
    bench_app: BenchApp,
    n: int,
    errors: list[str],
    times: list[int] | None = None,
    unit: str = "request",
) -> int:
    """Run ``n`` units; return how many failed (their messages go to ``errors``).

    With ``times``, each unit's wall time in ns is appended to it.
    """
    failed = 0
    request = getattr(bench_app, unit)
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
    unit: str = "request",
    progress: t.Callable[[str], None] | None = None,
) -> dict[str, t.Any]:
    """Run the interleaved rounds of ``unit`` (``"request"`` or ``"checkout"``);
    return raw per-round figures for every variant.

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
            "unit": unit,
        },
        "wall_us": {v: [] for v in names},
        "trim_us": {v: [] for v in names},
        "cpu_us": {v: [] for v in names},
        "errors": {v: 0 for v in names},
        "error_messages": {v: [] for v in names},
    }
    for name in names:  # fill the pools, compile the statement, warm the caches
        raw["errors"][name] += _block(
            apps[name], warmup, raw["error_messages"][name], unit=unit
        )
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
                    apps[name], block, raw["error_messages"][name], times[name], unit
                )
                cpu_ns[name] += cpu() - c0
                wall_ns[name] += wall() - w0
                raw["errors"][name] += failed
        n = blocks * block
        for name in names:
            raw["wall_us"][name].append(wall_ns[name] / n / 1000)
            raw["cpu_us"][name].append(cpu_ns[name] / n / 1000)
            raw["trim_us"][name].append(_trimmed_mean(times[name]) / 1000)
        if progress is not None:
            progress(
                f"round {r + 1}/{rounds}: "
                + ", ".join(f"{v} {raw['wall_us'][v][-1]:.0f}" for v in names)
                + f" µs/{unit}"
            )
    raw["rounds_done"] = len(raw["wall_us"][names[0]])
    raw["elapsed_s"] = round(time.monotonic() - started, 2)
    return raw


def summarize(
    raw: t.Mapping[str, t.Any],
    *,
    prefix: str,
    key: str = "wall_us",
    baseline: str = "bare",
    reference: str = "pre_ping",
) -> tuple[list[str], list[t.Any]]:
    """Markdown rows (one per variant) and one pyperf benchmark per variant.

    ``key`` picks the per-round figure: ``wall_us`` (round time / requests) or
    ``trim_us`` (the round's 10 %-trimmed mean request). The ratio is the median
    over rounds of ``(variant - baseline) / (reference - baseline)``. With
    :data:`FLOOR` among the variants, a listening variant's cost over it is its
    own code's, without SQLAlchemy's dispatch of the pool events.
    """
    per_round, cpu = raw[key], raw["cpu_us"]
    ref_added = report.paired(per_round[reference], per_round[baseline])
    rows, benchmarks = [], []
    for name, values in per_round.items():
        added = report.paired(values, per_round[baseline])
        cells = ["–", "–", "–", "–"]
        if name != baseline:
            ratios = [a / r for a, r in zip(added, ref_added) if r > 0]
            cells = [
                report.ci(added),
                report.ci(report.paired(cpu[name], cpu[baseline])),
                report.ci(ratios, 3),
                "–",
            ]
        if name not in (baseline, FLOOR, reference) and FLOOR in per_round:
            cells[3] = report.ci(report.paired(values, per_round[FLOOR]))
        rows.append(
            f"| {name} | {report.fmt(report.median_ci(values)[0])} | "
            + " | ".join(cells)
            + f" | {raw['errors'][name]} |"
        )
        benchmarks.append(
            report.benchmark(
                f"{prefix}.{name}",
                values,
                per_round_figure=key,
                added_us_over_bare=cells[0],
                rounds=raw["rounds_done"],
                requests_per_round=raw["config"]["requests_per_round"],
                errors=raw["errors"][name],
            )
        )
    return rows, benchmarks


#: The header of :func:`summarize`'s rows.
HEADER = [
    "| variant | µs per unit | added µs over bare [95 % CI] | added CPU µs |"
    " added ÷ pre_ping's added | added µs over listeners | failed units |",
    "| --- | --- | --- | --- | --- | --- | --- |",
]


#: Per unit: the table's title and what one unit is.
UNITS = {
    "checkout": (
        "Pool: added cost per request-shaped checkout, loopback, no round trip",
        "app context + the session's connection + checkin at teardown, engines"
        ' with `isolation_level="AUTOCOMMIT", skip_autocommit_rollback=True`:'
        " no round trip to the server, so nothing but the variants' own work"
        " differs (pre_ping's ping is its own work)",
    ),
    "request": (
        "Pool: added cost per request, loopback",
        "app context + checkout + `SELECT 1` + checkin",
    ),
}


def run(
    url: str,
    *,
    rounds: int,
    requests: int,
    time_limit: float,
    log: t.Callable[[str], None],
) -> tuple[list[str], list[t.Any]]:
    """Both units, every variant; the Markdown lines and the pyperf benchmarks.

    The ``checkout`` unit needs SQLAlchemy 2.1 (``skip_autocommit_rollback``).
    """
    lines: list[str] = []
    benchmarks: list[t.Any] = []
    for unit, (title, what) in UNITS.items():
        if unit == "checkout" and _version(sa.__version__) < (2, 1):
            log(f"pool: the checkout unit needs SQLAlchemy 2.1, not {sa.__version__}")
            continue
        apps = build_all(ALL, url, NO_ROUND_TRIP if unit == "checkout" else None)
        try:
            raw = measure(
                apps,
                rounds=rounds,
                requests=requests,
                time_limit=time_limit,
                unit=unit,
                progress=log,
            )
        finally:
            for bench_app in apps.values():
                bench_app.dispose()
        rows, found = summarize(raw, prefix=f"pool-{unit}")
        lines += [
            f"## {title}",
            "",
            f"{raw['rounds_done']} rounds × {requests} units per variant ({what}),"
            f" micro-blocks of {raw['config']['block']} in shuffled order.",
            "",
            *HEADER,
            *rows,
            "",
        ]
        benchmarks += found
    return lines, benchmarks


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".")[:2] if p.isdigit())
