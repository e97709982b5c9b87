"""The guard with other drivers: mysqlclient, and psycopg2 for PostgreSQL."""

from __future__ import annotations

import importlib
import time

import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from tests.helpers import AppFactory
from tests.helpers import replaced
from tests.servers import MariaDBServer
from tests.servers import PostgresServer

MYSQL_ID = sa.text("SELECT CONNECTION_ID()")
POSTGRES_ID = sa.text("SELECT pg_backend_pid()")


def _ids(
    app: Flask, db: SQLAlchemy, n: int, query: sa.TextClause = MYSQL_ID
) -> list[int]:
    """The server-side ids of ``n`` checkouts, one after the other."""
    out = []
    with app.app_context():
        for _ in range(n):
            with db.engine.connect() as conn:
                out.append(int(conn.execute(query).scalar_one()))
    return out


@pytest.fixture()
def mysqldb_url(mariadb: MariaDBServer) -> str:
    # Not importorskip: tox installs mysqlclient, and a skipped test proves nothing.
    import MySQLdb  # noqa: F401

    return mariadb.url.replace("mysql+pymysql://", "mysql+mysqldb://")


def test_mysqlclient_killed_and_timed_out_connections_are_replaced(
    make_app: AppFactory, mariadb: MariaDBServer, mysqldb_url: str
) -> None:
    app, db = make_app(
        mysqldb_url,
        SQLALCHEMY_ENGINE_OPTIONS={"pool_size": 1, "max_overflow": 0},
        STALEGUARD_SERVER_TIMEOUT=28800,  # only the socket probe can act
    )
    first = _ids(app, db, 2)
    assert first[0] == first[1]
    mariadb.execute(f"KILL {first[0]}")
    time.sleep(0.3)
    second = _ids(app, db, 1)[0]
    assert second != first[0]
    seen = replaced(app)
    assert sum(seen.values()) == 1
    assert "idle_budget" not in seen


def test_mysqlclient_without_guard_fails(
    make_app: AppFactory, mariadb: MariaDBServer, mysqldb_url: str
) -> None:
    app, db = make_app(
        mysqldb_url,
        guard=False,
        SQLALCHEMY_ENGINE_OPTIONS={"pool_size": 1, "max_overflow": 0},
    )
    first = _ids(app, db, 1)[0]
    mariadb.execute(f"KILL {first}")
    time.sleep(0.3)
    with pytest.raises(sa.exc.OperationalError):
        _ids(app, db, 1)


@pytest.fixture()
def psycopg2_url(postgres: PostgresServer) -> str:
    # Not importorskip: tox installs psycopg2-binary, and a skip proves nothing.
    importlib.import_module("psycopg2")
    return postgres.url.replace("postgresql+psycopg://", "postgresql+psycopg2://")


def test_psycopg2_terminated_backend_is_replaced_only_with_the_guard(
    make_app: AppFactory, postgres: PostgresServer, psycopg2_url: str
) -> None:
    one = {"pool_size": 1, "max_overflow": 0}
    guarded, guarded_db = make_app(
        psycopg2_url,
        SQLALCHEMY_ENGINE_OPTIONS={
            **one,
            "connect_args": {"application_name": "staleguard-psycopg2-guarded"},
        },
        STALEGUARD_SERVER_TIMEOUT=28800,  # only the socket probe can act
    )
    unguarded, unguarded_db = make_app(
        psycopg2_url,
        guard=False,
        SQLALCHEMY_ENGINE_OPTIONS={
            **one,
            "connect_args": {"application_name": "staleguard-psycopg2-unguarded"},
        },
    )
    with guarded.app_context():
        assert guarded_db.engine.dialect.driver == "psycopg2"
    first = _ids(guarded, guarded_db, 2, POSTGRES_ID)
    assert first[0] == first[1]
    control = _ids(unguarded, unguarded_db, 1, POSTGRES_ID)[0]
    # Waits until the backends have exited: their sockets are closed by now.
    killed = postgres.terminate_backends(application_name="staleguard-psycopg2-guarded")
    assert killed == [first[0]]
    killed = postgres.terminate_backends(
        application_name="staleguard-psycopg2-unguarded"
    )
    assert killed == [control]

    with pytest.raises(sa.exc.OperationalError):
        _ids(unguarded, unguarded_db, 1, POSTGRES_ID)

    second = _ids(guarded, guarded_db, 1, POSTGRES_ID)[0]
    assert second != first[0]
    seen = replaced(guarded)
    assert sum(seen.values()) == 1
    assert "idle_budget" not in seen
    assert all(reason.startswith("probe_") for reason in seen)
