"""A writer demoted to read-only: the pool leaves it after at most one failure.

Two private servers of each kind stand for the old and the new writer, behind a
TCP proxy that sends new connections where it is told, and leaves established
sessions where they are (as HAProxy does when its backend is switched).
"""

from __future__ import annotations

import logging
import threading
import typing as t
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_staleguard.core.checkout import STATE
from flask_staleguard.core.disconnects import failover_label
from tests.helpers import AppFactory
from tests.helpers import failed_writes
from tests.helpers import stats
from tests.proxies import TcpProxy
from tests.servers import MariaDBServer
from tests.servers import PostgresServer

POOL = {"pool_size": 5, "max_overflow": 0}
WRITES = 50
CREATE = "CREATE TABLE IF NOT EXISTS moves (id SERIAL PRIMARY KEY, port INT)"


@pytest.fixture(scope="module")
def new_mariadb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MariaDBServer]:
    """The writer a failover promotes."""
    with MariaDBServer(tmp_path_factory.mktemp("new-writer")) as server:
        yield server


@pytest.fixture(scope="module")
def new_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    with PostgresServer(tmp_path_factory.mktemp("new-pg-writer")) as server:
        yield server


@pytest.fixture()
def old_mariadb(mariadb: MariaDBServer) -> Iterator[MariaDBServer]:
    """The writer a failover demotes: the private MariaDB, writable again after."""
    yield mariadb
    mariadb.execute("SET GLOBAL read_only = 0")


def _proxy_to(server: MariaDBServer | PostgresServer) -> Iterator[TcpProxy]:
    proxy = TcpProxy(server.host, server.port)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture()
def mariadb_proxy(old_mariadb: MariaDBServer) -> Iterator[TcpProxy]:
    yield from _proxy_to(old_mariadb)


@pytest.fixture()
def postgres_proxy(postgres: PostgresServer) -> Iterator[TcpProxy]:
    yield from _proxy_to(postgres)


def _writing_app(
    make_app: AppFactory, url: str, guard: bool, **config: t.Any
) -> tuple[Flask, SQLAlchemy]:
    """An app whose ``POST /w`` inserts a row naming the server's port."""
    app, db = make_app(url, guard=guard, SQLALCHEMY_ENGINE_OPTIONS=POOL, **config)
    port = "@@port" if url.startswith("mysql") else "current_setting('port')::int"

    @app.post("/w")
    def write() -> str:
        db.session.execute(sa.text(f"INSERT INTO moves (port) SELECT {port}"))
        db.session.commit()
        return "ok"

    with app.app_context():
        # Fill the pool: every connection goes to the old writer.
        with db.engine.connect() as first:
            others = [db.engine.connect() for _ in range(POOL["pool_size"] - 1)]
            first.execute(sa.text("SELECT 1"))
            for conn in others:
                conn.execute(sa.text("SELECT 1"))
                conn.close()
    return app, db


def _rows_on(server: MariaDBServer | PostgresServer) -> int:
    return int(server.execute("SELECT count(*) FROM moves")[0][0])


def _fail_over_mariadb(old: MariaDBServer, new: MariaDBServer, proxy: TcpProxy) -> None:
    old.execute("SET GLOBAL read_only = 1")
    proxy.target_port = new.port


@pytest.mark.parametrize("guard", [True, False], ids=["guard", "bare"])
def test_mariadb_failover_costs_at_most_one_write(
    make_app: AppFactory,
    old_mariadb: MariaDBServer,
    new_mariadb: MariaDBServer,
    mariadb_proxy: TcpProxy,
    caplog: pytest.LogCaptureFixture,
    guard: bool,
) -> None:
    old_mariadb.execute(CREATE)
    new_mariadb.execute(CREATE)
    before = _rows_on(new_mariadb)
    app, _ = _writing_app(make_app, mariadb_proxy.url_for(old_mariadb.user_url), guard)
    caplog.set_level(logging.WARNING, logger="flask_staleguard")
    _fail_over_mariadb(old_mariadb, new_mariadb, mariadb_proxy)
    failed = failed_writes(app, WRITES)
    print(f"MariaDB failover, guard={guard}: {failed} of {WRITES} writes failed")
    if not guard:
        # Without the guard the pool keeps every session on the old writer.
        assert failed == WRITES
        return
    assert failed <= 1
    assert _rows_on(new_mariadb) - before == WRITES - failed
    assert stats(app)["disconnects"] == {"read_only": 1}
    said = [r.getMessage() for r in caplog.records if "failover" in r.getMessage()]
    assert said == [
        "bind default: the server became read-only (failover?): pool invalidated"
    ]


def _role(app: Flask, db: SQLAlchemy) -> bool | None:
    """What a new pooled connection learnt of its node's role when it was opened."""
    with app.app_context():
        db.engine.dispose()
        with db.engine.connect() as conn:
            return t.cast("bool | None", conn.connection.info[STATE].read_only)


def test_each_new_connection_learns_its_nodes_role(
    make_app: AppFactory,
    old_mariadb: MariaDBServer,
    postgres: PostgresServer,
) -> None:
    mysql = make_app(old_mariadb.user_url)
    pg = make_app(postgres.url)
    assert (_role(*mysql), _role(*pg)) == (False, False)
    old_mariadb.execute("SET GLOBAL read_only = 1")
    postgres.alter_system("default_transaction_read_only", "on")
    assert (_role(*mysql), _role(*pg)) == (True, True)


def test_a_replica_bind_is_left_alone(
    make_app: AppFactory, old_mariadb: MariaDBServer, mariadb_proxy: TcpProxy
) -> None:
    # Connections opened to a read-only node: their refusals are the app's to
    # handle, and the pool keeps them.
    old_mariadb.execute(CREATE)
    old_mariadb.execute("SET GLOBAL read_only = 1")
    app, db = _writing_app(make_app, mariadb_proxy.url_for(old_mariadb.user_url), True)
    seen = mariadb_proxy.connections_seen
    assert failed_writes(app, WRITES) == WRITES
    assert mariadb_proxy.connections_seen == seen
    assert stats(app)["disconnects"] == {}


@pytest.mark.parametrize("role", ["auto", "writer"])
def test_new_connections_wait_for_the_new_writer(
    make_app: AppFactory,
    old_mariadb: MariaDBServer,
    new_mariadb: MariaDBServer,
    mariadb_proxy: TcpProxy,
    role: str,
) -> None:
    # A stale DNS answer or a slow proxy: for a second after the demotion, new
    # connections still reach the old writer.
    old_mariadb.execute(CREATE)
    new_mariadb.execute(CREATE)
    before = _rows_on(new_mariadb)
    url = mariadb_proxy.url_for(old_mariadb.user_url)
    app, _ = _writing_app(make_app, url, True, STALEGUARD_ROLE=role)
    old_mariadb.execute("SET GLOBAL read_only = 1")
    move = threading.Timer(
        1.0, setattr, (mariadb_proxy, "target_port", new_mariadb.port)
    )
    move.start()
    try:
        failed = failed_writes(app, WRITES)
    finally:
        move.cancel()
    print(f"MariaDB failover, new connections late, role={role}: {failed} failed")
    assert failed <= 1
    assert _rows_on(new_mariadb) - before == WRITES - failed
    assert stats(app)["outages"] >= 1  # the old node was turned down, then left


def test_a_writer_bind_takes_a_read_only_node_when_no_writer_comes(
    make_app: AppFactory, old_mariadb: MariaDBServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Never worse than no guard: reads still work on the read-only node.
    old_mariadb.execute("SET GLOBAL read_only = 1")
    app, db = make_app(
        old_mariadb.user_url, STALEGUARD_ROLE="writer", STALEGUARD_CONNECT_WAIT=1
    )
    caplog.set_level(logging.WARNING, logger="flask_staleguard")
    with app.app_context():
        assert db.session.execute(sa.text("SELECT 1")).scalar_one() == 1
    said = [r.getMessage() for r in caplog.records]
    assert (
        "bind default: no writer within the connect wait (STALEGUARD_CONNECT_WAIT):"
        " a read-only node is taken"
    ) in said
    assert stats(app)["outages"] == 1


def test_role_any_leaves_refusals_to_the_app(
    make_app: AppFactory,
    old_mariadb: MariaDBServer,
    new_mariadb: MariaDBServer,
    mariadb_proxy: TcpProxy,
) -> None:
    old_mariadb.execute(CREATE)
    url = mariadb_proxy.url_for(old_mariadb.user_url)
    app, _ = _writing_app(make_app, url, True, STALEGUARD_ROLE="any")
    _fail_over_mariadb(old_mariadb, new_mariadb, mariadb_proxy)
    assert failed_writes(app, WRITES) == WRITES
    assert stats(app)["disconnects"] == {}


def test_a_read_only_transaction_of_the_app_is_not_a_failover(
    make_app: AppFactory, old_mariadb: MariaDBServer, mariadb_proxy: TcpProxy
) -> None:
    old_mariadb.execute(CREATE)
    app, db = _writing_app(make_app, mariadb_proxy.url_for(old_mariadb.user_url), True)
    with app.app_context(), db.engine.connect() as conn:
        cid = conn.execute(sa.text("SELECT CONNECTION_ID()")).scalar_one()
        conn.execute(sa.text("SET TRANSACTION READ ONLY"))
        with pytest.raises(sa.exc.DBAPIError) as info:
            conn.execute(sa.text("INSERT INTO moves (port) VALUES (0)"))
        assert info.value.orig.args[0] == 1792  # type: ignore[union-attr]
        assert not info.value.connection_invalidated
        conn.rollback()
        assert conn.execute(sa.text("SELECT CONNECTION_ID()")).scalar_one() == cid
    assert stats(app)["disconnects"] == {}


@pytest.mark.parametrize("guard", [True, False], ids=["guard", "bare"])
def test_postgres_failover_costs_at_most_one_write(
    make_app: AppFactory,
    postgres: PostgresServer,
    new_postgres: PostgresServer,
    postgres_proxy: TcpProxy,
    guard: bool,
) -> None:
    postgres.execute(CREATE)
    new_postgres.execute(CREATE)
    before = _rows_on(postgres) + _rows_on(new_postgres)
    app, _ = _writing_app(make_app, postgres_proxy.url_for(postgres.url), guard)
    postgres.alter_system("default_transaction_read_only", "on")
    postgres_proxy.target_port = new_postgres.port
    failed = failed_writes(app, WRITES)
    print(f"PostgreSQL failover, guard={guard}: {failed} of {WRITES} writes failed")
    if not guard:
        # A backend applies the reload when its signal arrives: under load, the
        # first write on a pooled connection may still pass. The rest fail.
        assert failed >= WRITES - POOL["pool_size"]
        return
    assert failed <= 1
    # Each backend reads the reloaded setting when its signal arrives: under
    # load, a first write may still land on the old writer, and succeed.
    assert _rows_on(postgres) + _rows_on(new_postgres) - before == WRITES - failed
    assert stats(app)["disconnects"] == {"read_only": 1}


def test_a_read_only_transaction_on_postgres_is_not_a_failover(
    make_app: AppFactory, postgres: PostgresServer, postgres_proxy: TcpProxy
) -> None:
    postgres.execute(CREATE)
    app, db = _writing_app(make_app, postgres_proxy.url_for(postgres.url), True)
    with app.app_context(), db.engine.connect() as conn:
        pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        conn.execute(sa.text("SET TRANSACTION READ ONLY"))
        with pytest.raises(sa.exc.DBAPIError) as info:
            conn.execute(sa.text("INSERT INTO moves (port) VALUES (0)"))
        assert info.value.orig.sqlstate == "25006"  # type: ignore[union-attr]
        assert not info.value.connection_invalidated
        conn.rollback()
        assert conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one() == pid
    assert stats(app)["disconnects"] == {}


class _Error(Exception):
    def __init__(self, *args: t.Any, sqlstate: str | None = None) -> None:
        super().__init__(*args)
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("error", "kind", "label"),
    [
        (
            _Error(1290, "The MariaDB server is running with the --read-only option"),
            "mysql",
            "read_only",
        ),
        (_Error(1290, "... --super-read-only option ..."), "mysql", "read_only"),
        (_Error(1290, "... the --secure-file-priv option ..."), "mysql", None),
        (_Error(1836, "Running in read-only mode"), "mysql", "read_only"),
        (
            _Error(1792, "Cannot execute statement in a READ ONLY transaction"),
            "mysql",
            None,
        ),
        (
            _Error(1047, "WSREP has not yet prepared node for application use"),
            "mysql",
            "wsrep_not_ready",
        ),
        (_Error(1047, "Unknown command"), "mysql", None),
        (_Error("cannot execute INSERT", sqlstate="25006"), "postgresql", "read_only"),
        (_Error("syntax", sqlstate="42601"), "postgresql", None),
        (_Error(1290, "--read-only"), "sqlite", None),
    ],
)
def test_failover_labels(error: BaseException, kind: str, label: str | None) -> None:
    assert failover_label(error, kind) == label
