"""Flask-SQLAlchemy-Lite: its engines are guarded in either init order, and the
sessions it caches on ``g`` are closed even when another teardown raises.
(Needs Flask 3: the min env leaves this module out.)
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
from flask_sqlalchemy_lite import SQLAlchemy as SQLAlchemyLite

from flask_staleguard import StaleGuard
from flask_staleguard.extension.contexts import TEARDOWNS_STOP_AT_FIRST_ERROR
from tests.clitools import invoke
from tests.helpers import raises
from tests.servers import MariaDBServer

POOL = {"pool_size": 3, "max_overflow": 0}


class LiteApp(t.NamedTuple):
    app: Flask
    db: SQLAlchemyLite
    guard: StaleGuard | None


@pytest.fixture()
def lite(mariadb: MariaDBServer) -> Iterator[t.Callable[..., LiteApp]]:
    made: list[LiteApp] = []

    def build(order: str = "guard-first", **config: t.Any) -> LiteApp:
        app = Flask(f"lite_{len(made)}")
        app.config["TESTING"] = True
        app.config["SQLALCHEMY_ENGINES"] = {"default": {"url": mariadb.url, **POOL}}
        app.config.update(config)
        db = SQLAlchemyLite()
        guard = StaleGuard() if order != "unguarded" else None
        if guard is not None and order == "guard-first":
            guard.init_app(app)
        db.init_app(app)
        if guard is not None and order == "db-first":
            guard.init_app(app)

        @app.route("/q")
        def query() -> str:
            return str(
                db.session.execute(sa.text("SELECT CONNECTION_ID()")).scalar_one()
            )

        made.append(LiteApp(app, db, guard))
        return made[-1]

    yield build
    for m in made:
        with m.app.app_context():
            m.db.engine.dispose()


def warm(m: LiteApp) -> set[int]:
    with m.app.app_context():
        conns = [m.db.engine.connect() for _ in range(3)]
        sql = sa.text("SELECT CONNECTION_ID()")
        ids = {int(c.execute(sql).scalar_one()) for c in conns}
        for c in conns:
            c.close()
    return ids


@pytest.mark.parametrize("order", ["guard-first", "db-first", "unguarded"])
def test_killed_idle_connections(
    lite: t.Callable[..., LiteApp], mariadb: MariaDBServer, order: str
) -> None:
    m = lite(order)
    before = warm(m)
    mariadb.kill_connections()
    time.sleep(0.2)
    client = m.app.test_client()
    if m.guard is None:
        with pytest.raises(sa.exc.OperationalError):
            client.get("/q")
        return
    served = {int(client.get("/q").text) for _ in range(6)}
    assert not before & served
    assert m.guard.stats(m.app)["default"]["replaced"] == {"probe_eof": 3}


@pytest.mark.parametrize("order", ["guard-first", "db-first"])
def test_idle_past_wait_timeout(
    lite: t.Callable[..., LiteApp], short_timeout: MariaDBServer, order: str
) -> None:
    m = lite(order)
    warm(m)
    time.sleep(2.5)
    client = m.app.test_client()
    assert all(client.get("/q").status_code == 200 for _ in range(6))
    assert m.guard is not None
    assert m.guard.stats(m.app)["default"]["replaced"] == {"idle_budget": 3}


def test_the_commands_and_per_engine_keys_name_its_engines(
    lite: t.Callable[..., LiteApp], mariadb: MariaDBServer
) -> None:
    m = lite(
        SQLALCHEMY_ENGINES={
            "default": {"url": mariadb.url, **POOL},
            "reports": mariadb.url,
        },
        STALEGUARD_IDLE_TIMEOUT={"reports": 100},
    )
    with m.app.app_context():
        result = invoke(m.app, "pool", "--json")
    assert result.exit_code == 0, result.output
    binds = {b["bind"]: b for b in json.loads(result.stdout)["binds"]}
    assert set(binds) == {"default", "reports"}
    assert binds["reports"]["idle_timeout"] == 100.0
    assert binds["default"]["idle_timeout"] is None


def test_its_sessions_are_closed_when_another_teardown_raises(
    lite: t.Callable[..., LiteApp], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "flask_staleguard")
    m = lite()
    with m.app.app_context():
        pool = m.db.engine.pool
    raised: list[bool] = []

    @m.app.teardown_appcontext
    def broken(exc: BaseException | None) -> None:
        if not raised:  # once: the fixture's own clean-up pushes a context too
            raised.append(True)
            raise RuntimeError("a teardown that raises")

    with raises(RuntimeError, "a teardown that raises"):
        m.app.test_client().get("/q")
    # On Flask 3.1 Lite's own teardown was skipped; the guard closed its session.
    assert pool.checkedout() == 0  # type: ignore[attr-defined]
    said = [r.getMessage() for r in caplog.records]
    assert any("Flask-SQLAlchemy-Lite's session 'default'" in s for s in said) or (
        not TEARDOWNS_STOP_AT_FIRST_ERROR
    )


def test_an_unknown_per_engine_key_is_an_error(
    lite: t.Callable[..., LiteApp],
) -> None:
    from flask_staleguard import ConfigError

    with pytest.raises(ConfigError, match="the key 'reprots', which is not a bind"):
        lite(STALEGUARD_IDLE_TIMEOUT={"reprots": 100})


def test_the_private_name_of_its_cached_sessions(
    lite: t.Callable[..., LiteApp],
) -> None:
    # About internals: the one private name of Flask-SQLAlchemy-Lite the guard
    # uses (flask_staleguard._private.pop_lite_sessions) is still where it was.
    from flask import g

    from flask_staleguard._private import pop_lite_sessions

    m = lite()
    with m.app.app_context():
        session = m.db.session
        assert pop_lite_sessions(g) == {"default": session}
        assert pop_lite_sessions(g) == {}
        session.close()


def test_its_async_sessions_are_closed_when_another_teardown_raises(
    mariadb: MariaDBServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "flask_staleguard")
    app = Flask("lite_async")
    app.config["TESTING"] = True
    url = mariadb.url.replace("mysql+pymysql://", "mysql+aiomysql://")
    app.config["SQLALCHEMY_ASYNC_ENGINES"] = {"default": {"url": url, **POOL}}
    db = SQLAlchemyLite(require_default_engine=False)
    StaleGuard(app)
    db.init_app(app)

    @app.route("/q")
    async def query() -> str:
        sql = sa.text("SELECT CONNECTION_ID()")
        return str((await db.async_session.execute(sql)).scalar_one())

    with app.app_context():
        pool = db.async_engine.sync_engine.pool
    raised: list[bool] = []

    @app.teardown_appcontext
    def broken(exc: BaseException | None) -> None:
        if not raised:  # once: the clean-up below pushes a context too
            raised.append(True)
            raise RuntimeError("a teardown that raises")

    try:
        with raises(RuntimeError, "a teardown that raises"):
            app.test_client().get("/q")
        # On Flask 3.1 Lite's own teardown was skipped; the guard closed the
        # async session and its connection went back to the pool.
        assert pool.checkedout() == 0  # type: ignore[attr-defined]
        said = [r.getMessage() for r in caplog.records]
        assert any("session 'default (async)'" in s for s in said) or (
            not TEARDOWNS_STOP_AT_FIRST_ERROR
        )
    finally:
        with app.app_context():
            app.ensure_sync(db.async_engine.dispose)()
