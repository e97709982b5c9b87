"""``guard.add_engine()``: the "SQLAlchemy in Flask" pattern from Flask's docs,
an engine and a scoped session the app makes itself, no Flask-SQLAlchemy.
"""

from __future__ import annotations

import json
import logging
import time
import typing as t
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from flask import Flask
from sqlalchemy.orm import scoped_session
from sqlalchemy.orm import sessionmaker

from flask_staleguard import StaleGuard
from tests.clitools import invoke
from tests.servers import MariaDBServer

POOL = {"pool_size": 3, "max_overflow": 0}


class HandMade(t.NamedTuple):
    app: Flask
    engine: sa.engine.Engine
    session: scoped_session[t.Any]
    guard: StaleGuard | None


@pytest.fixture()
def hand_made(mariadb: MariaDBServer) -> Iterator[t.Callable[[bool], HandMade]]:
    made: list[HandMade] = []

    def build(guarded: bool) -> HandMade:
        app = Flask(f"hand_made_{len(made)}")
        app.config["TESTING"] = True
        engine = sa.create_engine(mariadb.url, **POOL)
        session = scoped_session(sessionmaker(bind=engine))
        guard = None
        if guarded:
            guard = StaleGuard(app)
            guard.add_engine(app, engine, "reports")
            guard.register_session(session)
        else:

            @app.teardown_appcontext
            def remove(exc: BaseException | None) -> None:
                session.remove()

        @app.route("/q")
        def query() -> str:
            return str(session.execute(sa.text("SELECT CONNECTION_ID()")).scalar_one())

        made.append(HandMade(app, engine, session, guard))
        return made[-1]

    yield build
    for m in made:
        m.engine.dispose()


def warm(m: HandMade) -> set[int]:
    conns = [m.engine.connect() for _ in range(3)]
    ids = {
        int(c.execute(sa.text("SELECT CONNECTION_ID()")).scalar_one()) for c in conns
    }
    for c in conns:
        c.close()
    return ids


@pytest.mark.parametrize("guarded", [True, False])
def test_killed_idle_connections(
    hand_made: t.Callable[[bool], HandMade], mariadb: MariaDBServer, guarded: bool
) -> None:
    m = hand_made(guarded)
    before = warm(m)
    mariadb.kill_connections()
    time.sleep(0.2)
    client = m.app.test_client()
    if not guarded:
        with pytest.raises(sa.exc.OperationalError):
            client.get("/q")
        return
    served = {int(client.get("/q").text) for _ in range(6)}
    assert not before & served
    assert m.guard is not None
    assert m.guard.stats(m.app)["reports"]["replaced"] == {"probe_eof": 3}


def test_the_commands_show_the_added_engine(
    hand_made: t.Callable[[bool], HandMade],
) -> None:
    m = hand_made(True)
    with m.app.app_context():
        result = invoke(m.app, "pool", "--bind", "reports", "--json")
    assert result.exit_code == 0, result.output
    (bind,) = json.loads(result.stdout)["binds"]
    assert bind["bind"] == "reports"
    assert bind["server_timeout"] == 28800.0
    assert bind["liveness_probe"] is True


def test_a_leak_of_the_added_engine_is_reported(
    hand_made: t.Callable[[bool], HandMade], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "flask_staleguard")
    m = hand_made(True)
    kept = []
    with m.app.app_context():
        kept.append(m.engine.connect())
    said = [r.getMessage() for r in caplog.records]
    assert any(s.startswith("bind reports: a connection checked out") for s in said)
    assert m.guard is not None
    assert m.guard.stats(m.app)["reports"]["leaks_reclaimed"] == 1


def test_a_name_already_taken_is_refused(
    hand_made: t.Callable[[bool], HandMade], mariadb: MariaDBServer
) -> None:
    m = hand_made(True)
    assert m.guard is not None
    other = sa.create_engine(mariadb.url)
    try:
        with pytest.raises(ValueError, match="the name 'reports' is taken"):
            m.guard.add_engine(m.app, other, "reports")
    finally:
        other.dispose()
