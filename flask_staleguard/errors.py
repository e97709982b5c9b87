"""Every exception flask-staleguard raises, in one place."""

from __future__ import annotations

from sqlalchemy.exc import DisconnectionError


class ConfigError(ValueError):
    """A ``STALEGUARD_*`` key has a value the guard cannot use. The message
    names the key and the values it accepts.
    """


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


class NoAnswer(TimeoutError):
    """The database did not answer within the guard's time limit."""


class UnknownBind(LookupError):
    """``--bind`` (or a report function's ``bind``) named a bind the app does not
    have.
    """


class ConnectRejected(DisconnectionError):
    """A new connection was refused by the guard's connect check (as one that
    landed on a read-only node for a writer bind) until the connect wait ran out;
    the message says why. A :class:`sqlalchemy.exc.DisconnectionError`.
    """
