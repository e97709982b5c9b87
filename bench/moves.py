"""Scenario ``moves``: the database moves under the pool (issue 20's numbers).

Three ways a pooled connection stops pointing at a working database, each on
private servers this scenario starts (own ports and datadirs, 127.0.0.1), every
variant in turn on the same set-up:

``failover``
    A pool of 5 filled on the old writer; the writer is demoted
    (``read_only=1``; the app user ``sg`` has no SUPER) and a TCP proxy sends
    new connections to the new writer, keeping the old sessions where they are
    (HAProxy's way). Then ``writes`` writes, one request each: how many fail.
``restart``
    ``pools`` apps (worker processes' pools) of ``threads`` threads each make
    requests through a proxy while the MariaDB behind it (``max_connections``
    20) is stopped and started about 1 s later; ``extra`` more requests per
    pool start during the outage. Counted: failed requests that started once
    the server was down, failed requests started before (statements in flight
    or sent during the shutdown: no one may retry those), the slowest request
    that started after the stop, connection attempts the proxy accepted while
    the server was down, and requests failed with 1040 (too many connections).
``silent``
    A server that accepts TCP and never answers (``tests.proxies.MuteServer``):
    how long until a request fails, every variant at once, under a watchdog.
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
import threading
import time
import typing as t
from pathlib import Path

import sqlalchemy as sa

from tests.proxies import MuteServer
from tests.proxies import TcpProxy

from . import db as dbmod
from .variants import BenchApp
from .variants import build

#: The failover's pool: every connection filled on the old writer.
FAILOVER_POOL = {"pool_size": 5, "max_overflow": 0}
CREATE = "CREATE TABLE IF NOT EXISTS moves (id SERIAL PRIMARY KEY, port INT)"
INSERT = sa.text("INSERT INTO moves (port) SELECT @@port")
MAX_CONNECTIONS = 20
#: The guard's connect bounds in ``silent`` (the defaults are 10 s and 10 s).
SILENT_CONFIG = {
    "STALEGUARD_DISCOVERY_TIMEOUT": 1,
    "STALEGUARD_CONNECT_TIMEOUT": 2,
    "STALEGUARD_CONNECT_WAIT": 0,
}


def within(fn: t.Callable[[], t.Any], seconds: float) -> tuple[bool, t.Any]:
    """Run ``fn`` in a daemon thread: ``(True, result or exception)``, or
    ``(False, None)`` if it still runs after ``seconds`` (it is left to finish).
    """
    outcome: list[t.Any] = []

    def run() -> None:
        try:
            outcome.append(fn())
        except Exception as e:
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    return (False, None) if thread.is_alive() else (True, outcome[0])


def _short(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:200]


# -- failover -----------------------------------------------------------------


def _write(bench_app: BenchApp) -> None:
    with bench_app.app.app_context():
        bench_app.db.session.execute(INSERT)
        bench_app.db.session.commit()


def _fill(bench_app: BenchApp) -> None:
    """Check out the pool's every connection at once, run a statement on each."""
    engine = bench_app.engine
    conns = [engine.connect() for _ in range(FAILOVER_POOL["pool_size"])]
    for conn in conns:
        conn.execute(sa.text("SELECT 1"))
    for conn in conns:
        conn.close()


def _rows(server: dbmod.MariaDBServer) -> int:
    return int(server.execute("SELECT count(*) FROM moves")[0][0])


def failover(
    old: dbmod.MariaDBServer,
    new: dbmod.MariaDBServer,
    variants: t.Sequence[str],
    *,
    writes: int,
    log: t.Callable[[str], None],
) -> dict[str, dict[str, t.Any]]:
    """Per variant: a pool on ``old``, demote it, move the proxy, ``writes`` writes."""
    for server in (old, new):
        server.execute(CREATE)
    out: dict[str, dict[str, t.Any]] = {}
    with TcpProxy(old.host, old.port) as proxy:
        for v in variants:
            old.execute("SET GLOBAL read_only = 0")
            proxy.target_port = old.port
            bench_app = build(v, proxy.url_for(old.user_url), FAILOVER_POOL)
            _fill(bench_app)
            before = _rows(new)
            old.execute("SET GLOBAL read_only = 1")
            proxy.target_port = new.port
            errors: list[BaseException] = []

            def writing(app: BenchApp = bench_app, errs: list[t.Any] = errors) -> None:
                for _ in range(writes):
                    try:
                        _write(app)
                    except Exception as error:  # noqa: PERF203
                        errs.append(error)

            done, _ = within(writing, 60)
            stats = bench_app.guard_stats()
            out[v] = {
                "failed": len(errors),
                "landed": _rows(new) - before,
                "hung": not done,
                "disconnects": dict(stats["disconnects"]) if stats else {},
            }
            for e in errors[:2]:
                log(f"failover {v}: {_short(e)}")
            log(f"failover {v}: {out[v]}")
            bench_app.dispose()
        old.execute("SET GLOBAL read_only = 0")
    return out


# -- restart ------------------------------------------------------------------


class Load:
    """Threads of requests through several apps; every request's start, end and
    error recorded. Bounded: each thread stops after 2000 requests or at stop.
    """

    def __init__(self, apps: t.Sequence[BenchApp], threads: int) -> None:
        self.apps = apps
        self.stop = threading.Event()
        self.lock = threading.Lock()
        #: (started, ended, error or None) of every request.
        self.requests: list[tuple[float, float, BaseException | None]] = []
        self.threads = [
            threading.Thread(target=self._loop, args=(a,), daemon=True)
            for a in apps
            for _ in range(threads)
        ]

    def _loop(self, bench_app: BenchApp) -> None:
        for _ in range(2000):
            if self.stop.is_set():
                return
            self.request(bench_app)
            time.sleep(0.02)

    def request(self, bench_app: BenchApp) -> None:
        """One request, recorded; a failure is recorded, never raised."""
        started = time.monotonic()
        error: BaseException | None = None
        try:
            bench_app.request()
        except Exception as e:
            error = e
        with self.lock:
            self.requests.append((started, time.monotonic(), error))

    def more(self, per_app: int) -> None:
        """``per_app`` more requests per app, each in a new thread, starting now."""
        for bench_app in self.apps:
            for _ in range(per_app):
                thread = threading.Thread(
                    target=self.request, args=(bench_app,), daemon=True
                )
                self.threads.append(thread)
                thread.start()

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def finish(self, timeout: float) -> int:
        """Stop the loops; how many threads still run after ``timeout`` s in all."""
        self.stop.set()
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return sum(thread.is_alive() for thread in self.threads)


def _failed_of(requests: t.Sequence[tuple[float, float, t.Any]]) -> str:
    """``failed / all`` of ``requests``."""
    return f"{sum(e is not None for _, _, e in requests)} / {len(requests)}"


def restart(
    server: dbmod.MariaDBServer,
    variants: t.Sequence[str],
    *,
    pools: int,
    threads: int,
    extra: int,
    log: t.Callable[[str], None],
) -> dict[str, dict[str, t.Any]]:
    """Per variant: ``pools`` × ``threads`` under load, the server stopped and
    started 1 s later through a counting proxy.
    """
    out: dict[str, dict[str, t.Any]] = {}
    with TcpProxy(server.host, server.port) as proxy:
        for v in variants:
            apps = [build(v, proxy.url_for(server.user_url)) for _ in range(pools)]
            for bench_app in apps:
                bench_app.request()
            load = Load(apps, threads)
            load.start()
            time.sleep(0.5)
            attempts = proxy.attempts
            stopping = time.monotonic()
            server.stop()
            down = time.monotonic()
            time.sleep(0.2)
            load.more(extra)
            time.sleep(0.8)
            server.start()
            up = time.monotonic()
            outage_attempts = proxy.attempts - attempts
            time.sleep(2.0)
            hung = load.finish(timeout=40)
            requests = load.requests
            in_flight = [r for r in requests if r[0] < stopping < r[1]]
            shutting = [r for r in requests if stopping <= r[0] < down]
            after = [r for r in requests if r[0] >= down]
            every_error = [e for _, _, e in requests if e is not None]
            since_stop = [e - s for s, e, _ in requests if e >= stopping]
            counts: dict[str, t.Any] = {}
            for bench_app in apps:
                stats = bench_app.guard_stats()
                for key in ("outages", "connect_retries"):
                    if stats is not None:
                        counts[key] = counts.get(key, 0) + stats[key]
            out[v] = {
                "in_flight": _failed_of(in_flight),
                "shutting": _failed_of(shutting),
                "after": _failed_of(after),
                "slowest": max(since_stop, default=0.0),
                "shutdown": down - stopping,
                "outage": up - stopping,
                "attempts": outage_attempts,
                "e1040": sum("1040" in str(e) for e in every_error),
                "hung": hung,
                "guard": counts,
            }
            for e in [e for _, _, e in after if e is not None][:2]:
                log(f"restart {v}, started once down: {_short(e)}")
            log(f"restart {v}: {out[v]}")
            for bench_app in apps:
                bench_app.dispose()
    return out


# -- silent server --------------------------------------------------------------


def silent(
    variants: t.Sequence[str], *, watchdog: float, log: t.Callable[[str], None]
) -> dict[str, dict[str, t.Any]]:
    """Every variant (and ``guard`` with its default wait) requests at once from
    a server that never answers; each request's time, or ``None`` if it hung.
    """
    rows = [(v, v, SILENT_CONFIG) for v in variants]
    rows.append(
        ("guard, wait 10 s", "guard", {**SILENT_CONFIG, "STALEGUARD_CONNECT_WAIT": 10})
    )
    out: dict[str, dict[str, t.Any]] = {}
    with MuteServer("silent") as mute:
        apps: dict[str, BenchApp] = {}
        for name, variant, config in rows:
            # The guard's start-up discovery is bounded by its own timeout (1 s).
            url = mute.url("mysql+pymysql")
            done, made = within(
                functools.partial(build, variant, url, None, config), 30
            )
            if not done or isinstance(made, Exception):
                raise RuntimeError(f"building {name} on a silent server: {made}")
            apps[name] = made
        results: dict[str, tuple[float, BaseException | None]] = {}
        lock = threading.Lock()

        def timed(name: str) -> None:
            started = time.monotonic()
            error: BaseException | None = None
            try:
                apps[name].request()
            except Exception as e:
                error = e
            with lock:
                results[name] = (time.monotonic() - started, error)

        workers = [threading.Thread(target=timed, args=(n,), daemon=True) for n in apps]
        for worker in workers:
            worker.start()
        deadline = time.monotonic() + watchdog
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        with lock:
            for name in apps:
                took, error = results.get(name, (None, None))
                out[name] = {
                    "seconds": took,
                    "error": _short(error) if error is not None else None,
                }
                log(f"silent {name}: {out[name]}")
    # Leaving the MuteServer closed its sockets: the hung requests end now.
    for worker in workers:
        worker.join(10)
    return out


# -- the scenario ---------------------------------------------------------------


def _secs(value: float | None, watchdog: float) -> str:
    return f"hung > {watchdog:g} s" if value is None else f"{value:.1f} s"


def run(
    *,
    variants: t.Sequence[str],
    writes: int,
    pools: int,
    threads: int,
    extra: int,
    watchdog: float,
    log: t.Callable[[str], None],
) -> list[str]:
    """The three patterns on their own private servers; the Markdown tables."""
    with contextlib.ExitStack() as stack:
        base = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        args = [f"--max-connections={MAX_CONNECTIONS}"]
        old = stack.enter_context(dbmod.MariaDBServer(base / "old", extra_args=args))
        new = stack.enter_context(dbmod.MariaDBServer(base / "new"))
        log(f"moves: failover, {writes} writes per variant")
        moved = failover(old, new, variants, writes=writes, log=log)
        log(f"moves: restart, {pools} pools x {threads} threads (+{extra} each)")
        restarted = restart(
            old, variants, pools=pools, threads=threads, extra=extra, log=log
        )
    log(f"moves: silent server, watchdog {watchdog:g} s")
    muted = silent(variants, watchdog=watchdog, log=log)

    head = "| | " + " | ".join(variants) + " |"
    rule = "| --- | " + " | ".join("---" for _ in variants) + " |"
    lines = [
        "## When the database moves",
        "",
        f"### Failover, sessions kept: failed writes of {writes}",
        "",
        "Private MariaDB old and new writer behind a TCP proxy; pool of 5 filled on"
        " the old writer, which is set `read_only=1` (app user without SUPER) while"
        " the proxy sends new connections to the new one. One write per request.",
        "",
        head,
        rule,
        "| failed writes | "
        + " | ".join(
            f"{moved[v]['failed']}{' (hung)' if moved[v]['hung'] else ''}"
            for v in variants
        )
        + " |",
        "| rows on the new writer | "
        + " | ".join(str(moved[v]["landed"]) for v in variants)
        + " |",
        "",
        "### Restart shorter than the connect wait",
        "",
        f"Private MariaDB, `max_connections={MAX_CONNECTIONS}`, behind a counting"
        f" TCP proxy; {pools} pools (default QueuePool, 5 + 10) of {threads}"
        f" threads each, a request every 20 ms per thread; {extra} more requests"
        " per pool start 0.2 s after the server is down; the server is started"
        " again 1 s after it was down. Guard defaults (`STALEGUARD_CONNECT_WAIT` and"
        " `_TIMEOUT` 10 s).",
        "",
        head,
        rule,
    ]
    rows: list[tuple[str, t.Callable[[dict[str, t.Any]], str]]] = [
        (
            "shutdown (stop begun → port closed) / outage (→ logins again)",
            lambda r: f"{r['shutdown']:.1f} s / {r['outage']:.1f} s",
        ),
        ("failed / in flight at the stop", lambda r: r["in_flight"]),
        ("failed / started during the shutdown", lambda r: r["shutting"]),
        (
            "failed / started once the server was down",
            lambda r: r["after"] + (f" ({r['hung']} hung)" if r["hung"] else ""),
        ),
        ("slowest request since the stop", lambda r: f"{r['slowest']:.1f} s"),
        ("connect attempts, stop begun → logins again", lambda r: str(r["attempts"])),
        ("requests failed with 1040", lambda r: str(r["e1040"])),
    ]
    for label, cell in rows:
        lines.append(
            f"| {label} | " + " | ".join(cell(restarted[v]) for v in variants) + " |"
        )
    names = list(muted)
    lines += [
        "",
        "### A server that accepts TCP and never answers",
        "",
        "`tests.proxies.MuteServer`; the guard with `STALEGUARD_CONNECT_TIMEOUT = 2`"
        " and `STALEGUARD_CONNECT_WAIT = 0` (and 10, its default); every variant"
        f" at once, under a {watchdog:g} s watchdog.",
        "",
        "| | " + " | ".join(names) + " |",
        "| --- | " + " | ".join("---" for _ in names) + " |",
        "| until the request failed | "
        + " | ".join(_secs(muted[n]["seconds"], watchdog) for n in names)
        + " |",
        "",
    ]
    return lines
