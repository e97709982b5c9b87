"""A password is never printed, wherever it was given.

In the URL's user info, in its query string (PyMySQL and psycopg take
``?password=``), in ``connect_args``, or in a DSN string; for a server that can
be reached and for one that cannot; in the log at DEBUG and in every command's
output, text and JSON.
"""

from __future__ import annotations

import typing as t

import pytest
import sqlalchemy as sa

from flask_staleguard.core.redact import Secrets
from tests.clitools import invoke
from tests.helpers import AppFactory
from tests.servers import APP_PASSWORD
from tests.servers import free_port
from tests.servers import MariaDBServer

COMMANDS = [
    ("pool",),
    ("pool", "--json"),
    ("check",),
    ("check", "--json"),
    ("probe-idle", "--start", "0.2", "--max", "0.2"),
    ("probe-idle", "--start", "0.2", "--max", "0.2", "--json"),
]
PLACES = ["user info", "query string", "connect_args", "dsn"]


def configure(
    place: str, mariadb: MariaDBServer, postgres_port: int, reachable: bool
) -> dict[str, t.Any]:
    """Config with the password in ``place``; the DSN case is PostgreSQL's
    (whose trust authentication takes any password).
    """
    port = mariadb.port if reachable else free_port()
    mysql = f"mysql+pymysql://sg@127.0.0.1:{port}/staleguard"
    options: dict[str, t.Any] = {}
    if place == "user info":
        url = mysql.replace("sg@", f"sg:{APP_PASSWORD}@")
    elif place == "query string":
        url = f"{mysql}?password={APP_PASSWORD}"
    elif place == "connect_args":
        url = mysql
        options["connect_args"] = {"password": APP_PASSWORD}
    else:
        pg_port = postgres_port if reachable else free_port()
        url = f"postgresql+psycopg2://postgres@127.0.0.1:{pg_port}/test"
        options["connect_args"] = {"dsn": f"password='{APP_PASSWORD}' sslmode=disable"}
    return {
        "SQLALCHEMY_DATABASE_URI": url,
        "SQLALCHEMY_ENGINE_OPTIONS": options,
        "STALEGUARD_DISCOVERY_TIMEOUT": 2,
    }


@pytest.mark.parametrize("reachable", [True, False], ids=["reachable", "unreachable"])
@pytest.mark.parametrize("place", PLACES)
def test_the_password_is_never_printed(
    make_app: AppFactory,
    mariadb: MariaDBServer,
    postgres_url: str,
    guard_log: pytest.LogCaptureFixture,
    place: str,
    reachable: bool,
) -> None:
    postgres_port = sa.make_url(postgres_url).port or 5432
    app, _ = make_app(**configure(place, mariadb, postgres_port, reachable))
    for args in COMMANDS:
        with app.app_context():
            result = invoke(app, *args)
        output = result.stdout + result.stderr
        assert result.exit_code == (0 if reachable else 2), (args, output)
        assert APP_PASSWORD not in output, args
    assert APP_PASSWORD not in guard_log.text
    assert "flask_staleguard" in guard_log.text  # the log was captured at all
    if not reachable:
        assert "could not reach" in guard_log.text


@pytest.mark.parametrize(
    ("url", "connect_args", "shown"),
    [
        (
            "mysql+pymysql://u:pw%40x@db/app",
            None,
            "mysql+pymysql://u:***@db/app",
        ),
        (
            "mysql+pymysql://u@db/app?password=s3cret&charset=utf8mb4",
            None,
            "mysql+pymysql://u@db/app?charset=utf8mb4&password=***",
        ),
        (
            "postgresql+psycopg://u@db/app?dsn=host%3Ddb+password%3Ds3cret",
            None,
            "postgresql+psycopg://u@db/app?dsn=***",
        ),
        ("mysql+pymysql://u@db/app", {"passwd": "s3cret"}, "mysql+pymysql://u@db/app"),
    ],
)
def test_urls_are_shown_masked(
    url: str, connect_args: dict[str, t.Any] | None, shown: str
) -> None:
    assert Secrets(sa.make_url(url), connect_args).url == shown


def test_every_spelling_of_every_secret_is_masked() -> None:
    secrets = Secrets(
        sa.make_url("mysql+pymysql://u:p%40ss@db/app?password=query-pw"),
        {
            "ssl": {"key": "/etc/key.pem", "password": "nested-pw"},
            "dsn": "host=db password='dsn pw' user=u",
            "conninfo": "postgresql://u:uri-pw@db/app",
        },
    )
    text = "p@ss p%40ss query-pw nested-pw dsn pw dsn+pw dsn%20pw uri-pw /etc/key.pem"
    assert secrets.mask(text) == "*** *** *** *** *** *** *** *** /etc/key.pem"


def test_a_short_password_is_masked_as_a_word_only() -> None:
    secrets = Secrets(sa.make_url("mysql+pymysql://u:ab@db/app"))
    assert secrets.mask("access denied for ab (tab)") == "access denied for *** (tab)"
