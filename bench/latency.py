"""Scenario 3: per-request cost through a TCP proxy that adds a fixed delay.

A real network puts a round trip between the app and the database.
``pool_pre_ping`` pays one per checkout, so its cost grows with the delay; the
guard's poll is local and must not. For each delay the proxy
(:mod:`bench.proxy_server`, its own process) forwards to the server, the
variants are measured exactly as in scenario 1, and the round trip the proxy
really adds is measured with PyMySQL pings (``COM_PING``), because a timer-driven
Python proxy adds a little more than its nominal delay.
"""

from __future__ import annotations

import contextlib
import statistics
import subprocess
import sys
import time
import typing as t
from collections.abc import Iterator

import pymysql
from sqlalchemy.engine import make_url

from . import pool_cost
from . import REPO
from .variants import build_all


@contextlib.contextmanager
def delay_proxy(host: str, port: int, delay: float) -> Iterator[int]:
    """Start :mod:`bench.proxy_server` with ``delay``; yield its port."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.proxy_server",
            "--target-host",
            host,
            "--target-port",
            str(port),
            "--delay",
            repr(delay),
        ],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line.startswith("PORT "):
            raise RuntimeError(f"proxy did not start: {line!r}")
        yield int(line.split()[1])
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def ping_rtt_us(
    endpoints: t.Sequence[tuple[str, int]], user: str, count: int = 300
) -> list[float]:
    """Median ``COM_PING`` round trip in µs to each endpoint, pings alternating.

    Alternating keeps a busy moment of the machine from landing on one endpoint
    only, so the difference between two endpoints is fair.
    """
    conns = [
        pymysql.connect(host=h, port=p, user=user, password="") for h, p in endpoints
    ]
    try:
        samples: list[list[float]] = [[] for _ in conns]
        for _ in range(count):
            for conn, out in zip(conns, samples):
                t0 = time.perf_counter_ns()
                conn.ping()
                out.append((time.perf_counter_ns() - t0) / 1000)
        return [statistics.median(s) for s in samples]
    finally:
        for conn in conns:
            conn.close()


def run(
    url: str,
    *,
    delays: t.Sequence[float],
    variants: t.Sequence[str],
    rounds: int,
    round_seconds: float,
    time_limit: float,
    log: t.Callable[[str], None],
) -> tuple[list[str], list[t.Any]]:
    """Measure every variant at every delay; Markdown lines and pyperf benchmarks.

    The requests per round are chosen from bare's speed at that delay so a round
    takes about ``round_seconds`` for every delay.
    """
    target = make_url(url)
    host, port = target.host or "127.0.0.1", int(target.port or 3306)
    user = target.username or "root"
    (direct_rtt,) = ping_rtt_us([(host, port)], user)
    lines = [
        "## Latency: through a TCP proxy with a fixed one-way delay",
        "",
        f"Direct loopback COM_PING round trip: {direct_rtt:.0f} µs; RTT below is"
        " measured through the proxy. Per round, a variant's figure is its"
        " 10 %-trimmed mean request (the proxy's rare timer stalls swamp a mean).",
        "",
    ]
    benchmarks: list[t.Any] = []
    for delay in delays:
        with delay_proxy(host, port, delay) as proxy_port:
            proxied = target.set(host="127.0.0.1", port=proxy_port)
            proxied_url = proxied.render_as_string(hide_password=False)
            pings = max(50, min(300, int(0.3 / max(delay * 2, 1e-4))))
            level_direct, rtt = ping_rtt_us(
                [(host, port), ("127.0.0.1", proxy_port)], user, count=pings
            )
            apps = build_all(variants, proxied_url)
            for bench_app in apps.values():  # connect, compile, warm up
                for _ in range(5):
                    bench_app.request()
            # Size the rounds: ~round_seconds for all variants together.
            probe_start = time.perf_counter()
            for _ in range(20):
                apps["bare"].request()
            per_request = (time.perf_counter() - probe_start) / 20
            requests = int(round_seconds / (per_request * 1.3 * len(apps)))
            block = 5 if requests < 200 else 10
            requests = max(block * 4, requests // block * block)
            log(
                f"delay {delay * 1000:g} ms: ping RTT {rtt:.0f} µs (direct"
                f" {level_direct:.0f} µs), {requests} requests/round"
            )
            raw = pool_cost.measure(
                apps,
                rounds=rounds,
                requests=requests,
                block=block,
                warmup=20,
                time_limit=time_limit,
                seed=int(delay * 1e6),
            )
            for bench_app in apps.values():
                bench_app.dispose()
        rows, level_benchmarks = pool_cost.summarize(
            raw, prefix=f"latency_{delay * 1000:g}ms", key="trim_us"
        )
        lines += [
            f"### Delay {delay * 1000:g} ms one way: RTT {rtt:.0f} µs",
            "",
            f"{raw['rounds_done']} rounds × {requests} requests per variant.",
            "",
            *pool_cost.HEADER,
            *rows,
            "",
        ]
        for bench in level_benchmarks:
            bench.update_metadata({"ping_rtt_us": round(rtt, 1)})
        benchmarks += level_benchmarks
    return lines, benchmarks
