"""Prometheus metrics for the guard's counters (``flask-staleguard[prometheus]``).

The names are those of ``flask_staleguard.otel`` in Prometheus form (dots
become underscores, counters end in ``_total``), so a dashboard works with
either exporter. Counters are incremented in the process where the event
happens, so under gunicorn prometheus_client's multiprocess mode sums them over
all workers: set ``PROMETHEUS_MULTIPROC_DIR`` to an empty directory before the
server starts, and serve :func:`metrics_view`, which reads every worker's files
in that mode. The pool gauges (``db_client_connection_*``) are read from this
process's pools at scrape time, so that mode leaves them out.
"""

from __future__ import annotations

import dataclasses
import os
import typing as t
import weakref

import sqlalchemy as sa
from flask import Flask
from flask import Response
from prometheus_client import CollectorRegistry
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client import Counter
from prometheus_client import Gauge
from prometheus_client import generate_latest
from prometheus_client import multiprocess
from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from sqlalchemy import event

from ..core.guard import PoolGuard
from ..extension.state import get_state
from ..report.snapshot import engine_for
from .pool_state import pool_state
from .signals import connection_replaced
from .signals import disconnect_seen
from .signals import leak_detected
from .signals import leak_returned

#: The key of the exporter's state in ``app.extensions``.
EXTENSION_KEY = "staleguard_prometheus"


#: The label of the pool, as Prometheus spells OpenTelemetry's attribute.
POOL = "db_client_connection_pool_name"


@dataclasses.dataclass(frozen=True)
class _Metrics:
    checkouts: Counter
    replaced: Counter
    disconnects: Counter
    leaks: Counter
    returned: Counter
    idle_budget: Gauge
    pools: _PoolCollector


class _PoolCollector(Collector):
    """The semantic conventions' pool gauges, read from each pool at scrape time,
    and the connect counters, read from each guard's stats.

    Only this process's pools: in multiprocess mode, :func:`generate` leaves
    them out (each gunicorn worker has its own pool; OpenTelemetry exports each).
    """

    def __init__(self) -> None:
        self.pools: list[tuple[weakref.ref[PoolGuard], weakref.ref[sa.Engine]]] = []

    def collect(self) -> t.Iterable[Metric]:
        count = GaugeMetricFamily(
            "db_client_connection_count",
            "The number of connections that are currently in state described by"
            " the `state` attribute.",
            labels=[POOL, "db_client_connection_state"],
        )
        limits = {
            field: GaugeMetricFamily(
                f"db_client_connection_{field}", description, labels=[POOL]
            )
            for field, description in (
                ("max", "The maximum number of open connections allowed."),
                ("idle_max", "The maximum number of idle open connections allowed."),
                ("idle_min", "The minimum number of idle open connections allowed."),
            )
        }
        connects = {
            field: CounterMetricFamily(
                f"flask_staleguard_connect_{name}", description, labels=[POOL]
            )
            for field, name, description in (
                ("outages", "outages", "New connections that failed for a"
                 " transient reason and were waited for."),
                ("connect_retries", "retries", "Connects tried again during"
                 " outages."),
            )
        }  # fmt: skip
        for guard_ref, engine_ref in list(self.pools):
            guard, engine = guard_ref(), engine_ref()
            if guard is None or engine is None:
                continue
            for field, counter in connects.items():
                counter.add_metric([guard.name], getattr(guard.stats, field))
            state = pool_state(guard, engine.pool)
            count.add_metric([guard.name, "used"], state.used)
            if state.idle is not None:
                count.add_metric([guard.name, "idle"], state.idle)
            for field, family in limits.items():
                value = getattr(state, field)
                if value is not None:
                    family.add_metric([guard.name], value)
        yield count
        yield from limits.values()
        yield from connects.values()


# One set per registry: prometheus_client refuses to register a name twice, and
# several apps in one process share the metrics (told apart by the pool label).
# The names are OpenTelemetry's (flask_staleguard.otel), in Prometheus form.
_metrics: dict[int, _Metrics] = {}


def _metrics_for(registry: CollectorRegistry) -> _Metrics:
    metrics = _metrics.get(id(registry))
    if metrics is None:
        pools = _PoolCollector()
        registry.register(pools)
        metrics = _metrics[id(registry)] = _Metrics(
            Counter(
                "flask_staleguard_checkouts",
                "Connections handed out by the pool.",
                [POOL],
                registry=registry,
            ),
            Counter(
                "flask_staleguard_connections_replaced",
                "Stale connections replaced at checkout, by reason.",
                [POOL, "reason"],
                registry=registry,
            ),
            Counter(
                "flask_staleguard_disconnects",
                "Statements that failed because the connection was gone, by code.",
                [POOL, "code"],
                registry=registry,
            ),
            Counter(
                "flask_staleguard_leaks",
                "Connections still checked out when their app context ended.",
                [POOL, "reclaimed"],
                registry=registry,
            ),
            Counter(
                "flask_staleguard_leaks_returned",
                "Connections reported as leaked or held too long, returned later.",
                [POOL],
                registry=registry,
            ),
            Gauge(
                "flask_staleguard_idle_budget_seconds",
                "How long a pooled connection may idle before it is replaced.",
                [POOL],
                registry=registry,
                multiprocess_mode="mostrecent",
            ),
            pools,
        )
    return metrics


class StaleGuardMetrics:
    """Exports each bind's counters of one app to Prometheus.

    Call :meth:`init_app` after ``guard.init_app(app)`` and ``db.init_app(app)``:
    it listens to the engines Flask-SQLAlchemy made.

    :param registry: Where to register the metrics; the default registry unless
        given.
    """

    def __init__(
        self, app: Flask | None = None, *, registry: CollectorRegistry = REGISTRY
    ) -> None:
        self.registry = registry
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Start counting ``app``'s checkouts, replacements, disconnects and leaks."""
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError(
                "A 'StaleGuardMetrics' instance is already registered on this app."
            )
        metrics = _metrics_for(self.registry)
        receivers = [
            _export(bind, engine_for(app, bind.key), metrics)
            for bind in get_state(app).binds.values()
        ]
        # The signals hold their receivers weakly: the app holds them instead, so
        # they go when the app goes.
        app.extensions[EXTENSION_KEY] = (self, receivers)


def _export(
    bind: PoolGuard, engine: sa.engine.Engine, metrics: _Metrics
) -> tuple[t.Callable[..., None], ...]:
    """Count ``bind``'s events with the receivers returned."""
    name = bind.name
    checkouts = metrics.checkouts.labels(name)  # resolved once: checkouts are hot
    metrics.idle_budget.labels(name).set(bind.idle.seconds)

    def on_checkout(*args: t.Any) -> None:
        checkouts.inc()

    def on_replaced(sender: PoolGuard, reason: str, **kwargs: t.Any) -> None:
        metrics.replaced.labels(name, reason).inc()
        # A replacement may follow a newly learnt timeout; keep the gauge current.
        metrics.idle_budget.labels(name).set(sender.idle.seconds)

    def on_disconnect(sender: PoolGuard, code: str, **kwargs: t.Any) -> None:
        metrics.disconnects.labels(name, code).inc()

    def on_leak(sender: PoolGuard, reclaimed: bool, **kwargs: t.Any) -> None:
        metrics.leaks.labels(name, str(reclaimed).lower()).inc()

    def on_returned(sender: PoolGuard, **kwargs: t.Any) -> None:
        metrics.returned.labels(name).inc()

    # insert=True: ahead of the guard's own listener, which raises to replace a
    # stale connection, so the count matches guard.stats()["checkouts"].
    event.listen(engine, "checkout", on_checkout, insert=True)
    connection_replaced.connect(on_replaced, sender=bind)
    disconnect_seen.connect(on_disconnect, sender=bind)
    leak_detected.connect(on_leak, sender=bind)
    leak_returned.connect(on_returned, sender=bind)
    metrics.pools.pools.append((weakref.ref(bind), weakref.ref(engine)))
    return on_checkout, on_replaced, on_disconnect, on_leak, on_returned


def generate(registry: CollectorRegistry | None = None) -> tuple[bytes, str]:
    """The exposition text and its content type.

    With ``PROMETHEUS_MULTIPROC_DIR`` set and no ``registry`` given, it sums the
    files of every process (every gunicorn worker).
    """
    if registry is None:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        else:
            registry = REGISTRY
    return generate_latest(registry), CONTENT_TYPE_LATEST


def metrics_view() -> Response:
    """A Flask view serving :func:`generate`'s output, e.g.
    ``app.add_url_rule("/metrics", view_func=metrics_view)``.
    """
    data, content_type = generate()
    return Response(data, content_type=content_type)
