"""Ask a database server how long it lets a connection idle."""

from __future__ import annotations

import math
import typing as t

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

#: The keywords each driver takes to bound its connect and its reads and writes,
#: in whole seconds. They let a discovery that overran its time limit end;
#: the limit itself holds for every driver (:func:`~.deadline.call_within`).
TIMEOUT_ARGS = {
    "pymysql": ("connect_timeout", "read_timeout", "write_timeout"),
    "mysqldb": ("connect_timeout", "read_timeout", "write_timeout"),
    "mariadbconnector": ("connect_timeout", "read_timeout", "write_timeout"),
    "mysqlconnector": ("connection_timeout", "read_timeout", "write_timeout"),
    # libpq's connect_timeout covers the whole start-up, authentication included.
    "psycopg": ("connect_timeout",),
    "psycopg2": ("connect_timeout",),
    "pg8000": ("timeout",),
}

#: MySQL's and MariaDB's default ``wait_timeout``: assumed until a connection
#: succeeds and says otherwise.
MYSQL_DEFAULT_TIMEOUT = 28800.0


def flavor(url: sa.engine.URL) -> str:
    """``"mysql"``, ``"postgresql"``, ``"sqlite"`` or another backend name."""
    name = url.get_backend_name()
    return "mysql" if name in ("mysql", "mariadb") else name


def fallback_timeout(kind: str) -> float | None:
    """The timeout to assume for a server that could not be asked."""
    return MYSQL_DEFAULT_TIMEOUT if kind == "mysql" else None


def session_idle_timeout(dbapi_connection: t.Any, kind: str) -> float | None:
    """The idle timeout the server enforces on this very connection.

    MySQL and MariaDB enforce ``@@session.wait_timeout`` (seeded from the global
    ``wait_timeout`` for non-interactive clients such as PyMySQL and mysqlclient).
    PostgreSQL enforces ``idle_session_timeout`` (14+; 0 means none). ``None``
    means no idle timeout.
    """
    if kind == "mysql":
        row = _fetch_one(dbapi_connection, "SELECT @@session.wait_timeout")
        return float(row[0]) if row and row[0] else None
    if kind == "postgresql":
        try:
            row = _fetch_one(
                dbapi_connection,
                "SELECT setting FROM pg_settings WHERE name = 'idle_session_timeout'",
            )
        finally:
            # Leave no transaction open: the pool hands this connection out next.
            dbapi_connection.rollback()
        milliseconds = float(row[0]) if row else 0.0
        return milliseconds / 1000 if milliseconds else None
    return None


def _fetch_one(dbapi_connection: t.Any, sql: str) -> t.Any:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(sql)
        return cursor.fetchone()
    finally:
        cursor.close()


def discover(
    url: sa.engine.URL, options: t.Mapping[str, t.Any], timeout: float
) -> float | None:
    """Open one unpooled connection, read the server's idle timeout, close it.

    Nothing stays open afterwards, so a server that forks after start-up
    (gunicorn ``--preload``) shares no socket with its workers. Raises whatever
    the driver raises when the server cannot be reached. The drivers' own
    timeouts are set to ``timeout``; run it under
    :func:`~.deadline.call_within` to bound it for every driver.
    """
    kind = flavor(url)
    connect_args = dict(options.get("connect_args") or {})
    # libpq takes less than 2 s as 2 s.
    seconds = max(2, math.ceil(timeout))
    for keyword in TIMEOUT_ARGS.get(url.get_driver_name(), ()):
        connect_args.setdefault(keyword, seconds)
    engine = sa.create_engine(url, poolclass=NullPool, connect_args=connect_args)
    try:
        raw = engine.raw_connection()
        try:
            return session_idle_timeout(raw.dbapi_connection, kind)
        finally:
            raw.close()
    finally:
        engine.dispose()
