"""``flask staleguard probe-idle``: the idle timer of a real HAProxy, and no false
timer where there is none.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from flask_staleguard.report.probe_idle import format_probe
from flask_staleguard.report.probe_idle import growing
from flask_staleguard.report.probe_idle import IdleTimer
from flask_staleguard.report.probe_idle import NO_ANSWER
from flask_staleguard.report.probe_idle import probe_idle
from tests.clitools import invoke
from tests.helpers import AppFactory
from tests.proxies import TcpProxy
from tests.servers import APP_PASSWORD
from tests.servers import free_port
from tests.servers import HAProxy
from tests.servers import MariaDBServer


@pytest.fixture()
def haproxy(mariadb: MariaDBServer) -> Iterator[HAProxy]:
    """HAProxy before the private MariaDB, closing connections idle for 2 s."""
    with HAProxy(mariadb.host, mariadb.port, idle_timeout=2.0) as proxy:
        yield proxy


def test_growing_intervals_end_at_the_maximum() -> None:
    assert growing(1, 6) == [1, 2, 4, 6]
    assert growing(1, 8) == [1, 2, 4, 8]
    assert growing(5, 5) == [5]


def test_measures_haproxys_idle_timer(
    make_app: AppFactory, mariadb: MariaDBServer, haproxy: HAProxy
) -> None:
    app, db = make_app(haproxy.url_for(mariadb.user_url))
    with app.app_context():
        result = invoke(app, "probe-idle", "--start", "1.5", "--max", "2.5", "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["schema"] == 1
    (found,) = document["binds"]
    assert set(found) == {
        "bind",
        "url",
        "alive_after",
        "closed_after",
        "closed_by",
        "maximum",
        "server_timeout",
        "configured_idle_timeout",
        "recommended_idle_timeout",
        "note",
        "recommended_keepalive",
    }
    # HAProxy's `timeout client 2s`, bracketed to within the default resolution.
    assert 1.5 <= found["alive_after"] <= 2.05
    assert 1.95 <= found["closed_after"] <= 2.5
    assert found["closed_after"] - found["alive_after"] <= 0.25
    assert found["closed_by"] in ("fin", "error")
    assert found["server_timeout"] == 28800.0  # @@wait_timeout knows nothing of it
    assert 1.5 <= found["recommended_idle_timeout"] <= 2.0
    assert found["recommended_keepalive"] is None  # a FIN, not a silent drop
    assert APP_PASSWORD not in found["url"]
    # The progress bar goes to stderr, leaving stdout to the JSON.
    assert "default: idling 2 connections for 1.5 s to 2.5 s" in result.stderr

    text = format_probe([IdleTimer(**found)])
    recommended = found["recommended_idle_timeout"]
    assert f"  Set                      STALEGUARD_IDLE_TIMEOUT = {recommended:g}" in (
        text.splitlines()
    )


def test_the_servers_own_timer_is_not_the_paths(
    make_app: AppFactory, short_timeout: MariaDBServer
) -> None:
    # wait_timeout is 2 s, but the probe's connections tell the server to wait, so
    # a path with no timer of its own shows none.
    app, db = make_app(short_timeout.url)
    with app.app_context():
        result = invoke(app, "probe-idle", "--start", "1.5", "--max", "3")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[1:] == [
        "  Idle timer               none found: connections survived 3 s idle (raise"
        " --max to look further)",
        "  Server timeout           2 s",
        "  STALEGUARD_IDLE_TIMEOUT  none now",
        "  Set                      nothing: no timer on the path up to --max",
    ]


def test_a_silent_drop_is_found_by_its_missing_answer(
    make_app: AppFactory, mariadb: MariaDBServer
) -> None:
    # Like a NAT gateway: after 1 s idle, nothing more is forwarded, no FIN, no RST.
    with TcpProxy(mariadb.host, mariadb.port, idle_drop=1.0) as proxy:
        app, db = make_app(proxy.url_for(mariadb.user_url))
        (found,) = probe_idle(
            app, start=0.6, maximum=1.2, resolution=0.3, answer_timeout=0.5
        ).timers
    assert found.closed_by == NO_ANSWER
    # The proxy looks at its connections every 0.05 s, so it drops them a little
    # late; each figure is how long a connection really idled, which a sleep can
    # overshoot by a little.
    assert found.closed_after is not None
    assert 0.6 <= found.alive_after < found.closed_after < 1.3
    assert 1.0 <= found.closed_after
    assert found.recommended_idle_timeout is not None
    assert found.recommended_idle_timeout <= 1.1
    # Keepalive probes beat a silent drop: one every second at most, here.
    assert found.recommended_keepalive == 1.0


def test_a_slow_path_is_measured_by_real_idle_times(
    make_app: AppFactory, mariadb: MariaDBServer
) -> None:
    # Each connect takes several delayed round trips (about 0.3 s here), so a
    # round cannot open its 15 connections before the first is due. Checked
    # late, a short interval would seem to die early: before the fix this
    # reported a timer of about 0.6 s for the same 1 s drop.
    with TcpProxy(mariadb.host, mariadb.port, delay=0.02, idle_drop=1.0) as proxy:
        app, db = make_app(proxy.url_for(mariadb.user_url))
        (found,) = probe_idle(
            app, start=0.6, maximum=1.6, resolution=0.3, answer_timeout=1.0
        ).timers
    assert found.closed_by == NO_ANSWER
    assert found.closed_after is not None
    assert 0.6 <= found.alive_after < found.closed_after
    assert 1.0 <= found.closed_after < 1.9
    assert found.recommended_idle_timeout is not None
    assert found.recommended_idle_timeout <= 1.1


@pytest.mark.integration  # connects to a closed port
def test_unreachable_database_exits_2(make_app: AppFactory) -> None:
    url = f"mysql+pymysql://sg:{APP_PASSWORD}@127.0.0.1:{free_port()}/x"
    app, db = make_app(url)
    with app.app_context():
        result = invoke(app, "probe-idle", "--max", "1")
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(
        f"Error: cannot reach bind default ({url.replace(APP_PASSWORD, '***')}): "
        "(2003, "
    )
    assert APP_PASSWORD not in result.output + result.stderr


def test_start_must_not_exceed_max(make_app: AppFactory, mariadb_url: str) -> None:
    app, db = make_app(mariadb_url)
    with app.app_context():
        result = invoke(app, "probe-idle", "--start", "5", "--max", "2")
    assert result.exit_code == 2
    assert "--start (5) is longer than --max (2)" in result.stderr
