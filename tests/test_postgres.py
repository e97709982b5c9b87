"""PostgreSQL: idle_session_timeout, terminated backends, restarts, and NOTIFY.

Reading tests use the shared server, changing nothing global: the short timeout is
set per session through ``options``. Tests that terminate backends or restart the
server use the session's private PostgreSQL (the ``postgres`` fixture).
"""

from __future__ import annotations

import time
import typing as t

import psycopg
import pytest
import sqlalchemy as sa
from flask import Flask

from flask_staleguard.core import probe
from flask_staleguard.core.checkout import STATE
from tests.helpers import add_route
from tests.helpers import AppFactory
from tests.helpers import pool_json
from tests.helpers import POSTGRES_ID as PID
from tests.helpers import replaced
from tests.helpers import request_ids
from tests.helpers import warm
from tests.servers import PostgresServer

POOL: dict[str, t.Any] = {"pool_size": 4, "max_overflow": 0}
SHORT: dict[str, t.Any] = {
    **POOL,
    "connect_args": {"options": "-c idle_session_timeout=2000"},
}
#: On the private server, each app's backends are told apart by application_name.
GUARDED = "staleguard-guarded"
UNGUARDED = "staleguard-unguarded"


def pool_as(application_name: str) -> dict[str, t.Any]:
    return {**POOL, "connect_args": {"application_name": application_name}}


def raw_connect(postgres_url: str) -> psycopg.Connection[t.Any]:
    url = sa.make_url(postgres_url)
    return psycopg.connect(
        host=url.host,
        port=url.port or 5432,
        user=url.username,
        dbname=url.database,
        autocommit=True,
    )


def test_budget_is_derived_from_idle_session_timeout(
    make_app: AppFactory, postgres_url: str
) -> None:
    app, _ = make_app(postgres_url, SQLALCHEMY_ENGINE_OPTIONS=SHORT)
    pool = pool_json(app)
    assert (pool["server_timeout"], pool["server_timeout_source"]) == (2, "server")
    assert pool["idle_budget"] == pytest.approx(1.8)


def test_idle_session_timeout_is_survived(
    make_app: AppFactory, postgres_url: str
) -> None:
    app, db = make_app(postgres_url, SQLALCHEMY_ENGINE_OPTIONS=SHORT)
    add_route(app, db, PID)
    before = warm(app, db, PID)
    time.sleep(3)
    assert not before & set(request_ids(app))
    assert replaced(app).get("idle_budget", 0) >= 1


def test_idle_session_timeout_fails_without_guard(
    make_app: AppFactory, postgres_url: str
) -> None:
    app, db = make_app(postgres_url, guard=False, SQLALCHEMY_ENGINE_OPTIONS=SHORT)
    add_route(app, db, PID)
    warm(app, db, PID)
    time.sleep(3)
    with pytest.raises(sa.exc.OperationalError):
        app.test_client().get("/q")


def probe_only(app: Flask) -> bool:
    """Whether every replacement was the socket probe's doing."""
    return all(reason.startswith("probe_") for reason in replaced(app))


@pytest.mark.parametrize("guard", [True, False])
def test_terminated_idle_backends(
    make_app: AppFactory, postgres: PostgresServer, guard: bool
) -> None:
    name = GUARDED if guard else UNGUARDED
    app, db = make_app(
        postgres.url, guard=guard, SQLALCHEMY_ENGINE_OPTIONS=pool_as(name)
    )
    add_route(app, db, PID)
    before = warm(app, db, PID)
    # Waits until the backends have exited: their sockets are closed by now.
    assert set(postgres.terminate_backends(application_name=name)) == before
    if not guard:
        with pytest.raises(sa.exc.OperationalError):
            app.test_client().get("/q")
        return
    assert not before & set(request_ids(app))
    assert sum(replaced(app).values()) >= 1
    assert "idle_budget" not in replaced(app)
    assert probe_only(app)


def test_restart_is_survived_only_with_the_guard(
    make_app: AppFactory, postgres: PostgresServer
) -> None:
    guarded, guarded_db = make_app(
        postgres.url,
        SQLALCHEMY_ENGINE_OPTIONS=pool_as(GUARDED),
        STALEGUARD_SERVER_TIMEOUT=28800,  # only the socket probe can act
    )
    unguarded, unguarded_db = make_app(
        postgres.url, guard=False, SQLALCHEMY_ENGINE_OPTIONS=pool_as(UNGUARDED)
    )
    add_route(guarded, guarded_db, PID)
    add_route(unguarded, unguarded_db, PID)
    before = warm(guarded, guarded_db, PID)
    warm(unguarded, unguarded_db, PID)
    old_postmaster = postgres.pid
    # A fast shutdown terminates every backend; the port stays the same.
    postgres.restart()
    assert postgres.pid != old_postmaster
    with pytest.raises(sa.exc.OperationalError):
        unguarded.test_client().get("/q")
    after = set(request_ids(guarded))
    assert after and not before & after
    assert sum(replaced(guarded).values()) == len(before)
    assert "idle_budget" not in replaced(guarded)
    assert probe_only(guarded)


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
        # (About internals: the pool's queue and the guard's per-connection
        # probe, read to prove the precondition; no public API shows them.)
        record = db.engine.pool._pool.queue[0]  # type: ignore[attr-defined]
        verdict = record.info[STATE].probe.check()
        assert verdict is not None and verdict[0] == probe.UNKNOWN
        with db.engine.connect() as conn:
            assert conn.execute(sa.text(PID)).scalar_one() == pid
            conn.execute(sa.text(f"UNLISTEN {channel}"))
            conn.commit()
    assert replaced(app) == {}
