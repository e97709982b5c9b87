"""Helpers the test modules share: no fixtures here (those are in conftest.py),
and nothing a test module would import from another test module.

The guard is read through its public API only: ``StaleGuard.stats()`` and the
``flask staleguard pool --json`` command.
"""

from __future__ import annotations

import ast
import contextlib
import json
import pathlib
import re
import time
import typing as t
import weakref
from collections.abc import Iterator

import pymysql
import pytest
import sqlalchemy as sa
from flask import current_app
from flask import Flask
from flask import has_app_context
from flask_sqlalchemy import SQLAlchemy

from flask_staleguard import StaleGuard
from tests.clitools import invoke

if t.TYPE_CHECKING:
    from tests.servers import MariaDBServer

MYSQL_ID = "SELECT CONNECTION_ID()"
POSTGRES_ID = "SELECT pg_backend_pid()"


class AppFactory(t.Protocol):
    """The ``make_app`` fixture: a Flask app with Flask-SQLAlchemy and the guard."""

    def __call__(
        self,
        url: str | None = None,
        *,
        guard: bool = True,
        order: str = "guard-first",
        **config: t.Any,
    ) -> tuple[Flask, SQLAlchemy]: ...


#: The StaleGuard instance of each app ``make_app`` built with one.
GUARDS: weakref.WeakKeyDictionary[Flask, StaleGuard] = weakref.WeakKeyDictionary()


def guard_of(app: Flask) -> StaleGuard:
    """The ``StaleGuard`` instance ``make_app`` initialised ``app`` with."""
    return GUARDS[app]


def stats(app: Flask, bind: str = "default") -> dict[str, t.Any]:
    """``guard.stats(app)[bind]``: the bind's counters so far."""
    return guard_of(app).stats(app)[bind]


def replaced(app: Flask, bind: str = "default") -> dict[str, int]:
    """The bind's replacements at checkout so far, by reason."""
    return t.cast(dict[str, int], stats(app, bind)["replaced"])


def pool_json(app: Flask, bind: str = "default") -> dict[str, t.Any]:
    """The bind's entry in ``flask staleguard pool --json``: its idle budget,
    server timeout and its source, the pool's real ``pool_recycle`` and
    ``pre_ping``, the options the guard applied, ...
    """
    if has_app_context() and current_app._get_current_object() is app:  # type: ignore[attr-defined]
        result = invoke(app, "pool", "--json")
    else:
        with app.app_context():
            result = invoke(app, "pool", "--json")
    document = json.loads(result.stdout)
    (entry,) = [b for b in document["binds"] if b["bind"] == bind]
    return t.cast(dict[str, t.Any], entry)


def add_route(app: Flask, db: SQLAlchemy, sql: str = MYSQL_ID) -> None:
    """``GET /q`` runs ``sql`` on ``db.session`` and answers its one value."""

    @app.route("/q")
    def query() -> str:
        return str(db.session.execute(sa.text(sql)).scalar_one())


def open_at_once(
    db: SQLAlchemy, n: int, sql: str = MYSQL_ID, bind: str | None = None
) -> list[int]:
    """In the current app context: open ``n`` pooled connections at once, run
    ``sql`` on each, return them to the pool, and give the values (server ids).
    """
    with contextlib.ExitStack() as stack:
        conns = [stack.enter_context(db.engines[bind].connect()) for _ in range(n)]
        return [int(c.execute(sa.text(sql)).scalar_one()) for c in conns]


def warm(app: Flask, db: SQLAlchemy, sql: str = MYSQL_ID, n: int = 4) -> set[int]:
    """Fill the pool with ``n`` connections opened at once, so all of them go
    idle together; return their server ids.
    """
    with app.app_context():
        return set(open_at_once(db, n, sql))


def request_ids(app: Flask, n: int = 8) -> list[int]:
    """Make ``n`` requests to ``/q``; each must succeed. Their answers."""
    client = app.test_client()
    ids = []
    for _ in range(n):
        response = client.get("/q")
        assert response.status_code == 200
        ids.append(int(response.text))
    return ids


def parse(path: pathlib.Path) -> ast.Module:
    """``ast.parse`` of a source file.

    CPython 3.11 before 3.11.8 keeps the parser's recursion depth per
    interpreter, not per thread (gh-106905): a daemon thread left by an earlier
    test compiling at the same moment makes it fail spuriously, with
    "AST constructor recursion depth mismatch". Such a failure is tried again.
    """
    source = path.read_text()
    for attempt in range(3):
        try:
            return ast.parse(source)
        except SystemError as e:
            if "recursion depth mismatch" not in str(e) or attempt == 2:
                raise
    raise AssertionError("unreachable")


def failed_writes(app: Flask, writes: int) -> int:
    """Of ``writes`` requests to ``POST /w`` one after another, how many failed
    with a database error.
    """
    client = app.test_client()
    failed = 0
    for _ in range(writes):
        try:
            client.post("/w")
        except sa.exc.DBAPIError:
            failed += 1
    return failed


def connection_id(db: SQLAlchemy, bind: str | None = None) -> int:
    """The server-side id of the connection a fresh checkout gets."""
    with db.engines[bind].connect() as conn:
        return int(conn.execute(sa.text(MYSQL_ID)).scalar_one())


def fail_after_a_kill(app: Flask, db: SQLAlchemy, server: MariaDBServer) -> None:
    """Pool one connection of the app's user, KILL it, and see the next statement
    on it fail, as it does without the guard (strategy ``"off"``).
    """
    with app.app_context():
        connection_id(db)
        server.kill_connections(user="sg")
        time.sleep(0.2)  # the FIN arrives
        with pytest.raises(sa.exc.OperationalError):
            connection_id(db)


def outlive(server: MariaDBServer, ids: t.Iterable[int], timeout: float = 30.0) -> None:
    """Wait until ``server`` has closed every connection in ``ids`` (their
    ``wait_timeout`` ran out), polling its process list: the event itself, where a
    fixed sleep past the timeout would guess at it. Fails after ``timeout`` s."""
    waiting = set(ids)
    deadline = time.monotonic() + timeout
    while waiting:
        waiting &= {int(row["ID"]) for row in server.processlist()}
        if waiting and time.monotonic() > deadline:
            raise AssertionError(
                f"connections {sorted(waiting)} open after {timeout} s"
            )
        if waiting:
            time.sleep(0.1)


def engine_connection_id(engine: sa.engine.Engine) -> int:
    """The server-side id of the connection a checkout from ``engine`` gets."""
    with engine.connect() as conn:
        return int(conn.execute(sa.text(MYSQL_ID)).scalar_one())


def is_gone_error(error: BaseException) -> bool:
    """Whether ``error`` is the stale-connection failure the guard prevents."""
    orig = getattr(error, "orig", error)
    return isinstance(orig, (pymysql.err.OperationalError, pymysql.err.InterfaceError))


@contextlib.contextmanager
def raises(expected: type[BaseException], match: str = "") -> Iterator[None]:
    """``pytest.raises``, also through the exception group in which Flask 3.2
    gathers what teardown functions raised.
    """
    try:
        yield
    except BaseException as e:
        found = [
            error
            for error in flatten(e)
            if isinstance(error, expected) and re.search(match, str(error))
        ]
        if not found:
            raise
    else:
        pytest.fail(f"DID NOT RAISE {expected.__name__}")


def flatten(error: BaseException) -> Iterator[BaseException]:
    """``error`` and, if it is an exception group, everything inside it."""
    yield error
    for inner in getattr(error, "exceptions", ()):
        yield from flatten(inner)


def unwrapped(error: BaseException) -> BaseException:
    """The one error inside Flask 3.2's teardown exception groups, else ``error``."""
    leaves = [e for e in flatten(error) if not hasattr(e, "exceptions")]
    return leaves[0] if len(leaves) == 1 else error


class FakeClock:
    """A monotonic clock for ``PoolGuard(clock=...)`` that moves only when told."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
