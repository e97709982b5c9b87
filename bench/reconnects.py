"""Scenarios 4 and 5: reconnects and stale-connection errors, per traffic pattern.

Runs on a private MariaDB whose ``wait_timeout`` is set short (4 s by default),
so StaleGuard discovers it: the guard's idle budget is 3.6 s and the derived
``pool_recycle`` of the ``recycle`` variant is 3 s. Bare Flask-SQLAlchemy keeps
its ``pool_recycle=7200``. All variants run side by side in one process:

``busy``
    ``threads`` threads per variant send requests back to back for ``seconds``:
    no connection ever idles. Every reconnect here is needless; the age-based
    ``pool_recycle`` makes one per connection every 3 s.
``idle_burst``
    ``threads`` overlapping requests per variant (``SELECT SLEEP(0.05)`` so they
    need ``threads`` connections), then ``idle`` seconds of silence, longer than
    ``wait_timeout``, so the server closes every pooled connection; repeated.
    Reconnects are necessary here; errors are not.
``kill``
    Fresh pooled connections, then the server KILLs every idle one (a restart, a
    DBA, a failover): no timer can see this coming, only a check at checkout can.
    The connections are younger than the 3 s ``pool_recycle``.

``reconnects`` counts new DBAPI connections after warm-up; ``errors`` counts
requests that failed (stale-connection errors surfaced to the app).
"""

from __future__ import annotations

import threading
import time
import typing as t

import sqlalchemy as sa

from . import db as dbmod
from .variants import BenchApp
from .variants import build_all

_SLEEP = sa.text("SELECT SLEEP(0.05)")


class Tally:
    """Thread-safe request and error counts for one variant."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.errors = 0
        self.messages: list[str] = []

    def call(self, bench_app: BenchApp, statement: sa.TextClause | None = None) -> None:
        """One request; a failure is counted, never raised."""
        try:
            if statement is None:
                bench_app.request()
            else:
                bench_app.request(statement)
            failed = False
        except Exception as e:
            failed = True
            message = f"{type(e).__name__}: {e}"[:300]
        with self.lock:
            self.requests += 1
            if failed:
                self.errors += 1
                if len(self.messages) < 3:
                    self.messages.append(message)


def _burst(apps: t.Mapping[str, BenchApp], tallies: dict[str, Tally], n: int) -> None:
    """``n`` overlapping requests per variant, all variants at once."""
    threads = [
        threading.Thread(target=tallies[v].call, args=(apps[v], _SLEEP))
        for v in apps
        for _ in range(n)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)


def _snapshot(apps: t.Mapping[str, BenchApp]) -> dict[str, int]:
    return {v: a.connects for v, a in apps.items()}


def _result(
    apps: t.Mapping[str, BenchApp],
    tallies: dict[str, Tally],
    before: dict[str, int],
    guard_before: dict[str, t.Any],
) -> dict[str, t.Any]:
    out = {}
    for v, bench_app in apps.items():
        stats_after = bench_app.guard_stats()
        replaced: dict[str, int] = {}
        if stats_after is not None:
            earlier = (guard_before.get(v) or {}).get("replaced", {})
            replaced = {
                k: n - earlier.get(k, 0)
                for k, n in stats_after["replaced"].items()
                if n - earlier.get(k, 0)
            }
        out[v] = {
            "requests": tallies[v].requests,
            "reconnects": bench_app.connects - before[v],
            "errors": tallies[v].errors,
            "error_messages": tallies[v].messages,
            "guard_replaced": replaced,
        }
    return out


def busy(
    apps: t.Mapping[str, BenchApp], *, threads: int, seconds: float
) -> dict[str, t.Any]:
    """Back-to-back requests for ``seconds``; reconnects counted after a warm-up."""
    tallies = {v: Tally() for v in apps}
    stop = threading.Event()
    counting = threading.Event()

    def loop(variant: str) -> None:
        bench_app = apps[variant]
        while not stop.is_set():
            if counting.is_set():
                tallies[variant].call(bench_app)
            else:
                Tally().call(bench_app)

    workers = [
        threading.Thread(target=loop, args=(v,), daemon=True)
        for v in apps
        for _ in range(threads)
    ]
    for worker in workers:
        worker.start()
    time.sleep(0.5)  # every pool holds its `threads` connections now
    before = _snapshot(apps)
    guard_before = {v: a.guard_stats() for v, a in apps.items()}
    counting.set()
    time.sleep(seconds)
    stop.set()
    for worker in workers:
        worker.join(timeout=30)
    result = _result(apps, tallies, before, guard_before)
    for entry in result.values():
        entry["seconds"] = seconds
    return result


def idle_burst(
    apps: t.Mapping[str, BenchApp], *, threads: int, idle: float, cycles: int
) -> dict[str, t.Any]:
    """Warm-up burst, then ``cycles`` times: ``idle`` seconds of silence, a burst."""
    tallies = {v: Tally() for v in apps}
    _burst(apps, {v: Tally() for v in apps}, threads)
    before = _snapshot(apps)
    guard_before = {v: a.guard_stats() for v, a in apps.items()}
    for _ in range(cycles):
        time.sleep(idle)
        _burst(apps, tallies, threads)
    return _result(apps, tallies, before, guard_before)


def kill(
    apps: t.Mapping[str, BenchApp], server: dbmod.MariaDBServer, *, threads: int
) -> dict[str, t.Any]:
    """Fresh connections, KILL them while idle, then a burst."""
    for bench_app in apps.values():
        bench_app.dispose()
    _burst(apps, {v: Tally() for v in apps}, threads)
    before = _snapshot(apps)
    guard_before = {v: a.guard_stats() for v, a in apps.items()}
    killed = dbmod.kill_idle(server)
    time.sleep(0.2)  # the FINs arrive
    tallies = {v: Tally() for v in apps}
    _burst(apps, tallies, threads)
    result = _result(apps, tallies, before, guard_before)
    for entry in result.values():
        entry["server_killed_total"] = len(killed)
    return result


def run(
    server: dbmod.MariaDBServer,
    *,
    variants: t.Sequence[str],
    wait_timeout: int,
    threads: int,
    busy_seconds: float,
    idle_cycles: int,
    log: t.Callable[[str], None],
) -> list[str]:
    """All three patterns with a short ``wait_timeout`` (restored afterwards).

    Returns the Markdown table: per pattern and variant, reconnects / failed
    requests, and the guard's replacement reasons.
    """
    dbmod.set_wait_timeout(server, wait_timeout)
    try:
        apps = build_all(variants, server.url)
        derived = {
            v: {
                "pool_recycle": a.engine.pool._recycle,
                "pool_pre_ping": a.engine.pool._pre_ping,
            }
            for v, a in apps.items()
        }
        log(f"wait_timeout={wait_timeout}: pool settings {derived}")
        out: dict[str, t.Any] = {}
        log(f"busy: {threads} threads per variant for {busy_seconds:g} s")
        out["busy"] = busy(apps, threads=threads, seconds=busy_seconds)
        idle = wait_timeout + 2.0
        log(f"idle_burst: {idle_cycles} cycles of {idle:g} s idle + burst")
        out["idle_burst"] = idle_burst(
            apps, threads=threads, idle=idle, cycles=idle_cycles
        )
        log("kill: KILL idle connections, then a burst")
        out["kill"] = kill(apps, server, threads=threads)
        for bench_app in apps.values():
            bench_app.dispose()
    finally:
        dbmod.set_wait_timeout(server, 28800)
    lines = [
        "## Reconnects and stale errors",
        "",
        f"Private MariaDB, wait_timeout={wait_timeout} s, {threads} threads per"
        f" variant. Pool settings: {derived}. Cells: reconnects / failed requests"
        " (the guard's replacement reasons).",
        "",
        "| pattern | " + " | ".join(variants) + " |",
        "| --- | " + " | ".join("---" for _ in variants) + " |",
    ]
    for pattern, result in out.items():
        cells = []
        for v in variants:
            e = result[v]
            why = ", ".join(f"{k} {n}" for k, n in e["guard_replaced"].items())
            cells.append(
                f"{e['reconnects']} / {e['errors']}{f' ({why})' if why else ''}"
            )
            for message in e["error_messages"]:
                log(f"{pattern} {v}: {message}")
        requests = ", ".join(f"{v} {result[v]['requests']}" for v in variants)
        lines.append(f"| {pattern} ({requests} requests) | " + " | ".join(cells) + " |")
    return [*lines, ""]
