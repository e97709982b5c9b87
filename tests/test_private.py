"""The private names of flask_staleguard._private, on the installed versions.

About internals, on purpose: each test pins one private name of SQLAlchemy,
Flask-SQLAlchemy or PyMySQL that the guard relies on, so that an upgrade that
removes or changes it fails here, by name, before anything else does.
"""

from __future__ import annotations

import ast
import asyncio
import ssl
import time
import typing as t
from pathlib import Path

import pymysql
import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.ext.asyncio import create_async_engine

import flask_staleguard
from flask_staleguard import _private
from flask_staleguard import ConnectionReclaimed
from tests.helpers import parse

PACKAGE = Path(flask_staleguard.__file__).parent


@pytest.mark.parametrize(
    ("option", "value"), [("pool_recycle", 42), ("pool_pre_ping", True)]
)
def test_pool_options_can_be_read_and_set_and_survive_dispose(
    mariadb_url: str, option: str, value: object
) -> None:
    engine = sa.create_engine(mariadb_url)
    try:
        assert _private.can_set_pool_option(engine.pool, option)
        _private.set_pool_option(engine.pool, option, value)
        engine.dispose()  # Pool.recreate() carries the value over
        assert _private.pool_option(engine.pool, option) == value
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    finally:
        engine.dispose()


def test_max_overflow(mariadb_url: str) -> None:
    engine = sa.create_engine(mariadb_url, max_overflow=7)
    assert _private.max_overflow(engine.pool) == 7


def test_side_connection_runs_the_pools_listeners_and_takes_no_slot(
    mariadb_url: str,
) -> None:
    engine = sa.create_engine(mariadb_url, pool_size=1, max_overflow=0)
    seen: list[object] = []
    sa.event.listen(engine, "connect", lambda dbapi, record: seen.append(dbapi))
    try:
        record = _private.side_connection(engine.pool)
        assert seen == [record.dbapi_connection]
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        record.close()
    finally:
        engine.dispose()


def test_raw_dbapi_connection_uses_the_creator_only(mariadb_url: str) -> None:
    engine = sa.create_engine(mariadb_url)
    seen: list[object] = []
    sa.event.listen(engine, "connect", lambda dbapi, record: seen.append(dbapi))
    connection = _private.raw_dbapi_connection(engine.pool)
    try:
        assert isinstance(connection, pymysql.connections.Connection)
        assert seen == []
    finally:
        connection.close()
        engine.dispose()


def test_constructor_engine_options() -> None:
    db = SQLAlchemy(engine_options={"pool_recycle": 5})
    assert _private.constructor_engine_options(db) == {"pool_recycle": 5}


def test_pymysql_socket(mariadb_url: str) -> None:
    engine = sa.create_engine(mariadb_url)
    try:
        with engine.connect() as conn:
            dbapi_connection = conn.connection.dbapi_connection
            sock = _private.pymysql_socket(dbapi_connection)
            assert sock.fileno() > 0
            assert not isinstance(sock, ssl.SSLSocket)  # the shared server: no TLS
    finally:
        engine.dispose()


@pytest.mark.parametrize("driver", ["asyncmy", "aiomysql", "asyncpg"])
def test_asyncio_transport(driver: str, mariadb_url: str, postgres_url: str) -> None:
    url = sa.make_url(postgres_url if driver == "asyncpg" else mariadb_url)
    url = url.set(drivername=f"{url.get_backend_name()}+{driver}")

    async def check() -> None:
        engine = create_async_engine(url, poolclass=sa.pool.NullPool)
        try:
            async with engine.connect() as conn:
                raw = await conn.get_raw_connection()
                transport = _private.asyncio_transport(raw.driver_connection)
                assert isinstance(transport, asyncio.Transport)
                assert not transport.is_closing()
                sock = transport.get_extra_info("socket")
                assert sock.getpeername()[1] == url.port
            assert transport.is_closing()  # NullPool closed the connection
        finally:
            await engine.dispose()

    asyncio.run(check())


def test_a_taken_back_proxy_raises_for_its_holder_and_closes_quietly(
    mariadb_url: str, recwarn: pytest.WarningsRecorder
) -> None:
    engine = sa.create_engine(mariadb_url, pool_size=1, max_overflow=0)
    try:
        proxy = engine.raw_connection()
        proxy.invalidate()
        _private.leave_error_for_holder(proxy, "taken back")
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        with pytest.raises(ConnectionReclaimed, match="taken back"):
            proxy.cursor()
        with pytest.raises(ConnectionReclaimed):
            proxy.commit()
        proxy.rollback()
        proxy.close()  # SQLAlchemy calls rollback() and close() only: both quiet
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    finally:
        engine.dispose()


def test_checked_out_proxy_is_the_holders_proxy_while_it_lives(
    mariadb_url: str,
) -> None:
    engine = sa.create_engine(mariadb_url, pool_size=1, max_overflow=0)
    try:
        proxy = engine.raw_connection()
        record = proxy._connection_record
        assert _private.checked_out_proxy(record) is proxy
        proxy.close()
        assert _private.checked_out_proxy(record) is None
    finally:
        engine.dispose()


def _private_attributes(path: Path) -> set[str]:
    """Every ``x._name`` attribute read in ``path`` (not dunders)."""
    tree = parse(path)
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
        and not (isinstance(node.value, ast.Name) and node.value.id == "self")
    }


def test_private_names_live_in_one_module() -> None:
    # The guard's own module, werkzeug's public LocalProxy accessor, the standard
    # library's frame access and named tuples' documented ``_fields`` are fine;
    # any other leading underscore is a private name of Flask, Flask-SQLAlchemy,
    # SQLAlchemy or a driver.
    allowed = {"_private", "_get_current_object", "_getframe", "_fields"}
    outside = {
        path.name: found
        for path in PACKAGE.rglob("*.py")
        if path.name != "_private.py" and (found := _private_attributes(path) - allowed)
    }
    assert outside == {}


def test_no_private_flask_import() -> None:
    for path in PACKAGE.rglob("*.py"):
        tree = parse(path)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "flask"
            ):
                names = [a.name for a in node.names if a.name.startswith("_")]
                assert names == [], (path.name, node.module, names)


def test_the_package_imports_on_this_flask() -> None:
    app = Flask(__name__)
    flask_staleguard.StaleGuard(app)
    assert "staleguard" in app.extensions


def test_sessions_open_sees_flask_sqlalchemys_registry(mariadb_url: str) -> None:
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = mariadb_url
    db = SQLAlchemy(app)
    with app.app_context():
        assert not _private.sessions_open(db.session)
        db.session.execute(sa.text("SELECT 1"))
        assert _private.sessions_open(db.session)
        db.session.remove()
        assert not _private.sessions_open(db.session)
        db.engine.dispose()


def test_judge_disconnects_decides_once_per_tag_and_dialect(mariadb_url: str) -> None:
    engine = sa.create_engine(mariadb_url)
    gone = pymysql.err.OperationalError(2006, "MySQL server has gone away")
    refused = pymysql.err.OperationalError(1290, "--read-only")
    assert engine.dialect.is_disconnect(gone, None, None)
    assert not engine.dialect.is_disconnect(refused, None, None)
    _private.judge_disconnects(engine.dialect, "a", lambda e, c: False)
    _private.judge_disconnects(engine.dialect, "a", lambda e, c: True)  # left alone
    assert not engine.dialect.is_disconnect(gone, None, None)
    _private.judge_disconnects(engine.dialect, "b", lambda e, c: None)
    assert not engine.dialect.is_disconnect(gone, None, None)
    other = sa.create_engine(mariadb_url).dialect
    _private.judge_disconnects(other, "c", lambda e, c: e is refused or None)
    assert other.is_disconnect(refused, None, None)  # the judge says yes
    assert other.is_disconnect(gone, None, None)  # no word: the dialect's answer


def test_connect_started_is_when_the_pool_began_to_connect(mariadb_url: str) -> None:
    engine = sa.create_engine(mariadb_url, pool_size=1, max_overflow=0)
    try:
        before = time.time()
        proxy = engine.raw_connection()
        started = _private.connect_started(proxy._connection_record)
        assert started is not None and before <= started <= time.time()
        proxy.close()
    finally:
        engine.dispose()


def test_wrap_dialect_connect_runs_inside_the_pools_connect_once(
    mariadb_url: str,
) -> None:
    engine = sa.create_engine(mariadb_url)
    calls: list[dict[str, object]] = []

    def wrapper(original: t.Any, cargs: tuple[t.Any, ...], cparams: t.Any) -> t.Any:
        calls.append(dict(cparams))
        return original(*cargs, **cparams)

    try:
        assert _private.default_creator(engine.pool)
        assert _private.wrap_dialect_connect(engine.dialect, wrapper)
        assert not _private.wrap_dialect_connect(engine.dialect, wrapper)
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        engine.dispose()  # the dialect, and so the wrapper, outlive the pool
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        assert len(calls) == 2
        assert calls[0]["host"] == "127.0.0.1"
        # The wrapper costs statements nothing: no dialect event anywhere.
        assert not engine.dialect._has_events
        assert not engine._has_events
    finally:
        engine.dispose()


def test_default_creator_is_false_for_an_engine_with_its_own(mariadb_url: str) -> None:
    url = sa.make_url(mariadb_url)
    engine = sa.create_engine(
        url, creator=lambda: pymysql.connect(host=url.host, port=url.port, user="root")
    )
    try:
        assert not _private.default_creator(engine.pool)
    finally:
        engine.dispose()


def test_pymysql_timeouts_apply_to_the_next_read(mariadb_url: str) -> None:
    """Given back after the connect, the user's (no) read timeout rules the
    socket again: a statement longer than the connect's timeout succeeds.
    """
    url = sa.make_url(mariadb_url)
    connection = pymysql.connect(
        host=url.host, port=url.port, user="root", read_timeout=1, write_timeout=1
    )
    try:
        assert _private.pymysql_timeouts(connection) == (1, 1)
        _private.set_pymysql_timeouts(connection, None, None)
        cursor = connection.cursor()
        cursor.execute("SELECT SLEEP(1.5)")
        assert cursor.fetchone() == (0,)
        _private.set_pymysql_timeouts(connection, 0.5, None)
        with pytest.raises(pymysql.err.OperationalError, match="2013"):
            cursor.execute("SELECT SLEEP(1.5)")
    finally:
        connection.close()
