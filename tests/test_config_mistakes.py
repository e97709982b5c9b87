"""Configuration mistakes are errors that name the key, or are repaired: never
silence, and never an app left unguarded without a word.
"""

from __future__ import annotations

import time
import typing as t

import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_staleguard import ConfigError
from flask_staleguard import StaleGuard
from flask_staleguard.extension.contexts import TEARDOWNS_STOP_AT_FIRST_ERROR
from tests.helpers import AppFactory
from tests.helpers import pool_json
from tests.servers import MariaDBServer


@pytest.mark.parametrize(
    "key", ["STALEGUARD_IDLE_TIMEOUT", "STALEGUARD_SERVER_TIMEOUT"]
)
@pytest.mark.parametrize("order", ["guard-first", "db-first"])
def test_a_per_bind_key_that_names_no_bind_is_an_error(
    make_app: AppFactory, mariadb_url: str, key: str, order: str
) -> None:
    config: dict[str, t.Any] = {key: {"reprots": 240}}
    with pytest.raises(ConfigError) as info:
        make_app(
            mariadb_url,
            order=order,
            SQLALCHEMY_BINDS={"reports": mariadb_url},
            **config,
        )
    assert str(info.value) == (
        f"{key} has the key 'reprots', which is not a bind of this app; its binds"
        " are: 'default', 'reports' ('default' or None for the default bind)."
    )


@pytest.mark.parametrize("spelling", ["default", None])
def test_the_default_bind_is_spelled_default_or_none(
    make_app: AppFactory, mariadb_url: str, spelling: str | None
) -> None:
    app, _ = make_app(mariadb_url, STALEGUARD_IDLE_TIMEOUT={spelling: 30})
    assert pool_json(app)["idle_budget"] == 27


def test_default_is_ambiguous_beside_a_bind_named_default(
    make_app: AppFactory, mariadb_url: str
) -> None:
    with pytest.raises(ConfigError, match="names both the default bind"):
        make_app(
            mariadb_url,
            SQLALCHEMY_BINDS={"default": mariadb_url},
            STALEGUARD_IDLE_TIMEOUT={"default": 30},
        )


@pytest.mark.parametrize(
    "value",
    [10**400, 1e308, 10**9, -(10**400)],
    ids=["10**400", "1e308", "1e9", "-10**400"],
)
@pytest.mark.parametrize(
    "key",
    ["STALEGUARD_DISCOVERY_TIMEOUT", "STALEGUARD_IDLE_TIMEOUT", "STALEGUARD_MARGIN"],
)
def test_numbers_out_of_bounds_are_errors(key: str, value: t.Any) -> None:
    app = Flask(__name__)
    app.config.update({"SQLALCHEMY_DATABASE_URI": "sqlite://", key: value})
    with pytest.raises(ConfigError, match=f"{key} is .*at most 31536000"):
        StaleGuard(app)


def test_a_year_of_discovery_timeout_still_works(
    make_app: AppFactory, mariadb_url: str
) -> None:
    app, _ = make_app(mariadb_url, STALEGUARD_DISCOVERY_TIMEOUT=365 * 24 * 3600)
    assert pool_json(app)["server_timeout"] == 28800


def test_the_database_uri_set_after_init_app_is_guarded(
    short_timeout: MariaDBServer, guard_log: pytest.LogCaptureFixture
) -> None:
    app = Flask(__name__)
    guard = StaleGuard(app)  # before the URI is set: a common factory mistake
    app.config["SQLALCHEMY_DATABASE_URI"] = short_timeout.url
    db = SQLAlchemy(app)

    @app.route("/q")
    def query() -> str:
        return str(db.session.execute(sa.text("SELECT 1")).scalar_one())

    try:
        client = app.test_client()
        assert client.get("/q").text == "1"
        time.sleep(3)  # past the server's wait_timeout of 2 s
        assert client.get("/q").text == "1"
        assert "SQLALCHEMY_DATABASE_URI nor SQLALCHEMY_BINDS was set when" in (
            guard_log.text
        )
        stats = guard.stats(app)["default"]
        assert stats["replaced"] == {"idle_budget": 1}
    finally:
        with app.app_context():
            db.engine.dispose()


def test_an_app_without_any_database_is_told_once(
    guard_log: pytest.LogCaptureFixture,
) -> None:
    app = Flask(__name__)
    StaleGuard(app)

    @app.route("/")
    def index() -> str:
        return "ok"

    client = app.test_client()
    assert [client.get("/").text for _ in range(3)] == ["ok"] * 3
    assert guard_log.text.count("flask-staleguard guards nothing") == 1


def test_mysql_connector_failing_its_own_remove_is_named(
    make_app: AppFactory, mariadb: MariaDBServer, guard_log: pytest.LogCaptureFixture
) -> None:
    app, db = make_app(mariadb.url.replace("+pymysql", "+mysqlconnector"))

    @app.route("/killed")
    def killed() -> str:
        own = db.session.execute(sa.text("SELECT CONNECTION_ID()")).scalar_one()
        mariadb.execute(f"KILL {int(own)}")
        return "killed"

    try:
        app.test_client().get("/killed")
    except Exception:
        pass  # Flask 3.1 and older raise what the teardown raised
    messages = [r.getMessage() for r in guard_log.records]
    assert not [m for m in messages if "before Flask-SQLAlchemy's" in m]
    (message,) = [m for m in messages if "db.session was still open" in m]
    if TEARDOWNS_STOP_AT_FIRST_ERROR:  # the guard saw the exception go by
        assert "Flask-SQLAlchemy's session.remove() raised" in message
        assert "Lost connection" in message  # and what it raised
    else:  # Flask 3.2 keeps it to itself until every teardown has run
        assert "Flask-SQLAlchemy's session.remove() failed" in message
