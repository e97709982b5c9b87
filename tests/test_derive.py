"""Pure derivation: timeouts to idle budget to engine options."""

from __future__ import annotations

import pytest

from flask_staleguard.core.derive import derive_engine_options
from flask_staleguard.core.derive import effective_timeout
from flask_staleguard.core.derive import idle_budget
from flask_staleguard.core.derive import merge_options


@pytest.mark.parametrize(
    ("server", "idle", "expected"),
    [
        (28800, None, 28800),
        (28800, 350, 350),
        (60, 350, 60),
        (None, 240, 240),
        (0, None, None),  # PostgreSQL: idle_session_timeout = 0 is no timeout
        (None, None, None),
    ],
)
def test_effective_timeout_is_the_shortest_timer(
    server: float | None, idle: float | None, expected: float | None
) -> None:
    assert effective_timeout(server, idle) == expected


@pytest.mark.parametrize(
    ("timeout", "margin", "expected"),
    [
        (28800, None, 28770),  # automatic margin capped at 30 s
        (100, None, 90),  # automatic margin: 10 %
        (2, None, 1.8),
        (350, 5, 345),
        (10, 0, 10),
        (10, 9, 5),  # a margin larger than half the timeout is held at half
        (None, None, None),
    ],
)
def test_idle_budget(
    timeout: float | None, margin: float | None, expected: float | None
) -> None:
    assert idle_budget(timeout, margin) == pytest.approx(expected)


def test_strategies_ask_for_their_options() -> None:
    assert derive_engine_options("off", 100) == {}
    assert derive_engine_options("guard", 100) == {"pool_recycle": -1}
    assert derive_engine_options("recycle", 28770) == {"pool_recycle": 28770}
    assert derive_engine_options("pre_ping", 1.8) == {
        "pool_recycle": 1,
        "pool_pre_ping": True,
    }
    assert derive_engine_options("recycle", 0.4) == {"pool_recycle": 1}
    assert derive_engine_options("recycle", None) == {"pool_recycle": -1}


def test_recycling_never_waits_past_the_max_lifetime() -> None:
    # MySQL's default wait_timeout gives a budget of 28770 s: four times
    # Flask-SQLAlchemy's own 7200 s recycle.
    assert derive_engine_options("recycle", 28770, 1800) == {"pool_recycle": 1800}
    assert derive_engine_options("pre_ping", 28770, 7200)["pool_recycle"] == 7200
    assert derive_engine_options("recycle", 27, 1800) == {"pool_recycle": 27}
    assert derive_engine_options("recycle", None, 1800) == {"pool_recycle": 1800}
    assert derive_engine_options("guard", 28770, 1800) == {"pool_recycle": -1}


def test_user_options_win() -> None:
    merged, applied = merge_options(
        {"pool_recycle": 3600, "pool_size": 5},
        {"pool_recycle": 28770, "pool_pre_ping": True},
    )
    assert merged == {"pool_recycle": 3600, "pool_size": 5, "pool_pre_ping": True}
    assert applied == {"pool_pre_ping": True}
