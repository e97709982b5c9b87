"""Stale pooled connections: the bug without the guard, and its absence with it.

All against the private MariaDB, whose timeouts these tests change.
"""

from __future__ import annotations

import contextlib
import time
import typing as t

import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_staleguard.core.guard import PoolGuard
from flask_staleguard.core.options import GuardOptions
from flask_staleguard.core.redact import Secrets
from tests.conftest import AppFactory
from tests.conftest import connection_id
from tests.conftest import is_gone_error
from tests.servers import MariaDBServer

POOL = {"pool_size": 4, "max_overflow": 0}


def add_query_route(app: Flask, db: SQLAlchemy) -> None:
    @app.route("/q")
    def query() -> str:
        return str(db.session.execute(sa.text("SELECT CONNECTION_ID()")).scalar_one())


def warm(app: Flask, db: SQLAlchemy, n: int = 4) -> set[int]:
    """Fill the pool with ``n`` distinct connections; return their server ids."""
    with app.app_context(), contextlib.ExitStack() as stack:
        conns = [stack.enter_context(db.engine.connect()) for _ in range(n)]
        return {
            int(c.execute(sa.text("SELECT CONNECTION_ID()")).scalar_one())
            for c in conns
        }


def request_ids(app: Flask, n: int) -> list[int]:
    client = app.test_client()
    ids = []
    for _ in range(n):
        response = client.get("/q")
        assert response.status_code == 200
        ids.append(int(response.text))
    return ids


def stats(app: Flask) -> dict[str, int]:
    replaced: dict[str, int] = app.extensions["staleguard"].binds[None].stats.replaced
    return replaced


def test_without_guard_the_bug_reproduces(
    make_app: AppFactory, short_timeout: MariaDBServer
) -> None:
    app, db = make_app(short_timeout.url, guard=False, SQLALCHEMY_ENGINE_OPTIONS=POOL)
    add_query_route(app, db)
    warm(app, db)
    time.sleep(3)
    with pytest.raises(sa.exc.OperationalError) as info:
        app.test_client().get("/q")
    assert is_gone_error(info.value)
    assert info.value.orig.args[0] in (2006, 2013)  # type: ignore[union-attr]


@pytest.mark.parametrize("strategy", ["off"])
def test_strategy_off_does_not_protect(
    make_app: AppFactory, short_timeout: MariaDBServer, strategy: str
) -> None:
    app, db = make_app(
        short_timeout.url, SQLALCHEMY_ENGINE_OPTIONS=POOL, STALEGUARD_STRATEGY=strategy
    )
    add_query_route(app, db)
    warm(app, db)
    time.sleep(3)
    with pytest.raises(sa.exc.OperationalError):
        app.test_client().get("/q")


@pytest.mark.parametrize("strategy", ["guard", "recycle", "pre_ping"])
def test_idle_past_wait_timeout_every_request_succeeds(
    make_app: AppFactory, short_timeout: MariaDBServer, strategy: str
) -> None:
    app, db = make_app(
        short_timeout.url, SQLALCHEMY_ENGINE_OPTIONS=POOL, STALEGUARD_STRATEGY=strategy
    )
    add_query_route(app, db)
    before = warm(app, db)
    time.sleep(3)
    after = request_ids(app, 8)
    assert not before & set(after)  # every stale connection was replaced
    if strategy == "guard":
        assert stats(app).get("idle_budget", 0) >= 1


def test_guard_budget_comes_from_the_session_timeout(
    make_app: AppFactory, short_timeout: MariaDBServer
) -> None:
    app, db = make_app(short_timeout.url, SQLALCHEMY_ENGINE_OPTIONS=POOL)
    bind = app.extensions["staleguard"].binds[None]
    assert bind.idle.server_timeout == 2
    assert bind.idle.seconds == pytest.approx(1.8)


def test_killed_idle_connections_are_replaced(
    make_app: AppFactory, mariadb: MariaDBServer
) -> None:
    app, db = make_app(mariadb.url, SQLALCHEMY_ENGINE_OPTIONS=POOL)
    add_query_route(app, db)
    before = warm(app, db)
    killed = mariadb.kill_connections()
    assert before <= set(killed)
    time.sleep(0.2)
    after = request_ids(app, 8)
    assert not before & set(after)
    replaced = stats(app)
    assert replaced.get("probe_eof", 0) + replaced.get("probe_reset", 0) >= 1
    assert "idle_budget" not in replaced


def test_without_guard_killed_connections_fail(
    make_app: AppFactory, mariadb: MariaDBServer
) -> None:
    app, db = make_app(mariadb.url, guard=False, SQLALCHEMY_ENGINE_OPTIONS=POOL)
    add_query_route(app, db)
    warm(app, db)
    mariadb.kill_connections()
    time.sleep(0.2)
    with pytest.raises(sa.exc.OperationalError):
        app.test_client().get("/q")


def test_server_restart_is_survived(
    make_app: AppFactory, mariadb: MariaDBServer
) -> None:
    app, db = make_app(mariadb.url, SQLALCHEMY_ENGINE_OPTIONS=POOL)
    add_query_route(app, db)
    before = warm(app, db)
    mariadb.restart()
    after = request_ids(app, 8)
    assert not before & set(after)


def test_idle_budget_alone_replaces_idle_keeps_busy(
    make_app: AppFactory, mariadb: MariaDBServer
) -> None:
    # Nothing closes connections here (wait_timeout 28800): only the budget acts.
    app, db = make_app(
        mariadb.url,
        SQLALCHEMY_ENGINE_OPTIONS={"pool_size": 1, "max_overflow": 0},
        STALEGUARD_IDLE_TIMEOUT=1.5,
        STALEGUARD_MARGIN=0,
    )
    with app.app_context():
        first = connection_id(db)
        busy = []
        for _ in range(8):  # 2.4 s of use, never 1.5 s idle
            time.sleep(0.3)
            busy.append(connection_id(db))
        assert set(busy) == {first}
        time.sleep(1.8)
        replaced = connection_id(db)
        assert replaced != first
        assert connection_id(db) == replaced
    assert stats(app) == {"idle_budget": 1}


def test_connection_pooled_before_the_guard_is_guarded_after_its_checkin(
    short_timeout: MariaDBServer,
) -> None:
    engine = sa.create_engine(short_timeout.url)
    try:
        with engine.connect() as conn:
            first = conn.execute(sa.text("SELECT CONNECTION_ID()")).scalar_one()
        bind = PoolGuard(
            None, "default", Secrets(engine.url), "mysql", GuardOptions(), 2
        )
        bind.attach(engine)
        with engine.connect() as conn:  # the guard knows nothing of it yet
            assert conn.execute(sa.text("SELECT CONNECTION_ID()")).scalar_one() == first
        time.sleep(3)
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT CONNECTION_ID()")).scalar_one() != first
        # Replaced for its idle time, not mistaken for a connection from a parent.
        assert bind.stats.replaced == {"idle_budget": 1}
    finally:
        engine.dispose()


@pytest.mark.parametrize("guard", [True, False])
def test_a_new_connection_killed_before_its_first_checkout(
    make_app: AppFactory, mariadb: MariaDBServer, guard: bool
) -> None:
    # KILLed right after its connect, before the app ever used it: it never
    # idled, but its socket already shows the FIN.
    app, db = make_app(mariadb.url, guard=guard, SQLALCHEMY_ENGINE_OPTIONS=POOL)
    add_query_route(app, db)
    killed: list[int] = []
    with app.app_context():
        engine = db.engine

    @sa.event.listens_for(engine, "connect")
    def kill_the_first(dbapi_connection: t.Any, record: t.Any) -> None:
        if not killed:
            killed.append(dbapi_connection.thread_id())
            mariadb.execute(f"KILL {killed[0]}")
            time.sleep(0.2)  # the FIN arrives

    if guard:
        (served,) = request_ids(app, 1)
        assert served != killed[0]
        assert app.extensions["staleguard"].guard.stats(app)["default"]["replaced"] == {
            "probe_eof": 1
        }
    else:
        with pytest.raises(sa.exc.OperationalError):
            app.test_client().get("/q")
