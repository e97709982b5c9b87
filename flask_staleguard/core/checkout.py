"""The checks at checkout: keep a stale connection from the app, with no round trip.

At checkout, a pooled connection is replaced before the app sees it when it idled
past its budget, outlived its lifetime, or when its socket shows the other side
closed it. Replacing means raising :class:`~sqlalchemy.exc.DisconnectionError`
from the ``checkout`` event: SQLAlchemy then discards the connection and opens a
new one, once. A brand new connection is rejected only when its socket shows it
is already gone: the one retry is not spent on a guess.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import typing as t

from sqlalchemy import event
from sqlalchemy.exc import DisconnectionError

from ..errors import NoAnswer
from ..metrics.stats import BindStats
from . import probe
from .budget import IdleBudget
from .connect import trying_once
from .deadline import shut_down_after
from .discovery import node_facts
from .discovery import NodeFacts
from .holders import Holders
from .keepalive import Keepalive
from .keepalive import set_keepalive
from .lifetime import born
from .lifetime import lifetime

logger = logging.getLogger("flask_staleguard")

#: The key of a connection record's :class:`ConnectionState` in its ``info``.
#: SQLAlchemy clears ``info`` whenever it replaces the DBAPI connection, so a
#: missing state means a brand new connection.
STATE = "staleguard"

_pid = os.getpid()


def _note_fork() -> None:
    global _pid
    _pid = os.getpid()


# Cheaper than os.getpid() on every checkout.
os.register_at_fork(after_in_child=_note_fork)


class ConnectionState:
    """What the guard knows about one pooled DBAPI connection."""

    __slots__ = (
        "pid",
        "budget",
        "probe",
        "tls",
        "returned",
        "idle",
        "read_only",
        "expires",
    )

    def __init__(
        self,
        pid: int,
        budget: float,
        socket_probe: probe.SocketProbe | None,
        tls: bool | None = None,
        read_only: bool | None = None,
        expires: float = math.inf,
    ) -> None:
        #: The process that opened it.
        self.pid = pid
        #: Its idle budget in seconds, from its own session's timeout.
        self.budget = budget
        #: Its socket's liveness check; ``None`` when the driver hides the socket.
        self.probe = socket_probe
        #: Whether it runs over TLS; ``None`` when the driver does not say.
        self.tls = tls
        #: ``time.monotonic()`` of its last checkin; ``None`` until the first.
        self.returned: float | None = None
        #: Seconds it had idled before its latest checkout.
        self.idle: float | None = None
        #: Whether its node refused writes when it was opened; ``None``: unknown.
        self.read_only = read_only
        #: The ``time.monotonic()`` past which it is replaced at checkout for its
        #: age; infinite where no lifetime applies.
        self.expires = expires


#: Replaces a connection: counts, logs and signals ``reason`` and returns the
#: error to raise from the ``checkout`` event.
Replace = t.Callable[[str, t.Optional[float], str], DisconnectionError]


class CheckoutChecks:
    """The ``connect``, ``checkout`` and ``checkin`` listeners of one pool.

    Every strategy but ``"off"`` learns each new connection's idle timeout and
    times its idling; ``"guard"`` also checks it at checkout, and gives it a
    lifetime (``max_lifetime``: its jittered maximum). Connections from
    before a fork are dropped in every strategy. The same two listeners tell
    ``holders`` who holds what: SQLAlchemy's dispatch of each pool listener costs
    about as much as the checks themselves.
    """

    def __init__(
        self,
        name: str,
        kind: str,
        strategy: str,
        timeout: float,
        budget: IdleBudget,
        stats: BindStats,
        replace: Replace,
        learn: t.Callable[[float | None], None],
        holders: Holders,
        clock: t.Callable[[], float] = time.monotonic,
        keepalive: Keepalive | None = None,
        max_lifetime: float = 1800.0,
    ) -> None:
        self._name = name
        self._kind = kind
        #: Seconds any exchange of the guard's own with the server may take.
        self._timeout = timeout
        self._budget = budget
        self._stats = stats
        self._replace = replace
        self._learn = learn
        self._holders = holders
        self._hold = holders.hold
        self._holder = holders.holder
        self._held = holders.checked_out
        self._reported = holders.reported
        self._returned_late = holders.returned_late
        self._clock = clock
        #: The TCP keepalive every new connection gets; ``None``: the driver's.
        self.keepalive = keepalive
        #: Seconds a connection may live under ``"guard"``, before its jitter.
        self.max_lifetime = max_lifetime
        self._told_hidden = False
        #: ``id()`` of the proxies whose checkout this pool already failed once:
        #: SQLAlchemy retries a checkout once, with a brand new connection.
        self._retried: set[int] = set()
        self._guarding = strategy == "guard"
        self._watching = strategy != "off"
        self._dialect: t.Any = None
        #: Whether the node of the newest connection refused writes when it was
        #: opened; ``None`` until one says.
        self.read_only: bool | None = None
        #: Given a new connection's ``read_only`` and whether it is the connect's
        #: last attempt, the role to record for it, or
        #: :class:`~.connect.RetryConnect` to turn its node down; ``None``: any
        #: node will do (``STALEGUARD_ROLE = "any"``).
        self.role_of: t.Callable[[bool | None, bool], bool | None] | None = None
        # What prepare() learnt, for the connect listener that follows it in
        # the same thread.
        self._fresh = threading.local()

    def attach(self, engine: t.Any) -> None:
        """Listen to ``engine``'s pool. Listeners survive ``engine.dispose()``."""
        self._dialect = engine.dialect
        event.listen(engine, "connect", self._on_connect)
        event.listen(engine, "checkout", self._on_checkout)
        event.listen(engine, "checkin", self._on_checkin)

    def prepare(self, dbapi_connection: t.Any, last: bool) -> None:
        """Inside the pool's connect (the connector's check): learn what the new
        connection says, and turn its node down when the pool wants a writer and
        it is read-only, so the connect is tried again (:attr:`role_of`).
        """
        facts = self._first_words(dbapi_connection)
        # The guard's own connections (reports) take the node they find.
        if facts is not None and self.role_of is not None and not trying_once():
            facts = NodeFacts(facts.idle_timeout, self.role_of(facts.read_only, last))
        self._fresh.value = (dbapi_connection, facts)

    def _on_connect(self, dbapi_connection: t.Any, record: t.Any) -> None:
        fresh = getattr(self._fresh, "value", None)
        if fresh is not None and fresh[0] is dbapi_connection:
            self._fresh.value = None
            facts = fresh[1]
        else:  # an engine whose connects the connector does not run
            facts = self._first_words(dbapi_connection)
        budget = self._budget.seconds
        read_only = None
        if facts is not None:
            timeout, read_only = facts
            budget = self._budget.for_timeout(timeout)
            if read_only is not None:
                self.read_only = read_only
            if self._budget.is_news(timeout):
                self._learn(timeout)
        state = record.info[STATE] = self.state(
            dbapi_connection, record, budget, read_only
        )
        if self._guarding and state.probe is None:
            self._tell_hidden()

    def _first_words(self, dbapi_connection: t.Any) -> NodeFacts | None:
        """Set a new connection's keepalive, then ask its idle timeout and its
        node's role; ``None`` when not asked, or when asking failed harmlessly.
        """
        if self.keepalive is not None:
            # Before the guard's own query: a dead path must not hang it either.
            self._set_keepalive(dbapi_connection, self.keepalive)
        if not (self._watching and self._budget.discovers):
            return None
        try:
            return self._node_facts(dbapi_connection)
        except NoAnswer:
            raise  # the connection was shut down: the pool must not keep it
        except Exception as e:
            if self._lost(e, dbapi_connection):
                # Killed under the guard's query: kept, it would fail the app's
                # first statement with a less telling error.
                raise
            # Otherwise never fail a connect over a diagnostic.
            logger.debug("bind %s: could not read the idle timeout: %s", self._name, e)
            return None

    def _tell_hidden(self) -> None:
        """Say once that the driver hides its socket, and what the pool loses."""
        if self._told_hidden:
            return
        self._told_hidden = True
        keepalive = "no TCP keepalive is set (STALEGUARD_KEEPALIVE)"
        if not self._guarding:
            lost = f"{keepalive}, and a silently dropped path is found only by the"
            lost += " idle budget"
        elif self.keepalive is None:
            lost = "no socket probe runs at checkout; only the idle budget protects"
            lost += " the pool"
        else:
            lost = f"{keepalive} and no socket probe runs at checkout; only the idle"
            lost += " budget protects the pool"
        logger.warning("bind %s: the driver hides its socket: %s", self._name, lost)

    def _set_keepalive(self, dbapi_connection: t.Any, keepalive: Keepalive) -> None:
        fd = probe.socket_fd(dbapi_connection)
        if fd is None:
            self._tell_hidden()
            return
        try:
            with probe.borrowed(fd) as sock:
                set_keepalive(sock, keepalive)
        except OSError as e:  # a diagnostic's failure never fails a connect
            logger.debug("bind %s: could not set TCP keepalive: %s", self._name, e)

    def _lost(self, error: Exception, dbapi_connection: t.Any) -> bool:
        """Whether ``error`` left the new connection unusable."""
        try:
            return bool(self._dialect.is_disconnect(error, dbapi_connection, None))
        except Exception:
            return False

    def _node_facts(self, dbapi_connection: t.Any) -> NodeFacts:
        """The new connection's idle timeout and role, asked within the time limit."""
        with shut_down_after(dbapi_connection, self._timeout) as struck:
            try:
                return node_facts(dbapi_connection, self._kind)
            except Exception:
                if struck():
                    raise NoAnswer(
                        f"bind {self._name}: the server did not answer the guard's"
                        f" query for its idle timeout within {self._timeout:g} s"
                        " (STALEGUARD_DISCOVERY_TIMEOUT); the connection was closed"
                    ) from None
                raise

    def state(
        self,
        dbapi_connection: t.Any,
        record: t.Any,
        budget: float,
        read_only: bool | None = None,
    ) -> ConnectionState:
        """A new connection's state: its budget, its node's role and, to guard
        it, its socket and the end of its lifetime.
        """
        socket_probe = None
        tls = None
        expires = math.inf
        if self._guarding:
            socket_probe = probe.probe_for(dbapi_connection)
            tls = probe.uses_tls(dbapi_connection)
            expires = born(record, self._clock()) + lifetime(self.max_lifetime)
        return ConnectionState(_pid, budget, socket_probe, tls, read_only, expires)

    # The two listeners below run for every checkout: every attribute lookup and
    # call counts, so they are written flat.

    def _on_checkout(
        self, dbapi_connection: t.Any, record: t.Any, proxy: t.Any
    ) -> None:
        self._stats.checkouts += 1
        now = self._clock()
        state = record.info.get(STATE)
        # No state: opened before the guard attached; its state comes at checkin.
        if state is not None:
            if state.returned is None:
                # Brand new: it has not idled, but a KILL or a restart between
                # its connect and this checkout already shows on its socket.
                socket_probe = state.probe
                retry = bool(self._retried) and id(proxy) in self._retried
                if retry:
                    self._retried.discard(id(proxy))
                if self._guarding and socket_probe is not None and socket_probe.poll(0):
                    if retry:
                        self._hand_over_lost(state)
                    else:
                        self._judge(socket_probe.peek(), dbapi_connection, state, proxy)
            elif state.pid != _pid:
                # Closing the parent's socket would send COM_QUIT on the parent's
                # connection; drop it instead (SQLAlchemy's multiprocessing recipe).
                record.dbapi_connection = proxy.dbapi_connection = None
                raise self._retrying(proxy, self._replace("fork", None, ""))
            else:
                idle = state.idle = now - state.returned
                if self._guarding:
                    if idle > state.budget:
                        error = self._replace("idle_budget", idle, "")
                        raise self._retrying(proxy, error)
                    # The backstop for what no check sees (an old node that still
                    # answers); only here, so never a connection in use or new.
                    if now > state.expires:
                        error = self._replace("max_lifetime", idle, "")
                        raise self._retrying(proxy, error)
                    socket_probe = state.probe
                    # poll(0) is the whole check when the socket is quiet, as it
                    # is for a live idle connection: called directly, no frame.
                    if socket_probe is not None and socket_probe.poll(0):
                        self._judge(socket_probe.peek(), dbapi_connection, state, proxy)
        # Only a connection the checks let through is held.
        if self._holders.plain:  # Holders.hold, inline
            owner, request = self._holder()
            self._held[record] = (owner, (), now, request)
        else:
            self._hold(record, now)

    def _on_checkin(self, dbapi_connection: t.Any, record: t.Any) -> None:
        # Holders.release, inline.
        raw = self._held.pop(record, None)
        if raw is not None and self._reported:  # rare: only after a report
            self._returned_late(record, raw)
        if dbapi_connection is not None:
            state = record.info.get(STATE)
            if state is None:  # opened before the guard attached to its engine
                state = record.info[STATE] = self.state(
                    dbapi_connection, record, self._budget.seconds
                )
                if self.keepalive is not None:
                    # Its connect listener never ran: without this it would keep
                    # the system's keepalive (none for two hours) all its life.
                    self._set_keepalive(dbapi_connection, self.keepalive)
            state.returned = self._clock()

    def _retrying(self, proxy: t.Any, error: DisconnectionError) -> DisconnectionError:
        """``error``, after noting that SQLAlchemy will retry ``proxy``'s checkout."""
        if len(self._retried) > 256:  # retries whose connect failed never came back
            self._retried.clear()
        self._retried.add(id(proxy))
        return error

    def _hand_over_lost(self, state: ConnectionState) -> None:
        """Let a lost connection through on SQLAlchemy's one retry of a checkout.

        A second ``DisconnectionError`` would fail the checkout with "This
        connection is closed", which says less than the driver's own error that
        the app's first statement now gets, as it would without the guard.
        """
        logger.warning(
            "bind %s: the new connection that replaced a stale one is already"
            " gone too (the server is restarting, or killing connections); it is"
            " handed over, and its first statement fails with the driver's error",
            self._name,
        )

    def _judge(
        self,
        verdict: tuple[str, bytes],
        dbapi_connection: t.Any,
        state: ConnectionState,
        proxy: t.Any,
    ) -> None:
        """Replace a connection whose socket spoke while idle, unless a ping says no."""
        reason, data = verdict
        idle = state.idle
        if reason != probe.UNKNOWN:
            raise self._retrying(proxy, self._replace(reason, idle, ""))
        detail = ""
        if self._kind == "mysql":
            reason, detail = probe.mysql_verdict(data, state.tls)
        elif self._kind == "postgresql":
            reason, detail = probe.postgres_verdict(data)
        if reason != probe.UNKNOWN:
            raise self._retrying(proxy, self._replace(reason, idle, detail))
        # Bytes nobody can classify here (TLS records, a NOTIFY): one real ping
        # decides, rather than trusting or discarding blindly; within the time
        # limit, as a silently dropped path would never answer.
        with shut_down_after(dbapi_connection, self._timeout) as struck:
            try:
                alive = self._dialect.do_ping(dbapi_connection)
            except Exception:
                alive = False
        if struck():
            error = self._replace(
                "probe_ping_timeout", idle, f"no answer within {self._timeout:g} s"
            )
            raise self._retrying(proxy, error)
        if not alive:
            raise self._retrying(
                proxy, self._replace("probe_ping_failed", idle, detail)
            )
