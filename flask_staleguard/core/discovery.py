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


#: What the guard asks each new connection, in one round trip: the idle
#: timeout the server enforces on it, and whether its node refuses writes.
#: MySQL's ``super_read_only`` turns ``read_only`` on with it; Aurora's readers
#: say so in ``innodb_read_only``.
FACTS_SQL = {
    "mysql": (
        "SELECT @@session.wait_timeout,"
        " @@global.read_only OR @@global.innodb_read_only",
        # A server without InnoDB's variable (1193): the same, less it.
        "SELECT @@session.wait_timeout, @@global.read_only",
    ),
    "postgresql": (
        "SELECT (SELECT setting FROM pg_settings"
        " WHERE name = 'idle_session_timeout'),"
        " pg_is_in_recovery()"
        " OR current_setting('default_transaction_read_only') = 'on'",
        # A server that speaks the protocol without these functions.
        "SELECT setting FROM pg_settings WHERE name = 'idle_session_timeout'",
    ),
}


class NodeFacts(t.NamedTuple):
    """What a new connection says about itself and its node."""

    #: The idle timeout the server enforces on it, in seconds; ``None``: none.
    idle_timeout: float | None
    #: Whether its node refuses writes (a replica, a demoted primary);
    #: ``None``: the node did not say.
    read_only: bool | None


NO_FACTS = NodeFacts(None, None)


def node_facts(dbapi_connection: t.Any, kind: str) -> NodeFacts:
    """The idle timeout and role of the node behind ``dbapi_connection``.

    MySQL and MariaDB enforce ``@@session.wait_timeout`` (seeded from the global
    ``wait_timeout`` for non-interactive clients such as PyMySQL and mysqlclient).
    PostgreSQL enforces ``idle_session_timeout`` (14+; 0 means none).
    """
    queries = FACTS_SQL.get(kind)
    if queries is None:
        return NO_FACTS
    first, fallback = queries
    try:
        try:
            row = _fetch_one(dbapi_connection, first)
        except Exception as e:
            if not _unknown_name(e, kind):
                raise
            if kind == "postgresql":
                dbapi_connection.rollback()
            row = _fetch_one(dbapi_connection, fallback)
    finally:
        if kind == "postgresql":
            # Leave no transaction open: the pool hands this connection out next.
            dbapi_connection.rollback()
    if row is None:
        return NO_FACTS
    timeout = float(row[0]) if row[0] else None
    if kind == "postgresql" and timeout is not None:
        timeout /= 1000  # milliseconds
    read_only = bool(int(row[1])) if len(row) > 1 and row[1] is not None else None
    return NodeFacts(timeout or None, read_only)


def _unknown_name(error: BaseException, kind: str) -> bool:
    """Whether ``error`` says the server does not know a variable or function
    of the first query: a server that is not what it claims, not a dead one.
    """
    args: tuple[t.Any, ...] = getattr(error, "args", ())
    if kind == "mysql":
        return bool(args) and args[0] == 1193  # ER_UNKNOWN_SYSTEM_VARIABLE
    code = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
    return code in ("42883", "42704", "42P01")  # undefined function / object


def session_idle_timeout(dbapi_connection: t.Any, kind: str) -> float | None:
    """The idle timeout the server enforces on this very connection."""
    return node_facts(dbapi_connection, kind).idle_timeout


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
