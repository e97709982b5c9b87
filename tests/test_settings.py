"""The STALEGUARD_* keys: defaults, validation, and the errors that name the key."""

from __future__ import annotations

import typing as t

import pytest

from flask_staleguard import ConfigError
from flask_staleguard.extension.config import DEFAULTS
from flask_staleguard.extension.config import load_settings
from flask_staleguard.extension.config import Settings


def test_defaults() -> None:
    assert load_settings({}) == Settings()
    assert load_settings(DEFAULTS) == Settings()


def test_values_are_read() -> None:
    settings = load_settings(
        {
            "STALEGUARD_STRATEGY": "pre_ping",
            "STALEGUARD_IDLE_TIMEOUT": 350,
            "STALEGUARD_SERVER_TIMEOUT": {None: 60, "reports": 600.5},
            "STALEGUARD_MARGIN": 0,
            "STALEGUARD_LEAKS": "warn",
            "STALEGUARD_LEAK_THRESHOLD": 30,
            "STALEGUARD_MAX_LIFETIME": 7200,
            "STALEGUARD_CONNECT_TIMEOUT": 2.5,
            "STALEGUARD_CONNECT_WAIT": 0,
        }
    )
    assert settings.strategy == "pre_ping"
    assert settings.idle_timeout_for(None) == 350.0
    assert settings.idle_timeout_for("reports") == 350.0
    assert settings.server_timeout_for(None) == 60.0
    assert settings.server_timeout_for("reports") == 600.5
    assert settings.server_timeout_for("other") is None
    assert settings.margin == 0.0
    assert settings.leaks == "warn"
    assert settings.leak_threshold == 30.0
    assert settings.max_lifetime == 7200.0
    assert settings.options_for(None).max_lifetime == 7200.0
    assert load_settings({}).options_for(None).max_lifetime == 1800.0
    assert settings.options_for(None).connect_timeout == 2.5
    assert settings.options_for(None).connect_wait == 0.0


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (
            "STALEGUARD_STRATEGY",
            "ping",
            "STALEGUARD_STRATEGY is 'ping'; accepted values are:"
            " 'guard', 'recycle', 'pre_ping', 'off'.",
        ),
        (
            "STALEGUARD_IDLE_TIMEOUT",
            -5,
            "STALEGUARD_IDLE_TIMEOUT is -5; expected a number of seconds more than 0"
            " and at most 31536000 (a year), or None.",
        ),
        (
            "STALEGUARD_IDLE_TIMEOUT",
            "300",
            "STALEGUARD_IDLE_TIMEOUT is '300'; expected a number of seconds more than"
            " 0 and at most 31536000 (a year), or None.",
        ),
        (
            "STALEGUARD_SERVER_TIMEOUT",
            {"reports": 0},
            "STALEGUARD_SERVER_TIMEOUT['reports'] is 0; expected a number of seconds"
            " more than 0 and at most 31536000 (a year), or None.",
        ),
        (
            "STALEGUARD_MARGIN",
            -1,
            "STALEGUARD_MARGIN is -1; expected a number of seconds 0 or more and at"
            " most 31536000 (a year), or None.",
        ),
        (
            "STALEGUARD_DISCOVERY_TIMEOUT",
            None,
            "STALEGUARD_DISCOVERY_TIMEOUT is None; expected a number of seconds more"
            " than 0 and at most 31536000 (a year).",
        ),
        (
            "STALEGUARD_LEAKS",
            "ignore",
            "STALEGUARD_LEAKS is 'ignore'; accepted values are:"
            " 'warn', 'reclaim', 'raise'.",
        ),
        (
            "STALEGUARD_LEAK_THRESHOLD",
            True,
            "STALEGUARD_LEAK_THRESHOLD is True; expected a number of seconds more than"
            " 0 and at most 31536000 (a year), or None.",
        ),
        (
            "STALEGUARD_ROLE",
            "replica",
            "STALEGUARD_ROLE is 'replica'; accepted values are:"
            " 'auto', 'writer', 'any'.",
        ),
        (
            "STALEGUARD_ROLE",
            {"reports": None},
            "STALEGUARD_ROLE['reports'] is None; accepted values are:"
            " 'auto', 'writer', 'any'.",
        ),
        (
            "STALEGUARD_MAX_LIFETIME",
            0,
            "STALEGUARD_MAX_LIFETIME is 0; expected a number of seconds more than 0"
            " and at most 7200 (Flask-SQLAlchemy's own pool_recycle on MySQL).",
        ),
        (
            "STALEGUARD_MAX_LIFETIME",
            -5,
            "STALEGUARD_MAX_LIFETIME is -5; expected a number of seconds more than 0"
            " and at most 7200 (Flask-SQLAlchemy's own pool_recycle on MySQL).",
        ),
        (
            "STALEGUARD_MAX_LIFETIME",
            7201,
            "STALEGUARD_MAX_LIFETIME is 7201; expected a number of seconds more than 0"
            " and at most 7200 (Flask-SQLAlchemy's own pool_recycle on MySQL).",
        ),
        (
            "STALEGUARD_MAX_LIFETIME",
            7200.5,
            "STALEGUARD_MAX_LIFETIME is 7200.5; expected a number of seconds more than"
            " 0 and at most 7200 (Flask-SQLAlchemy's own pool_recycle on MySQL).",
        ),
        (
            "STALEGUARD_MAX_LIFETIME",
            True,
            "STALEGUARD_MAX_LIFETIME is True; expected a number of seconds more than 0"
            " and at most 7200 (Flask-SQLAlchemy's own pool_recycle on MySQL).",
        ),
        (
            "STALEGUARD_MAX_LIFETIME",
            "x",
            "STALEGUARD_MAX_LIFETIME is 'x'; expected a number of seconds more than 0"
            " and at most 7200 (Flask-SQLAlchemy's own pool_recycle on MySQL).",
        ),
        (
            "STALEGUARD_MAX_LIFETIME",
            None,
            "STALEGUARD_MAX_LIFETIME is None; expected a number of seconds more than 0"
            " and at most 7200 (Flask-SQLAlchemy's own pool_recycle on MySQL).",
        ),
        (
            "STALEGUARD_CONNECT_TIMEOUT",
            0,
            "STALEGUARD_CONNECT_TIMEOUT is 0; expected a number of seconds more than 0"
            " and at most 31536000 (a year).",
        ),
        (
            "STALEGUARD_CONNECT_TIMEOUT",
            None,
            "STALEGUARD_CONNECT_TIMEOUT is None; expected a number of seconds more"
            " than 0 and at most 31536000 (a year).",
        ),
        (
            "STALEGUARD_CONNECT_WAIT",
            -1,
            "STALEGUARD_CONNECT_WAIT is -1; expected a number of seconds 0 or more and"
            " at most 31536000 (a year).",
        ),
        (
            "STALEGUARD_CONNECT_WAIT",
            "10",
            "STALEGUARD_CONNECT_WAIT is '10'; expected a number of seconds 0 or more"
            " and at most 31536000 (a year).",
        ),
        (
            "STALEGUARD_IDLE_TIMEOUT",
            float("nan"),
            "STALEGUARD_IDLE_TIMEOUT is nan; expected a number of seconds more than 0"
            " and at most 31536000 (a year), or None.",
        ),
    ],
)
def test_bad_values_name_the_key(key: str, value: t.Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({key: value})
    assert str(info.value) == message


def test_unknown_key_is_an_error() -> None:
    with pytest.raises(
        ConfigError, match="Unknown configuration key 'STALEGUARD_IDLE'"
    ):
        load_settings({"STALEGUARD_IDLE": 5})


def test_role_is_per_bind() -> None:
    settings = load_settings({"STALEGUARD_ROLE": {"replica": "any"}})
    keyed = settings.for_binds([None, "replica"])
    assert keyed.options_for("replica").role == "any"
    assert keyed.options_for(None).role == "auto"
    assert load_settings({"STALEGUARD_ROLE": "writer"}).options_for(None).role == (
        "writer"
    )
    with pytest.raises(ConfigError, match="STALEGUARD_ROLE has the key 'nope'"):
        load_settings({"STALEGUARD_ROLE": {"nope": "any"}}).for_binds([None])
