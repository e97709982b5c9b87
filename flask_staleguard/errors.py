"""Which database errors mean "the connection was already gone"."""

from __future__ import annotations

import errno

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


class LeakError(RuntimeError):
    """A connection was still checked out when its app context ended.

    Raised at teardown only with ``STALEGUARD_LEAKS = "raise"``, after the
    connection was reclaimed; meant for test suites.
    """


class ConnectionReclaimed(LeakError):
    """Raised to the holder of a connection the guard took back when the app
    context that checked it out ended (``STALEGUARD_LEAKS`` ``"reclaim"`` or
    ``"raise"``): the connection was closed, so nothing else can be handed it.
    """


def error_code(error: BaseException) -> int | None:
    """The driver's numeric error code, unwrapping PyMySQL's nested errors."""
    args = getattr(error, "args", ())
    if args and isinstance(args[0], BaseException):
        return error_code(args[0])
    if args and isinstance(args[0], int):
        return args[0]
    return None


def disconnect_label(
    error: BaseException, kind: str, *, mariadb: bool = False
) -> str | None:
    """A short label for a disconnect error, or ``None`` if it is not one."""
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
