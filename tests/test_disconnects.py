"""Disconnect errors: which ones count, how they are reported, what follows them.

The classification is a pure function of the error (``disconnect_label``); the rest
runs against the private MariaDB, whose connections these tests KILL.
"""

from __future__ import annotations

import errno
import time
import typing as t

import pymysql
import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_staleguard.core.disconnects import disconnect_label
from tests.helpers import AppFactory
from tests.helpers import connection_id
from tests.helpers import stats
from tests.helpers import warm
from tests.servers import MariaDBServer

POOL = {"pool_size": 2, "max_overflow": 0}


@pytest.mark.parametrize(
    ("code", "label"),
    [(2006, "2006"), (2013, "2013"), (2055, "2055")],
)
@pytest.mark.parametrize("mariadb", [False, True])
def test_client_gone_codes_are_disconnects(
    code: int, label: str, mariadb: bool
) -> None:
    error = pymysql.err.OperationalError(code, "MySQL server has gone away")
    assert disconnect_label(error, "mysql", mariadb=mariadb) == label


def test_4031_is_a_disconnect_on_mysql_only() -> None:
    error = pymysql.err.OperationalError(
        4031, "The client was disconnected by the server because of inactivity."
    )
    assert disconnect_label(error, "mysql", mariadb=False) == "4031"
    assert disconnect_label(error, "mysql", mariadb=True) is None


@pytest.mark.parametrize(
    ("error", "label"),
    [
        (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), "reset"),
        (
            ConnectionResetError(10054, "An existing connection was forcibly closed"),
            "reset",
        ),
        (
            ConnectionAbortedError(10053, "An established connection was aborted"),
            "aborted",
        ),
        (BrokenPipeError(errno.EPIPE, "Broken pipe"), "broken_pipe"),
        (OSError(errno.ECONNRESET, "Connection reset by peer"), "reset"),
        (OSError(errno.EPIPE, "Broken pipe"), "broken_pipe"),
        (RuntimeError("Lost connection: system error: 10054"), "reset"),
        (RuntimeError("Lost connection: system error: 10053"), "aborted"),
    ],
)
@pytest.mark.parametrize("kind", ["mysql", "postgresql"])
def test_socket_errors_are_named(error: BaseException, label: str, kind: str) -> None:
    assert disconnect_label(error, kind) == label


def test_mysql_code_wins_over_the_message() -> None:
    error = pymysql.err.OperationalError(
        2013, "Lost connection to MySQL system error: 10054 An existing ..."
    )
    assert disconnect_label(error, "mysql") == "2013"


def add_killed_route(app: Flask, db: SQLAlchemy, mariadb: MariaDBServer) -> None:
    @app.route("/killed")
    def killed() -> str:
        cid = db.session.execute(sa.text("SELECT CONNECTION_ID()")).scalar_one()
        mariadb.execute("KILL %s", (int(cid),))
        time.sleep(0.1)
        db.session.execute(sa.text("SELECT 1"))  # fails: the connection is gone
        return "unreachable"


def test_kill_mid_request_is_counted_and_explained(
    make_app: AppFactory, mariadb: MariaDBServer, guard_log: t.Any
) -> None:
    app, db = make_app(mariadb.url, SQLALCHEMY_ENGINE_OPTIONS=POOL)
    add_killed_route(app, db, mariadb)
    with app.app_context():
        connection_id(db)  # the request gets a pooled connection, not a new one
    with pytest.raises(sa.exc.OperationalError) as info:
        app.test_client().get("/killed")
    code = info.value.orig.args[0]  # type: ignore[union-attr]
    assert code in (2006, 2013)
    disconnects = stats(app)["disconnects"]
    assert disconnects == {str(code): 1}
    lines = [
        r.getMessage() for r in guard_log.records if "connection lost" in r.message
    ]
    assert len(lines) == 1, lines
    # Lost while in use: it must not blame an idle timer for a KILL mid-request.
    assert lines[0] == (
        f"bind default: connection lost ({code}) while in use:"
        " a server restart, KILL or network fault"
    )


def test_strategy_off_still_counts_disconnects(
    make_app: AppFactory, mariadb: MariaDBServer
) -> None:
    app, db = make_app(
        mariadb.url, SQLALCHEMY_ENGINE_OPTIONS=POOL, STALEGUARD_STRATEGY="off"
    )
    add_killed_route(app, db, mariadb)
    with pytest.raises(sa.exc.OperationalError):
        app.test_client().get("/killed")
    # Strategy "off" still counts: statistics stay on.
    assert sum(stats(app)["disconnects"].values()) == 1


def test_a_disconnect_is_counted_once_not_per_connection_it_takes_along(
    make_app: AppFactory, mariadb: MariaDBServer, guard_log: t.Any
) -> None:
    # After a disconnect SQLAlchemy drops every pooled connection older than it
    # (its pool-wide invalidation, not the guard's doing). The guard counts and
    # explains the one connection lost, and neither counts nor explains the
    # healthy ones dropped with it as lost or stale.
    app, db = make_app(mariadb.url, SQLALCHEMY_ENGINE_OPTIONS=POOL)
    add_killed_route(app, db, mariadb)
    older = warm(app, db, n=2)
    with pytest.raises(sa.exc.OperationalError) as info:
        app.test_client().get("/killed")
    code = str(info.value.orig.args[0])  # type: ignore[union-attr]
    newer = warm(app, db, n=2)
    assert not older & newer  # the scenario: the survivor was dropped too
    counters = stats(app)
    assert counters["disconnects"] == {code: 1}
    assert counters["replaced"] == {}
    lost = [r for r in guard_log.records if "connection lost" in r.getMessage()]
    assert len(lost) == 1, [r.getMessage() for r in lost]


def test_mariadb_4031_is_not_a_disconnect(
    make_app: AppFactory, mariadb: MariaDBServer
) -> None:
    app, db = make_app(mariadb.url, SQLALCHEMY_ENGINE_OPTIONS=POOL)
    mariadb.execute("DROP TABLE IF EXISTS trg_4031")
    mariadb.execute("CREATE TABLE trg_4031 (n INT)")
    try:
        with app.app_context(), db.engine.connect() as conn:
            cid = conn.execute(sa.text("SELECT CONNECTION_ID()")).scalar_one()
            with pytest.raises(sa.exc.OperationalError) as info:
                conn.execute(
                    sa.text(
                        "CREATE TRIGGER trg_4031_b BEFORE INSERT ON trg_4031"
                        " FOR EACH ROW FOLLOWS no_such_trigger SET NEW.n = 1"
                    )
                )
            assert info.value.orig.args[0] == 4031  # type: ignore[union-attr]
            assert not info.value.connection_invalidated
            # The same connection keeps working: it was never treated as gone.
            conn.rollback()
            assert conn.execute(sa.text("SELECT CONNECTION_ID()")).scalar_one() == cid
        assert stats(app)["disconnects"] == {}
    finally:
        mariadb.execute("DROP TABLE IF EXISTS trg_4031")


def test_statements_meet_no_listener_of_the_guard(
    make_app: AppFactory, mariadb_url: str, postgres_url: str
) -> None:
    # About SQLAlchemy's internals: any engine or dialect event listener makes it
    # look up listeners around every statement. The MariaDB 4031 rule is on the
    # dialect's is_disconnect instead, which only failed statements call, and so
    # is the rule that a demoted writer's refusal is a disconnect.
    mysql_app, mysql_db = make_app(mariadb_url)
    postgres_app, postgres_db = make_app(postgres_url)
    with mysql_app.app_context():
        engine = mysql_db.engine
        assert engine._has_events is False
        assert engine.dialect._has_events is False
        judges = engine.dialect.is_disconnect.staleguard_judges  # type: ignore[attr-defined]
        assert sorted(judges) == ["demotion", "mariadb-4031"]
    with postgres_app.app_context():
        assert postgres_db.engine._has_events is False
        assert postgres_db.engine.dialect._has_events is False
        dialect = postgres_db.engine.dialect
        judges = dialect.is_disconnect.staleguard_judges  # type: ignore[attr-defined]
        assert list(judges) == ["demotion"]
