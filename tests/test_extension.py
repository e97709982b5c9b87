"""init_app: derived options per bind, precedence, order, several apps, bad config."""

from __future__ import annotations

import logging
import time
import typing as t

import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_staleguard import ConfigError
from flask_staleguard import StaleGuard
from tests.helpers import AppFactory
from tests.helpers import connection_id
from tests.helpers import pool_json
from tests.helpers import replaced
from tests.servers import free_port
from tests.servers import MariaDBServer


def test_options_are_derived_and_shown_in_config(
    make_app: AppFactory, mariadb: MariaDBServer
) -> None:
    # The idle budget, 28770 s, is longer than the 1800 s max lifetime.
    app, db = make_app(mariadb.url, STALEGUARD_STRATEGY="pre_ping")
    options = app.config["SQLALCHEMY_ENGINE_OPTIONS"]
    assert options["pool_recycle"] == 1800
    assert options["pool_pre_ping"] is True
    with app.app_context():
        assert pool_json(app)["pool_recycle"] == 1800
        assert pool_json(app)["pre_ping"] is True


def test_guard_strategy_turns_age_recycling_off(
    make_app: AppFactory, mariadb: MariaDBServer
) -> None:
    app, db = make_app(mariadb.url)
    assert app.config["SQLALCHEMY_ENGINE_OPTIONS"]["pool_recycle"] == -1
    with app.app_context():
        assert pool_json(app)["pool_recycle"] == -1  # not Flask-SQLAlchemy's 7200
        assert pool_json(app)["pre_ping"] is False


@pytest.mark.parametrize("order", ["guard-first", "db-first"])
def test_user_pool_recycle_wins(
    make_app: AppFactory, mariadb: MariaDBServer, order: str
) -> None:
    app, db = make_app(
        mariadb.url,
        order=order,
        STALEGUARD_STRATEGY="pre_ping",
        SQLALCHEMY_ENGINE_OPTIONS={"pool_recycle": 3600},
    )
    with app.app_context():
        assert pool_json(app)["pool_recycle"] == 3600
        assert pool_json(app)["pre_ping"] is True
    assert pool_json(app)["applied"] == {"pool_pre_ping": True}


def test_db_first_order_still_protects(
    make_app: AppFactory,
    short_timeout: MariaDBServer,
    guard_log: pytest.LogCaptureFixture,
) -> None:
    app, db = make_app(short_timeout.url, order="db-first")
    assert "call guard.init_app(app) before db.init_app(app)" in guard_log.text
    with app.app_context():
        assert pool_json(app)["pool_recycle"] == -1
        first = connection_id(db)
        time.sleep(3)
        assert connection_id(db) != first  # replaced, not an error
    assert replaced(app) == {"idle_budget": 1}


def test_db_first_pre_ping_is_applied_in_place(
    make_app: AppFactory, mariadb: MariaDBServer
) -> None:
    app, db = make_app(mariadb.url, order="db-first", STALEGUARD_STRATEGY="pre_ping")
    with app.app_context():
        assert pool_json(app)["pre_ping"] is True
        assert pool_json(app)["pool_recycle"] == 1800


def test_two_binds_get_their_own_budget(
    make_app: AppFactory, mariadb: MariaDBServer
) -> None:
    app, db = make_app(
        mariadb.url,
        STALEGUARD_STRATEGY="recycle",
        SQLALCHEMY_BINDS={
            "short": {
                "url": mariadb.url,
                "connect_args": {"init_command": "SET SESSION wait_timeout=20"},
            },
            "plain": mariadb.url,
        },
    )
    assert pool_json(app, "short")["server_timeout"] == 20
    assert pool_json(app, "plain")["server_timeout"] == 28800
    binds = app.config["SQLALCHEMY_BINDS"]
    # The budget where it is shorter than the max lifetime (1800 s).
    assert binds["short"]["pool_recycle"] == 18
    assert binds["plain"]["pool_recycle"] == 1800
    with app.app_context():
        assert pool_json(app, "short")["pool_recycle"] == 18
        assert pool_json(app, "plain")["pool_recycle"] == 1800
        assert pool_json(app)["pool_recycle"] == 1800


def test_declared_timeouts_per_bind(
    make_app: AppFactory, mariadb: MariaDBServer
) -> None:
    app, _ = make_app(
        mariadb.url,
        SQLALCHEMY_BINDS={"other": mariadb.url},
        STALEGUARD_SERVER_TIMEOUT={None: 600},
        STALEGUARD_IDLE_TIMEOUT={"other": 350},
    )
    assert pool_json(app)["server_timeout"] == 600
    assert pool_json(app)["idle_budget"] == 570
    assert pool_json(app, "other")["idle_budget"] == 320


def test_two_apps_share_no_config(make_app: AppFactory, mariadb: MariaDBServer) -> None:
    shared = {"pool_size": 2}  # a config class attribute two apps both point at
    one, _ = make_app(
        mariadb.url, STALEGUARD_STRATEGY="recycle", SQLALCHEMY_ENGINE_OPTIONS=shared
    )
    two, _ = make_app(
        mariadb.url, STALEGUARD_STRATEGY="pre_ping", SQLALCHEMY_ENGINE_OPTIONS=shared
    )
    assert shared == {"pool_size": 2}
    assert "pool_pre_ping" not in one.config["SQLALCHEMY_ENGINE_OPTIONS"]
    assert two.config["SQLALCHEMY_ENGINE_OPTIONS"]["pool_pre_ping"] is True
    # Each app has a guard of its own.
    assert pool_json(one)["strategy"] == "recycle"
    assert pool_json(two)["strategy"] == "pre_ping"


def test_one_guard_many_apps(mariadb: MariaDBServer) -> None:
    guard = StaleGuard()
    apps = []
    for strategy in ("guard", "recycle"):
        app = Flask(__name__)
        app.config.update(
            SQLALCHEMY_DATABASE_URI=mariadb.url, STALEGUARD_STRATEGY=strategy
        )
        guard.init_app(app)
        apps.append((app, SQLAlchemy(app)))
    try:
        assert guard.stats(apps[0][0]) == {
            "default": {
                "checkouts": 0,
                "replaced": {},
                "disconnects": {},
                "leaks_detected": 0,
                "leaks_reclaimed": 0,
                "leaks_returned": 0,
                "outages": 0,
                "connect_retries": 0,
            }
        }
        assert [pool_json(a)["strategy"] for a, _ in apps] == ["guard", "recycle"]
    finally:
        for app, db in apps:
            with app.app_context():
                db.engine.dispose()


def test_init_twice_is_an_error(mariadb: MariaDBServer) -> None:
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = mariadb.url
    StaleGuard(app)
    with pytest.raises(RuntimeError, match="already registered"):
        StaleGuard(app)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("STALEGUARD_IDLE_TIMEOUT", -1),
        ("STALEGUARD_MARGIN", "ten"),
        ("STALEGUARD_STRATEGY", "sometimes"),
        ("STALEGUARD_TIMEOUT", 5),
    ],
)
def test_bad_config_fails_at_init_naming_the_key(key: str, value: object) -> None:
    app = Flask(__name__)
    app.config.update({"SQLALCHEMY_DATABASE_URI": "sqlite://", key: value})
    with pytest.raises(ConfigError, match=key):
        StaleGuard(app)
    assert "staleguard" not in app.extensions


def test_discovery_leaves_no_connection_open(mariadb: MariaDBServer) -> None:
    def app_connections() -> int:
        return sum(1 for row in mariadb.processlist() if row["DB"] == "staleguard")

    def settled(count: int) -> bool:
        # The server drops a closed connection's thread a moment after the
        # client's goodbye: wait for it, a bounded while.
        deadline = time.monotonic() + 2
        while app_connections() != count and time.monotonic() < deadline:
            time.sleep(0.05)
        return app_connections() == count

    before = app_connections()
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = mariadb.url
    StaleGuard(app)
    db = SQLAlchemy(app)
    assert settled(before)
    with app.app_context():
        assert db.engine.pool.checkedin() == 0  # type: ignore[attr-defined]
    # It did ask the server (`pool --json` itself connects: asked last).
    assert pool_json(app)["server_timeout"] == 28800
    assert pool_json(app)["server_timeout_source"] == "server"


def test_sqlite_is_said_once_and_left_alone(
    make_app: AppFactory, guard_log: pytest.LogCaptureFixture
) -> None:
    app, db = make_app("sqlite://")
    assert guard_log.text.count("is SQLite: there is no connection to go stale") == 1
    assert pool_json(app)["strategy"] == "off"
    assert "pool_recycle" not in app.config["SQLALCHEMY_ENGINE_OPTIONS"]
    with app.app_context():
        assert db.session.execute(sa.text("SELECT 1")).scalar_one() == 1


def test_startup_log_line_masks_the_password(
    make_app: AppFactory, mariadb: MariaDBServer, guard_log: pytest.LogCaptureFixture
) -> None:
    make_app(mariadb.user_url)
    assert "s3cr3t-pw" not in guard_log.text
    assert "strategy guard, server idle timeout 28800 s" in guard_log.text
    assert "sg:***@" in guard_log.text


def test_database_down_at_startup(
    make_app: AppFactory, mariadb: MariaDBServer, guard_log: pytest.LogCaptureFixture
) -> None:
    mariadb.stop()
    app, db = make_app(
        mariadb.url,
        STALEGUARD_STRATEGY="recycle",
        SQLALCHEMY_ENGINE_OPTIONS={
            "connect_args": {"init_command": "SET SESSION wait_timeout=2"}
        },
    )
    assert "could not reach" in guard_log.text
    assert "assuming 28800 s until a connection succeeds" in guard_log.text
    assert pool_json(app)["server_timeout_source"] == "assumed"

    @app.route("/q")
    def query() -> str:
        return str(db.session.execute(sa.text("SELECT 1")).scalar_one())

    with pytest.raises(sa.exc.OperationalError):  # a clean driver error, no crash
        app.test_client().get("/q")
    mariadb.start()
    assert app.test_client().get("/q").text == "1"
    # The first connection told the truth; the derived recycle follows it.
    assert pool_json(app)["server_timeout"] == 2
    assert pool_json(app)["server_timeout_source"] == "server"
    with app.app_context():
        assert pool_json(app)["pool_recycle"] == 1


@pytest.mark.integration  # connects to a closed port
def test_unreachable_port_does_not_block_startup(
    make_app: AppFactory, guard_log: pytest.LogCaptureFixture
) -> None:
    url = f"mysql+pymysql://root@127.0.0.1:{free_port()}/x"
    started = time.monotonic()
    app, _ = make_app(url, STALEGUARD_DISCOVERY_TIMEOUT=1)
    assert time.monotonic() - started < 5
    assert pool_json(app)["server_timeout_source"] == "assumed"
    assert logging.WARNING in {r.levelno for r in guard_log.records}


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        ("guard", {"pool_recycle": -1}),
        # No idle budget: the max lifetime alone.
        ("recycle", {"pool_recycle": 1800}),
        ("pre_ping", {"pool_recycle": 1800, "pool_pre_ping": True}),
    ],
)
def test_postgres_without_idle_timeout(
    make_app: AppFactory, postgres_url: str, strategy: str, expected: dict[str, t.Any]
) -> None:
    # idle_session_timeout = 0: nothing closes idle sessions, there is no budget.
    app, db = make_app(postgres_url, STALEGUARD_STRATEGY=strategy)
    assert pool_json(app)["server_timeout"] is None
    assert pool_json(app)["applied"] == expected
    with app.app_context():
        assert db.session.execute(sa.text("SELECT 1")).scalar_one() == 1
