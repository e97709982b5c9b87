"""Every exchange of the guard's own with a database ends within its time limit.

Servers that never answer are real listeners: one that accepts and stays silent
(a frozen server, a half-dead proxy), one whose full accept queue makes the
kernel drop every SYN (a firewall). A path that stops forwarding mid-session is
the test proxy, dropping everything after a chosen moment.
"""

from __future__ import annotations

import json
import threading
import time
import typing as t

import pytest
import sqlalchemy as sa

from tests.clitools import invoke
from tests.helpers import AppFactory
from tests.helpers import stats
from tests.proxies import MuteServer
from tests.proxies import TcpProxy

LIMIT = 1.0
#: Thread start-up and a shared, busy machine (load 20+): what may come on top of
#: LIMIT. A missing limit waits for the 15 s watchdog or a driver's own 10 s.
SLACK = 4.0
DRIVERS = [
    "mysql+pymysql",
    "mysql+mysqldb",
    "mysql+mysqlconnector",
    "postgresql+psycopg",
    "postgresql+psycopg2",
    "postgresql+pg8000",
]


def run_with_watchdog(fn: t.Callable[[], t.Any], seconds: float) -> t.Any:
    """``fn()``'s result or exception; a failure if it is still running after
    ``seconds`` (a hang, which the thread is then left to finish).
    """
    outcome: list[t.Any] = []

    def run() -> None:
        try:
            outcome.append(fn())
        except BaseException as e:
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s: a hang"
    return outcome[0]


@pytest.fixture(params=["silent", "syn-drop"])
def mute(request: pytest.FixtureRequest) -> t.Iterator[MuteServer]:
    with MuteServer(request.param) as server:
        yield server


@pytest.mark.parametrize("driver", DRIVERS)
def test_start_up_ends_within_the_limit(
    make_app: AppFactory,
    mute: MuteServer,
    driver: str,
    guard_log: pytest.LogCaptureFixture,
) -> None:
    started = time.monotonic()
    run_with_watchdog(
        lambda: make_app(mute.url(driver), STALEGUARD_DISCOVERY_TIMEOUT=LIMIT), 15
    )
    assert time.monotonic() - started < LIMIT + SLACK
    (warning,) = [r.getMessage() for r in guard_log.records if "assuming" in r.message]
    assert f"no answer within {LIMIT:g} s (STALEGUARD_DISCOVERY_TIMEOUT)" in warning
    assumed = "28800 s" if driver.startswith("mysql") else "none"
    assert f"assuming {assumed} until a connection succeeds" in warning


@pytest.mark.parametrize(
    "args",
    [("pool", "--json"), ("check", "--json"), ("probe-idle", "--json", "--max", "1")],
    ids=["pool", "check", "probe-idle"],
)
def test_commands_end_within_the_limit(
    make_app: AppFactory, mute: MuteServer, args: tuple[str, ...]
) -> None:
    app, _ = run_with_watchdog(
        lambda: make_app(mute.url("mysql+pymysql"), STALEGUARD_DISCOVERY_TIMEOUT=LIMIT),
        15,
    )
    started = time.monotonic()

    def command() -> t.Any:
        with app.app_context():
            return invoke(app, *args)

    result = run_with_watchdog(command, 15)
    assert time.monotonic() - started < LIMIT + SLACK
    assert result.exit_code == 2
    document = json.loads(result.stdout)
    assert document["schema"] == 1
    # pool reports per bind; check and probe-idle list the unreachable binds.
    reasons = [b["error"] for b in document["binds"] if isinstance(b, dict)]
    reasons += [u["message"] for u in document.get("unreachable", ())]
    (reason,) = reasons
    assert f"within {LIMIT:g} s (STALEGUARD_DISCOVERY_TIMEOUT)" in reason
    assert "s3cr3t-pw" not in result.stdout + result.stderr


# A ParameterStatus message: PostgreSQL may send one to an idle client any time;
# the client cannot tell it from a notice or a farewell without asking.
PARAMETER_STATUS = b"S" + (4 + 13).to_bytes(4, "big") + b"TimeZone\x00UTC\x00"


def test_the_probes_ping_ends_within_the_limit(
    make_app: AppFactory, postgres_url: str
) -> None:
    with TcpProxy("127.0.0.1", 5432) as proxy:
        app, db = make_app(
            proxy.url_for(postgres_url),
            STALEGUARD_DISCOVERY_TIMEOUT=LIMIT,
            SQLALCHEMY_ENGINE_OPTIONS={"pool_size": 1, "max_overflow": 0},
        )

        @app.route("/q")
        def query() -> str:
            return str(db.session.execute(sa.text("SELECT 1")).scalar_one())

        client = app.test_client()
        assert client.get("/q").text == "1"
        # The pooled connection gets bytes to ask about, and then the path dies.
        assert proxy.say_and_drop(PARAMETER_STATUS) >= 1
        time.sleep(0.2)
        started = time.monotonic()
        response = run_with_watchdog(lambda: client.get("/q"), 15)
        elapsed = time.monotonic() - started
    assert response.text == "1"  # on a new connection
    assert elapsed < LIMIT + SLACK
    counters = stats(app)
    assert counters["replaced"] == {"probe_ping_timeout": 1}


def test_the_connect_time_query_ends_within_the_limit(
    make_app: AppFactory, mariadb_url: str, guard_log: pytest.LogCaptureFixture
) -> None:
    # The server stops answering exactly when the guard asks for the timeout.
    # No connect wait: tried again, the connect would wait for it.
    with TcpProxy("127.0.0.1", 3306, drop_on=b"@@session.wait_timeout") as proxy:
        app, db = make_app(
            proxy.url_for(mariadb_url),
            STALEGUARD_DISCOVERY_TIMEOUT=LIMIT,
            STALEGUARD_CONNECT_WAIT=0,
        )

        @app.route("/q")
        def query() -> str:
            return str(db.session.execute(sa.text("SELECT 1")).scalar_one())

        started = time.monotonic()
        outcome = run_with_watchdog(lambda: app.test_client().get("/q"), 15)
        elapsed = time.monotonic() - started
    assert isinstance(outcome, TimeoutError)
    assert "did not answer the guard's query for its idle timeout" in str(outcome)
    assert elapsed < LIMIT + SLACK


def test_a_connection_lost_under_the_guards_query_is_not_kept(
    make_app: AppFactory, mariadb_url: str
) -> None:
    # Lost exactly when the guard asks a new connection for its timeout (as a
    # KILL could): kept, it would fail the app's statement with InterfaceError
    # (0, '') instead of the disconnect that happened. (With the connect wait,
    # the connect is tried again instead: test_connect.py.)
    with TcpProxy(
        "127.0.0.1", 3306, close_on=b"@@session.wait_timeout", closes=2
    ) as proxy:
        app, db = make_app(  # the first close: discovery
            proxy.url_for(mariadb_url), STALEGUARD_CONNECT_WAIT=0
        )

        @app.route("/q")
        def query() -> str:
            return str(db.session.execute(sa.text("SELECT 1")).scalar_one())

        client = app.test_client()
        lost = run_with_watchdog(lambda: client.get("/q"), 15)
        assert isinstance(lost, sa.exc.OperationalError), repr(lost)
        assert lost.orig.args[0] == 2013  # type: ignore[union-attr]
        assert run_with_watchdog(lambda: client.get("/q"), 15).text == "1"


def test_a_connection_lost_under_the_guards_query_is_connected_again(
    make_app: AppFactory, mariadb_url: str
) -> None:
    # The same loss inside the connect wait: nothing of the app's was sent, so
    # the connect is tried again and the request succeeds.
    with TcpProxy(
        "127.0.0.1", 3306, close_on=b"@@session.wait_timeout", closes=2
    ) as proxy:
        app, db = make_app(proxy.url_for(mariadb_url))

        @app.route("/q")
        def query() -> str:
            return str(db.session.execute(sa.text("SELECT 1")).scalar_one())

        assert run_with_watchdog(lambda: app.test_client().get("/q"), 15).text == "1"
        assert stats(app)["outages"] == 1
