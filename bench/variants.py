"""The apps under test: one Flask-SQLAlchemy app per variant, built the same way.

Every variant is a complete Flask app with Flask-SQLAlchemy, so the comparison is
apples to apples; only the connection-pool protection differs:

``bare``
    Flask-SQLAlchemy as it comes (its MySQL default ``pool_recycle=7200``).
``listeners``
    ``bare`` plus an empty ``checkout`` and ``checkin`` listener: what SQLAlchemy
    charges any extension that listens to the pool, the floor under ``recycle``
    and ``guard``.
``pre_ping``
    ``SQLALCHEMY_ENGINE_OPTIONS = {"pool_pre_ping": True}``: a round trip per checkout.
``recycle``
    StaleGuard, ``STALEGUARD_STRATEGY="recycle"``: the derived ``pool_recycle`` only.
``guard``
    StaleGuard's default strategy: idle budget and socket poll at checkout.
``busy``
    ``guard`` while another holder keeps a connection checked out all along, as
    concurrent requests do: each request's teardown then sees a busy pool.
``minimal``
    ``bare`` plus the least a guard can do per checkout with SQLAlchemy's pool
    events and Flask's public API: the idle-time check, one ``poll()``, the app
    context and request that took the connection (the guard's own lookup), and
    a dict of the connections out. No counters, fork check, leak reports or
    teardown: the floor under ``guard``, not a guard.
"""

from __future__ import annotations

import dataclasses
import itertools
import select
import threading
import time
import typing as t

import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import event

from flask_staleguard import StaleGuard
from flask_staleguard.core.probe import socket_fd
from flask_staleguard.extension.contexts import current_holder

#: The variants, in report order.
ALL = ("bare", "listeners", "minimal", "pre_ping", "recycle", "guard", "busy")

#: The variant whose cost every pool listener pays: bare with two empty ones.
FLOOR = "listeners"

SELECT_1 = sa.text("SELECT 1")

#: Engine options under which a checkout and checkin make no round trip:
#: PyMySQL sends ``ROLLBACK`` at every checkin, even when nothing ran, unless
#: SQLAlchemy (2.1 and later) skips it for a connection in autocommit mode.
NO_ROUND_TRIP = {"isolation_level": "AUTOCOMMIT", "skip_autocommit_rollback": True}
_names = itertools.count()


@dataclasses.dataclass
class BenchApp:
    """One variant's app, its ``SQLAlchemy``, its guard (if any) and a count of
    new DBAPI connections."""

    variant: str
    app: Flask
    db: SQLAlchemy
    guard: StaleGuard | None = None
    connects: int = 0
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    #: A connection checked out outside the requests (``busy``), or ``None``.
    held: sa.engine.Connection | None = None

    @property
    def engine(self) -> sa.engine.Engine:
        """The default bind's engine."""
        with self.app.app_context():
            return self.db.engine

    def guard_stats(self) -> dict[str, t.Any] | None:
        """StaleGuard's counters for the default bind, or ``None`` without the guard."""
        if self.guard is None:
            return None
        return t.cast(dict[str, t.Any], self.guard.stats(self.app).get("default"))

    def request(self, statement: sa.TextClause = SELECT_1) -> None:
        """One request-shaped unit: app context, checkout, statement, checkin."""
        with self.app.app_context():
            self.db.session.execute(statement).scalar()

    def checkout(self) -> None:
        """A request-shaped checkout without the statement: app context, the
        session's connection, checkin at teardown. Built with
        :data:`NO_ROUND_TRIP`, it makes no syscall but the guard's own ``poll``.
        """
        with self.app.app_context():
            self.db.session.connection()

    def dispose(self) -> None:
        """Close the pool's connections."""
        if self.held is not None:
            self.held.close()
        self.engine.dispose()


def build(
    variant: str,
    url: str,
    engine_options: t.Mapping[str, t.Any] | None = None,
    config: t.Mapping[str, t.Any] | None = None,
) -> BenchApp:
    """Build ``variant``'s app against ``url`` (StaleGuard first, as documented),
    its engine created with ``engine_options`` besides the variant's own, and
    ``config`` (``STALEGUARD_*`` keys, say) in every variant's app config.
    """
    if variant not in ALL:
        raise ValueError(f"unknown variant {variant!r}; choose from {ALL}")
    app = Flask(f"bench_{variant}_{next(_names)}")
    app.config.update(config or {})
    app.config["SQLALCHEMY_DATABASE_URI"] = url
    options = dict(engine_options or {})
    if variant == "pre_ping":
        options["pool_pre_ping"] = True
    if options:
        app.config["SQLALCHEMY_ENGINE_OPTIONS"] = options
    guard = None
    if variant in ("recycle", "guard", "busy"):
        strategy = "recycle" if variant == "recycle" else "guard"
        app.config["STALEGUARD_STRATEGY"] = strategy
        guard = StaleGuard(app)
    db = SQLAlchemy()
    db.init_app(app)
    bench_app = BenchApp(variant, app, db, guard)

    # A connect listener fires only for new DBAPI connections, never per checkout,
    # so it leaves bare's checkout path free of listeners.
    def count_connect(dbapi_connection: t.Any, record: t.Any) -> None:
        with bench_app.lock:
            bench_app.connects += 1

    event.listen(bench_app.engine, "connect", count_connect)
    if variant == "busy":
        bench_app.held = bench_app.engine.connect()
    if variant == "listeners":
        event.listen(bench_app.engine, "checkout", _checked_out)
        event.listen(bench_app.engine, "checkin", _checked_in)
    if variant == "minimal":
        _listen_minimally(bench_app.engine)
    return bench_app


def _checked_out(dbapi_connection: t.Any, record: t.Any, proxy: t.Any) -> None:
    """The ``listeners`` variant's ``checkout`` listener: it does nothing."""


def _checked_in(dbapi_connection: t.Any, record: t.Any) -> None:
    """The ``listeners`` variant's ``checkin`` listener: it does nothing."""


class _Idling:
    """The ``minimal`` variant's state of one connection."""

    __slots__ = ("returned", "poll")

    def __init__(self, poll: t.Callable[[int], list[t.Any]]) -> None:
        self.returned: float | None = None
        self.poll = poll


def _listen_minimally(engine: sa.engine.Engine) -> None:
    """The ``minimal`` variant's listeners: what any guard's checkout must do."""
    held: dict[t.Any, tuple[t.Any, float]] = {}
    clock = time.monotonic
    budget = 3600.0

    def connected(dbapi_connection: t.Any, record: t.Any) -> None:
        poller = select.poll()
        poller.register(t.cast(int, socket_fd(dbapi_connection)), select.POLLIN)
        record.info["minimal"] = _Idling(poller.poll)

    def checked_out(dbapi_connection: t.Any, record: t.Any, proxy: t.Any) -> None:
        now = clock()
        state = record.info.get("minimal")
        if state is not None and state.returned is not None:
            if now - state.returned > budget or state.poll(0):
                raise sa.exc.DisconnectionError("stale")
        held[record] = (current_holder(), now)

    def checked_in(dbapi_connection: t.Any, record: t.Any) -> None:
        held.pop(record, None)
        state = record.info.get("minimal")
        if state is not None:
            state.returned = clock()

    event.listen(engine, "connect", connected)
    event.listen(engine, "checkout", checked_out)
    event.listen(engine, "checkin", checked_in)


def build_all(
    variants: t.Iterable[str],
    url: str,
    engine_options: t.Mapping[str, t.Any] | None = None,
    config: t.Mapping[str, t.Any] | None = None,
) -> dict[str, BenchApp]:
    """Build each of ``variants`` against ``url``."""
    return {v: build(v, url, engine_options, config) for v in variants}
