"""The example app boots anywhere, and its demo shows the bug and the fix."""

from __future__ import annotations

import pytest

from example_app import create_app
from example_app import demo
from tests.servers import MariaDBServer


def test_example_app_on_sqlite() -> None:
    app = create_app({"SQLALCHEMY_DATABASE_URI": "sqlite://"})
    client = app.test_client()
    assert client.get("/").get_json() == {"visits": 1}
    assert client.get("/health").get_json()["ok"] is True


def test_demo_fails_without_and_passes_with_the_guard(
    mariadb: MariaDBServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert demo.main_for(mariadb.url) == 0
    out = capsys.readouterr().out
    assert "MySQL server has gone away" in out or "Lost connection" in out
    assert "failed requests: " in out and ", 0 with it" in out
    # In order, even when piped: the guard's start-up line (logged to stdout)
    # belongs to the guarded part.
    bare, guarded = out.split("== with flask-staleguard")
    assert "log: flask_staleguard" not in bare
    assert "log: flask_staleguard INFO bind default" in guarded
