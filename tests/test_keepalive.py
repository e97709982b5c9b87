"""TCP keepalive on pooled connections (``STALEGUARD_KEEPALIVE``): what is set,
read back from real sockets; the firewall scenarios are in
``test_keepalive_firewall.py``.
"""

from __future__ import annotations

import json
import logging
import types

import pytest
import sqlalchemy as sa

from flask_staleguard import ConfigError
from flask_staleguard import protect
from flask_staleguard.core import probe
from flask_staleguard.core.keepalive import Keepalive
from flask_staleguard.core.keepalive import keepalive_for
from flask_staleguard.core.keepalive import read_keepalive
from flask_staleguard.core.keepalive import socket_options
from tests.clitools import invoke
from tests.helpers import AppFactory

DRIVERS = [
    "mysql+pymysql",
    "mysql+mysqldb",
    "postgresql+psycopg",
    "postgresql+psycopg2",
]


@pytest.mark.parametrize(
    ("seconds", "idle_timeout", "expected"),
    [
        (60, None, Keepalive(60, 15)),
        (1, None, Keepalive(1, 1)),
        (0.5, None, Keepalive(1, 1)),
        (60, 240, Keepalive(60, 15)),
        (60, 30, Keepalive(15, 3)),
        (None, 30, None),
    ],
)
def test_keepalive_derivation(
    seconds: float | None, idle_timeout: float | None, expected: Keepalive | None
) -> None:
    assert keepalive_for(seconds, idle_timeout) == expected


def test_the_window_bounds_probes_and_unacknowledged_data() -> None:
    assert Keepalive(60, 15).window == 105
    assert Keepalive(1, 1).window == 4


def _platform(*names: str) -> types.SimpleNamespace:
    constants = {"SOL_SOCKET": 1, "SO_KEEPALIVE": 9, "IPPROTO_TCP": 6}
    numbers = {
        "TCP_KEEPIDLE": 4,
        "TCP_KEEPALIVE": 16,
        "TCP_KEEPINTVL": 5,
        "TCP_KEEPCNT": 6,
        "TCP_USER_TIMEOUT": 18,
    }
    return types.SimpleNamespace(**constants, **{n: numbers[n] for n in names})


@pytest.mark.parametrize(
    ("platform", "expected"),
    [
        (  # Linux
            _platform(
                "TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT", "TCP_USER_TIMEOUT"
            ),
            [(1, 9, 1), (6, 4, 10), (6, 5, 2), (6, 6, 3), (6, 18, 16000)],
        ),
        (  # macOS: the idle time is TCP_KEEPALIVE, and no user timeout
            _platform("TCP_KEEPALIVE", "TCP_KEEPINTVL", "TCP_KEEPCNT"),
            [(1, 9, 1), (6, 16, 10), (6, 5, 2), (6, 6, 3)],
        ),
        (  # Windows 10 1709 and later
            _platform("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT"),
            [(1, 9, 1), (6, 4, 10), (6, 5, 2), (6, 6, 3)],
        ),
        (_platform(), [(1, 9, 1)]),  # only switched on: the system's timers
    ],
)
def test_options_are_chosen_by_feature_detection(
    platform: types.SimpleNamespace, expected: list[tuple[int, int, int]]
) -> None:
    assert socket_options(Keepalive(10, 2), platform) == expected


@pytest.mark.parametrize("driver", DRIVERS)
def test_pooled_connections_get_the_keepalive(
    make_app: AppFactory, mariadb_url: str, postgres_url: str, driver: str
) -> None:
    base = mariadb_url if driver.startswith("mysql") else postgres_url
    url = sa.make_url(base).set(drivername=driver).render_as_string(False)
    app, db = make_app(url, STALEGUARD_KEEPALIVE=7)
    with app.app_context(), db.engine.connect() as conn:
        fd = probe.socket_fd(conn.connection.dbapi_connection)
        assert fd is not None
        with probe.borrowed(fd) as sock:
            found = read_keepalive(sock)
    assert found == {
        "enabled": True,
        "idle": 7,
        "interval": 1,
        "count": 3,
        "user_timeout": 10.0,
    }


def test_none_leaves_the_drivers_setting(
    make_app: AppFactory, mariadb_url: str
) -> None:
    app, db = make_app(mariadb_url, STALEGUARD_KEEPALIVE=None)
    with app.app_context(), db.engine.connect() as conn:
        fd = probe.socket_fd(conn.connection.dbapi_connection)
        assert fd is not None
        with probe.borrowed(fd) as sock:
            found = read_keepalive(sock)
    # PyMySQL's own: switched on, with the kernel's timers (two hours on Linux).
    assert found is not None
    assert found["enabled"] and found["idle"] == 7200
    assert found["user_timeout"] == 0


def test_pool_shows_the_keepalive_read_from_a_socket(
    make_app: AppFactory, mariadb_url: str
) -> None:
    app, db = make_app(mariadb_url, STALEGUARD_KEEPALIVE=20)
    with app.app_context():
        document = json.loads(invoke(app, "pool", "--json").output)
        text = invoke(app, "pool").output
    (bind,) = document["binds"]
    assert bind["keepalive"] == {
        "enabled": True,
        "idle": 20,
        "interval": 5,
        "count": 3,
        "user_timeout": 35.0,
    }
    assert "first probe after 20 s idle, then every 5 s" in text


@pytest.mark.parametrize(("keepalive", "flagged"), [(None, True), (60, False)])
def test_check_flags_a_path_timer_the_keepalive_does_not_beat(
    make_app: AppFactory, mariadb_url: str, keepalive: float | None, flagged: bool
) -> None:
    app, db = make_app(
        mariadb_url, STALEGUARD_IDLE_TIMEOUT=30, STALEGUARD_KEEPALIVE=keepalive
    )
    with app.app_context():
        document = json.loads(invoke(app, "check", "--json").output)
    codes = [p["code"] for p in document["problems"]]
    assert ("keepalive_too_long" in codes) is flagged


def test_a_driver_that_hides_its_socket_is_named_once(
    make_app: AppFactory, mariadb_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "flask_staleguard")
    url = sa.make_url(mariadb_url).set(drivername="mysql+mysqlconnector")
    app, db = make_app(url.render_as_string(False))
    with app.app_context():
        for _ in range(3):  # three connections, one warning
            with db.engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
                conn.invalidate()
    said = [r.getMessage() for r in caplog.records if "keepalive" in r.getMessage()]
    assert len(said) == 1
    assert "hides its socket: no TCP keepalive is set" in said[0]


def test_without_keepalive_the_lost_probe_is_named_once(
    mariadb_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "flask_staleguard")
    url = sa.make_url(mariadb_url).set(drivername="mysql+mysqlconnector")
    engine = sa.create_engine(url)
    protect(engine, keepalive=None)
    try:
        for _ in range(3):  # three connections, one warning
            with engine.connect() as conn:
                conn.invalidate()
    finally:
        engine.dispose()
    said = [r.getMessage() for r in caplog.records if "hides" in r.getMessage()]
    assert said == [
        f"bind {url.database}: the driver hides its socket: no socket probe runs at"
        " checkout; only the idle budget protects the pool"
    ]


def test_keepalive_is_validated(make_app: AppFactory, mariadb_url: str) -> None:
    with pytest.raises(ConfigError, match="STALEGUARD_KEEPALIVE is 0;"):
        make_app(mariadb_url, STALEGUARD_KEEPALIVE=0)
