"""A server that stops answering mid-statement (SIGSTOP: a frozen host or process).

Nothing the guard checks can tell it from a slow query: the kernel still
acknowledges what the client sends, so neither the socket probe nor TCP
keepalive sees anything wrong. Only a read bound of the driver's ends the wait.
These tests measure what does and what does not, for the docs
("When the database moves", "A server that stops answering").
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import typing as t
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from tests.helpers import AppFactory
from tests.servers import MariaDBServer
from tests.servers import PostgresServer

#: How long a statement may wait before the test calls it hung: past the
#: keepalive window of STALEGUARD_KEEPALIVE=1 (1 + 3 x 1 s).
HUNG = 6.0


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[None]:
    """Stop process ``pid`` for the block, and always let it go on after."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def outcome(statement: t.Callable[[], object]) -> dict[str, object]:
    """Run ``statement`` in a thread; after :data:`HUNG` s, say whether it ended."""
    result: dict[str, object] = {"error": None}
    started = time.monotonic()

    def run() -> None:
        try:
            statement()
        except Exception as e:  # the driver's error is the result
            result["error"] = e
        result["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(HUNG)
    result["hung"] = thread.is_alive()
    result["thread"] = thread
    return result


@pytest.mark.parametrize("read_timeout", [None, 1])
def test_only_a_read_timeout_ends_a_statement_on_a_frozen_mariadb(
    make_app: AppFactory, mariadb: MariaDBServer, read_timeout: int | None
) -> None:
    connect_args = {} if read_timeout is None else {"read_timeout": read_timeout}
    # Keepalive at its shortest: its window (1 + 3 x 1 s) passes while frozen.
    app, db = make_app(
        mariadb.user_url,
        SQLALCHEMY_ENGINE_OPTIONS={"connect_args": connect_args},
        STALEGUARD_KEEPALIVE=1,
    )
    pid = mariadb.pid
    assert pid is not None
    with app.app_context():
        conn = db.engine.connect()
        conn.execute(sa.text("SELECT 1"))
        with frozen(pid):
            found = outcome(lambda: conn.execute(sa.text("SELECT 1")))
        t.cast(threading.Thread, found["thread"]).join(30)
        conn.invalidate()
        conn.close()
    if read_timeout is None:
        assert found["hung"], found
    else:
        assert not found["hung"], found
        assert isinstance(found["error"], sa.exc.OperationalError)


def test_statement_timeout_does_not_end_a_statement_on_a_frozen_backend(
    make_app: AppFactory, postgres: PostgresServer
) -> None:
    # The server enforces statement_timeout: a frozen backend enforces nothing.
    app, db = make_app(
        postgres.url,
        SQLALCHEMY_ENGINE_OPTIONS={
            "connect_args": {"options": "-c statement_timeout=1000"}
        },
        STALEGUARD_KEEPALIVE=1,
    )
    with app.app_context():
        conn = db.engine.connect()
        backend = int(conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())
        with frozen(backend):
            found = outcome(lambda: conn.execute(sa.text("SELECT 1")))
        t.cast(threading.Thread, found["thread"]).join(30)
        conn.invalidate()
        conn.close()
    assert found["hung"], found
