"""Shared fixtures: real servers, and a factory for Flask apps with the guard."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import typing as t
from collections.abc import Iterator
from pathlib import Path

import pymysql
import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_staleguard import StaleGuard
from tests.servers import MariaDBServer
from tests.servers import PostgresServer

#: The machine's shared MariaDB: read-only use; never change its globals or KILL.
SHARED_MARIADB_URL = os.environ.get(
    "STALEGUARD_TEST_MARIADB", "mysql+pymysql://root@127.0.0.1:3306/test"
)
#: The machine's shared PostgreSQL (trust auth).
SHARED_POSTGRES_URL = os.environ.get(
    "STALEGUARD_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def _reachable(url: str) -> str | None:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect():
            return None
    except Exception as e:
        return str(e)
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def mariadb_url() -> str:
    """The shared MariaDB. A test that needs it fails, never skips, without it."""
    error = _reachable(SHARED_MARIADB_URL)
    if error:
        pytest.fail(f"shared MariaDB at {SHARED_MARIADB_URL} unreachable: {error}")
    return SHARED_MARIADB_URL


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The shared PostgreSQL. A test that needs it fails, never skips, without it."""
    error = _reachable(SHARED_POSTGRES_URL)
    if error:
        pytest.fail(f"shared PostgreSQL at {SHARED_POSTGRES_URL} unreachable: {error}")
    return SHARED_POSTGRES_URL


@pytest.fixture(scope="session")
def private_mariadb(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[MariaDBServer]:
    """A MariaDB of the test session's own: tests may change globals, KILL, restart."""
    with MariaDBServer(tmp_path_factory.mktemp("mariadb")) as server:
        yield server


@pytest.fixture()
def mariadb(private_mariadb: MariaDBServer) -> Iterator[MariaDBServer]:
    """The private MariaDB, running and with its default timeouts restored after."""
    if not private_mariadb.running:
        private_mariadb.start()
    yield private_mariadb
    if not private_mariadb.running:
        private_mariadb.start()
    private_mariadb.set_global("wait_timeout", 28800)
    private_mariadb.set_global("interactive_timeout", 28800)


@pytest.fixture()
def short_timeout(mariadb: MariaDBServer) -> MariaDBServer:
    """The private MariaDB with ``wait_timeout=2`` for every new connection."""
    mariadb.set_global("wait_timeout", 2)
    return mariadb


@pytest.fixture(scope="session")
def private_postgres(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[PostgresServer]:
    """A PostgreSQL of the test session's own: tests may terminate, restart, kill."""
    with PostgresServer(tmp_path_factory.mktemp("postgres")) as server:
        yield server


@pytest.fixture()
def postgres(private_postgres: PostgresServer) -> Iterator[PostgresServer]:
    """The private PostgreSQL, running, with ALTER SYSTEM settings reset after."""
    if not private_postgres.running:
        private_postgres.start()
    yield private_postgres
    if not private_postgres.running:
        private_postgres.start()
    private_postgres.execute("ALTER SYSTEM RESET ALL")
    private_postgres.execute("SELECT pg_reload_conf()")


class AppFactory(t.Protocol):
    def __call__(
        self,
        url: str | None = None,
        *,
        guard: bool = True,
        order: str = "guard-first",
        **config: t.Any,
    ) -> tuple[Flask, SQLAlchemy]: ...


@pytest.fixture()
def make_app(tmp_path: Path) -> Iterator[AppFactory]:
    """Build Flask apps with Flask-SQLAlchemy and (optionally) the guard.

    Every engine is disposed afterwards, so no test leaves connections behind.
    """
    made: list[tuple[Flask, SQLAlchemy]] = []

    def factory(
        url: str | None = None,
        *,
        guard: bool = True,
        order: str = "guard-first",
        **config: t.Any,
    ) -> tuple[Flask, SQLAlchemy]:
        app = Flask(f"test_app_{len(made)}", instance_path=str(tmp_path))
        app.config["TESTING"] = True
        if url is not None:
            app.config["SQLALCHEMY_DATABASE_URI"] = url
        app.config.update(config)
        db = SQLAlchemy()
        if guard and order == "guard-first":
            StaleGuard(app)
        db.init_app(app)
        if guard and order == "db-first":
            StaleGuard(app)
        made.append((app, db))
        return app, db

    yield factory
    for app, db in made:
        with app.app_context():
            for engine in db.engines.values():
                engine.dispose()


@pytest.fixture()
def guard_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Capture the ``flask_staleguard`` logger at DEBUG."""
    caplog.set_level(logging.DEBUG, logger="flask_staleguard")
    return caplog


def connection_id(db: SQLAlchemy, bind: str | None = None) -> int:
    """The server-side id of the connection a fresh checkout gets."""
    with db.engines[bind].connect() as conn:
        return int(conn.execute(sa.text("SELECT CONNECTION_ID()")).scalar_one())


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
