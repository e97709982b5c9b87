"""What flask_staleguard.otel adds to a checkout and checkin, against the guard alone
(and, for comparison, the Prometheus exporter's checkout counter).

``python -m bench.otel_cost [URL]``: engines on one MySQL server (the machine's
by default), each guarded with ``protect()``; blocks of raw pool checkouts and
checkins (no statement), the variants interleaved in shuffled order; the figure
is the median over rounds of the per-checkout difference from the guard alone.
"""

from __future__ import annotations

import random
import statistics
import sys
import time
import typing as t

import sqlalchemy as sa
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import Counter

from flask_staleguard import protect
from flask_staleguard.otel import instrument

URL = "mysql+pymysql://root@127.0.0.1:3306/test"


READER = InMemoryMetricReader()


def _engines(url: str) -> dict[str, sa.engine.Engine]:
    # No reset on return: its ROLLBACK round trip would drown the listeners.
    engines = {
        name: sa.create_engine(url, pool_reset_on_return=None)
        for name in ("guard", "otel", "prometheus")
    }
    for name, engine in engines.items():
        protection = protect(engine, name=name)
        if name == "otel":
            instrument(protection, MeterProvider(metric_readers=[READER]))
        if name == "prometheus":
            # The exporter's own listener: one labelled counter per checkout.
            counter = Counter("bench_checkouts", "", ["pool"], registry=None)
            sa.event.listen(
                engine, "checkout", _count(counter.labels(name)), insert=True
            )
    return engines


def _count(child: t.Any) -> t.Callable[..., None]:
    def on_checkout(*args: t.Any) -> None:
        child.inc()

    return on_checkout


def _block(pool: sa.pool.Pool, n: int) -> tuple[int, int]:
    """Wall and this thread's CPU ns of ``n`` checkouts and checkins."""
    wall, cpu = time.perf_counter_ns, time.thread_time_ns
    w0, c0 = wall(), cpu()
    for _ in range(n):
        pool.connect().close()
    return wall() - w0, cpu() - c0


def measure(url: str, rounds: int = 30, n: int = 2000, block: int = 50) -> None:
    """Print the added ns per checkout of each variant over the guard alone."""
    engines = _engines(url)
    pools = {name: engine.pool for name, engine in engines.items()}
    rng = random.Random(0)
    for pool in pools.values():
        _block(pool, 500)  # warm up: a connection each, every code path run
    variants = [name for name in pools if name != "guard"]
    differences: dict[str, list[float]] = {name: [] for name in variants}
    cpu_differences: dict[str, list[float]] = {name: [] for name in variants}
    collected: list[float] = []
    for _ in range(rounds):
        totals = dict.fromkeys(pools, 0)
        cpu_totals = dict.fromkeys(pools, 0)
        for _ in range(n // block):
            order = list(pools)
            rng.shuffle(order)
            for name in order:
                wall, cpu = _block(pools[name], block)
                totals[name] += wall
                cpu_totals[name] += cpu
        for name in variants:
            differences[name].append((totals[name] - totals["guard"]) / n)
            cpu_differences[name].append((cpu_totals[name] - cpu_totals["guard"]) / n)
        # A reader's collection, as a periodic one would make it: it records the
        # use times the checkins queued. Timed apart: it is off the request path.
        t0 = time.perf_counter_ns()
        READER.get_metrics_data()
        collected.append((time.perf_counter_ns() - t0) / n)
    base = totals["guard"] / n  # the last round's, for scale
    print(f"guard alone: {base / 1000:.1f} µs per checkout + checkin (last round)")
    for name in variants:
        for kind, values in (
            ("wall", differences[name]),
            ("cpu", cpu_differences[name]),
        ):
            low, _, high = (v / 1000 for v in statistics.quantiles(values, n=4))
            print(
                f"{name}: +{statistics.median(values) / 1000:.2f} µs {kind} per"
                f" checkout + checkin (quartiles {low:.2f} .. {high:.2f};"
                f" {rounds} rounds)"
            )
    print(
        f"collection: {statistics.median(collected) / 1000:.2f} µs per queued"
        " checkin, in the reader's thread"
    )
    for engine in engines.values():
        engine.dispose()


def main(argv: t.Sequence[str]) -> None:
    measure(argv[0] if argv else URL)


if __name__ == "__main__":
    main(sys.argv[1:])
