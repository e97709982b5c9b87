"""What the MariaDB-4031 ``handle_error`` listener costs every statement.

Any dialect event listener makes SQLAlchemy look up listeners around each
statement, whether a statement fails or not. SQLite in memory, so that nothing
but that lookup differs: two engines, one with the guard's listener, the same
statement on each in interleaved rounds, the difference paired per round.
"""

from __future__ import annotations

import time
import typing as t

import sqlalchemy as sa
from sqlalchemy import event

from flask_staleguard.core.disconnects import keep_mariadb_4031 as _keep_mariadb_4031

from .stats import bootstrap_ci
from .stats import median


def _per_statement_ns(conn: sa.Connection, statement: t.Any, n: int) -> float:
    started = time.perf_counter_ns()
    for _ in range(n):
        conn.execute(statement).scalar()
    return (time.perf_counter_ns() - started) / n


def run(
    *, rounds: int, statements: int, log: t.Callable[[str], None]
) -> dict[str, t.Any]:
    """Per round, ns per statement with and without the listener; the summary."""
    bare = sa.create_engine("sqlite://")
    listened = sa.create_engine("sqlite://")
    event.listen(listened, "handle_error", _keep_mariadb_4031)
    statement = sa.text("SELECT 1")
    with bare.connect() as plain, listened.connect() as guarded:
        for conn in (plain, guarded):  # warm both
            _per_statement_ns(conn, statement, statements)
        added = []
        base = []
        for r in range(rounds):
            # Alternate the order, so neither engine always runs first.
            if r % 2:
                a = _per_statement_ns(plain, statement, statements)
                b = _per_statement_ns(guarded, statement, statements)
            else:
                b = _per_statement_ns(guarded, statement, statements)
                a = _per_statement_ns(plain, statement, statements)
            base.append(a / 1000)
            added.append((b - a) / 1000)
    bare.dispose()
    listened.dispose()
    low, high = bootstrap_ci(added)
    summary: dict[str, t.Any] = {
        "added_us": {"median": median(added), "ci95_low": low, "ci95_high": high},
        "statement_us": median(base),
    }
    log(
        f"statements: handle_error listener adds {summary['added_us']['median']:.3f} µs"
        f" [{low:.3f}, {high:.3f}] to a {summary['statement_us']:.1f} µs statement"
    )
    return {"raw": {"added_us": added, "statement_us": base}, "summary": summary}
