"""PostgreSQL: idle_session_timeout, terminated backends, and NOTIFY on the socket.

Against the shared server, changing nothing global: the short timeout is set per
session through ``options``, and only this test's own backends are terminated.
"""

from __future__ import annotations

import contextlib
import time
import typing as t

import psycopg
import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_staleguard import probe
from tests.conftest import AppFactory

PID = "SELECT pg_backend_pid()"
POOL: dict[str, t.Any] = {"pool_size": 4, "max_overflow": 0}
SHORT: dict[str, t.Any] = {
    **POOL,
    "connect_args": {"options": "-c idle_session_timeout=2000"},
}


def add_route(app: Flask, db: SQLAlchemy) -> None:
    @app.route("/q")
    def query() -> str:
        return str(db.session.execute(sa.text(PID)).scalar_one())


def warm(app: Flask, db: SQLAlchemy, n: int = 4) -> set[int]:
    with app.app_context(), contextlib.ExitStack() as stack:
        conns = [stack.enter_context(db.engine.connect()) for _ in range(n)]
        return {int(c.execute(sa.text(PID)).scalar_one()) for c in conns}


def request_pids(app: Flask, n: int = 8) -> set[int]:
    client = app.test_client()
    pids = set()
    for _ in range(n):
        response = client.get("/q")
        assert response.status_code == 200
        pids.add(int(response.text))
    return pids


def raw_connect(postgres_url: str) -> psycopg.Connection[t.Any]:
    url = sa.make_url(postgres_url)
    return psycopg.connect(
        host=url.host,
        port=url.port or 5432,
        user=url.username,
        dbname=url.database,
        autocommit=True,
    )


def terminate(postgres_url: str, pids: set[int]) -> None:
    with raw_connect(postgres_url) as conn:
        for pid in pids:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


def replaced(app: Flask) -> dict[str, int]:
    stats: dict[str, int] = app.extensions["staleguard"].binds[None].stats.replaced
    return stats


def test_budget_is_derived_from_idle_session_timeout(
    make_app: AppFactory, postgres_url: str
) -> None:
    app, _ = make_app(postgres_url, SQLALCHEMY_ENGINE_OPTIONS=SHORT)
    bind = app.extensions["staleguard"].binds[None]
    assert bind.server_timeout == 2
    assert bind.budget == pytest.approx(1.8)


def test_idle_session_timeout_is_survived(
    make_app: AppFactory, postgres_url: str
) -> None:
    app, db = make_app(postgres_url, SQLALCHEMY_ENGINE_OPTIONS=SHORT)
    add_route(app, db)
    before = warm(app, db)
    time.sleep(3)
    assert not before & request_pids(app)
    assert replaced(app).get("idle_budget", 0) >= 1


def test_idle_session_timeout_fails_without_guard(
    make_app: AppFactory, postgres_url: str
) -> None:
    app, db = make_app(postgres_url, guard=False, SQLALCHEMY_ENGINE_OPTIONS=SHORT)
    add_route(app, db)
    warm(app, db)
    time.sleep(3)
    with pytest.raises(sa.exc.OperationalError):
        app.test_client().get("/q")


@pytest.mark.parametrize("guard", [True, False])
def test_terminated_idle_backends(
    make_app: AppFactory, postgres_url: str, guard: bool
) -> None:
    app, db = make_app(postgres_url, guard=guard, SQLALCHEMY_ENGINE_OPTIONS=POOL)
    add_route(app, db)
    before = warm(app, db)
    terminate(postgres_url, before)
    time.sleep(0.3)
    if not guard:
        with pytest.raises(sa.exc.OperationalError):
            app.test_client().get("/q")
        return
    assert not before & request_pids(app)
    assert sum(replaced(app).values()) >= 1
    assert "idle_budget" not in replaced(app)


def test_pending_notify_does_not_discard_the_connection(
    make_app: AppFactory, postgres_url: str
) -> None:
    app, db = make_app(
        postgres_url, SQLALCHEMY_ENGINE_OPTIONS={"pool_size": 1, "max_overflow": 0}
    )
    channel = f"staleguard_{time.monotonic_ns()}"
    with app.app_context():
        with db.engine.connect() as conn:
            pid = conn.execute(sa.text(PID)).scalar_one()
            conn.execute(sa.text(f"LISTEN {channel}"))
            conn.commit()
        # Idle in the pool, LISTENing: another session's NOTIFY makes it readable.
        with db.engine.connect() as conn:
            assert conn.execute(sa.text(PID)).scalar_one() == pid
        with raw_connect(postgres_url) as other:
            other.execute(f"NOTIFY {channel}, 'hello'")
        time.sleep(0.3)
        # The pooled connection's socket really is readable, with bytes no peek
        # can classify: the ping path, not the quiet path, is what is tested.
        record = db.engine.pool._pool.queue[0]  # type: ignore[attr-defined]
        verdict = record.info["staleguard.probe"].check()
        assert verdict is not None and verdict[0] == probe.UNKNOWN
        with db.engine.connect() as conn:
            assert conn.execute(sa.text(PID)).scalar_one() == pid
            conn.execute(sa.text(f"UNLISTEN {channel}"))
            conn.commit()
    assert replaced(app) == {}
