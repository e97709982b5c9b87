"""OpenTelemetry: the semantic conventions' pool metrics and the guard's counters,
read with the SDK's in-memory reader, match what the pool did.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
import typing as t
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sqlalchemy as sa
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.metrics.export import NumberDataPoint

import flask_staleguard
from flask_staleguard import protect
from flask_staleguard.core.holders import Checkout
from flask_staleguard.metrics import otel
from flask_staleguard.otel import instrument
from tests.helpers import AppFactory
from tests.helpers import connection_id
from tests.helpers import fail_after_a_kill
from tests.helpers import stats
from tests.proxies import TcpProxy
from tests.servers import free_port
from tests.servers import MariaDBServer
from tests.webservers import Gunicorn

Points = dict[tuple[str, tuple[tuple[str, t.Any], ...]], t.Any]


def read(reader: InMemoryMetricReader) -> Points:
    """The reader's data now: {(metric name, sorted attributes): value}; a
    histogram's value is its data point.
    """
    found: Points = {}
    data = reader.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    key = at(metric.name, *(point.attributes or {}).items())
                    if isinstance(point, NumberDataPoint):
                        found[key] = point.value
                    else:
                        found[key] = point
    return found


POOL = ("db.client.connection.pool.name", "default")


def at(name: str, *attributes: tuple[str, t.Any]) -> tuple[str, t.Any]:
    """The key of a metric's point with these attributes (in any order)."""
    return name, tuple(sorted(attributes))


def count(points: Points, state: str) -> t.Any:
    return points[
        at("db.client.connection.count", POOL, ("db.client.connection.state", state))
    ]


def test_pool_metrics_follow_the_pool(
    make_app: AppFactory, mariadb: MariaDBServer
) -> None:
    reader = InMemoryMetricReader()
    app, db = make_app(mariadb.user_url, SQLALCHEMY_ENGINE_OPTIONS={"pool_size": 4})
    instrument(app, MeterProvider(metric_readers=[reader]))
    with app.app_context():
        with contextlib.ExitStack() as stack:
            for _ in range(3):
                stack.enter_context(db.engine.connect())
            held = read(reader)
        returned = read(reader)
        mariadb.kill_connections(user="sg")
        time.sleep(0.2)
        connection_id(db)  # a KILLed connection, replaced at checkout
        after_kill = read(reader)
    assert (count(held, "used"), count(held, "idle")) == (3, 0)
    assert (count(returned, "used"), count(returned, "idle")) == (0, 3)
    assert held[("db.client.connection.max", (POOL,))] == 4 + 10
    assert held[("db.client.connection.idle.max", (POOL,))] == 4
    assert held[("db.client.connection.idle.min", (POOL,))] == 0
    assert returned[("flask_staleguard.checkouts", (POOL,))] == 3
    # One replaced connection, under the reason the guard's stats give.
    (reason,) = stats(app)["replaced"]
    assert reason.startswith("probe_")
    key = at("flask_staleguard.connections.replaced", POOL, ("reason", reason))
    assert after_kill[key] == 1
    assert after_kill[("flask_staleguard.checkouts", (POOL,))] == 5
    # Three connections made, then one more for the KILLed one.
    create = after_kill[("db.client.connection.create_time", (POOL,))]
    assert create.count == 4
    assert 0 < create.min and create.max < 5
    # Four returns: the three held together, and the one after the KILL.
    use = after_kill[("db.client.connection.use_time", (POOL,))]
    assert use.count == 4
    assert 0 < use.min and use.max < 5
    assert after_kill[("flask_staleguard.idle_budget", (POOL,))] == 28770
    with app.app_context():
        # About SQLAlchemy's internals: no engine or dialect listener, which
        # would make every statement look up listeners.
        assert db.engine._has_events is False
        assert db.engine.dialect._has_events is False


def test_without_the_guard_a_kill_is_a_disconnect(
    make_app: AppFactory, mariadb: MariaDBServer
) -> None:
    """The same KILL with strategy "off": nothing is replaced, the app's statement
    fails, and the metrics say so by code.
    """
    reader = InMemoryMetricReader()
    app, db = make_app(mariadb.user_url, STALEGUARD_STRATEGY="off")
    instrument(app, MeterProvider(metric_readers=[reader]))
    fail_after_a_kill(app, db, mariadb)
    points = read(reader)
    assert not [k for k in points if k[0] == "flask_staleguard.connections.replaced"]
    (code,) = stats(app)["disconnects"]
    assert points[at("flask_staleguard.disconnects", POOL, ("code", code))] == 1


def test_a_leak_is_counted_and_its_return_said_once(
    make_app: AppFactory, mariadb_url: str, guard_log: pytest.LogCaptureFixture
) -> None:
    reader = InMemoryMetricReader()
    app, db = make_app(mariadb_url, STALEGUARD_LEAKS="warn")
    instrument(app, MeterProvider(metric_readers=[reader]))
    with app.app_context():
        leaked = db.engine.connect()  # reported, and left out by the "warn" policy
        connection_id(db)
    time.sleep(0.3)
    reported = read(reader)
    leaked.close()
    with app.app_context():
        connection_id(db)  # a connection never reported: its return says nothing
    points = read(reader)
    assert reported[at("flask_staleguard.leaks", POOL, ("reclaimed", "false"))] == 1
    assert reported[("flask_staleguard.leaks.returned", (POOL,))] == 0
    assert points[("flask_staleguard.leaks.returned", (POOL,))] == 1
    assert stats(app)["leaks_returned"] == 1
    said = [r for r in guard_log.records if "(unleaked)" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING
    seconds = float(said[0].getMessage().split(" after ")[1].split(" s ")[0])
    assert 0.3 <= seconds < 5


def test_a_connect_waited_for_is_counted(mariadb_url: str) -> None:
    # Refused for half a second (the proxy's upstream is a closed port), then the
    # server is there: the connect waits, and the metrics count the outage.
    proxy = TcpProxy("127.0.0.1", free_port())
    proxy.start()
    engine = sa.create_engine(proxy.url_for(mariadb_url))
    try:
        protection = protect(engine, name="jobs", connect_wait=10)
        reader = InMemoryMetricReader()
        instrument(protection, MeterProvider(metric_readers=[reader]))
        threading.Timer(0.5, setattr, (proxy, "target_port", 3306)).start()
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT 1")).scalar() == 1
        points = read(reader)
        counts = protection.stats()
    finally:
        engine.dispose()
        proxy.stop()
    jobs = ("db.client.connection.pool.name", "jobs")
    assert points[("flask_staleguard.connect.outages", (jobs,))] == 1
    retries = points[("flask_staleguard.connect.retries", (jobs,))]
    assert retries == counts["connect_retries"] >= 1


def test_a_protected_engine_held_too_long(
    mariadb_url: str, guard_log: pytest.LogCaptureFixture
) -> None:
    engine = sa.create_engine(mariadb_url)
    try:
        protection = protect(engine, name="jobs", leak_threshold=0.5)
        reader = InMemoryMetricReader()
        instrument(protection, MeterProvider(metric_readers=[reader]))
        held = engine.connect()
        time.sleep(1.1)  # past the threshold, and past the scan's 1 s spacing
        with engine.connect():
            pass  # this checkout reports the one held too long
        assert any("has been held for" in r.getMessage() for r in guard_log.records)
        held.close()
        points = read(reader)
    finally:
        engine.dispose()
    jobs = ("db.client.connection.pool.name", "jobs")
    assert points[("flask_staleguard.leaks.returned", (jobs,))] == 1
    assert points[("flask_staleguard.checkouts", (jobs,))] == 2
    assert points[("db.client.connection.use_time", (jobs,))].count == 2
    said = [r.getMessage() for r in guard_log.records if "(unleaked)" in r.getMessage()]
    assert len(said) == 1 and "bind jobs" in said[0]


def test_use_times_are_never_lost(
    mariadb_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checkins queue their use time for the next collection; past the queue's
    bound they record their own, so nothing waits unbounded and nothing is lost.
    """
    monkeypatch.setattr(otel, "MAX_PENDING", 2)
    engine = sa.create_engine(mariadb_url)
    try:
        reader = InMemoryMetricReader()
        instrument(protect(engine, name="q"), MeterProvider(metric_readers=[reader]))
        for _ in range(5):
            with engine.connect():
                pass
        points = read(reader)
    finally:
        engine.dispose()
    use = points[
        at("db.client.connection.use_time", ("db.client.connection.pool.name", "q"))
    ]
    assert use.count == 5


def test_one_instrumentation_per_pool(make_app: AppFactory, mariadb_url: str) -> None:
    app, _ = make_app(mariadb_url)
    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    instrument(app, provider)
    with pytest.raises(RuntimeError, match="already instrumented"):
        instrument(app, provider)
    # The use_time listener reads the checkout time where the guard keeps it.
    assert Checkout._fields[2] == "at"


_WITHOUT_OTEL = """
import sys
sys.modules["opentelemetry"] = None  # as if the extra were not installed
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
import flask_staleguard
from flask_staleguard import StaleGuard

app = Flask("no_otel")
app.config["SQLALCHEMY_DATABASE_URI"] = URL
StaleGuard(app)
db = SQLAlchemy(app)

@app.get("/")
def index():
    return str(db.session.execute(sa.text("SELECT 41 + 1")).scalar_one())

print(app.test_client().get("/").text)
try:
    import flask_staleguard.otel
except ImportError as e:
    print(e)
"""


def test_the_app_runs_without_opentelemetry(mariadb_url: str) -> None:
    code = f"URL = {mariadb_url!r}\n{_WITHOUT_OTEL}"
    env = {**os.environ, "PYTHONPATH": str(Path(flask_staleguard.__file__).parents[1])}
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    answer, error = result.stdout.splitlines()
    assert answer == "42"
    assert "pip install 'flask-staleguard[otel]'" in error


OTEL_APP = """\
import os
import time

import sqlalchemy as sa
from flask import Flask
from flask import jsonify
from flask import request
from flask_sqlalchemy import SQLAlchemy
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource

from flask_staleguard import StaleGuard
from flask_staleguard.otel import instrument

app = Flask(__name__)
app.config["SQLALCHEMY_DATABASE_URI"] = os.environ["SG_TEST_URL"]
StaleGuard(app)
db = SQLAlchemy(app)
reader = InMemoryMetricReader()
resource = Resource.create({"process.pid": os.getpid()})
instrument(app, MeterProvider(metric_readers=[reader], resource=resource))


@app.get("/query")
def query():
    db.session.execute(sa.text("SELECT 1"))
    return jsonify(pid=os.getpid())


@app.get("/otel")
def otel():
    # Holds the worker, so that two at once reach both; no database here.
    time.sleep(float(request.args.get("hold", 0)))
    data = reader.get_metrics_data().to_json()
    return app.response_class(data, mimetype="application/json")
"""


def test_each_gunicorn_worker_exports(tmp_path: Path, mariadb_url: str) -> None:
    (tmp_path / "sg_otel_app.py").write_text(OTEL_APP)
    options = ("-w", "2", "--chdir", str(tmp_path))
    log = tmp_path / "gunicorn.log"
    with Gunicorn("sg_otel_app:app", log, *options, SG_TEST_URL=mariadb_url) as server:
        served: collections.Counter[int] = collections.Counter(
            server.get("/query")["pid"] for _ in range(12)
        )
        dumps: dict[int, dict[str, t.Any]] = {}
        # Two at once, each holding its sync worker, reach both workers.
        with ThreadPoolExecutor(2) as pool:
            for _ in range(10):
                for dump in pool.map(server.get, ["/otel?hold=0.3"] * 2):
                    dumps[_pid_of(dump)] = dump
                if len(dumps) == 2:
                    break
        assert len(dumps) == 2, "one gunicorn worker answered every request"
    stderr = log.read_bytes()
    # Each worker counted its own checkouts and its own pool.
    for pid, dump in dumps.items():
        points = _points_of(dump)
        checkouts = points.get(at("flask_staleguard.checkouts", POOL), 0)
        assert checkouts == served[pid], stderr.decode()
        used, idle = (
            points.get(
                at(
                    "db.client.connection.count",
                    POOL,
                    ("db.client.connection.state", s),
                )
            )
            for s in ("used", "idle")
        )
        # A sync worker serves one request at a time: one pooled connection, if
        # it served any query.
        assert (used, idle) == (0, 1 if served[pid] else 0)
        assert points.get(at("db.client.connection.create_time", POOL)) == (
            1 if served[pid] else None
        )


def _pid_of(dump: dict[str, t.Any]) -> int:
    return int(dump["resource_metrics"][0]["resource"]["attributes"]["process.pid"])


def _points_of(dump: dict[str, t.Any]) -> dict[tuple[str, t.Any], t.Any]:
    found = {}
    for resource in dump["resource_metrics"]:
        for scope in resource["scope_metrics"]:
            for metric in scope["metrics"]:
                for point in metric["data"]["data_points"]:
                    key = at(metric["name"], *point["attributes"].items())
                    found[key] = point.get("value", point.get("count"))
    return found
