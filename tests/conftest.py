"""Shared fixtures: real servers, and a factory for Flask apps with the guard.

Helpers that are not fixtures are in tests/helpers.py.
"""

from __future__ import annotations

import logging
import os
import typing as t
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_staleguard import StaleGuard
from tests.helpers import AppFactory
from tests.helpers import GUARDS
from tests.servers import MariaDBServer
from tests.servers import PostgresServer
from tests.tiers import mark_integration
from tests.tiers import needs_servers
from tests.tiers import Tripwire

#: The machine's shared MariaDB: read-only use; never change its globals or KILL.
SHARED_MARIADB_URL = os.environ.get(
    "STALEGUARD_TEST_MARIADB", "mysql+pymysql://root@127.0.0.1:3306/test"
)
#: The machine's shared PostgreSQL (trust auth).
SHARED_POSTGRES_URL = os.environ.get(
    "STALEGUARD_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "integration: needs a server, root or a network namespace (tests/tiers.py)",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    mark_integration(items)


#: Armed when the session selected no integration test: see _fast_tier_tripwire.
_FAST_SESSION = pytest.StashKey[bool]()


def pytest_collection_finish(session: pytest.Session) -> None:
    session.config.stash[_FAST_SESSION] = not any(map(needs_servers, session.items))


@pytest.fixture(autouse=True)
def _fast_tier_tripwire(request: pytest.FixtureRequest) -> Iterator[None]:
    """In a fast-tier session, a test that connects or starts a process fails.

    Only then: in a full run, an integration test's leftovers (a proxy thread, a
    pool's late reconnect) could trip it during a fast test.
    """
    if not request.config.stash.get(_FAST_SESSION, False):
        yield
        return
    wire = Tripwire()
    with wire.armed():
        yield
    if wire.attempts:
        pytest.fail(f"fast-tier test reached out: {wire.attempts}", pytrace=False)


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
        staleguard = StaleGuard() if guard else None
        if staleguard is not None and order == "guard-first":
            staleguard.init_app(app)
        db.init_app(app)
        if staleguard is not None and order == "db-first":
            staleguard.init_app(app)
        if staleguard is not None:
            GUARDS[app] = staleguard
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
