"""Which errors mean "this node no longer takes writes": a failover.

A statement refused because its node became read-only, on a connection that was
opened to a writer, says the pool points at a demoted primary. Told that it is a
disconnect, SQLAlchemy drops the connection and invalidates the pool (every
connection checked out before), and the next checkouts connect anew, to wherever
the name or the proxy leads now. Only failed statements pay for the check.
"""

from __future__ import annotations

import logging
import typing as t

from .._private import judge_disconnects
from .checkout import STATE
from .connect import RetryConnect
from .disconnects import failover_label

logger = logging.getLogger("flask_staleguard")

#: PostgreSQL's parameters that say its node refuses writes, reported to the
#: client at connect and with the first reply after they change (14+).
_PG_READ_ONLY = ("default_transaction_read_only", "in_hot_standby")


def watch_for_demotions(dialect: t.Any, kind: str) -> None:
    """Make ``dialect`` call a demoted writer's refusal a disconnect."""
    if kind in ("mysql", "postgresql"):
        judge_disconnects(
            dialect, "demotion", lambda e, c: is_demotion(e, kind, c) or None
        )


def is_demotion(error: BaseException, kind: str, connection: t.Any) -> bool:
    """Whether ``error``, raised on ``connection`` (a pool's proxied connection),
    says the writer it was opened to stopped taking writes.

    A connection opened to a read-only node (a replica), or whose node's role was
    never learnt, is not judged. On PostgreSQL the node must also report itself
    read-only now, or the 25006 came from the app's own read-only transaction.
    """
    label = failover_label(error, kind)
    if label is None:
        return False
    info = getattr(connection, "info", None)
    state = info.get(STATE) if isinstance(info, dict) else None
    if state is None or state.read_only is not False:
        return False
    if kind == "postgresql":
        driver = getattr(connection, "driver_connection", None)
        return any(reported(driver, name) == "on" for name in _PG_READ_ONLY)
    return True


def reported(driver_connection: t.Any, name: str) -> str | None:
    """The value of parameter ``name`` PostgreSQL last reported on this driver
    connection, without a round trip; ``None`` when the driver does not say.
    """
    try:
        info = getattr(driver_connection, "info", None)
        if info is not None and hasattr(info, "parameter_status"):  # psycopg 3
            return t.cast("str | None", info.parameter_status(name))
        if hasattr(driver_connection, "get_parameter_status"):  # psycopg2
            return t.cast("str | None", driver_connection.get_parameter_status(name))
        if hasattr(driver_connection, "get_settings"):  # asyncpg
            value = getattr(driver_connection.get_settings(), name, None)
            return None if value is None else str(value)
    except Exception:  # a closed connection: it says nothing
        return None
    return None


class WriterWanted:
    """Whether a pool's new connections must land on a writer: always (role
    ``"writer"``), or from a failover until one does (role ``"auto"``).

    After a failover, DNS caches and proxies send new connections to the old node
    for a while: turned down, they are tried again within the connect wait
    (:class:`~.connect.Connector`), as libpq's ``target_session_attrs`` does.
    """

    def __init__(self, name: str, role: str) -> None:
        self._name = name
        self._always = role == "writer"
        #: Whether a failover made the pool want a writer, until one is found.
        self.wanted = False

    def failover(self) -> None:
        """The pool's writer became read-only: its next connections must not."""
        self.wanted = True

    def role_of(self, read_only: bool | None, last: bool) -> bool | None:
        """The role to record for a new connection whose node said ``read_only``,
        on the connect's ``last`` attempt or not; raises
        :class:`~.connect.RetryConnect` to turn the node down.
        """
        if read_only is not True:
            if read_only is False:
                self.wanted = False  # a writer again: the failover is over
            return read_only
        if not (self._always or self.wanted):
            return True  # a replica, or a pool that reads from any node
        if not last:
            raise RetryConnect(
                f"bind {self._name}: the new connection's node is read-only, and"
                " the pool wants a writer"
            )
        # Never worse than no guard: a read-only node still serves reads. Taken
        # as the pool's writer, its first refused write is a failover again.
        self.wanted = False
        logger.warning(
            "bind %s: no writer within the connect wait (STALEGUARD_CONNECT_WAIT):"
            " a read-only node is taken",
            self._name,
        )
        return False
