"""Stale pooled connections: the bug without the guard, and its absence with it.

All against the private MariaDB, whose timeouts these tests change.
"""

from __future__ import annotations

import time
import typing as t

import pytest
import sqlalchemy as sa

from flask_staleguard.core.guard import PoolGuard
from flask_staleguard.core.options import GuardOptions
from flask_staleguard.core.redact import Secrets
from tests.helpers import add_route
from tests.helpers import AppFactory
from tests.helpers import engine_connection_id
from tests.helpers import FakeClock
from tests.helpers import is_gone_error
from tests.helpers import outlive
from tests.helpers import pool_json
from tests.helpers import replaced
from tests.helpers import request_ids
from tests.helpers import warm
from tests.servers import MariaDBServer

POOL = {"pool_size": 4, "max_overflow": 0}


def test_without_guard_the_bug_reproduces(
    make_app: AppFactory, short_timeout: MariaDBServer
) -> None:
    app, db = make_app(short_timeout.url, guard=False, SQLALCHEMY_ENGINE_OPTIONS=POOL)
    add_route(app, db)
    outlive(short_timeout, warm(app, db))
    with pytest.raises(sa.exc.OperationalError) as info:
        app.test_client().get("/q")
    assert is_gone_error(info.value)
    assert info.value.orig.args[0] in (2006, 2013)  # type: ignore[union-attr]


def test_strategy_off_does_not_protect(
    make_app: AppFactory, short_timeout: MariaDBServer
) -> None:
    app, db = make_app(
        short_timeout.url, SQLALCHEMY_ENGINE_OPTIONS=POOL, STALEGUARD_STRATEGY="off"
    )
    add_route(app, db)
    outlive(short_timeout, warm(app, db))
    with pytest.raises(sa.exc.OperationalError):
        app.test_client().get("/q")


@pytest.mark.parametrize("strategy", ["guard", "recycle", "pre_ping"])
def test_idle_past_wait_timeout_every_request_succeeds(
    make_app: AppFactory, short_timeout: MariaDBServer, strategy: str
) -> None:
    app, db = make_app(
        short_timeout.url, SQLALCHEMY_ENGINE_OPTIONS=POOL, STALEGUARD_STRATEGY=strategy
    )
    add_route(app, db)
    before = warm(app, db)
    outlive(short_timeout, before)
    after = request_ids(app, 8)
    assert not before & set(after)  # every stale connection was replaced
    if strategy == "guard":
        assert replaced(app).get("idle_budget", 0) >= 1


def test_guard_budget_comes_from_the_session_timeout(
    make_app: AppFactory, short_timeout: MariaDBServer
) -> None:
    app, db = make_app(short_timeout.url, SQLALCHEMY_ENGINE_OPTIONS=POOL)
    pool = pool_json(app)
    assert (pool["server_timeout"], pool["server_timeout_source"]) == (2, "server")
    assert pool["idle_budget"] == pytest.approx(1.8)


def test_killed_idle_connections_are_replaced(
    make_app: AppFactory, mariadb: MariaDBServer
) -> None:
    app, db = make_app(mariadb.url, SQLALCHEMY_ENGINE_OPTIONS=POOL)
    add_route(app, db)
    before = warm(app, db)
    killed = mariadb.kill_connections()
    assert before <= set(killed)
    time.sleep(0.2)
    after = request_ids(app, 8)
    assert not before & set(after)
    seen = replaced(app)
    assert seen.get("probe_eof", 0) + seen.get("probe_reset", 0) >= 1
    assert "idle_budget" not in seen


def test_without_guard_killed_connections_fail(
    make_app: AppFactory, mariadb: MariaDBServer
) -> None:
    app, db = make_app(mariadb.url, guard=False, SQLALCHEMY_ENGINE_OPTIONS=POOL)
    add_route(app, db)
    warm(app, db)
    mariadb.kill_connections()
    time.sleep(0.2)
    with pytest.raises(sa.exc.OperationalError):
        app.test_client().get("/q")


def test_server_restart_is_survived(
    make_app: AppFactory, mariadb: MariaDBServer
) -> None:
    app, db = make_app(mariadb.url, SQLALCHEMY_ENGINE_OPTIONS=POOL)
    add_route(app, db)
    before = warm(app, db)
    mariadb.restart()
    after = request_ids(app, 8)
    assert not before & set(after)


def test_idle_budget_alone_replaces_idle_keeps_busy(mariadb_url: str) -> None:
    # Nothing closes connections here (wait_timeout 28800): only the budget acts,
    # and its time is a fake clock's. The guard on a real Flask app beating a
    # real server's timer is test_idle_past_wait_timeout_every_request_succeeds.
    clock = FakeClock()
    engine = sa.create_engine(mariadb_url, pool_size=1, max_overflow=0)
    try:
        guard = PoolGuard(
            None,
            "default",
            Secrets(engine.url),
            "mysql",
            GuardOptions(idle_timeout=1.5, margin=0),
            28800,
            clock=clock,
        )
        guard.attach(engine)
        first = engine_connection_id(engine)
        busy = []
        for _ in range(8):  # 2.4 s of use, never 1.5 s idle
            clock.advance(0.3)
            busy.append(engine_connection_id(engine))
        assert set(busy) == {first}
        clock.advance(1.6)
        fresh = engine_connection_id(engine)
        assert fresh != first
        assert engine_connection_id(engine) == fresh
        assert guard.stats.snapshot()["replaced"] == {"idle_budget": 1}
    finally:
        engine.dispose()


def test_connection_pooled_before_the_guard_is_guarded_after_its_checkin(
    mariadb_url: str,
) -> None:
    clock = FakeClock()
    engine = sa.create_engine(mariadb_url)
    try:
        first = engine_connection_id(engine)
        bind = PoolGuard(
            None,
            "default",
            Secrets(engine.url),
            "mysql",
            GuardOptions(),
            2,
            clock=clock,
        )
        bind.attach(engine)
        assert engine_connection_id(engine) == first  # the guard knew nothing of it
        clock.advance(3)
        assert engine_connection_id(engine) != first
        # Replaced for its idle time, not mistaken for a connection from a parent.
        assert bind.stats.snapshot()["replaced"] == {"idle_budget": 1}
    finally:
        engine.dispose()


def kill_the_next_connection(
    engine: sa.engine.Engine, mariadb: MariaDBServer
) -> list[int]:
    """KILL the next connection ``engine`` opens, right after its connect; the
    list returned gets its id.
    """
    killed: list[int] = []

    @sa.event.listens_for(engine, "connect")
    def kill_it(dbapi_connection: t.Any, record: t.Any) -> None:
        if not killed:
            killed.append(dbapi_connection.thread_id())
            mariadb.execute(f"KILL {killed[0]}")
            time.sleep(0.2)  # the FIN arrives

    return killed


@pytest.mark.parametrize("guard", [True, False])
def test_a_new_connection_killed_before_its_first_checkout(
    make_app: AppFactory, mariadb: MariaDBServer, guard: bool
) -> None:
    # KILLed right after its connect, before the app ever used it: it never
    # idled, but its socket already shows the FIN.
    app, db = make_app(mariadb.url, guard=guard, SQLALCHEMY_ENGINE_OPTIONS=POOL)
    add_route(app, db)
    with app.app_context():
        killed = kill_the_next_connection(db.engine, mariadb)

    if guard:
        (served,) = request_ids(app, 1)
        assert served != killed[0]
        assert replaced(app) == {"probe_eof": 1}
    else:
        with pytest.raises(sa.exc.OperationalError):
            app.test_client().get("/q")


def test_a_replacement_lost_too_fails_with_the_drivers_error(
    make_app: AppFactory, mariadb: MariaDBServer, guard_log: t.Any
) -> None:
    # A stale connection is replaced, and its replacement is KILLed before its
    # first checkout too (a restart in progress). SQLAlchemy retries a checkout
    # only once: a second rejection would fail it with "This connection is
    # closed". The guard hands the second one over instead, and the app gets
    # the driver's own disconnect error, as it would without the guard.
    app, db = make_app(mariadb.url, SQLALCHEMY_ENGINE_OPTIONS=POOL)
    add_route(app, db)
    (first,) = request_ids(app, 1)
    with app.app_context():
        killed = kill_the_next_connection(db.engine, mariadb)

    mariadb.execute(f"KILL {first}")
    time.sleep(0.2)
    with pytest.raises(sa.exc.OperationalError) as failed:
        app.test_client().get("/q")
    assert is_gone_error(failed.value)
    assert replaced(app) == {"probe_eof": 1}
    said = [r for r in guard_log.records if "is handed over" in r.getMessage()]
    assert len(said) == 1
    (served,) = request_ids(app, 1)  # the pool recovers at once
    assert served not in (first, killed[0])
