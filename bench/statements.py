"""What the guard costs a statement: nothing, by design.

Any engine or dialect event listener would make SQLAlchemy look up listeners
around each statement, so the guard has none (its MariaDB-4031 rule sits on the
dialect's ``is_disconnect``, which only failed statements call). SQLite in
memory, so that nothing else differs: two engines, one guarded by ``protect()``
with the MySQL rule added, the same statement on each in interleaved rounds, the
difference paired per round.
"""

from __future__ import annotations

import time
import typing as t

import sqlalchemy as sa

from flask_staleguard import protect
from flask_staleguard.core.disconnects import keep_mariadb_4031

from . import report


def _per_statement_ns(conn: sa.Connection, statement: t.Any, n: int) -> float:
    started = time.perf_counter_ns()
    for _ in range(n):
        conn.execute(statement).scalar()
    return (time.perf_counter_ns() - started) / n


def run(
    *, rounds: int, statements: int, log: t.Callable[[str], None]
) -> tuple[list[str], list[t.Any]]:
    """Per round, µs per statement with and without the guard; the summary."""
    bare = sa.create_engine("sqlite://")
    listened = sa.create_engine("sqlite://")
    protect(listened)
    keep_mariadb_4031(listened.dialect)
    statement = sa.text("SELECT 1")
    with bare.connect() as plain, listened.connect() as guarded:
        for conn in (plain, guarded):  # warm both
            _per_statement_ns(conn, statement, statements)
        base: list[float] = []
        with_listener: list[float] = []
        for r in range(rounds):
            # Alternate the order, so neither engine always runs first.
            if r % 2:
                a = _per_statement_ns(plain, statement, statements)
                b = _per_statement_ns(guarded, statement, statements)
            else:
                b = _per_statement_ns(guarded, statement, statements)
                a = _per_statement_ns(plain, statement, statements)
            base.append(a / 1000)
            with_listener.append(b / 1000)
    bare.dispose()
    listened.dispose()
    added = report.ci(report.paired(with_listener, base), 3)
    statement_us = report.fmt(report.median_ci(base)[0])
    log(f"statements: the guard adds {added} µs to a {statement_us} µs statement")
    lines = [
        "## Per statement: a guarded engine",
        "",
        f"{rounds} rounds × {statements} statements, SQLite in memory.",
        "",
        "| µs per statement | added by the guard, µs [95 % CI] |",
        "| --- | --- |",
        f"| {statement_us} | {added} |",
        "",
    ]
    benchmarks = [
        report.benchmark("statements.bare", base),
        report.benchmark("statements.guarded", with_listener, added_us_over_bare=added),
    ]
    return lines, benchmarks
