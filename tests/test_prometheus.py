"""The Prometheus exporter: the guard's counters as metrics, summed over gunicorn
workers in prometheus_client's multiprocess mode.
"""

from __future__ import annotations

import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import Histogram
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.metrics.export import Sum
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from flask_staleguard.metrics.prometheus import generate
from flask_staleguard.metrics.prometheus import POOL
from flask_staleguard.metrics.prometheus import StaleGuardMetrics
from flask_staleguard.otel import instrument
from tests.helpers import AppFactory
from tests.helpers import connection_id
from tests.helpers import fail_after_a_kill
from tests.helpers import stats
from tests.servers import MariaDBServer
from tests.webservers import Gunicorn


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The exposition text as {(name, sorted labels): value}."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_counters_follow_guard_stats(make_app: AppFactory, mariadb_url: str) -> None:
    registry = CollectorRegistry()
    # A declared 1 s timeout makes the idle budget 0.9 s.
    app, db = make_app(mariadb_url, STALEGUARD_SERVER_TIMEOUT=1)
    StaleGuardMetrics(app, registry=registry)
    with app.app_context():
        connection_id(db)
        time.sleep(1.0)
        connection_id(db)  # replaced: idle past the budget
        leaked = db.engine.connect()  # reclaimed when the context ends
    leaked.close()
    counters = stats(app)
    assert counters["replaced"] == {"idle_budget": 1}
    assert counters["leaks_detected"] == 1
    text, content_type = generate(registry)
    assert content_type.startswith("text/plain")
    found = samples(text.decode())
    bind = (POOL, "default")
    assert (
        found[("flask_staleguard_checkouts_total", (bind,))]
        == counters["checkouts"]
        == 4
    )
    reason = ("reason", "idle_budget")
    assert found[("flask_staleguard_connections_replaced_total", (bind, reason))] == 1
    assert found[("flask_staleguard_leaks_total", (bind, ("reclaimed", "true")))] == 1
    assert found[("flask_staleguard_idle_budget_seconds", (bind,))] == 0.9


def test_disconnects_are_counted_by_code(
    make_app: AppFactory, mariadb: MariaDBServer
) -> None:
    registry = CollectorRegistry()
    app, db = make_app(mariadb.user_url, STALEGUARD_STRATEGY="off")
    StaleGuardMetrics(app, registry=registry)
    fail_after_a_kill(app, db, mariadb)
    (code,) = stats(app)["disconnects"]
    found = samples(generate(registry)[0].decode())
    key = ("flask_staleguard_disconnects_total", (("code", code), (POOL, "default")))
    assert found[key] == 1
    # strategy "off": no idle budget at all.
    assert found[
        ("flask_staleguard_idle_budget_seconds", ((POOL, "default"),))
    ] == float("inf")


def test_one_exporter_per_app(make_app: AppFactory, mariadb_url: str) -> None:
    registry = CollectorRegistry()
    app, db = make_app(mariadb_url)
    exporter = StaleGuardMetrics(app, registry=registry)
    with pytest.raises(RuntimeError, match="already registered"):
        exporter.init_app(app)
    # Two apps share the registry's metrics: the second registers nothing twice,
    # and both count into them.
    other, other_db = make_app(mariadb_url)
    StaleGuardMetrics(other, registry=registry)
    for each_app, each_db in ((app, db), (other, other_db)):
        with each_app.app_context():
            connection_id(each_db)
    found = samples(generate(registry)[0].decode())
    checkouts = found[("flask_staleguard_checkouts_total", ((POOL, "default"),))]
    assert checkouts == stats(app)["checkouts"] + stats(other)["checkouts"] == 2


def test_pool_gauges_and_names_are_opentelemetrys(
    make_app: AppFactory, mariadb_url: str
) -> None:
    """The pool's counts at scrape time, and every name as the OpenTelemetry
    metric of flask_staleguard.otel would read in Prometheus form.
    """
    registry = CollectorRegistry()
    reader = InMemoryMetricReader()
    app, db = make_app(mariadb_url, STALEGUARD_LEAKS="warn")
    StaleGuardMetrics(app, registry=registry)
    instrument(app, MeterProvider(metric_readers=[reader]))
    with app.app_context():
        leaked = db.engine.connect()  # reported, and left out ("warn")
        with db.engine.connect():
            found = samples(generate(registry)[0].decode())
    leaked.close()  # returned after its report
    used = ("db_client_connection_state", "used")
    assert found[("db_client_connection_count", ((POOL, "default"), used))] == 2
    assert found[("db_client_connection_max", ((POOL, "default"),))] == 15
    found = samples(generate(registry)[0].decode())
    assert found[("flask_staleguard_leaks_returned_total", ((POOL, "default"),))] == 1
    data = reader.get_metrics_data()
    assert data is not None
    otel_names = {
        prometheus_name(m.name, m.unit or "", m.data)
        for r in data.resource_metrics
        for s in r.scope_metrics
        for m in s.metrics
    }
    exported = {name for name, _ in found}
    histograms = {"db_client_connection_create_time", "db_client_connection_use_time"}
    # The exporter has every OpenTelemetry metric but the histograms.
    assert {n for n in otel_names if not n.endswith("_seconds_bucket")} <= exported
    assert {f"{h}_seconds_bucket" for h in histograms} <= otel_names


def prometheus_name(name: str, unit: str, data: object) -> str:
    """OpenTelemetry's name in Prometheus form (its specification's rules for
    the units used here): dots to underscores, ``s`` as ``_seconds``, a
    monotonic sum's ``_total``, a histogram's ``_bucket`` series.
    """
    name = name.replace(".", "_") + ("_seconds" if unit == "s" else "")
    if isinstance(data, Histogram):
        return name + "_bucket"
    return name + ("_total" if isinstance(data, Sum) and data.is_monotonic else "")


METRICS_APP = """\
import os
import time

import sqlalchemy as sa
from flask import Flask
from flask import jsonify
from flask import request
from flask_sqlalchemy import SQLAlchemy

from flask_staleguard import StaleGuard
from flask_staleguard.metrics.prometheus import metrics_view
from flask_staleguard.metrics.prometheus import StaleGuardMetrics
from flask_staleguard.otel import instrument

app = Flask(__name__)
app.config["SQLALCHEMY_DATABASE_URI"] = os.environ["SG_TEST_URL"]
StaleGuard(app)
db = SQLAlchemy(app)
StaleGuardMetrics(app)
app.add_url_rule("/metrics", view_func=metrics_view)


@app.get("/query")
def query():
    db.session.execute(sa.text("SELECT 1"))
    time.sleep(float(request.args.get("hold", 0)))
    return jsonify(pid=os.getpid())
"""


def test_gunicorn_workers_are_summed(tmp_path: Path, mariadb_url: str) -> None:
    (tmp_path / "sg_metrics_app.py").write_text(METRICS_APP)
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    log = tmp_path / "gunicorn.log"
    with Gunicorn(
        "sg_metrics_app:app",
        log,
        *("-w", "2", "--chdir", str(tmp_path)),
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
        SG_TEST_URL=mariadb_url,
    ) as server:
        pids: set[int] = set()
        requests = 0
        # Sequential requests can all land on one worker. Two at once, each
        # holding its sync worker for a while, must be served by both.
        with ThreadPoolExecutor(2) as pool:
            while len(pids) < 2 and requests < 20:
                answers = pool.map(server.get, ["/query?hold=0.3"] * 2)
                pids.update(answer["pid"] for answer in answers)
                requests += 2
        assert len(pids) == 2, "one gunicorn worker served every request"
        with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as response:
            found = samples(response.read().decode())
    stderr = log.read_bytes()
    # One worker answered the scrape, yet the count covers both.
    checkouts = found[("flask_staleguard_checkouts_total", ((POOL, "default"),))]
    assert checkouts == requests, stderr.decode()
    budget = found[("flask_staleguard_idle_budget_seconds", ((POOL, "default"),))]
    assert budget == 28770.0
