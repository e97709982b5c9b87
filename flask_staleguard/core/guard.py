"""The guard of one pool: its pieces, wired to the pool's events.

:class:`PoolGuard` knows which pool it guards (name, URL, backend) and with which
options; the work is done by its pieces, each attached to the pool's events:
:class:`~.checkout.CheckoutChecks` (stale connections at checkout),
:class:`~.holders.Holders` (who holds what: leaks),
:class:`~.disconnects.DisconnectReports` (connections lost in use),
:func:`~.failover.watch_for_demotions` (a writer that became read-only),
:class:`~.connect.Connector` (new connections: bounded, waited for), and
:class:`~.budget.IdleBudget` (how long connections may idle).
"""

from __future__ import annotations

import logging
import time
import typing as t
import weakref

import sqlalchemy as sa
from sqlalchemy.exc import DisconnectionError

from .._private import set_pool_option
from ..metrics.signals import connection_replaced
from ..metrics.signals import leak_returned
from ..metrics.stats import BindStats
from .budget import IdleBudget
from .checkout import CheckoutChecks
from .connect import Connector
from .derive import derive_engine_options
from .disconnects import DisconnectReports
from .failover import watch_for_demotions
from .failover import WriterWanted
from .holders import Holders
from .keepalive import keepalive_for
from .options import GuardOptions
from .redact import Secrets
from .units import seconds_text

logger = logging.getLogger("flask_staleguard")


class PoolGuard:
    """Settings, listeners and counters for the pool of one engine (in Flask, of
    one bind of one app); the sender of every signal.

    :param key: What the integration calls the pool (Flask: the bind key).
    :param name: Its name in logs and output.
    :param holder: Returns who checks a connection out now: its owner (Flask:
        the app context; leaks are judged per owner) and the request being
        served, each ``None`` when there is none.
    :param describe: Words for a request, in leak reports.
    :param clock: Seconds on a monotonic clock: ``time.monotonic``, or a fake
        one in tests of the timing logic.
    """

    def __init__(
        self,
        key: t.Any,
        name: str,
        secrets: Secrets,
        kind: str,
        options: GuardOptions,
        server_timeout: float | None,
        *,
        provisional: bool = False,
        holder: t.Callable[[], tuple[t.Any, t.Any]] | None = None,
        describe: t.Callable[[t.Any], str] | None = None,
        clock: t.Callable[[], float] = time.monotonic,
    ) -> None:
        self.key = key
        #: The pool's name in logs and output.
        self.name = name
        #: The pool's credentials, to mask wherever they could show.
        self.secrets = secrets
        #: The URL with every credential masked: safe for logs and output.
        self.url = secrets.url
        #: ``"mysql"``, ``"postgresql"``, ``"sqlite"`` or another backend name.
        self.kind = kind
        self.options = options
        self.strategy = options.strategy
        #: Seconds any exchange of the guard's own with the server may take.
        self.timeout = options.timeout
        #: How long connections may idle, and what the server said.
        self.idle = IdleBudget(options, server_timeout, provisional=provisional)
        #: The engine options this strategy asks for.
        self.derived = derive_engine_options(
            self.strategy, self.idle.finite, options.max_lifetime
        )
        #: Those of :attr:`derived` the user had not set, so the guard applied them.
        self.applied: dict[str, t.Any] = {}
        self.stats = BindStats()
        #: Who holds each checked-out connection.
        self.holders = Holders(
            name,
            threshold=options.leak_threshold,
            record_sites=options.leaks == "raise",
            holder=holder,
            describe=describe,
            clock=clock,
        )
        self.holders.on_unleaked = self._unleaked
        #: The TCP keepalive every new connection gets; ``None``: the driver's.
        self.keepalive = (
            None
            if self.strategy == "off"
            else keepalive_for(options.keepalive, options.idle_timeout)
        )
        self._checks = CheckoutChecks(
            name,
            kind,
            self.strategy,
            self.timeout,
            self.idle,
            self.stats,
            self._replace,
            self._learn,
            self.holders,
            clock,
            self.keepalive,
            options.max_lifetime,
        )
        self._reports = DisconnectReports(
            self, kind, self.strategy, self.idle, self.stats
        )
        #: The pool's connects: bounded, and tried again through an outage.
        self.connector = Connector(
            name, options.connect_timeout, options.connect_wait, self.stats, secrets
        )
        self.connector.check = self._checks.prepare
        #: Whether new connections must land on a writer (``STALEGUARD_ROLE``);
        #: ``None``: any node will do.
        self.writer_wanted: WriterWanted | None = None
        if self.strategy != "off" and options.role != "any":
            self.writer_wanted = WriterWanted(name, options.role)
            self._checks.role_of = self.writer_wanted.role_of
            self._reports.on_failover = self.writer_wanted.failover
        self._engines: weakref.WeakSet[sa.engine.Engine] = weakref.WeakSet()

    def __repr__(self) -> str:
        return f"<PoolGuard {self.name!r} {self.url} strategy={self.strategy}>"

    def attach(self, engine: sa.engine.Engine) -> None:
        """Listen to ``engine``'s pool. Listeners survive ``engine.dispose()``."""
        if engine in self._engines:
            return
        self._engines.add(engine)
        self._checks.attach(engine)
        self.holders.attach(engine)
        self._reports.attach(engine)
        if self.strategy != "off" and self.options.role != "any":
            watch_for_demotions(engine.dialect, self.kind)
        if self.strategy != "off":
            self.connector.attach(engine)

    @property
    def node_role(self) -> str | None:
        """``"writer"`` or ``"read-only"``: what the newest connection's node said
        when it was opened; ``None`` until one said.
        """
        read_only = self._checks.read_only
        return None if read_only is None else ("read-only" if read_only else "writer")

    def engines(self) -> list[sa.engine.Engine]:
        """The engines whose pools this guard listens to."""
        return list(self._engines)

    def _replace(
        self, reason: str, idle: float | None, detail: str
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

    def _unleaked(self, held: float) -> None:
        """Count a reported connection that came back after ``held`` seconds."""
        self.stats.add("leaks_returned")
        leak_returned.send(self, held=held)

    def _learn(self, timeout: float | None) -> None:
        """Adopt the idle timeout a live connection reported."""
        was = self.idle.learn(timeout)
        self.derived = derive_engine_options(
            self.strategy, self.idle.finite, self.options.max_lifetime
        )
        recycle = self.derived.get("pool_recycle", -1)
        if "pool_recycle" in self.applied and recycle != self.applied["pool_recycle"]:
            self.applied["pool_recycle"] = recycle
            for engine in list(self._engines):
                set_pool_option(engine.pool, "pool_recycle", int(recycle))
        logger.info(
            "bind %s: the server's idle timeout is %s (was %s); idle budget %s",
            self.name,
            seconds_text(timeout),
            seconds_text(was),
            seconds_text(self.idle.seconds),
        )
