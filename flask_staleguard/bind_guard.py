"""The guard of one bind: pool listeners that keep stale connections from the app.

At checkout, a pooled connection is replaced before the app sees it when it idled
past its budget, or when its socket shows the other side closed it. Replacing
means raising :class:`~sqlalchemy.exc.DisconnectionError` from the ``checkout``
event: SQLAlchemy then discards the connection and opens a new one, once. A brand
new connection is never rejected, or that one retry would be spent.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import typing as t
import weakref

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.exc import DisconnectionError

from . import _private
from . import probe
from .contexts import current_context
from .contexts import current_request
from .deadline import NoAnswer
from .deadline import shut_down_after
from .derive import derive_engine_options
from .derive import effective_timeout
from .derive import idle_budget
from .discovery import session_idle_timeout
from .errors import disconnect_label
from .errors import error_code
from .errors import LeakError
from .errors import MYSQL_ONLY_GONE
from .redact import Secrets
from .settings import bind_name
from .settings import BindKey
from .settings import Settings
from .signals import connection_replaced
from .signals import disconnect_seen
from .signals import leak_detected
from .sites import checkout_site
from .sites import format_site
from .sites import Site
from .stats import BindStats
from .units import seconds_text

logger = logging.getLogger("flask_staleguard")

#: The key of a connection record's :class:`ConnectionState` in its ``info``.
#: SQLAlchemy clears ``info`` whenever it replaces the DBAPI connection, so a
#: missing state means a brand new connection.
STATE = "staleguard"

#: Seconds of idle before a checkout below which idleness cannot explain a lost
#: connection: no server or middlebox idle timer is that short. (Tracking each
#: statement instead would put a listener on every execute.)
IDLE_EXPLAINS = 1.0

_pid = os.getpid()


def _note_fork() -> None:
    global _pid
    _pid = os.getpid()


# Cheaper than os.getpid() on every checkout.
os.register_at_fork(after_in_child=_note_fork)


class ConnectionState:
    """What the guard knows about one pooled DBAPI connection."""

    __slots__ = ("pid", "budget", "probe", "tls", "returned", "idle")

    def __init__(
        self,
        pid: int,
        budget: float,
        socket_probe: probe.SocketProbe | None,
        tls: bool | None = None,
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


class Checkout(t.NamedTuple):
    """A connection the app holds: who took it, where, and when."""

    #: The app context that took it, or ``None``.
    context: t.Any
    #: The app's frames that took it, when recorded.
    site: Site
    at: float
    #: The request that took it, while the bind names leaks by request.
    request: t.Any
    #: A weak reference to the proxy the holder has (SQLAlchemy's pool proxy).
    proxy: weakref.ref[t.Any]


class BindGuard:
    """Settings, listeners and counters for one bind of one app."""

    def __init__(
        self,
        key: BindKey,
        secrets: Secrets,
        kind: str,
        settings: Settings,
        server_timeout: float | None,
        *,
        provisional: bool = False,
    ) -> None:
        self.key = key
        #: The bind's name in logs and output.
        self.name = bind_name(key)
        #: The bind's credentials, to mask wherever they could show.
        self.secrets = secrets
        #: The URL with every credential masked: safe for logs and output.
        self.url = secrets.url
        #: ``"mysql"``, ``"postgresql"``, ``"sqlite"`` or another backend name.
        self.kind = kind
        self.strategy = settings.strategy
        self.leak_policy = settings.leaks
        self.leak_threshold = settings.leak_threshold
        #: Seconds any exchange of the guard's own with the server may take.
        self.timeout = settings.discovery_timeout
        self._idle_timeout = settings.idle_timeout_for(key)
        self._margin = settings.margin
        #: ``True`` while the server's timeout is discovered per connection.
        self.discovers = settings.server_timeout_for(key) is None
        #: ``True`` while :attr:`server_timeout` is a fallback, not the server's word.
        self.provisional = provisional
        self.server_timeout = server_timeout
        self.budget = self._budget_for(server_timeout)
        #: The engine options this strategy asks for.
        self.derived = derive_engine_options(self.strategy, _finite(self.budget))
        #: Those of :attr:`derived` the user had not set, so the guard applied them.
        self.applied: dict[str, t.Any] = {}
        self.stats = BindStats()
        #: Connections checked out now, with who took them, where and when: the
        #: fields of a :class:`Checkout`, as a plain tuple (cheaper to build).
        self.checked_out: dict[
            t.Any, tuple[t.Any, Site, float, t.Any, weakref.ref[t.Any]]
        ] = {}
        self._guarding = self.strategy == "guard"
        self._watching = self.strategy != "off"
        self._engines: weakref.WeakSet[sa.engine.Engine] = weakref.WeakSet()
        self._dialect: t.Any = None
        #: Whether checkouts in app contexts record their site: from the bind's
        #: first leak on, or always when leaks raise (test suites).
        self._sites = self.leak_policy == "raise"
        self._held_scan = 0.0
        self._reported: dict[t.Any, tuple[t.Any, ...]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<BindGuard {self.key!r} {self.url} strategy={self.strategy}>"

    @property
    def idle_timeout(self) -> float | None:
        """The declared middlebox idle timer, if any."""
        return self._idle_timeout

    def _budget_for(self, server_timeout: float | None) -> float:
        timeout = effective_timeout(server_timeout, self._idle_timeout)
        budget = idle_budget(timeout, self._margin)
        return math.inf if budget is None else budget

    def attach(self, engine: sa.engine.Engine) -> None:
        """Listen to ``engine``'s pool. Listeners survive ``engine.dispose()``."""
        if engine in self._engines:
            return
        self._engines.add(engine)
        self._dialect = engine.dialect
        event.listen(engine, "connect", self._on_connect)
        event.listen(engine, "checkout", self._on_checkout)
        event.listen(engine, "checkin", self._on_checkin)
        event.listen(engine, "detach", self._on_detach)
        # Disconnects are counted when the pool invalidates the connection, not
        # in a ``handle_error`` listener: any dialect listener costs every
        # statement an event lookup.
        event.listen(engine, "invalidate", self._on_invalidate)
        if self.kind == "mysql":
            event.listen(engine, "handle_error", _keep_mariadb_4031)

    # -- pool events ---------------------------------------------------------------

    def _on_connect(self, dbapi_connection: t.Any, record: t.Any) -> None:
        budget = self.budget
        if self._watching and self.discovers:
            try:
                timeout = self._session_timeout(dbapi_connection)
            except NoAnswer:
                raise  # the connection was shut down: the pool must not keep it
            except Exception as e:  # never fail a connect over a diagnostic
                logger.debug(
                    "bind %s: could not read the idle timeout: %s", self.name, e
                )
            else:
                budget = self._budget_for(timeout)
                if timeout != self.server_timeout or self.provisional:
                    self._learn(timeout)
        record.info[STATE] = self._state(dbapi_connection, budget)

    def _session_timeout(self, dbapi_connection: t.Any) -> float | None:
        """The new connection's idle timeout, asked within :attr:`timeout`."""
        with shut_down_after(dbapi_connection, self.timeout) as struck:
            try:
                return session_idle_timeout(dbapi_connection, self.kind)
            except Exception:
                if struck():
                    raise NoAnswer(
                        f"bind {self.name}: the server did not answer the guard's"
                        f" query for its idle timeout within {self.timeout:g} s"
                        " (STALEGUARD_DISCOVERY_TIMEOUT); the connection was closed"
                    ) from None
                raise

    def _state(self, dbapi_connection: t.Any, budget: float) -> ConnectionState:
        socket_probe = None
        tls = None
        if self._guarding:
            fd = probe.socket_fd(dbapi_connection)
            socket_probe = None if fd is None else probe.SocketProbe(fd)
            tls = probe.uses_tls(dbapi_connection)
        return ConnectionState(_pid, budget, socket_probe, tls)

    # The two listeners below run for every checkout: every attribute lookup and
    # call counts, so they are written flat.

    def _on_checkout(
        self, dbapi_connection: t.Any, record: t.Any, proxy: t.Any
    ) -> None:
        self.stats.checkouts += 1
        now = time.monotonic()
        state = record.info.get(STATE)
        if state is not None and state.returned is not None:
            if state.pid != _pid:
                # Closing the parent's socket would send COM_QUIT on the parent's
                # connection; drop it instead (SQLAlchemy's multiprocessing recipe).
                record.dbapi_connection = proxy.dbapi_connection = None
                raise self._replace("fork", None)
            idle = state.idle = now - state.returned
            if self._guarding:
                if idle > state.budget:
                    raise self._replace("idle_budget", idle)
                socket_probe = state.probe
                # poll(0) is the whole check when the socket is quiet, as it is
                # for a live idle connection: called directly, no Python frame.
                if socket_probe is not None and socket_probe.poll(0):
                    self._judge(socket_probe.peek(), dbapi_connection, state)
        ctx = current_context()
        if ctx is not None:
            # The stack walk is most of a checkout's cost, so it waits for the
            # bind's first leak; that one is reported by its request instead.
            sites = self._sites
            self.checked_out[record] = (
                ctx,
                checkout_site() if sites else (),
                now,
                None if sites else current_request(),
                weakref.ref(proxy),
            )
        else:
            held = self.leak_threshold is not None
            self.checked_out[record] = (
                None,
                checkout_site() if held else (),
                now,
                None,
                weakref.ref(proxy),
            )
        if self.leak_threshold is not None:
            self._report_held()

    def _on_checkin(self, dbapi_connection: t.Any, record: t.Any) -> None:
        self.checked_out.pop(record, None)
        if dbapi_connection is not None:
            state = record.info.get(STATE)
            if state is None:  # opened before the guard attached to its engine
                state = record.info[STATE] = self._state(dbapi_connection, self.budget)
            state.returned = time.monotonic()

    def _on_detach(self, dbapi_connection: t.Any, record: t.Any) -> None:
        self.checked_out.pop(record, None)

    def _judge(
        self,
        verdict: tuple[str, bytes],
        dbapi_connection: t.Any,
        state: ConnectionState,
    ) -> None:
        """Replace a connection whose socket spoke while idle, unless a ping says no."""
        reason, data = verdict
        idle = t.cast(float, state.idle)
        if reason != probe.UNKNOWN:
            raise self._replace(reason, idle)
        detail = ""
        if self.kind == "mysql":
            reason, detail = probe.mysql_verdict(data, state.tls)
            if reason != probe.UNKNOWN:
                raise self._replace(reason, idle, detail)
        # Bytes nobody can classify here (TLS records, a NOTIFY): one real ping
        # decides, rather than trusting or discarding blindly; within the time
        # limit, as a silently dropped path would never answer.
        with shut_down_after(dbapi_connection, self.timeout) as struck:
            try:
                alive = self._dialect.do_ping(dbapi_connection)
            except Exception:
                alive = False
        if struck():
            raise self._replace(
                "probe_ping_timeout", idle, f"no answer within {self.timeout:g} s"
            )
        if not alive:
            raise self._replace("probe_ping_failed", idle, detail)

    def _replace(
        self, reason: str, idle: float | None, detail: str = ""
    ) -> DisconnectionError:
        self.stats.count(self.stats.replaced, reason)
        logger.debug(
            "bind %s: replacing a stale connection (%s%s)%s",
            self.name,
            reason,
            f", {detail}" if detail else "",
            "" if idle is None else f" after {idle:.1f} s idle",
        )
        connection_replaced.send(self, reason=reason, idle=idle)
        return DisconnectionError(f"flask-staleguard: stale connection ({reason})")

    def _learn(self, timeout: float | None) -> None:
        """Adopt the idle timeout a live connection reported."""
        with self._lock:
            was, self.server_timeout = self.server_timeout, timeout
            self.provisional = False
            self.budget = self._budget_for(timeout)
            self.derived = derive_engine_options(self.strategy, _finite(self.budget))
            recycle = self.derived.get("pool_recycle", -1)
            if (
                "pool_recycle" in self.applied
                and recycle != self.applied["pool_recycle"]
            ):
                self.applied["pool_recycle"] = recycle
                for engine in list(self._engines):
                    _private.set_pool_option(engine.pool, "pool_recycle", int(recycle))
        logger.info(
            "bind %s: the server's idle timeout is %s (was %s); idle budget %s",
            self.name,
            seconds_text(timeout),
            seconds_text(was),
            seconds_text(self.budget),
        )

    def _on_invalidate(
        self, dbapi_connection: t.Any, record: t.Any, exception: BaseException | None
    ) -> None:
        """Count and explain a connection the pool drops after a disconnect error."""
        if exception is None or isinstance(exception, (DisconnectionError, LeakError)):
            # Invalidated by the app, replaced at checkout (counted there), or a
            # leak taken back (counted as one).
            return
        mariadb = bool(getattr(self._dialect, "is_mariadb", False))
        label = disconnect_label(exception, self.kind, mariadb=mariadb)
        if label is None:
            return
        self.stats.count(self.stats.disconnects, label)
        state = record.info.get(STATE)
        idle = None if state is None else state.idle
        logger.warning("bind %s: %s", self.name, self._explain(label, idle))
        disconnect_seen.send(self, code=label, idle=idle)

    def _explain(self, label: str, idle: float | None) -> str:
        """One line that names the likely cause of a lost connection."""
        lost = f"connection lost ({label})"
        if idle is None or idle < IDLE_EXPLAINS:
            return f"{lost} while in use: a server restart, KILL or network fault"
        if self.server_timeout and idle < self.server_timeout:
            return (
                f"{lost} after {idle:.0f} s idle: a timer shorter than the server's"
                f" idle timeout ({self.server_timeout:.0f} s) is on the path; set"
                " STALEGUARD_IDLE_TIMEOUT below it"
            )
        if self.strategy in ("off", "recycle"):
            return (
                f"{lost} after {idle:.0f} s idle; STALEGUARD_STRATEGY={self.strategy!r}"
                " does not check connections at checkout: use 'guard'"
            )
        return f"{lost} after {idle:.0f} s idle: killed or restarted since"

    # -- leaks -------------------------------------------------------------------

    def leaks_of(self, context: t.Any) -> list[tuple[t.Any, Checkout]]:
        """Connections checked out in the app context ``context`` and still out."""
        return [
            (r, Checkout(*c))
            for r, c in self.checked_out.copy().items()
            if c[0] is context
        ]

    def reclaim(self, record: t.Any, checkout: Checkout) -> None:
        """Report a leaked connection and, by policy, take it back from its holder.

        Taking it back closes it and frees its pool slot: the holder may still use
        it, so it is never handed to anyone else. The holder's next use raises
        :class:`~flask_staleguard.ConnectionReclaimed`.
        """
        self.stats.add("leaks_detected")
        proxy = checkout.proxy()
        reclaim = self.leak_policy != "warn" and proxy is not None
        where = _where(checkout)
        logger.warning(
            "bind %s: a connection checked out %s was not returned when its app"
            " context ended; %s%s",
            self.name,
            where,
            "closed and its pool slot freed: its holder's next use raises"
            " ConnectionReclaimed"
            if reclaim
            else "left checked out (STALEGUARD_LEAKS='warn')",
            "" if self._sites else "; file and line are recorded for the next leaks",
        )
        self._sites = True
        if reclaim:
            self._take_back(proxy, where)
            self.checked_out.pop(record, None)
            self.stats.add("leaks_reclaimed")
        elif self.checked_out.get(record) == tuple(checkout):
            # Reported once; from now on it is held outside any app context.
            self.checked_out[record] = (
                None,
                checkout.site,
                checkout.at,
                None,
                checkout.proxy,
            )
        leak_detected.send(self, site=checkout.site, reclaimed=reclaim)

    def _take_back(self, proxy: t.Any, where: str) -> None:
        """Close a leaked connection under its holder and free its pool slot."""
        message = (
            f"flask-staleguard closed this connection (checked out {where}) when"
            " the app context that checked it out ended, because it was still"
            f" checked out (STALEGUARD_LEAKS={self.leak_policy!r}); return"
            " connections before the context ends"
        )
        try:
            dbapi_connection = proxy.dbapi_connection
            if dbapi_connection is None:
                return
            # Shut the socket first: a holder busy on it in another thread fails
            # at once, and the driver's goodbye can never interleave with its bytes.
            fd = probe.socket_fd(dbapi_connection)
            if fd is not None:
                probe.shut_down(fd)
            proxy.invalidate(LeakError(message))
            _private.leave_error_for_holder(proxy, message)
        except Exception as e:
            logger.warning(
                "bind %s: could not close the leaked connection: %s", self.name, e
            )

    def _report_held(self) -> None:
        """Report connections held outside any app context past the threshold."""
        now = time.monotonic()
        if now - self._held_scan < 1.0:
            return
        self._held_scan = now
        threshold = t.cast(float, self.leak_threshold)
        held = self.checked_out.copy()
        self._reported = {r: c for r, c in self._reported.items() if held.get(r) is c}
        for record, raw in held.items():
            checkout = Checkout(*raw)
            if (
                checkout.context is None
                and now - checkout.at > threshold
                and record not in self._reported
            ):
                self._reported[record] = raw
                logger.warning(
                    "bind %s: a connection checked out %s has been held for %.0f s"
                    " (STALEGUARD_LEAK_THRESHOLD=%s)",
                    self.name,
                    _where(checkout),
                    now - checkout.at,
                    seconds_text(threshold),
                )


def _keep_mariadb_4031(context: sa.engine.ExceptionContext) -> None:
    """Stop SQLAlchemy taking MariaDB's 4031 for MySQL 8's idle disconnect.

    On MariaDB 4031 is a trigger error on a live connection; treated as a
    disconnect it would invalidate the whole pool. A ``handle_error`` listener
    costs every statement about 0.3 µs (``python -m bench --scenarios
    statements``), and runs only when one fails.
    """
    if (
        context.is_disconnect
        and getattr(context.dialect, "is_mariadb", False)
        and error_code(context.original_exception) in MYSQL_ONLY_GONE
    ):
        context.is_disconnect = False


def _where(checkout: Checkout) -> str:
    """``at file:line in function ...``, or the request that took the connection."""
    if checkout.site or checkout.request is None:
        return f"at {format_site(checkout.site)}"
    request = checkout.request
    return f"during {request.method} {request.path} (endpoint {request.endpoint!r})"


def _finite(budget: float) -> float | None:
    """The budget for derivation: ``None`` when there is no idle limit at all."""
    return None if math.isinf(budget) else budget
