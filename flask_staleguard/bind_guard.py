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
from flask.globals import _cv_app
from flask.globals import _cv_request
from sqlalchemy import event
from sqlalchemy.exc import DisconnectionError

from . import probe
from .derive import derive_engine_options
from .derive import effective_timeout
from .derive import idle_budget
from .discovery import flavor
from .discovery import session_idle_timeout
from .errors import disconnect_label
from .errors import error_code
from .errors import MYSQL_ONLY_GONE
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

    __slots__ = ("pid", "budget", "probe", "returned", "idle")

    def __init__(
        self, pid: int, budget: float, socket_probe: probe.SocketProbe | None
    ) -> None:
        #: The process that opened it.
        self.pid = pid
        #: Its idle budget in seconds, from its own session's timeout.
        self.budget = budget
        #: Its socket's liveness check; ``None`` when the driver hides the socket.
        self.probe = socket_probe
        #: ``time.monotonic()`` of its last checkin; ``None`` until the first.
        self.returned: float | None = None
        #: Seconds it had idled before its latest checkout.
        self.idle: float | None = None


class Checkout(t.NamedTuple):
    """A connection the app holds: who took it, where, and when."""

    #: ``id()`` of the app context that took it, or ``None``.
    context: int | None
    #: The app's frames that took it, when recorded.
    site: Site
    at: float
    #: The request context that took it, if any.
    request: t.Any


class BindGuard:
    """Settings, listeners and counters for one bind of one app."""

    def __init__(
        self,
        key: BindKey,
        url: sa.engine.URL,
        settings: Settings,
        server_timeout: float | None,
        *,
        provisional: bool = False,
    ) -> None:
        self.key = key
        #: The bind's name in logs and output.
        self.name = bind_name(key)
        #: The URL with its password masked: safe for logs and output.
        self.url = url.render_as_string(hide_password=True)
        self.kind = flavor(url)
        self.strategy = settings.strategy
        self.leak_policy = settings.leaks
        self.leak_threshold = settings.leak_threshold
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
        self.checked_out: dict[t.Any, tuple[int | None, Site, float, t.Any]] = {}
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
            _keep_mariadb_4031(engine.dialect)

    # -- pool events ---------------------------------------------------------------

    def _on_connect(self, dbapi_connection: t.Any, record: t.Any) -> None:
        budget = self.budget
        if self._watching and self.discovers:
            try:
                timeout = session_idle_timeout(dbapi_connection, self.kind)
            except Exception as e:  # never fail a connect over a diagnostic
                logger.debug(
                    "bind %s: could not read the idle timeout: %s", self.name, e
                )
            else:
                budget = self._budget_for(timeout)
                if timeout != self.server_timeout or self.provisional:
                    self._learn(timeout)
        record.info[STATE] = self._state(dbapi_connection, budget)

    def _state(self, dbapi_connection: t.Any, budget: float) -> ConnectionState:
        socket_probe = None
        if self._guarding:
            fd = probe.socket_fd(dbapi_connection)
            socket_probe = None if fd is None else probe.SocketProbe(fd)
        return ConnectionState(_pid, budget, socket_probe)

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
                    self._judge(socket_probe.peek(), dbapi_connection, idle)
        ctx = _cv_app.get(None)
        if ctx is not None:
            # The stack walk is most of a checkout's cost, so it waits for the
            # bind's first leak; that one is reported by its request instead.
            self.checked_out[record] = (
                id(ctx),
                checkout_site() if self._sites else (),
                now,
                _cv_request.get(None),
            )
        else:
            held = self.leak_threshold is not None
            self.checked_out[record] = (
                None,
                checkout_site() if held else (),
                now,
                None,
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
        self, verdict: tuple[str, bytes], dbapi_connection: t.Any, idle: float
    ) -> None:
        """Replace a connection whose socket spoke while idle, unless a ping says no."""
        reason, data = verdict
        if reason != probe.UNKNOWN:
            raise self._replace(reason, idle)
        if self.kind == "mysql":
            code = probe.mysql_error_code(data)
            if code is not None:
                raise self._replace(probe.SERVER_ERROR, idle, f"error {code}")
        # Bytes nobody can classify here (TLS records, a NOTIFY): one real ping
        # decides, rather than trusting or discarding blindly.
        try:
            alive = self._dialect.do_ping(dbapi_connection)
        except Exception:
            alive = False
        if not alive:
            raise self._replace("probe_ping_failed", idle)

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
                    engine.pool._recycle = int(recycle)
        logger.info(
            "bind %s: the server's idle timeout is %s (was %s); idle budget %s",
            self.name,
            _seconds(timeout),
            _seconds(was),
            _seconds(self.budget),
        )

    def _on_invalidate(
        self, dbapi_connection: t.Any, record: t.Any, exception: BaseException | None
    ) -> None:
        """Count and explain a connection the pool drops after a disconnect error."""
        if exception is None or isinstance(exception, DisconnectionError):
            return  # invalidated by the app, or replaced at checkout (counted there)
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

    def leaks_of(self, context: int) -> list[tuple[t.Any, Checkout]]:
        """Connections checked out in the app context ``context`` and still out."""
        return [
            (r, Checkout(*c))
            for r, c in self.checked_out.copy().items()
            if c[0] == context
        ]

    def reclaim(self, record: t.Any, checkout: Checkout) -> None:
        """Report a leaked connection and, by policy, roll it back into the pool."""
        with self.stats._lock:
            self.stats.leaks_detected += 1
        fairy_ref = record.fairy_ref
        proxy = None if fairy_ref is None else fairy_ref()
        reclaim = self.leak_policy != "warn" and proxy is not None
        logger.warning(
            "bind %s: a connection checked out %s was not returned when its app"
            " context ended; %s%s",
            self.name,
            _where(checkout),
            "rolled back and returned to the pool"
            if reclaim
            else "left checked out (STALEGUARD_LEAKS='warn')",
            "" if self._sites else "; file and line are recorded for the next leaks",
        )
        self._sites = True
        if reclaim:
            try:
                proxy.close()  # type: ignore[union-attr]
            except Exception as e:  # a failed rollback: SQLAlchemy invalidates it
                logger.warning(
                    "bind %s: could not return the connection: %s", self.name, e
                )
            self.checked_out.pop(record, None)
            with self.stats._lock:
                self.stats.leaks_reclaimed += 1
        elif self.checked_out.get(record) == checkout:
            # Reported once; from now on it is held outside any app context.
            self.checked_out[record] = (None, checkout.site, checkout.at, None)
        leak_detected.send(self, site=checkout.site, reclaimed=reclaim)

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
                    _seconds(threshold),
                )


def _keep_mariadb_4031(dialect: t.Any) -> None:
    """Stop SQLAlchemy taking MariaDB's 4031 for MySQL 8's idle disconnect.

    On MariaDB 4031 is a trigger error on a live connection; treated as a
    disconnect it would invalidate the whole pool. An instance attribute on this
    engine's own dialect, consulted only when a statement fails (the
    ``handle_error`` event would cost every statement).
    """
    is_disconnect = dialect.is_disconnect
    if getattr(is_disconnect, "staleguard", False):
        return

    def is_disconnect_on_this_server(
        error: BaseException, connection: t.Any, cursor: t.Any
    ) -> bool:
        if dialect.is_mariadb and error_code(error) in MYSQL_ONLY_GONE:
            return False
        return bool(is_disconnect(error, connection, cursor))

    is_disconnect_on_this_server.staleguard = True  # type: ignore[attr-defined]
    dialect.is_disconnect = is_disconnect_on_this_server


def _where(checkout: Checkout) -> str:
    """``at file:line in function ...``, or the request that took the connection."""
    if checkout.site or checkout.request is None:
        return f"at {format_site(checkout.site)}"
    request = checkout.request.request
    return f"during {request.method} {request.path} (endpoint {request.endpoint!r})"


def _finite(budget: float) -> float | None:
    """The budget for derivation: ``None`` when there is no idle limit at all."""
    return None if math.isinf(budget) else budget


def _seconds(value: float | None) -> str:
    if value is None or math.isinf(value):
        return "none"
    return f"{value:g} s"
