"""Real middleboxes between the app and the database, closing idle connections.

HAProxy (FIN), a proxy that resets (RST), PgBouncer before PostgreSQL, and a silent
drop, which only STALEGUARD_IDLE_TIMEOUT can catch. Every proxy a test starts is
stopped by its context manager, also when the test fails.
"""

from __future__ import annotations

import time
import typing as t

import pytest
import sqlalchemy as sa

from tests.helpers import add_route
from tests.helpers import AppFactory
from tests.helpers import MYSQL_ID
from tests.helpers import replaced
from tests.helpers import request_ids
from tests.helpers import warm
from tests.proxies import TcpProxy
from tests.servers import HAProxy
from tests.servers import MariaDBServer
from tests.servers import PgBouncer

POOL: dict[str, t.Any] = {"pool_size": 4, "max_overflow": 0}


# -- HAProxy: timeout client/server 2 s, closes idle connections with a FIN --------


@pytest.mark.parametrize("idle_timeout", [None, 2])
def test_haproxy_idle_close_is_survived(
    make_app: AppFactory, mariadb: MariaDBServer, idle_timeout: float | None
) -> None:
    with HAProxy(mariadb.host, mariadb.port, idle_timeout=2.0) as proxy:
        config: dict[str, t.Any] = {}
        if idle_timeout is not None:
            config["STALEGUARD_IDLE_TIMEOUT"] = idle_timeout
        app, db = make_app(
            proxy.url_for(mariadb.url), SQLALCHEMY_ENGINE_OPTIONS=POOL, **config
        )
        add_route(app, db, MYSQL_ID)
        warm(app, db, MYSQL_ID)
        time.sleep(3)
        request_ids(app)
        seen = replaced(app)
        if idle_timeout is None:  # nothing configured: the socket probe saw the FIN
            assert seen.get("probe_eof", 0) + seen.get("probe_reset", 0) >= 1, seen
        else:  # the budget (2 s - margin) acts first
            assert seen.get("idle_budget", 0) >= 1, seen


def test_haproxy_idle_close_fails_without_guard(
    make_app: AppFactory, mariadb: MariaDBServer
) -> None:
    with HAProxy(mariadb.host, mariadb.port, idle_timeout=2.0) as proxy:
        app, db = make_app(
            proxy.url_for(mariadb.url), guard=False, SQLALCHEMY_ENGINE_OPTIONS=POOL
        )
        add_route(app, db, MYSQL_ID)
        warm(app, db, MYSQL_ID)
        time.sleep(3)
        with pytest.raises(sa.exc.OperationalError):
            app.test_client().get("/q")


# -- A proxy that resets idle connections (RST) -------------------------------------


@pytest.mark.parametrize("guard", [True, False])
def test_proxy_idle_reset(
    make_app: AppFactory, mariadb: MariaDBServer, guard: bool
) -> None:
    with TcpProxy(mariadb.host, mariadb.port, idle_reset=1.5) as proxy:
        app, db = make_app(
            proxy.url_for(mariadb.url), guard=guard, SQLALCHEMY_ENGINE_OPTIONS=POOL
        )
        add_route(app, db, MYSQL_ID)
        warm(app, db, MYSQL_ID)
        time.sleep(2.5)
        if not guard:
            with pytest.raises(sa.exc.OperationalError):
                app.test_client().get("/q")
            return
        request_ids(app)
        seen = replaced(app)
        assert seen.get("probe_reset", 0) + seen.get("probe_eof", 0) >= 1, seen
        assert "idle_budget" not in seen


# -- PgBouncer (transaction pooling), client_idle_timeout=2 ------------------------

PG_POOL: dict[str, t.Any] = {
    **POOL,
    # PgBouncer in transaction mode and server-side prepared statements do not mix.
    "connect_args": {"prepare_threshold": None},
}


@pytest.mark.parametrize("guard", [True, False])
def test_pgbouncer_idle_close(
    make_app: AppFactory, postgres_url: str, guard: bool
) -> None:
    with PgBouncer(client_idle_timeout=2) as bouncer:
        app, db = make_app(bouncer.url, guard=guard, SQLALCHEMY_ENGINE_OPTIONS=PG_POOL)
        add_route(app, db, "SELECT 1")
        warm(app, db, "SELECT 1")
        time.sleep(3)
        if not guard:
            with pytest.raises(sa.exc.OperationalError):
                app.test_client().get("/q")
            return
        request_ids(app)
        assert sum(replaced(app).values()) >= 1


# -- Silent drop: no FIN, no RST; only the idle budget can tell ---------------------

DROP_POOL: dict[str, t.Any] = {
    **POOL,
    # A dropped connection never answers: fail the control case in 2 s, not never.
    "connect_args": {"read_timeout": 2, "write_timeout": 2},
}


def test_silent_drop_is_caught_by_the_idle_budget(
    make_app: AppFactory, mariadb: MariaDBServer
) -> None:
    # The path goes silent right after the pool is filled, not on the proxy's own
    # idle timer: on a loaded machine, filling the pool could outlast that timer.
    with TcpProxy(mariadb.host, mariadb.port) as proxy:
        app, db = make_app(
            proxy.url_for(mariadb.url),
            SQLALCHEMY_ENGINE_OPTIONS=DROP_POOL,
            STALEGUARD_IDLE_TIMEOUT=1.5,
        )
        add_route(app, db, MYSQL_ID)
        warm(app, db, MYSQL_ID)
        assert proxy.drop_all() == POOL["pool_size"]
        time.sleep(2.5)  # idle past the budget: the time the guard must see pass
        # A request on a dropped connection fails with 2013 after read_timeout:
        # every one succeeding means none was handed a dead socket.
        request_ids(app)
        assert replaced(app).get("idle_budget", 0) >= 1


@pytest.mark.parametrize("strategy", ["guard", "off"])
def test_silent_drop_without_idle_timeout_fails(
    make_app: AppFactory, mariadb: MariaDBServer, strategy: str
) -> None:
    with TcpProxy(mariadb.host, mariadb.port) as proxy:
        app, db = make_app(
            proxy.url_for(mariadb.url),
            SQLALCHEMY_ENGINE_OPTIONS=DROP_POOL,
            STALEGUARD_STRATEGY=strategy,
        )
        add_route(app, db, MYSQL_ID)
        warm(app, db, MYSQL_ID)
        assert proxy.drop_all() == POOL["pool_size"]
        time.sleep(2.5)
        started = time.monotonic()
        with pytest.raises(sa.exc.OperationalError) as info:
            app.test_client().get("/q")
        assert info.value.orig.args[0] in (2006, 2013)  # type: ignore[union-attr]
        assert time.monotonic() - started >= 1.5  # it hung until read_timeout
        assert replaced(app) == {}
