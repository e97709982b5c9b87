"""OpenTelemetry metrics for each guarded pool (``flask-staleguard[otel]``).

The semantic conventions' connection-pool metrics that SQLAlchemy's pool lets
one measure honestly, and the guard's own counters. Pool sizes and counters are
read at collection time (observable instruments): a checkout costs nothing more.
Only ``use_time`` listens to checkins, and ``create_time`` to new connections.
Nothing but this module imports ``opentelemetry``: without the extra, the
package and the app run as before.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.metadata
import math
import threading
import time
import typing as t
import weakref
from collections.abc import Iterable
from collections.abc import Iterator

import sqlalchemy as sa
from flask import Flask
from sqlalchemy import event

from .._private import connect_started
from ..core.guard import PoolGuard
from ..core.holders import Checkout
from ..core.protect import Protection
from ..extension.state import get_state
from ..report.snapshot import engine_for
from .pool_state import pool_state

try:
    from opentelemetry import metrics
    from opentelemetry.metrics import CallbackOptions
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.metrics import Observation
except ImportError as e:
    raise ImportError(
        f"flask_staleguard.otel needs OpenTelemetry's API ({e}):"
        " pip install 'flask-staleguard[otel]'"
    ) from e

#: The semantic conventions' attributes.
POOL_NAME = "db.client.connection.pool.name"
STATE = "db.client.connection.state"

#: The histograms' buckets, in seconds (the SDK's default ones suit milliseconds).
BUCKETS = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0]

#: How many use times may wait for a collection before checkins record their own.
MAX_PENDING = 10_000

#: The index of :attr:`Checkout.at` in the tuples of ``Holders.checked_out``.
_AT: t.Final = 2
if Checkout._fields[_AT] != "at":  # pragma: no cover - a guard for refactors
    raise ImportError("flask_staleguard.metrics.otel: Checkout.at moved")


@dataclasses.dataclass(frozen=True)
class _Pool:
    """One instrumented pool: its guard, and its engine (weakly: an app that
    goes stops being measured).
    """

    guard: weakref.ref[PoolGuard]
    engine: weakref.ref[sa.engine.Engine]


class _Instruments:
    """One meter's instruments, and the pools whose callbacks read them."""

    def __init__(self, provider: MeterProvider) -> None:
        self.pools: list[_Pool] = []
        self._lock = threading.Lock()
        try:
            version: str | None = importlib.metadata.version("flask-staleguard")
        except importlib.metadata.PackageNotFoundError:
            version = None
        meter = provider.get_meter("flask_staleguard", version)
        pool_metrics = [
            ("db.client.connection.count", self._count, "{connection}",
             "The number of connections that are currently in state described by"
             " the `state` attribute."),
            ("db.client.connection.max", self._max, "{connection}",
             "The maximum number of open connections allowed."),
            ("db.client.connection.idle.max", self._idle_max, "{connection}",
             "The maximum number of idle open connections allowed."),
            ("db.client.connection.idle.min", self._idle_min, "{connection}",
             "The minimum number of idle open connections allowed."),
        ]  # fmt: skip
        for name, callback, unit, description in pool_metrics:
            meter.create_observable_up_down_counter(
                name, [callback], unit=unit, description=description
            )
        counters = [
            ("flask_staleguard.checkouts", self._checkouts, "{checkout}",
             "Connections handed out by the pool."),
            ("flask_staleguard.connections.replaced", self._replaced,
             "{connection}", "Stale connections replaced at checkout, by reason."),
            ("flask_staleguard.disconnects", self._disconnects, "{disconnect}",
             "Statements that failed because the connection was gone, by code."),
            ("flask_staleguard.leaks", self._leaks, "{connection}",
             "Connections still checked out when their app context ended."),
            ("flask_staleguard.leaks.returned", self._returned, "{connection}",
             "Connections reported as leaked or held too long, returned later."),
            ("flask_staleguard.connect.outages", self._outages, "{outage}",
             "New connections that failed for a transient reason and were waited for."),
            ("flask_staleguard.connect.retries", self._retries, "{connect}",
             "Connects tried again during outages."),
        ]  # fmt: skip
        for name, callback, unit, description in counters:
            meter.create_observable_counter(
                name, [callback], unit=unit, description=description
            )
        meter.create_observable_gauge(
            "flask_staleguard.idle_budget",
            [self._idle_budget],
            unit="s",
            description="How long a pooled connection may idle before it is replaced.",
        )
        #: Histograms, recorded as connections are made and returned.
        self.create_time = meter.create_histogram(
            "db.client.connection.create_time",
            unit="s",
            description="The time it took to create a new connection.",
            explicit_bucket_boundaries_advisory=BUCKETS,
        )
        self.use_time = meter.create_histogram(
            "db.client.connection.use_time",
            unit="s",
            description="The time between borrowing a connection and returning it"
            " to the pool.",
            explicit_bucket_boundaries_advisory=BUCKETS,
        )
        #: Use times not recorded yet: a histogram's record() costs more than
        #: the rest of a checkin, so the collection records them.
        self.pending_use: collections.deque[tuple[float, dict[str, str]]] = (
            collections.deque()
        )

    def drain(self) -> None:
        """Record the use times the checkins queued since the last collection."""
        pending = self.pending_use
        record = self.use_time.record
        while True:
            try:
                seconds, pool_name = pending.popleft()
            except IndexError:
                return
            record(seconds, pool_name)

    def add(self, guard: PoolGuard, engine: sa.engine.Engine) -> None:
        """Measure ``engine``'s pool, which ``guard`` guards."""
        with self._lock:
            self.pools = [p for p in self.pools if p.guard() is not None] + [
                _Pool(weakref.ref(guard), weakref.ref(engine))
            ]

    def _live(self) -> Iterator[tuple[PoolGuard, sa.pool.Pool, dict[str, str]]]:
        for entry in self.pools:
            guard, engine = entry.guard(), entry.engine()
            if guard is not None and engine is not None:
                # engine.pool, not a pool kept from before: dispose() replaces it.
                yield guard, engine.pool, {POOL_NAME: guard.name}

    # The callbacks: each runs when a reader collects, never on a checkout.

    def _count(self, options: CallbackOptions) -> Iterable[Observation]:
        # First of the callbacks: the queued use times go into this collection.
        self.drain()
        for guard, pool, pool_name in self._live():
            state = pool_state(guard, pool)
            yield Observation(state.used, {**pool_name, STATE: "used"})
            if state.idle is not None:
                yield Observation(state.idle, {**pool_name, STATE: "idle"})

    def _max(self, options: CallbackOptions) -> Iterable[Observation]:
        for guard, pool, pool_name in self._live():
            value = pool_state(guard, pool).max
            if value is not None:
                yield Observation(value, pool_name)

    def _idle_max(self, options: CallbackOptions) -> Iterable[Observation]:
        for guard, pool, pool_name in self._live():
            value = pool_state(guard, pool).idle_max
            if value is not None:
                yield Observation(value, pool_name)

    def _idle_min(self, options: CallbackOptions) -> Iterable[Observation]:
        for guard, pool, pool_name in self._live():
            value = pool_state(guard, pool).idle_min
            if value is not None:
                yield Observation(value, pool_name)

    def _checkouts(self, options: CallbackOptions) -> Iterable[Observation]:
        for guard, _, pool_name in self._live():
            yield Observation(guard.stats.checkouts, pool_name)

    def _replaced(self, options: CallbackOptions) -> Iterable[Observation]:
        for guard, _, pool_name in self._live():
            for reason, count in guard.stats.snapshot()["replaced"].items():
                yield Observation(count, {**pool_name, "reason": reason})

    def _disconnects(self, options: CallbackOptions) -> Iterable[Observation]:
        for guard, _, pool_name in self._live():
            for code, count in guard.stats.snapshot()["disconnects"].items():
                yield Observation(count, {**pool_name, "code": code})

    def _leaks(self, options: CallbackOptions) -> Iterable[Observation]:
        for guard, _, pool_name in self._live():
            stats = guard.stats.snapshot()
            reclaimed = stats["leaks_reclaimed"]
            left = stats["leaks_detected"] - reclaimed
            yield Observation(reclaimed, {**pool_name, "reclaimed": "true"})
            yield Observation(left, {**pool_name, "reclaimed": "false"})

    def _returned(self, options: CallbackOptions) -> Iterable[Observation]:
        for guard, _, pool_name in self._live():
            yield Observation(guard.stats.leaks_returned, pool_name)

    def _outages(self, options: CallbackOptions) -> Iterable[Observation]:
        for guard, _, pool_name in self._live():
            yield Observation(guard.stats.outages, pool_name)

    def _retries(self, options: CallbackOptions) -> Iterable[Observation]:
        for guard, _, pool_name in self._live():
            yield Observation(guard.stats.connect_retries, pool_name)

    def _idle_budget(self, options: CallbackOptions) -> Iterable[Observation]:
        for guard, _, pool_name in self._live():
            if math.isfinite(guard.idle.seconds):  # infinite: no budget at all
                yield Observation(guard.idle.seconds, pool_name)


# One set per meter provider: a second app or engine joins the first's callbacks.
_instruments: weakref.WeakKeyDictionary[MeterProvider, _Instruments] = (
    weakref.WeakKeyDictionary()
)
_instruments_lock = threading.Lock()
# The guards already measured, so that none is counted twice.
_measured: weakref.WeakSet[PoolGuard] = weakref.WeakSet()


def _instruments_for(provider: MeterProvider) -> _Instruments:
    with _instruments_lock:
        instruments = _instruments.get(provider)
        if instruments is None:
            instruments = _instruments[provider] = _Instruments(provider)
        return instruments


def instrument(
    target: Flask | Protection, meter_provider: MeterProvider | None = None
) -> None:
    """Record the pool metrics of ``target``'s pools with OpenTelemetry.

    :param target: A Flask app (each of its binds: call this after
        ``guard.init_app(app)`` and ``db.init_app(app)``), or what
        :func:`~flask_staleguard.protect` returned.
    :param meter_provider: The provider to record with; the global one
        (``opentelemetry.metrics.get_meter_provider()``) when ``None``.
    """
    provider = meter_provider or metrics.get_meter_provider()
    if isinstance(target, Protection):
        pools = [(target.guard, engine) for engine in target.guard.engines()]
    else:
        state = get_state(target)
        if state.binds_pending:
            raise RuntimeError(
                "flask-staleguard has not attached to this app's engines yet (no"
                " database was configured when guard.init_app(app) ran); call"
                " instrument(app) inside the app's first app context, or set"
                " SQLALCHEMY_DATABASE_URI before guard.init_app(app)"
            )
        pools = [(bind, engine_for(target, bind.key)) for bind in state.binds.values()]
    instruments = _instruments_for(provider)
    for guard, _ in pools:
        if guard in _measured:
            raise RuntimeError(f"the pool {guard.name!r} is already instrumented")
    for guard, engine in pools:
        _measured.add(guard)
        instruments.add(guard, engine)
        _listen(guard, engine, instruments)


def _listen(
    guard: PoolGuard, engine: sa.engine.Engine, instruments: _Instruments
) -> None:
    """Time new connections and each checkout's use, for the histograms."""
    pool_name = {POOL_NAME: guard.name}
    holders = guard.holders
    clock = time.monotonic
    create_time = instruments.create_time
    use_time = instruments.use_time
    pending = instruments.pending_use

    def on_connect(dbapi_connection: t.Any, record: t.Any) -> None:
        # SQLAlchemy notes the wall-clock time before it calls the driver. (A
        # do_connect listener could time it too, but any dialect listener makes
        # SQLAlchemy look up listeners around every statement.)
        started = connect_started(record)
        if started is not None:
            create_time.record(max(0.0, time.time() - started), pool_name)

    def on_checkin(dbapi_connection: t.Any, record: t.Any) -> None:
        # Ahead of the guard's own checkin listener, which forgets the checkout.
        held = holders.checked_out.get(record)
        if held is not None:
            if len(pending) < MAX_PENDING:
                pending.append((clock() - held[_AT], pool_name))
            else:  # nobody collects: record at once rather than hoard
                use_time.record(clock() - held[_AT], pool_name)

    # Last: the time includes the dialect's setup and the guard's discovery.
    event.listen(engine, "connect", on_connect)
    event.listen(engine, "checkin", on_checkin, insert=True)
