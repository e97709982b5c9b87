"""Every private name of SQLAlchemy, Flask-SQLAlchemy and the drivers the guard uses.

Each is used only where no public API does the job, and each has a test per
supported version (``tests/test_private.py``), so an upgrade that removes one
fails there first, by name.
"""

from __future__ import annotations

import asyncio
import typing as t

import sqlalchemy as sa

from .errors import ConnectionReclaimed

#: ``create_engine``'s ``pool_*`` options and the pool attributes that hold them.
#: Read on every checkout, and carried over by ``Pool.recreate()`` (``dispose()``).
POOL_ATTRIBUTES = {"pool_recycle": "_recycle", "pool_pre_ping": "_pre_ping"}


def pool_option(pool: sa.pool.Pool, option: str) -> t.Any:
    """The value of ``create_engine`` option ``option`` on an existing pool."""
    return getattr(pool, POOL_ATTRIBUTES[option])


def can_set_pool_option(pool: sa.pool.Pool, option: str) -> bool:
    """Whether :func:`set_pool_option` works on this pool class."""
    return hasattr(pool, POOL_ATTRIBUTES[option])


def set_pool_option(pool: sa.pool.Pool, option: str, value: t.Any) -> None:
    """Change option ``option`` of a pool that already exists (Flask-SQLAlchemy
    created the engine before the guard ran: there is no public way).
    """
    setattr(pool, POOL_ATTRIBUTES[option], value)


def max_overflow(pool: sa.pool.Pool) -> int:
    """A ``QueuePool``'s ``max_overflow``: it has ``size()``, but no getter for this."""
    return int(getattr(pool, "_max_overflow", 0))


def side_connection(pool: sa.pool.Pool) -> t.Any:
    """A DBAPI connection made by ``pool``'s creator and ``connect`` listeners,
    outside the pool: it takes no slot and leaves the pool's counts alone.

    Returns the record; ``record.dbapi_connection`` is the connection and
    ``record.close()`` closes it.
    """
    from sqlalchemy.pool.base import _ConnectionRecord

    return _ConnectionRecord(pool)


def raw_dbapi_connection(pool: sa.pool.Pool) -> t.Any:
    """A DBAPI connection from ``pool``'s creator only: the app's connect
    arguments, none of the pool's listeners.
    """
    return t.cast(t.Any, pool)._invoke_creator(None)


def constructor_engine_options(db: t.Any) -> dict[str, t.Any]:
    """The ``engine_options`` given to Flask-SQLAlchemy's ``SQLAlchemy()``."""
    return dict(getattr(db, "_engine_options", None) or {})


#: Decides whether an error is a disconnect: ``True`` or ``False``, or ``None``
#: to leave it to the dialect. Takes the error and the connection SQLAlchemy
#: passes (a pool's proxied connection for statements, the DBAPI one for pings).
Judge = t.Callable[[BaseException, t.Any], t.Optional[bool]]


def judge_disconnects(dialect: t.Any, tag: str, judge: Judge) -> None:
    """Let ``judge`` overrule this dialect instance's ``is_disconnect``, on every
    path SQLAlchemy asks it (statements, pings). One judge per ``tag``: a second
    call with the same tag leaves the first in place.

    The public way is a ``handle_error`` listener, but any dialect listener makes
    SQLAlchemy look up listeners around every statement; this costs only errors.
    """
    judges: dict[str, Judge] | None = getattr(
        dialect.is_disconnect, "staleguard_judges", None
    )
    if judges is None:
        original = dialect.is_disconnect
        judges = {}
        verdicts = judges.values()

        def is_disconnect(e: t.Any, connection: t.Any, cursor: t.Any) -> bool:
            for decide in verdicts:
                verdict = decide(e, connection)
                if verdict is not None:
                    return verdict
            return bool(original(e, connection, cursor))

        is_disconnect.staleguard_judges = judges  # type: ignore[attr-defined]
        dialect.is_disconnect = is_disconnect
    judges.setdefault(tag, judge)


def connect_started(record: t.Any) -> float | None:
    """The ``time.time()`` at which the pool began to open ``record``'s current
    DBAPI connection (SQLAlchemy's ``starttime``, which ``pool_recycle`` reads).
    """
    started = getattr(record, "starttime", None)
    return None if started is None else float(started)


def checked_out_proxy(record: t.Any) -> t.Any:
    """The proxy (``_ConnectionFairy``) of a checked-out connection record, while
    its holder keeps it; ``None`` once it is gone. SQLAlchemy keeps a weak
    reference to it on the record (``fairy_ref``): no public accessor.
    """
    ref = record.fairy_ref
    return None if ref is None else ref()


def sessions_open(session: t.Any) -> bool:
    """Whether a scoped session holds a session for any scope: a quick test,
    without calling the scope function as the public ``registry.has()`` does.
    """
    registry = session.registry
    sessions = getattr(registry, "registry", None)
    if isinstance(sessions, dict):  # a ScopedRegistry, as Flask-SQLAlchemy's is
        return bool(sessions)
    return bool(registry.has())


def pop_lite_sessions(g: t.Any) -> dict[str, t.Any]:
    """The sessions Flask-SQLAlchemy-Lite cached on ``g`` and has not closed
    (its teardown did not run): taken off ``g``, as its own teardown does.
    """
    return dict(g.pop("_sqlalchemy_sessions", None) or {})


def pop_lite_async_sessions(g: t.Any) -> dict[str, t.Any]:
    """The async sessions Flask-SQLAlchemy-Lite cached on ``g`` and has not
    closed, taken off ``g`` as :func:`pop_lite_sessions` does.
    """
    return dict(g.pop("_sqlalchemy_async_sessions", None) or {})


def pymysql_socket(dbapi_connection: t.Any) -> t.Any:
    """PyMySQL's socket (a ``socket`` or ``ssl.SSLSocket``); it has no accessor."""
    return getattr(dbapi_connection, "_sock", None)


def pymysql_read_timeout(dbapi_connection: t.Any) -> float | None:
    """The read timeout a PyMySQL connection applies to every reply; ``None``:
    none. It has no accessor.
    """
    value = getattr(dbapi_connection, "_read_timeout", None)
    return None if value is None else float(value)


def asyncio_transport(driver_connection: t.Any) -> asyncio.BaseTransport | None:
    """The asyncio transport an asyncio driver's connection talks over, if any.

    None has an accessor: asyncpg and asyncmy (0.2.17 and newer) keep it in
    ``_transport``; aiomysql and older asyncmy in their ``StreamWriter``
    (``_writer``), whose ``transport`` is public.
    """
    transport = getattr(driver_connection, "_transport", None)
    if transport is None:
        writer = getattr(driver_connection, "_writer", None)
        transport = getattr(writer, "transport", None)
    return transport if isinstance(transport, asyncio.BaseTransport) else None


class _Reclaimed:
    """Stands in for a DBAPI connection the guard took back from its holder.

    Whatever the holder tries next raises the error that says so; rolling back and
    closing succeed, as there is nothing left to roll back or close.
    """

    def __init__(self, message: str) -> None:
        self._message = message

    def rollback(self) -> None:
        """Nothing to roll back: closing the connection ended its transaction."""

    def close(self) -> None:
        """Already closed."""

    def __getattr__(self, name: str) -> t.Any:
        raise ConnectionReclaimed(self._message)


def leave_error_for_holder(proxy: t.Any, message: str) -> None:
    """After ``proxy.invalidate()``, make the holder's next use of ``proxy`` raise
    :class:`~flask_staleguard.ConnectionReclaimed` with ``message``, rather than
    SQLAlchemy's bare ``AssertionError`` for a proxy whose connection is ``None``.

    ``dbapi_connection`` is a public attribute; that SQLAlchemy then only calls
    ``rollback()`` and ``close()`` on it is not documented, hence here.
    """
    proxy.dbapi_connection = _Reclaimed(message)


#: What wraps a dialect's ``connect``: given the original, the positional and the
#: keyword arguments of one call, it returns the new DBAPI connection.
ConnectWrapper = t.Callable[
    [t.Callable[..., t.Any], tuple[t.Any, ...], dict[str, t.Any]], t.Any
]


def wrap_dialect_connect(dialect: t.Any, wrapper: ConnectWrapper) -> bool:
    """Route this dialect instance's ``connect`` through ``wrapper``.

    SQLAlchemy's default creator (``create_engine``'s ``connect()``) looks up
    ``dialect.connect`` on the instance at every call, and each engine has its
    own dialect: so the wrapper runs inside the pool's connect and nowhere else.
    The public way, a ``do_connect`` listener, makes every statement look up
    dialect listeners. One wrapper per dialect: returns ``False`` when there is one.
    """
    original = dialect.connect
    if hasattr(original, "staleguard_connect"):
        return False

    def connect(*cargs: t.Any, **cparams: t.Any) -> t.Any:
        return wrapper(original, cargs, cparams)

    connect.staleguard_connect = wrapper  # type: ignore[attr-defined]
    dialect.connect = connect
    return True


def default_creator(pool: sa.pool.Pool) -> bool:
    """Whether ``pool`` connects through SQLAlchemy's default creator, which
    calls ``dialect.connect``; not so for an engine made with ``creator=``.
    """
    creator = getattr(pool, "_creator", None)
    return getattr(creator, "__module__", None) == "sqlalchemy.engine.create"


def pymysql_timeouts(dbapi_connection: t.Any) -> tuple[t.Any, t.Any]:
    """A PyMySQL connection's read and write timeouts (no public accessor)."""
    return dbapi_connection._read_timeout, dbapi_connection._write_timeout


def set_pymysql_timeouts(dbapi_connection: t.Any, read: t.Any, write: t.Any) -> None:
    """Give a PyMySQL connection new read and write timeouts after its connect.

    PyMySQL reads them before each read and write and applies them to its socket
    when they differ from the socket's (1.1+), or every time (1.0).
    """
    dbapi_connection._read_timeout = read
    dbapi_connection._write_timeout = write
