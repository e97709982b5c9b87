"""guard.stats(): per-bind counters, and the blinker signals sent with them."""

from __future__ import annotations

import time
import typing as t
from collections.abc import Iterator

import pymysql  # type: ignore[import-untyped, unused-ignore]
import pytest
import sqlalchemy as sa
from blinker import Signal

from flask_staleguard.core.guard import PoolGuard
from flask_staleguard.metrics.signals import connection_replaced
from flask_staleguard.metrics.signals import disconnect_seen
from flask_staleguard.metrics.signals import leak_detected
from tests.helpers import AppFactory
from tests.helpers import connection_id
from tests.helpers import guard_of
from tests.helpers import stats as stats_of
from tests.servers import MariaDBServer

Received = list[tuple[PoolGuard, dict[str, t.Any]]]


@pytest.fixture()
def receive() -> Iterator[t.Callable[[Signal], Received]]:
    """Connect a recording receiver to a signal, for this test only."""
    connected: list[tuple[Signal, t.Callable[..., None]]] = []

    def connect(signal: Signal) -> Received:
        received: Received = []

        def receiver(sender: PoolGuard, **kwargs: t.Any) -> None:
            received.append((sender, kwargs))

        signal.connect(receiver, weak=False)
        connected.append((signal, receiver))
        return received

    yield connect
    for signal, receiver in connected:
        signal.disconnect(receiver)


def sender_of(app: t.Any, key: str | None = None) -> PoolGuard:
    """The sender of a bind's signals: its ``PoolGuard``, which only the guard's
    state in ``app.extensions`` holds (an internal, read to check the sender).
    """
    return t.cast(PoolGuard, app.extensions["staleguard"].binds[key])


def test_counters_start_at_zero_and_count_checkouts(
    make_app: AppFactory, mariadb_url: str, postgres_url: str
) -> None:
    app, db = make_app(mariadb_url, SQLALCHEMY_BINDS={"pg": postgres_url})
    guard = guard_of(app)
    zero = {
        "checkouts": 0,
        "replaced": {},
        "disconnects": {},
        "leaks_detected": 0,
        "leaks_reclaimed": 0,
        "leaks_returned": 0,
        "outages": 0,
        "connect_retries": 0,
    }
    assert guard.stats(app) == {"default": zero, "pg": zero}
    with app.app_context():
        for _ in range(3):
            with db.engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        with db.engines["pg"].connect():
            pass
        assert guard.stats() == {
            "default": {**zero, "checkouts": 3},
            "pg": {**zero, "checkouts": 1},
        }


def test_idle_budget_replacement_is_counted_and_signalled(
    make_app: AppFactory,
    mariadb_url: str,
    receive: t.Callable[[Signal], Received],
) -> None:
    replaced = receive(connection_replaced)
    # A declared 1 s timeout makes the idle budget 0.9 s.
    app, db = make_app(mariadb_url, STALEGUARD_SERVER_TIMEOUT=1)
    with app.app_context():
        first = connection_id(db)
        time.sleep(1.0)
        assert connection_id(db) != first
    stats = guard_of(app).stats(app)["default"]
    assert stats["replaced"] == {"idle_budget": 1}
    assert stats["checkouts"] == 3  # two handed out, one refused and replaced
    ((sender, kwargs),) = replaced
    assert sender is sender_of(app)
    assert kwargs["reason"] == "idle_budget"
    assert 0.9 < kwargs["idle"] < 2


def test_probe_replacement_is_counted_and_signalled(
    make_app: AppFactory,
    mariadb: MariaDBServer,
    receive: t.Callable[[Signal], Received],
) -> None:
    replaced = receive(connection_replaced)
    app, db = make_app(mariadb.user_url)
    with app.app_context():
        first = connection_id(db)
        assert mariadb.kill_connections(user="sg") == [first]
        time.sleep(0.2)  # for the FIN to arrive
        assert connection_id(db) != first
    (reason,) = stats_of(app)["replaced"]
    assert reason.startswith("probe_")
    ((sender, kwargs),) = replaced
    assert sender is sender_of(app) and kwargs["reason"] == reason


def test_disconnect_is_counted_and_signalled(
    make_app: AppFactory,
    mariadb: MariaDBServer,
    receive: t.Callable[[Signal], Received],
) -> None:
    seen = receive(disconnect_seen)
    # Nothing checks the connection at checkout, so the statement meets the KILL.
    app, db = make_app(mariadb.user_url, STALEGUARD_STRATEGY="off")
    with app.app_context():
        first = connection_id(db)
        mariadb.kill_connections(user="sg")
        time.sleep(0.2)
        with pytest.raises(sa.exc.OperationalError) as raised:
            connection_id(db)
    assert first
    code = str(t.cast(pymysql.err.OperationalError, raised.value.orig).args[0])
    assert stats_of(app)["disconnects"] == {code: 1}
    ((sender, kwargs),) = seen
    assert sender is sender_of(app)
    assert kwargs["code"] == code
    assert kwargs["idle"] is not None and kwargs["idle"] >= 0.2


def test_leaks_are_counted_and_signalled(
    make_app: AppFactory,
    mariadb_url: str,
    receive: t.Callable[[Signal], Received],
) -> None:
    leaks = receive(leak_detected)
    app, db = make_app(mariadb_url)
    leaked = []
    for _ in range(2):
        with app.app_context():
            leaked.append(db.engine.connect())  # never closed: a leak
    with app.app_context():
        assert db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    for conn in leaked:
        conn.close()
    stats = stats_of(app)
    assert (stats["leaks_detected"], stats["leaks_reclaimed"]) == (2, 2)
    (first_sender, first), (_, second) = leaks
    assert first_sender is sender_of(app)
    assert first["reclaimed"] is True and second["reclaimed"] is True
    # The bind records sites from its first leak on.
    assert first["site"] == ()
    (site,) = [frame for frame in second["site"] if frame[0] == __file__]
    assert site[2] == "test_leaks_are_counted_and_signalled"


def test_signals_stay_quiet_for_healthy_connections(
    make_app: AppFactory,
    mariadb_url: str,
    receive: t.Callable[[Signal], Received],
) -> None:
    received = [
        receive(s) for s in (connection_replaced, disconnect_seen, leak_detected)
    ]
    app, db = make_app(mariadb_url)
    with app.app_context():
        for _ in range(3):
            connection_id(db)
    assert received == [[], [], []]
    assert stats_of(app)["checkouts"] == 3


def test_stats_outside_an_app_context_says_to_pass_the_app(
    make_app: AppFactory, mariadb_url: str
) -> None:
    app, _ = make_app(mariadb_url)
    guard = guard_of(app)
    with pytest.raises(RuntimeError, match=r"pass the app, guard\.stats\(app\)"):
        guard.stats()
    assert guard.stats(app)["default"]["checkouts"] == 0
