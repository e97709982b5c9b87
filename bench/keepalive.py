"""What ``STALEGUARD_KEEPALIVE`` costs: once per new connection, nothing per
checkout (the ``pool`` scenario measures checkouts with it on, as by default).

Per round, new PyMySQL connections are opened to the server; on each, the
guard's connect-time step (find the socket, set the options) is timed alone,
and the connect itself beside it, for scale.
"""

from __future__ import annotations

import time
import typing as t

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from flask_staleguard.core import probe
from flask_staleguard.core.keepalive import keepalive_for
from flask_staleguard.core.keepalive import set_keepalive

from . import report


def run(
    url: str, *, rounds: int, connections: int, log: t.Callable[[str], None]
) -> tuple[list[str], list[t.Any]]:
    """Per round, the median µs of setting the keepalive and of connecting."""
    keepalive = keepalive_for(60, None)
    assert keepalive is not None
    engine = sa.create_engine(url, poolclass=NullPool)
    setting: list[float] = []
    connecting: list[float] = []
    for _ in range(rounds):
        set_ns: list[int] = []
        connect_ns: list[int] = []
        for _ in range(connections):
            started = time.perf_counter_ns()
            raw = engine.raw_connection()
            connected = time.perf_counter_ns()
            fd = probe.socket_fd(raw.dbapi_connection)
            assert fd is not None
            with probe.borrowed(fd) as sock:
                set_keepalive(sock, keepalive)
            set_ns.append(time.perf_counter_ns() - connected)
            connect_ns.append(connected - started)
            raw.close()
        setting.append(sorted(set_ns)[len(set_ns) // 2] / 1000)
        connecting.append(sorted(connect_ns)[len(connect_ns) // 2] / 1000)
    engine.dispose()
    cost = report.ci(setting, 2)
    connect = report.fmt(report.median_ci(connecting)[0])
    log(f"keepalive: {cost} µs per new connection, whose connect takes {connect} µs")
    lines = [
        "## Per new connection: setting the TCP keepalive",
        "",
        f"{rounds} rounds × {connections} new PyMySQL connections.",
        "",
        "| µs to connect | µs to set the keepalive [95 % CI] |",
        "| --- | --- |",
        f"| {connect} | {cost} |",
        "",
    ]
    return lines, [
        report.benchmark("keepalive.connect", connecting),
        report.benchmark("keepalive.set", setting),
    ]
