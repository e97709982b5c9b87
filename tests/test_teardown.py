"""Teardown: leaked scoped sessions and leaked connections are cleaned up."""

from __future__ import annotations

import typing as t

import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import scoped_session
from sqlalchemy.orm import sessionmaker

from flask_staleguard import LeakError
from flask_staleguard import StaleGuard
from flask_staleguard.extension.contexts import TEARDOWNS_STOP_AT_FIRST_ERROR
from tests.helpers import AppFactory
from tests.helpers import guard_of
from tests.helpers import raises
from tests.helpers import stats
from tests.servers import MariaDBServer

SMALL_POOL = {"pool_size": 3, "max_overflow": 0, "pool_timeout": 1}


def checked_out(app: Flask, db: SQLAlchemy) -> int:
    with app.app_context():
        return int(db.engine.pool.checkedout())  # type: ignore[attr-defined]


def add_raising_teardown(app: Flask) -> t.Callable[[BaseException | None], None]:
    @app.teardown_appcontext
    def broken(exc: BaseException | None) -> None:
        raise RuntimeError("a user teardown that fails")

    return broken


def query_view(app: Flask, db: SQLAlchemy) -> None:
    @app.route("/q")
    def query() -> str:
        return str(db.session.execute(sa.text("SELECT 1")).scalar_one())


@pytest.mark.parametrize("guarded", [False, True])
def test_raising_teardown_leaves_no_session_behind(
    make_app: AppFactory, mariadb: MariaDBServer, guarded: bool, guard_log: t.Any
) -> None:
    app, db = make_app(mariadb.url, guard=guarded, SQLALCHEMY_ENGINE_OPTIONS=SMALL_POOL)
    query_view(app, db)
    broken = add_raising_teardown(app)  # registered last, so Flask runs it first
    with raises(RuntimeError, match="a user teardown that fails"):
        app.test_client().get("/q")
    app.teardown_appcontext_funcs.remove(broken)
    leftover = len(db.session.registry.registry)
    if not TEARDOWNS_STOP_AT_FIRST_ERROR:  # Flask 3.2 runs them all: no bug
        assert (leftover, checked_out(app, db)) == (0, 0)
        return
    if not guarded:  # Flask <= 3.1 skipped Flask-SQLAlchemy's teardown: the bug
        assert leftover == 1
        assert checked_out(app, db) == 1
        return
    assert leftover == 0
    assert checked_out(app, db) == 0
    assert "db.session was still open after teardown" in guard_log.text


def test_registered_scoped_session_is_removed(
    make_app: AppFactory, mariadb: MariaDBServer
) -> None:
    app, db = make_app(mariadb.url, guard=False, SQLALCHEMY_ENGINE_OPTIONS=SMALL_POOL)
    guard = StaleGuard(app)
    with app.app_context():
        session = scoped_session(sessionmaker(bind=db.engine))
    guard.register_session(session)

    @app.route("/own")
    def own() -> str:
        return str(session.execute(sa.text("SELECT 1")).scalar_one())  # never removed

    client = app.test_client()
    for _ in range(5):
        assert client.get("/own").text == "1"
    assert not session.registry.has()
    assert checked_out(app, db) == 0


class Base(sa.orm.DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"
    id: sa.orm.Mapped[int] = sa.orm.mapped_column(primary_key=True)
    body: sa.orm.Mapped[str] = sa.orm.mapped_column(sa.Text)


def test_unsaved_changes_are_rolled_back_with_a_warning(
    make_app: AppFactory, mariadb: MariaDBServer, guard_log: t.Any
) -> None:
    mariadb.execute("CREATE TABLE IF NOT EXISTS notes (id INT PRIMARY KEY, body TEXT)")
    mariadb.execute("DELETE FROM notes")
    app, db = make_app(mariadb.url)
    with app.app_context():
        session = scoped_session(sessionmaker(bind=db.engine))
    guard_of(app).register_session(session)

    @app.route("/write")
    def write() -> str:
        session.add(Note(id=1, body="flushed, never committed"))
        session.flush()
        session.add(Note(id=2, body="pending"))
        return "ok"

    assert app.test_client().get("/write").text == "ok"
    assert mariadb.execute("SELECT COUNT(*) FROM notes") == [(0,)]
    assert not session.registry.has()
    assert "left open with unsaved changes at teardown" in guard_log.text
    assert checked_out(app, db) == 0


def leaky_app(
    make_app: AppFactory, url: str, **config: t.Any
) -> tuple[Flask, SQLAlchemy, list[sa.Connection]]:
    app, db = make_app(url, SQLALCHEMY_ENGINE_OPTIONS=SMALL_POOL, **config)
    # Kept referenced, as a leak in a cache or a global is: SQLAlchemy's own
    # garbage-collection fallback cannot return these.
    held: list[sa.Connection] = []

    @app.route("/leak")
    def leak() -> str:
        conn = db.engine.connect()  # never closed: a leak
        held.append(conn)
        return str(conn.execute(sa.text("SELECT 1")).scalar_one())

    return app, db, held


def test_leaked_connections_do_not_exhaust_the_pool(
    make_app: AppFactory, mariadb: MariaDBServer, guard_log: t.Any
) -> None:
    app, db, held = leaky_app(make_app, mariadb.url)
    client = app.test_client()
    for _ in range(10):
        assert client.get("/leak").text == "1"
    assert checked_out(app, db) == 0
    warnings = [
        r.getMessage() for r in guard_log.records if "not returned" in r.message
    ]
    assert len(warnings) == 10
    # The first leak is named by its request (sites cost a stack walk per
    # checkout, so a bind records them from its first leak on)...
    assert "checked out during GET /leak (endpoint 'leak')" in warnings[0]
    assert "file and line are recorded for the next leaks" in warnings[0]
    # ...the next ones by the file and line of db.engine.connect() in leak().
    assert f"checked out at {__file__}:" in warnings[1]
    assert " in leak <- " in warnings[1]
    assert stats(app)["leaks_reclaimed"] == 10


def test_a_leak_is_reclaimed_while_the_pool_is_busy(
    make_app: AppFactory, mariadb: MariaDBServer, guard_log: t.Any
) -> None:
    """Under load other holders always have connections out: the teardown
    still finds its own context's leak, and leaves theirs alone.
    """
    app, db, held = leaky_app(make_app, mariadb.url)
    with app.app_context():
        engine = db.engine
    other = engine.connect()  # held outside any app context, all along
    try:
        for _ in range(2):
            assert app.test_client().get("/leak").text == "1"
        assert stats(app)["leaks_reclaimed"] == 2
        assert checked_out(app, db) == 1
        assert other.execute(sa.text("SELECT 1")).scalar_one() == 1
    finally:
        other.close()
    assert checked_out(app, db) == 0


def test_warn_policy_only_warns(make_app: AppFactory, mariadb: MariaDBServer) -> None:
    app, db, held = leaky_app(make_app, mariadb.url, STALEGUARD_LEAKS="warn")
    client = app.test_client()
    for _ in range(3):
        client.get("/leak")
    assert checked_out(app, db) == 3
    with pytest.raises(sa.exc.TimeoutError):  # the pool is exhausted, as it would be
        client.get("/leak")
    for conn in held:
        conn.close()


def test_raise_policy_reclaims_then_raises(
    make_app: AppFactory, mariadb: MariaDBServer
) -> None:
    app, db, held = leaky_app(make_app, mariadb.url, STALEGUARD_LEAKS="raise")
    with raises(LeakError, match="1 connection"):
        app.test_client().get("/leak")
    assert checked_out(app, db) == 0


class BrokenSession(scoped_session[t.Any]):
    """A scoped session whose removal fails, to prove the teardown contains it."""

    def remove(self) -> None:
        raise RuntimeError("remove failed")


def test_teardown_never_raises(
    make_app: AppFactory, mariadb: MariaDBServer, guard_log: t.Any
) -> None:
    app, db = make_app(mariadb.url)
    with app.app_context():
        broken = BrokenSession(sessionmaker(bind=db.engine))
    guard_of(app).register_session(broken)

    @app.route("/b")
    def use_broken() -> str:
        return str(broken.execute(sa.text("SELECT 1")).scalar_one())

    assert app.test_client().get("/b").text == "1"
    assert "could not be closed at teardown (RuntimeError: remove failed)" in (
        guard_log.text
    )
