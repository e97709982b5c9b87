"""The socket probe over TLS, which PyMySQL 1.2+ uses whenever the server offers it."""

from __future__ import annotations

import ssl
import subprocess
import time
import typing as t
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.helpers import AppFactory
from tests.helpers import connection_id
from tests.helpers import replaced
from tests.servers import MariaDBServer


def tls_options(**options: t.Any) -> dict[str, t.Any]:
    """Engine options that ask for TLS: PyMySQL before 1.2 does not by default."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the throwaway certificate is self-signed
    return {**options, "connect_args": {"ssl": context}}


@pytest.fixture(scope="module")
def tls_mariadb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MariaDBServer]:
    """A private MariaDB that offers TLS, with a throwaway self-signed certificate."""
    base = tmp_path_factory.mktemp("tls")
    cert, key = base / "cert.pem", base / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"],
        check=True,
        capture_output=True,
    )
    args = [f"--ssl-cert={cert}", f"--ssl-key={key}"]
    with MariaDBServer(Path(base / "server"), extra_args=args) as server:
        yield server


def test_connections_really_use_tls(
    make_app: AppFactory, tls_mariadb: MariaDBServer
) -> None:
    app, db = make_app(tls_mariadb.url, SQLALCHEMY_ENGINE_OPTIONS=tls_options())
    with app.app_context(), db.engine.connect() as conn:
        dbapi = conn.connection.dbapi_connection
        assert isinstance(dbapi._sock, ssl.SSLSocket)  # type: ignore[union-attr]
        version = conn.execute(sa.text("SHOW STATUS LIKE 'Ssl_version'")).one()[1]
        assert version.startswith("TLS")


def test_healthy_tls_connection_is_kept(
    make_app: AppFactory, tls_mariadb: MariaDBServer
) -> None:
    app, db = make_app(
        tls_mariadb.url, SQLALCHEMY_ENGINE_OPTIONS=tls_options(pool_size=1)
    )
    with app.app_context():
        first = connection_id(db)
        for _ in range(3):
            time.sleep(0.4)
            assert connection_id(db) == first
    assert replaced(app) == {}


def test_tls_connection_killed_or_timed_out_is_replaced(
    make_app: AppFactory, tls_mariadb: MariaDBServer
) -> None:
    # A declared timeout far above the real one: only the probe can save this.
    app, db = make_app(
        tls_mariadb.url,
        SQLALCHEMY_ENGINE_OPTIONS=tls_options(pool_size=2, max_overflow=0),
        STALEGUARD_SERVER_TIMEOUT=28800,
    )
    tls_mariadb.set_global("wait_timeout", 1)
    try:
        with app.app_context():
            timed_out = connection_id(db)
            time.sleep(2.5)
            killed = connection_id(db)
            assert killed != timed_out
            tls_mariadb.execute(f"KILL {killed}")
            time.sleep(0.3)
            assert connection_id(db) not in (timed_out, killed)
    finally:
        tls_mariadb.set_global("wait_timeout", 28800)
    seen = replaced(app)
    assert sum(seen.values()) == 2
    assert "idle_budget" not in seen
