"""New pooled connections: bounded in time, and waited for through a short outage.

Every connect of a guarded pool runs inside the pool's own connect (SQLAlchemy's
default creator calls ``dialect.connect``, which the guard wraps: no event
listener, so checkouts and statements pay nothing). There the driver gets its
own timeouts for the connect only (``STALEGUARD_CONNECT_TIMEOUT``); a connect
that fails for a transient reason (the server restarting, full, or silent) is
tried again with jittered exponential backoff until ``STALEGUARD_CONNECT_WAIT``
has passed, one connector at a time per pool while the outage lasts, and then
the last error is raised unchanged. Only connects are tried again: nothing was
sent on them. A statement is never retried.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
import threading
import time
import typing as t

import sqlalchemy as sa

from .. import _private
from ..errors import ConnectRejected
from ..metrics.stats import BindStats
from .redact import Secrets

logger = logging.getLogger("flask_staleguard")

#: The first pause after a failed connect, in seconds; it doubles each time.
FIRST_PAUSE = 0.05
#: The longest pause between two connects of a pool in an outage.
LONGEST_PAUSE = 1.0
#: Each pause is drawn from this fraction around its nominal length, so the
#: processes of a fleet do not reconnect in step.
JITTER = 0.25

#: MySQL / MariaDB error codes a connect may meet while its server restarts: too
#: many connections, shutdown in progress, can't connect (socket / TCP), server
#: gone away or lost during the handshake.
TRANSIENT_MYSQL = frozenset({1040, 1053, 2002, 2003, 2006, 2013, 2055})
#: PostgreSQL's SQLSTATEs for a server starting up or shutting down, and the
#: messages libpq gives for them and for a refused, reset or timed-out connect
#: (libpq's connect errors carry no SQLSTATE).
TRANSIENT_SQLSTATES = frozenset({"57P01", "57P02", "57P03"})
TRANSIENT_PG_MESSAGES = (
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "the database system is not yet accepting connections",
    "connection refused",
    "connection reset",
    "server closed the connection unexpectedly",
    "timeout expired",
    "could not receive data from server",
    "could not send data to server",
    "too many clients already",
)

#: The keywords that bound each driver's connect and nothing after it. PyMySQL's
#: ``connect_timeout`` covers the TCP connect only: its read and write timeouts
#: bound the handshake and login, and are given back to the user's values right
#: after (:meth:`Connector._attempt`). mysqlclient's ``connect_timeout`` covers the
#: handshake, libpq's (psycopg, psycopg2) the whole start-up. The other drivers'
#: only bounds (mysql-connector's ``connection_timeout``, pg8000's ``timeout``,
#: MariaDB Connector/Python's read timeout) would bound every statement as well.
CONNECT_BOUNDS: dict[str, tuple[str, ...]] = {
    "pymysql": ("connect_timeout", "read_timeout", "write_timeout"),
    "mysqldb": ("connect_timeout",),
    "psycopg": ("connect_timeout",),
    "psycopg2": ("connect_timeout",),
}
#: Drivers that take whole seconds: libpq reads less than 2 as 2.
_WHOLE_SECONDS = ("psycopg", "psycopg2", "mysqldb")


#: Per thread: whether its connects are tried once only (:func:`one_try`).
_once = threading.local()


@contextlib.contextmanager
def one_try() -> t.Iterator[None]:
    """Connects in this block are not waited for: the guard's own connections
    (the CLI's, the reports') answer within their own time limit.
    """
    before = getattr(_once, "on", False)
    _once.on = True
    try:
        yield
    finally:
        _once.on = before


def trying_once() -> bool:
    """Whether this thread's connects are the guard's own (:func:`one_try`)."""
    return bool(getattr(_once, "on", False))


class RetryConnect(Exception):
    """Raised by a connect check (:attr:`Connector.check`) to refuse a new
    connection: it is closed, and the connect is tried again within the wait.
    """


#: Called with each new DBAPI connection inside the connect loop, and whether it
#: is the last attempt within the wait; raises :class:`RetryConnect` to refuse it.
Check = t.Callable[[t.Any, bool], None]


def transient(error: BaseException) -> bool:
    """Whether a failed connect may succeed when tried again shortly."""
    if isinstance(error, (RetryConnect, ConnectionError, TimeoutError)):
        return True
    code = getattr(error, "errno", None)
    args = getattr(error, "args", ())
    if not isinstance(code, int) and args and isinstance(args[0], int):
        code = args[0]
    if isinstance(code, int) and code in TRANSIENT_MYSQL:
        return True
    state = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
    if state in TRANSIENT_SQLSTATES:
        return True
    if type(error).__name__ == "ConnectionTimeout":  # psycopg 3's own
        return True
    text = str(error).lower()
    return any(message in text for message in TRANSIENT_PG_MESSAGES)


def pause(attempt: int) -> float:
    """The jittered pause after a pool's ``attempt``-th failed connect (1, 2, ...)."""
    nominal = min(LONGEST_PAUSE, FIRST_PAUSE * float(2 ** min(attempt - 1, 16)))
    return nominal * random.uniform(1 - JITTER, 1 + JITTER)


class Connector:
    """The connects of one pool: bounded, waited for, one at a time in an outage.

    :param name: The pool's name in logs.
    :param timeout: Seconds one connect may take (``STALEGUARD_CONNECT_TIMEOUT``).
    :param wait: Seconds a connect keeps trying through transient failures
        (``STALEGUARD_CONNECT_WAIT``); 0: never tried again.
    """

    def __init__(
        self,
        name: str,
        timeout: float,
        wait: float,
        stats: BindStats,
        secrets: Secrets,
        clock: t.Callable[[], float] = time.monotonic,
    ) -> None:
        self._name = name
        self.timeout = timeout
        #: The wait in force: ``wait``, or the pool's ``pool_timeout`` if shorter.
        self.wait = wait
        self._stats = stats
        self._secrets = secrets
        self._clock = clock
        #: Called on each new connection inside the loop; ``None``: none.
        self.check: Check | None = None
        #: Whether it runs the pool's connects (not for asyncio engines, nor
        #: engines made with ``creator=``).
        self.running = False
        self._driver = ""
        # Held only by a pool in an outage, by the one thread that connects.
        self._lock = threading.Lock()
        #: Whether the pool's last connect failed for a transient reason.
        self._outage = False
        self._outage_started = 0.0
        self._attempts = 0
        self._next_attempt = 0.0
        self._last_error: BaseException | None = None
        self._told_gave_up = False

    def attach(self, engine: sa.engine.Engine) -> None:
        """Run ``engine``'s new connections through :meth:`connect`, where it can."""
        dialect = engine.dialect
        if getattr(dialect, "is_async", False):
            logger.info(
                "bind %s: an asyncio engine: its connects are neither bounded nor"
                " waited for (STALEGUARD_CONNECT_TIMEOUT, STALEGUARD_CONNECT_WAIT),"
                " as a pause would block the event loop; set the driver's own"
                " connect timeout",
                self._name,
            )
            return
        if not _private.default_creator(engine.pool):
            logger.info(
                "bind %s: the engine was made with creator=: its connects are"
                " neither bounded nor waited for (STALEGUARD_CONNECT_TIMEOUT,"
                " STALEGUARD_CONNECT_WAIT)",
                self._name,
            )
            return
        self._driver = engine.url.get_driver_name()
        if self._driver not in CONNECT_BOUNDS:
            logger.info(
                "bind %s: driver %s has no timeout for the connect alone: connects"
                " are bounded only by its own settings (STALEGUARD_CONNECT_TIMEOUT"
                " does not apply)",
                self._name,
                self._driver,
            )
        pool_timeout = getattr(engine.pool, "timeout", None)
        if callable(pool_timeout):
            # Never wait longer than a checkout may wait for a pooled connection.
            self.wait = min(self.wait, float(pool_timeout()))
        _private.wrap_dialect_connect(dialect, self.connect)
        self.running = True

    def connect(
        self,
        original: t.Callable[..., t.Any],
        cargs: tuple[t.Any, ...],
        cparams: dict[str, t.Any],
    ) -> t.Any:
        """A new DBAPI connection from ``original(*cargs, **cparams)``: bounded,
        and tried again through transient failures within the wait.
        """
        restore = self._bound(cparams)
        if trying_once():
            try:
                return self._attempt(original, cargs, cparams, restore, last=True)
            except RetryConnect as e:
                raise _final(e) from e
        if not self._outage:
            try:
                return self._attempt(
                    original, cargs, cparams, restore, last=self.wait <= 0
                )
            except Exception as e:
                if self.wait <= 0 or not transient(e):
                    if isinstance(e, RetryConnect):
                        raise _final(e) from e
                    raise
                started = self._clock()
                self._failed(e, started)
                last: BaseException | None = e
        else:
            started = self._clock()
            last = None
        return self._wait_out(original, cargs, cparams, restore, started, last)

    def _wait_out(
        self,
        original: t.Callable[..., t.Any],
        cargs: tuple[t.Any, ...],
        cparams: dict[str, t.Any],
        restore: tuple[str, ...],
        started: float,
        last: BaseException | None,
    ) -> t.Any:
        """Connect, one thread of the pool at a time, until ``started`` + wait."""
        deadline = started + self.wait
        while True:
            left = deadline - self._clock()
            if left <= 0 or not self._lock.acquire(timeout=left):
                if isinstance(last or self._last_error, RetryConnect):
                    # Turned down, not failed: the node answers, and on the last
                    # attempt the check takes what it finds.
                    try:
                        connection = self._attempt(
                            original, cargs, cparams, restore, last=True
                        )
                    except RetryConnect as e:
                        raise self._give_up(e) from None
                    self._ended()
                    return connection
                raise self._give_up(last)
            try:
                last_try = False
                if self._outage:
                    # The last attempt comes at the deadline, not a pause before.
                    last_try = self._next_attempt >= deadline
                    rest = min(self._next_attempt, deadline) - self._clock()
                    if rest > 0:
                        time.sleep(rest)  # looked up now: gevent patches it
                try:
                    connection = self._attempt(
                        original, cargs, cparams, restore, last=last_try
                    )
                except Exception as e:
                    if not transient(e):
                        raise
                    if last_try and isinstance(e, RetryConnect):
                        raise self._give_up(e) from None  # turned down at the last
                    last = e
                    self._failed(e, self._clock())
                    continue
                self._ended()
                return connection
            finally:
                self._lock.release()

    def _bound(self, cparams: dict[str, t.Any]) -> tuple[str, ...]:
        """Add the driver's connect bounds the user did not set (``cparams`` is
        this call's own copy); return those to give back after the connect.
        """
        keywords = CONNECT_BOUNDS.get(self._driver, ())
        value: float = self.timeout
        if self._driver in _WHOLE_SECONDS:
            value = max(2, math.ceil(self.timeout))
        added = tuple(k for k in keywords if k not in cparams)
        for keyword in added:
            cparams[keyword] = value
        # Only PyMySQL keeps its read and write timeouts beyond the connect.
        return added if self._driver == "pymysql" else ()

    def _attempt(
        self,
        original: t.Callable[..., t.Any],
        cargs: tuple[t.Any, ...],
        cparams: dict[str, t.Any],
        restore: tuple[str, ...],
        *,
        last: bool,
    ) -> t.Any:
        """One connect; ``last``: the check may not refuse it, as none follows."""
        connection = original(*cargs, **cparams)
        try:
            if restore:
                read, write = _private.pymysql_timeouts(connection)
                _private.set_pymysql_timeouts(
                    connection,
                    None if "read_timeout" in restore else read,
                    None if "write_timeout" in restore else write,
                )
            if self.check is not None:
                self.check(connection, last)
        except BaseException:
            try:
                connection.close()
            except Exception:
                pass  # the refusal, not a failed close, is what counts
            raise
        return connection

    def _failed(self, error: BaseException, now: float) -> None:
        """Note a transient failure: the outage starts or goes on."""
        self._last_error = error
        self._next_attempt = now + pause(self._attempts + 1)
        if self._outage:
            self._attempts += 1
            self._stats.add("connect_retries")
            return
        self._outage = True
        self._outage_started = now
        self._attempts = 1
        self._told_gave_up = False
        self._stats.add("outages")
        logger.warning(
            "bind %s: cannot connect (%s); retrying for up to %g s"
            " (STALEGUARD_CONNECT_WAIT)",
            self._name,
            self._secrets.one_line(error),
            self.wait,
        )

    def _ended(self) -> None:
        if not self._outage:
            return
        self._outage = False
        logger.warning(
            "bind %s: connected again after %.1f s and %d failed connects",
            self._name,
            self._clock() - self._outage_started,
            self._attempts,
        )

    def _give_up(self, last: BaseException | None) -> BaseException:
        """The error for a connect whose wait ran out: its last one, unchanged."""
        error = last if last is not None else self._last_error
        if error is None:  # cannot be: an outage starts with an error
            error = ConnectRejected(f"bind {self._name}: no connection")
        elif last is None:
            # Another thread's error: a copy, so no two raise the same object.
            error = copy.copy(error)
        if not self._told_gave_up:
            self._told_gave_up = True
            logger.warning(
                "bind %s: still cannot connect after %g s (STALEGUARD_CONNECT_WAIT):"
                " %s",
                self._name,
                self.wait,
                self._secrets.one_line(error),
            )
        return _final(error)


def _final(error: BaseException) -> BaseException:
    """What the app gets for a connect given up: the driver's error as it is, or
    :class:`~flask_staleguard.ConnectRejected` for a refused connection.
    """
    if isinstance(error, RetryConnect):
        return ConnectRejected(str(error))
    return error
