"""The maximum connection lifetime: the backstop against what no check can see (an
old node that still answers after a fail-over). Connections are replaced for
their age at checkout only, under ``guard`` only, each at its own jittered time.

Against the shared MariaDB, read-only: nothing here changes the server.
"""

from __future__ import annotations

import time
import typing as t
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from flask_staleguard import protect
from flask_staleguard.core.checkout import ConnectionState
from flask_staleguard.core.checkout import STATE
from flask_staleguard.core.guard import PoolGuard
from flask_staleguard.core.lifetime import lifetime
from flask_staleguard.core.options import GuardOptions
from flask_staleguard.core.redact import Secrets
from tests.helpers import AppFactory
from tests.helpers import engine_connection_id
from tests.helpers import FakeClock
from tests.helpers import MYSQL_ID
from tests.helpers import pool_json
from tests.helpers import replaced
from tests.proxies import TcpProxy
from tests.servers import MariaDBServer

#: The shared server's wait_timeout: the idle budget never acts here.
SERVER_TIMEOUT = 28800


@pytest.fixture()
def engine(mariadb_url: str) -> Iterator[sa.engine.Engine]:
    made = sa.create_engine(mariadb_url, pool_size=4, max_overflow=0)
    yield made
    made.dispose()


def guarded(
    engine: sa.engine.Engine, clock: FakeClock, max_lifetime: float, strategy: str
) -> PoolGuard:
    """A guard on ``engine`` whose time is ``clock``'s."""
    guard = PoolGuard(
        None,
        "default",
        Secrets(engine.url),
        "mysql",
        GuardOptions(strategy=strategy, max_lifetime=max_lifetime),
        SERVER_TIMEOUT,
        clock=clock,
    )
    guard.attach(engine)
    return guard


def state_of(proxy: t.Any) -> ConnectionState:
    """The guard's state of a checked-out connection."""
    return t.cast(ConnectionState, proxy._connection_record.info[STATE])


def test_lifetimes_lie_within_75_to_100_percent_and_are_spread() -> None:
    assert lifetime(1800, lambda: 0.0) == 1800
    assert lifetime(1800, lambda: 0.999999) == pytest.approx(1350, abs=0.01)
    drawn = [lifetime(100) for _ in range(200)]
    assert all(75 < d <= 100 for d in drawn)
    # 200 uniform draws: all in one half has a chance of 2 ** -199.
    assert min(drawn) < 87.5 < max(drawn)


def test_each_new_connection_draws_its_own_expiry_at_connect(
    engine: sa.engine.Engine,
) -> None:
    clock = FakeClock()
    guarded(engine, clock, 1000, "guard")
    proxies = [engine.raw_connection() for _ in range(4)]
    try:
        # Counted from when SQLAlchemy began to connect, on the wall clock: at
        # most moments before this fake clock's now.
        left = [state_of(p).expires - clock.now for p in proxies]
        assert all(700 < s <= 1000 for s in left), left
        assert len(set(left)) == 4, left
    finally:
        for proxy in proxies:
            proxy.close()


def test_past_its_lifetime_an_idle_connection_is_replaced_never_one_in_use(
    engine: sa.engine.Engine,
) -> None:
    clock = FakeClock()
    guard = guarded(engine, clock, 100, "guard")
    first = engine_connection_id(engine)
    clock.advance(70)  # below 75 s, the shortest lifetime: not due yet
    assert engine_connection_id(engine) == first
    with engine.connect() as conn:
        held = [conn.execute(sa.text(MYSQL_ID)).scalar_one()]
        clock.advance(60)  # past every lifetime, while in use
        held.append(conn.execute(sa.text(MYSQL_ID)).scalar_one())
    assert held == [first, first]
    assert guard.stats.snapshot()["replaced"] == {}
    fresh = engine_connection_id(engine)  # its next checkout
    assert fresh != first
    assert guard.stats.snapshot()["replaced"] == {"max_lifetime": 1}
    assert engine_connection_id(engine) == fresh


def test_a_brand_new_connection_is_never_judged_by_its_age(
    engine: sa.engine.Engine,
) -> None:
    clock = FakeClock()
    guard = guarded(engine, clock, 100, "guard")

    @sa.event.listens_for(engine, "connect")
    def slow_connect(dbapi_connection: t.Any, record: t.Any) -> None:
        clock.advance(200)  # after the guard drew its lifetime, before checkout

    first = engine_connection_id(engine)
    assert guard.stats.snapshot()["replaced"] == {}
    assert engine_connection_id(engine) != first  # judged once it idled
    assert guard.stats.snapshot()["replaced"] == {"max_lifetime": 1}


def test_a_busy_pool_leaves_an_old_node_that_still_answers(
    mariadb_url: str, mariadb: MariaDBServer
) -> None:
    # A proxy in front of the shared server is moved to the private one, as a
    # rebalanced proxy or a DNS change moves new connections: the old node's
    # connections are alive and quiet, so neither the idle budget nor the probe
    # has anything to see. Only SELECTs reach either server.
    old = sa.make_url(mariadb_url).port
    with TcpProxy("127.0.0.1", t.cast(int, old)) as proxy:
        engine = sa.create_engine(
            f"mysql+pymysql://root@127.0.0.1:{proxy.port}/", pool_size=2
        )
        try:
            clock = FakeClock()
            guard = guarded(engine, clock, 100, "guard")

            def port() -> int:
                with engine.connect() as conn:
                    return int(conn.execute(sa.text("SELECT @@port")).scalar_one())

            assert port() == old
            proxy.target_port = mariadb.port  # the fail-over
            seen = []
            for _ in range(14):  # 70 s of constant use: younger than any lifetime
                clock.advance(5)
                seen.append(port())
            assert set(seen) == {old}
            clock.advance(31)  # past every lifetime, never idle more than 31 s
            assert port() == mariadb.port
            assert guard.stats.snapshot()["replaced"] == {"max_lifetime": 1}
        finally:
            engine.dispose()


@pytest.mark.parametrize("strategy", ["recycle", "pre_ping", "off"])
def test_only_the_guard_strategy_applies_a_lifetime(
    engine: sa.engine.Engine, strategy: str
) -> None:
    clock = FakeClock()
    guard = guarded(engine, clock, 100, strategy)
    first = engine_connection_id(engine)
    clock.advance(1000)
    assert engine_connection_id(engine) == first
    assert guard.stats.snapshot()["replaced"] == {}


def test_a_connection_from_before_the_guard_counts_its_age_from_its_connect(
    engine: sa.engine.Engine,
) -> None:
    first = engine_connection_id(engine)
    time.sleep(1.1)  # older than its lifetime (at most 1 s) before the guard comes
    clock = FakeClock()  # and from then on, no time passes for the guard
    guard = guarded(engine, clock, 1, "guard")
    assert engine_connection_id(engine) == first  # unknown to the guard until checkin
    assert engine_connection_id(engine) != first
    assert guard.stats.snapshot()["replaced"] == {"max_lifetime": 1}


@pytest.mark.parametrize(
    ("strategy", "applied", "renewed"),
    # recycle: SQLAlchemy's pool_recycle, capped at the max lifetime, renews it.
    [("guard", True, True), ("recycle", False, True), ("off", False, False)],
)
def test_a_flask_app_leaves_a_connection_past_its_lifetime_after_its_checkin(
    make_app: AppFactory, mariadb_url: str, strategy: str, applied: bool, renewed: bool
) -> None:
    app, db = make_app(
        mariadb_url,
        SQLALCHEMY_ENGINE_OPTIONS={"pool_size": 1, "max_overflow": 0},
        STALEGUARD_STRATEGY=strategy,
        STALEGUARD_MAX_LIFETIME=1,
    )
    with app.app_context():
        with db.engine.connect() as conn:
            held = [conn.execute(sa.text(MYSQL_ID)).scalar_one()]
            time.sleep(1.2)  # past its lifetime, at most 1 s, while in use
            held.append(conn.execute(sa.text(MYSQL_ID)).scalar_one())
        assert held[0] == held[1]
        assert "max_lifetime" not in replaced(app)
        after = engine_connection_id(db.engine)
    assert (after != held[0]) is renewed
    assert replaced(app).get("max_lifetime", 0) == (1 if applied else 0)
    assert pool_json(app)["max_lifetime"] == (1 if applied else None)


def test_protect_takes_max_lifetime(engine: sa.engine.Engine) -> None:
    assert protect(engine).guard.options.max_lifetime == 1800
    other = sa.create_engine(engine.url, pool_size=1, max_overflow=0)
    try:
        assert protect(other, max_lifetime=7200).guard.options.max_lifetime == 7200
    finally:
        other.dispose()
