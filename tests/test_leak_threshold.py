"""STALEGUARD_LEAK_THRESHOLD: connections held too long outside any app context.

A background thread that checks a connection out and keeps it is reported, once,
with the file and line that took it (HikariCP's leakDetectionThreshold).
"""

from __future__ import annotations

import inspect
import threading
import time
import typing as t
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_staleguard.core.guard import PoolGuard
from flask_staleguard.core.options import GuardOptions
from flask_staleguard.core.redact import Secrets
from tests.helpers import AppFactory
from tests.helpers import FakeClock
from tests.servers import MariaDBServer

POOL = {"pool_size": 3, "max_overflow": 0, "pool_timeout": 2}
HELD = "has been held for"


class Holder:
    """A thread that checks a connection out, outside any app context, and keeps it."""

    def __init__(self, engine: sa.engine.Engine) -> None:
        self.engine = engine
        self.taken = threading.Event()
        self.release = threading.Event()
        self.line = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.line = _line() + 1
        conn = self.engine.connect()  # the checkout site the report must name
        try:
            conn.execute(sa.text("SELECT 1"))
            self.taken.set()
            self.release.wait(10)
        finally:
            conn.close()

    def __enter__(self) -> Holder:
        self.thread.start()
        assert self.taken.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.thread.join(10)


def _line() -> int:
    frame = inspect.currentframe()
    assert frame is not None and frame.f_back is not None
    return frame.f_back.f_lineno


@pytest.fixture()
def app_db(
    make_app: AppFactory, mariadb: MariaDBServer
) -> Iterator[t.Callable[..., tuple[Flask, SQLAlchemy]]]:
    def build(**config: t.Any) -> tuple[Flask, SQLAlchemy]:
        config.setdefault("SQLALCHEMY_ENGINE_OPTIONS", POOL)
        return make_app(mariadb.url, **config)

    yield build


def checkout_once(app: Flask, db: SQLAlchemy) -> None:
    with app.app_context(), db.engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))


def held_reports(log: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in log.records if HELD in r.getMessage()]


def test_connection_held_past_threshold_is_reported_with_its_site(
    app_db: t.Callable[..., tuple[Flask, SQLAlchemy]], guard_log: t.Any
) -> None:
    app, db = app_db(STALEGUARD_LEAK_THRESHOLD=0.5)
    with app.app_context():
        engine = db.engine
    with Holder(engine) as holder:
        checkout_once(app, db)  # starts the scan clock
        time.sleep(1.2)
        checkout_once(app, db)  # the next scan finds the holder past 0.5 s
        time.sleep(1.1)
        checkout_once(app, db)  # still held: not reported twice
        reports = held_reports(guard_log)
        assert len(reports) == 1, reports
        assert f"test_leak_threshold.py:{holder.line} in _run" in reports[0]
        assert "STALEGUARD_LEAK_THRESHOLD=0.5 s" in reports[0]
    # About internals: the guard's table of holders forgets a returned connection.
    assert app.extensions["staleguard"].binds[None].holders.checked_out == {}


@pytest.fixture()
def clocked(
    mariadb: MariaDBServer,
) -> Iterator[t.Callable[..., tuple[sa.engine.Engine, FakeClock]]]:
    """An engine guarded by a ``PoolGuard`` on a fake clock: the threshold's
    timing logic without sleeping.
    """
    engines: list[sa.engine.Engine] = []

    def build(
        threshold: float | None,
        holder: t.Callable[[], tuple[t.Any, t.Any]] | None = None,
    ) -> tuple[sa.engine.Engine, FakeClock]:
        engine = sa.create_engine(mariadb.url, **POOL)
        engines.append(engine)
        clock = FakeClock()
        options = GuardOptions(leak_threshold=threshold)
        guard = PoolGuard(
            None,
            "default",
            Secrets(engine.url),
            "mysql",
            options,
            28800,
            holder=holder,
            clock=clock,
        )
        guard.attach(engine)  # its listeners keep it alive with the engine
        return engine, clock

    yield build
    for engine in engines:
        engine.dispose()


def use(engine: sa.engine.Engine) -> None:
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))


@pytest.mark.parametrize(
    "threshold", [None, 5.0], ids=["no threshold", "held under the threshold"]
)
def test_nothing_is_reported(
    clocked: t.Callable[..., tuple[sa.engine.Engine, FakeClock]],
    guard_log: t.Any,
    threshold: float | None,
) -> None:
    engine, clock = clocked(threshold)
    with Holder(engine):
        use(engine)
        clock.advance(1.2)
        use(engine)
    assert held_reports(guard_log) == []


def test_connection_held_inside_an_app_context_is_not_reported(
    clocked: t.Callable[..., tuple[sa.engine.Engine, FakeClock]], guard_log: t.Any
) -> None:
    # A long request is teardown's business, not the threshold's: every checkout
    # here has an owner, as one inside an app context has.
    engine, clock = clocked(0.5, holder=lambda: ("a context", None))
    with engine.connect() as held:
        held.execute(sa.text("SELECT 1"))
        use(engine)
        clock.advance(1.2)
        use(engine)
    assert held_reports(guard_log) == []


def test_a_new_holder_of_a_reported_connection_is_reported_again(
    clocked: t.Callable[..., tuple[sa.engine.Engine, FakeClock]], guard_log: t.Any
) -> None:
    engine, clock = clocked(0.5)
    for _ in range(2):
        with Holder(engine):
            use(engine)
            clock.advance(1.2)
            use(engine)
    assert len(held_reports(guard_log)) == 2
