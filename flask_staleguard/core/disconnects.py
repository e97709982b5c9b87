"""Which database errors mean "the connection was already gone", and the
report of each one the pool meets.
"""

from __future__ import annotations

import errno
import functools
import logging
import time
import typing as t

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.exc import DisconnectionError

from .._private import connect_started
from .._private import judge_disconnects
from ..errors import LeakError
from ..metrics.signals import disconnect_seen
from ..metrics.stats import BindStats
from .budget import IdleBudget
from .checkout import STATE

logger = logging.getLogger("flask_staleguard")

#: Seconds of idle before a checkout below which idleness cannot explain a lost
#: connection: no server or middlebox idle timer is that short. (Tracking each
#: statement instead would put a listener on every execute.)
IDLE_EXPLAINS = 1.0

#: MySQL client and server codes for a connection that is gone. 4031 is MySQL 8's
#: ER_CLIENT_INTERACTION_TIMEOUT; on MariaDB 4031 is an unrelated trigger error.
MYSQL_GONE = frozenset({1927, 2006, 2013, 2014, 2045, 2055})
MYSQL_ONLY_GONE = frozenset({4031})

_MESSAGES = (
    ("10054", "reset"),
    ("ConnectionResetError", "reset"),
    ("10053", "aborted"),
    ("ConnectionAbortedError", "aborted"),
    ("BrokenPipeError", "broken_pipe"),
    ("Packet sequence number wrong", "packet_sequence"),
)


#: Socket errno values (POSIX and Windows' WSAE*) of a connection that is gone.
_ERRNOS = {
    errno.ECONNRESET: "reset",
    10054: "reset",
    errno.ECONNABORTED: "aborted",
    10053: "aborted",
    errno.EPIPE: "broken_pipe",
}


def error_code(error: BaseException) -> int | None:
    """The driver's numeric error code, unwrapping PyMySQL's nested errors."""
    args = getattr(error, "args", ())
    if args and isinstance(args[0], BaseException):
        return error_code(args[0])
    if args and isinstance(args[0], int):
        return args[0]
    return None


#: The label of a node that became read-only (MySQL 1290 and 1836, PostgreSQL
#: 25006), in stats, metrics and signals.
READ_ONLY = "read_only"
#: The label of a Galera node that left the cluster's primary component (1047).
NOT_PRIMARY = "wsrep_not_ready"
#: What each failover label means, in the log.
FAILOVERS = {
    READ_ONLY: "the server became read-only",
    NOT_PRIMARY: "the node left the cluster's primary component",
}

#: MySQL's 1290 is "the server runs with an option that forbids this"; only these
#: options mean a read-only node (``--secure-file-priv`` is another).
_READ_ONLY_OPTIONS = ("--read-only", "--super-read-only")


def failover_label(error: BaseException, kind: str) -> str | None:
    """:data:`READ_ONLY` or :data:`NOT_PRIMARY` when ``error`` is a statement
    refused for its node's role, else ``None``.

    MySQL's 1792 (a ``READ ONLY`` transaction) is the app's own choice, never a
    failover; PostgreSQL's 25006 can be either: :func:`is_demotion` tells.
    """
    if kind == "mysql":
        code = error_code(error)
        message = str(error)
        if code == 1836 or (
            code == 1290 and any(o in message for o in _READ_ONLY_OPTIONS)
        ):
            return READ_ONLY
        if code == 1047 and "WSREP" in message:
            return NOT_PRIMARY
        return None
    if kind == "postgresql":
        sqlstate = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
        return READ_ONLY if sqlstate == "25006" else None
    return None


def disconnect_label(
    error: BaseException, kind: str, *, mariadb: bool = False
) -> str | None:
    """A short label for a disconnect error, or ``None`` if it is not one."""
    demoted = failover_label(error, kind)
    if demoted is not None:
        return demoted
    if isinstance(error, OSError):
        # str() of an OSError names the errno, not the class ("[Errno 104] ...").
        label = _ERRNOS.get(getattr(error, "winerror", None) or error.errno or 0)
        if label is not None:
            return label
    code = error_code(error)
    if kind == "mysql" and code is not None:
        if code in MYSQL_GONE or (code in MYSQL_ONLY_GONE and not mariadb):
            return str(code)
        if code in MYSQL_ONLY_GONE:
            return None
    message = str(error)
    for needle, label in _MESSAGES:
        if needle in message:
            return label
    sqlstate = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
    if sqlstate:
        return str(sqlstate)
    return str(code) if code is not None else type(error).__name__


class DisconnectReports:
    """Counts and explains each connection the pool drops after a disconnect
    error, and keeps MariaDB's 4031 from counting as one.
    """

    def __init__(
        self,
        sender: t.Any,
        kind: str,
        strategy: str,
        budget: IdleBudget,
        stats: BindStats,
    ) -> None:
        #: The pool's guard: the signals' sender, and its name in logs.
        self._sender = sender
        self._kind = kind
        self._strategy = strategy
        self._budget = budget
        self._stats = stats
        self._dialect: t.Any = None
        #: ``time.time()`` of the last failover that invalidated the pool.
        self._failover_at = 0.0
        #: Called once per failover; ``None``: nothing to tell.
        self.on_failover: t.Callable[[], None] | None = None

    def attach(self, engine: sa.engine.Engine) -> None:
        """Listen to ``engine``: disconnects are counted when the pool invalidates
        the connection, not in a ``handle_error`` listener, which would cost every
        statement an event lookup.
        """
        self._dialect = engine.dialect
        event.listen(engine, "invalidate", self._on_invalidate)
        if self._kind == "mysql":
            keep_mariadb_4031(engine.dialect)

    def _on_invalidate(
        self, dbapi_connection: t.Any, record: t.Any, exception: BaseException | None
    ) -> None:
        if exception is None or isinstance(exception, (DisconnectionError, LeakError)):
            # Invalidated by the app, replaced at checkout (counted there), or a
            # leak taken back (counted as one).
            return
        mariadb = bool(getattr(self._dialect, "is_mariadb", False))
        label = disconnect_label(exception, self._kind, mariadb=mariadb)
        if label is None:
            return
        self._stats.count(self._stats.disconnects, label)
        state = record.info.get(STATE)
        idle = None if state is None else state.idle
        if label in FAILOVERS:
            self._failover(label, record)
        else:
            logger.warning("bind %s: %s", self._sender.name, self.explain(label, idle))
        disconnect_seen.send(self._sender, code=label, idle=idle)

    def _failover(self, label: str, record: t.Any) -> None:
        """Say once per failover that the pool was invalidated, and why."""
        started = connect_started(record)
        if started is not None and started < self._failover_at:
            # Opened before the last failover invalidated the pool: the same
            # event, met by another holder.
            return
        self._failover_at = time.time()
        if self.on_failover is not None:
            self.on_failover()
        cause = FAILOVERS[label]
        logger.warning(
            "bind %s: %s (failover?): pool invalidated", self._sender.name, cause
        )

    def explain(self, label: str, idle: float | None) -> str:
        """One line that names the likely cause of a lost connection."""
        lost = f"connection lost ({label})"
        server_timeout = self._budget.server_timeout
        if idle is None or idle < IDLE_EXPLAINS:
            return f"{lost} while in use: a server restart, KILL or network fault"
        if server_timeout and idle < server_timeout:
            return (
                f"{lost} after {idle:.0f} s idle: a timer shorter than the server's"
                f" idle timeout ({server_timeout:.0f} s) is on the path; set"
                " STALEGUARD_IDLE_TIMEOUT below it"
            )
        if self._strategy in ("off", "recycle"):
            return (
                f"{lost} after {idle:.0f} s idle; STALEGUARD_STRATEGY="
                f"{self._strategy!r} does not check connections at checkout: use"
                " 'guard'"
            )
        return f"{lost} after {idle:.0f} s idle: killed or restarted since"


def keep_mariadb_4031(dialect: t.Any) -> None:
    """Stop ``dialect`` taking MariaDB's 4031 for MySQL 8's idle disconnect.

    On MariaDB 4031 is a trigger error on a live connection; treated as a
    disconnect it would invalidate the whole pool. Only failed statements pay
    for the check (``python -m bench --scenarios statements``).
    """
    judge_disconnects(
        dialect, "mariadb-4031", functools.partial(_mariadb_4031, dialect)
    )


def _mariadb_4031(
    dialect: t.Any, error: BaseException, connection: t.Any
) -> None | bool:
    if getattr(dialect, "is_mariadb", False) and error_code(error) in MYSQL_ONLY_GONE:
        return False
    return None
