"""``flask staleguard pool`` (and what every command shares): in process with the
test CLI runner, and as real ``flask --app`` subprocesses against real servers.
"""

from __future__ import annotations

import json
import re
import time
import typing as t
from pathlib import Path

import pytest
import sqlalchemy as sa
from flask import jsonify

from flask_staleguard.report.snapshot import pool_snapshot
from tests.clitools import invoke
from tests.clitools import run_flask
from tests.helpers import AppFactory
from tests.helpers import open_at_once
from tests.servers import APP_PASSWORD
from tests.servers import free_port
from tests.servers import MariaDBServer

#: What every bind's entry in ``pool --json`` has, whatever the backend.
BIND_KEYS = {
    "bind",
    "dialect",
    "driver",
    "url",
    "pool_class",
    "size",
    "max_overflow",
    "pool_timeout",
    "checked_in",
    "checked_out",
    "overflow",
    "strategy",
    "server_timeout",
    "server_timeout_source",
    "idle_timeout",
    "idle_budget",
    "max_lifetime",
    "pool_recycle",
    "pre_ping",
    "applied",
    "role",
    "node_role",
    "connect_timeout",
    "connect_wait",
    "liveness_probe",
    "keepalive",
    "read_timeout",
    "server",
    "connections",
    "notes",
    "error",
    "stats",
}
MYSQL_SERVER_KEYS = {
    "version",
    "user",
    "database",
    "wait_timeout",
    "global_wait_timeout",
    "interactive_timeout",
    "max_connections",
    "threads_connected",
    "read_only",
}
POSTGRES_SERVER_KEYS = {
    "version",
    "user",
    "database",
    "idle_session_timeout",
    "idle_in_transaction_session_timeout",
    "max_connections",
    "superuser_reserved_connections",
    "client_backends",
    "read_only",
}
CONNECTION_KEYS = {"id", "host", "state", "idle", "past_budget"}
STATS_KEYS = {
    "checkouts",
    "replaced",
    "disconnects",
    "leaks_detected",
    "leaks_reclaimed",
    "leaks_returned",
    "outages",
    "connect_retries",
}


def test_pool_json_schema_with_two_binds(
    make_app: AppFactory, mariadb_url: str, postgres_url: str
) -> None:
    app, db = make_app(mariadb_url, SQLALCHEMY_BINDS={"pg": postgres_url})
    with app.app_context():
        mysql_ids = open_at_once(db, 2, "SELECT CONNECTION_ID()", None)
        pg_ids = open_at_once(db, 2, "SELECT pg_backend_pid()", "pg")
        held = db.engines[None].connect()  # one checked out while the CLI runs
        try:
            result = invoke(app, "pool", "--json")
        finally:
            held.close()
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["schema"] == 1
    default, pg = document["binds"]
    assert default["bind"] == "default" and pg["bind"] == "pg"
    for entry in (default, pg):
        assert set(entry) == BIND_KEYS
        assert set(entry["stats"]) == STATS_KEYS
        assert entry["strategy"] == "guard"
        assert entry["pool_class"] == "QueuePool"
        assert (entry["size"], entry["max_overflow"]) == (5, 10)
        assert entry["pool_timeout"] == 30.0
        assert entry["pool_recycle"] == -1
        assert entry["pre_ping"] is False
        assert entry["liveness_probe"] is True
        assert (entry["role"], entry["node_role"]) == ("auto", "writer")
        assert (entry["connect_timeout"], entry["connect_wait"]) == (10.0, 10.0)
        assert entry["server"]["read_only"] is False
        assert entry["error"] is None
        assert entry["stats"]["checkouts"] >= 2
        for connection in entry["connections"]:
            assert set(connection) == CONNECTION_KEYS
    assert (default["dialect"], default["driver"]) == ("mysql", "pymysql")
    assert (pg["dialect"], pg["driver"]) == ("postgresql", "psycopg")
    assert default["url"] == mariadb_url
    # This process's pool: two pooled, one of them checked out by `held`.
    assert (default["checked_in"], default["checked_out"], default["overflow"]) == (
        1,
        1,
        0,
    )
    assert (pg["checked_in"], pg["checked_out"]) == (2, 0)
    # The guard's view: the shared servers' own timers.
    assert default["server_timeout"] == 28800.0
    assert default["server_timeout_source"] == "server"
    assert default["idle_budget"] == 28770.0
    assert pg["server_timeout"] is None and pg["idle_budget"] is None
    assert set(default["server"]) == MYSQL_SERVER_KEYS
    assert default["server"]["wait_timeout"] == 28800.0
    assert default["server"]["max_connections"] > 0
    assert default["server"]["threads_connected"] >= 2
    assert set(pg["server"]) == POSTGRES_SERVER_KEYS
    assert pg["server"]["idle_session_timeout"] is None
    assert pg["server"]["max_connections"] > 0
    # The server's view: this app's pooled connections are among them.
    assert set(mysql_ids) <= {c["id"] for c in default["connections"]}
    assert set(pg_ids) <= {c["id"] for c in pg["connections"]}
    mine = [c for c in pg["connections"] if c["id"] in pg_ids]
    assert all(c["state"] == "idle" and c["idle"] >= 0 for c in mine)

    # --bind narrows the output to one bind.
    with app.app_context():
        result = invoke(app, "pool", "--bind", "pg", "--json")
    assert [b["bind"] for b in json.loads(result.stdout)["binds"]] == ["pg"]


def test_pool_table_counts_leaks_and_their_late_returns(
    make_app: AppFactory, mariadb_url: str, guard_log: pytest.LogCaptureFixture
) -> None:
    app, db = make_app(mariadb_url, STALEGUARD_LEAKS="warn")
    with app.app_context():
        leaked = db.engine.connect()  # reported, and left out by the "warn" policy
    leaked.close()
    result = invoke(app, "pool")
    assert result.exit_code == 0, result.output
    (stats,) = [line for line in result.stdout.splitlines() if "  Stats " in line]
    assert "leaks: 1 (0 reclaimed, 1 returned late)" in stats, stats


def test_pool_table_flags_idle_past_budget_and_missing_privilege(
    make_app: AppFactory, mariadb: MariaDBServer, guard_log: pytest.LogCaptureFixture
) -> None:
    # The user `sg` has a password and no PROCESS privilege; a declared 1 s timeout
    # makes the idle budget 0.9 s.
    app, db = make_app(mariadb.user_url, STALEGUARD_SERVER_TIMEOUT=1)
    with app.app_context():
        (stale,) = open_at_once(db, 1, "SELECT CONNECTION_ID()", None)
        time.sleep(1.2)
        result = invoke(app, "pool")
    assert result.exit_code == 0, result.output
    out = result.stdout
    lines = out.splitlines()
    assert lines[0] == f"default  {mariadb.user_url.replace(APP_PASSWORD, '***')}"
    assert "  Strategy             guard" in lines
    assert (
        "  Idle budget          0.9 s (server timeout 1 s, STALEGUARD_SERVER_TIMEOUT)"
        in lines
    )
    assert "  Max lifetime         1800 s (each connection 1350 s to 1800 s)" in lines
    assert "  wait_timeout         28800 s (session), 28800 s (global)" in lines
    # In process, the guard's counters are shown.
    assert any(line.startswith("  Stats ") and "1 checkouts" in line for line in lines)
    assert (
        "  Note                 open transactions (information_schema.INNODB_TRX) not"
        " shown: the database user lacks the PROCESS privilege" in lines
    )
    header = next(
        i for i, line in enumerate(lines) if line.split()[:3] == ["ID", "Host", "State"]
    )
    rows = [line.split() for line in lines[header + 2 :]]
    assert [row[0] for row in rows] == [str(stale)]
    assert rows[0][2] == "idle" and rows[0][-4:] == ["past", "the", "idle", "budget"]
    assert APP_PASSWORD not in out + result.stderr + guard_log.text


def test_cli_process_sees_the_web_workers_connections(
    tmp_path: Path, make_app: AppFactory, mariadb: MariaDBServer
) -> None:
    # This test process plays the web worker; the CLI runs in another process.
    app, db = make_app(mariadb.user_url)
    with app.app_context():
        worker_ids = open_at_once(db, 3, "SELECT CONNECTION_ID()", None)
    result = run_flask(
        tmp_path, {"SQLALCHEMY_DATABASE_URI": mariadb.user_url}, "pool", "--json"
    )
    assert result.returncode == 0, result.stderr
    (entry,) = json.loads(result.stdout)["binds"]
    seen = {c["id"]: c for c in entry["connections"]}
    assert set(worker_ids) <= set(seen)
    assert all(seen[i]["state"] == "idle" for i in worker_ids)
    assert entry["checked_in"] == 0 and entry["checked_out"] == 0  # its own pool
    assert APP_PASSWORD not in result.stdout + result.stderr


@pytest.mark.integration  # connects to a closed port
def test_unreachable_server_exits_2_with_one_line(tmp_path: Path) -> None:
    url = f"mysql+pymysql://sg:{APP_PASSWORD}@127.0.0.1:{free_port()}/staleguard"
    result = run_flask(tmp_path, {"SQLALCHEMY_DATABASE_URI": url}, "pool")
    assert result.returncode == 2
    masked = url.replace(APP_PASSWORD, "***")
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert errors == [
        f"Error: bind default: cannot connect to {masked}: (2003, \"Can't connect to"
        " MySQL server on '127.0.0.1' ([Errno 111] Connection refused)\")"
    ]
    assert "Traceback" not in result.stderr
    # What is known without the server is still shown.
    assert result.stdout.startswith(f"default  {masked}\n")
    assert "assumed: the server was unreachable at start-up" in result.stdout
    assert APP_PASSWORD not in result.stdout + result.stderr


def test_passwords_never_appear(
    tmp_path: Path,
    make_app: AppFactory,
    mariadb: MariaDBServer,
    postgres_url: str,
    guard_log: pytest.LogCaptureFixture,
) -> None:
    # PostgreSQL's trust authentication ignores the password, which is all it
    # takes to have one in the URL; the third bind cannot be reached at all.
    pg_url = postgres_url.replace("postgres@", f"postgres:{APP_PASSWORD}@")
    config: dict[str, t.Any] = {
        "SQLALCHEMY_DATABASE_URI": mariadb.user_url,
        "SQLALCHEMY_BINDS": {
            "pg": pg_url,
            "down": f"mysql+pymysql://sg:{APP_PASSWORD}@127.0.0.1:{free_port()}/x",
        },
    }
    commands = [
        ("pool",),
        ("pool", "--json"),
        ("check",),
        ("check", "--json"),
        ("probe-idle", "--bind", "pg", "--start", "0.2", "--max", "0.2"),
        ("probe-idle", "--start", "0.2", "--max", "0.2", "--json"),
    ]
    app, db = make_app(**config)
    for args in commands:
        with app.app_context():
            result = invoke(app, *args)
        assert result.exit_code in (0, 2), (args, result.output)
        assert "***@" in result.stdout + result.stderr, args
        assert APP_PASSWORD not in result.stdout + result.stderr, args
    assert "***@127.0.0.1" in guard_log.text  # the log names the unreachable bind
    assert APP_PASSWORD not in guard_log.text
    # A real process, whose stderr also carries the guard's log at DEBUG.
    for args in commands[1:4:2]:
        result = run_flask(tmp_path, config, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert "could not reach mysql+pymysql://sg:***@127.0.0.1:" in result.stderr
        assert APP_PASSWORD not in result.stdout + result.stderr, args
        assert "Traceback" not in result.stderr, args


def test_sqlite_has_nothing_to_guard(make_app: AppFactory, tmp_path: Path) -> None:
    app, db = make_app(f"sqlite:///{tmp_path / 'app.db'}")
    with app.app_context():
        pool = invoke(app, "pool", "--json")
        table = invoke(app, "pool")
        check = invoke(app, "check", "--json")
        probe = invoke(app, "probe-idle", "--json")
    assert pool.exit_code == 0 and table.exit_code == 0
    (entry,) = json.loads(pool.stdout)["binds"]
    assert entry["dialect"] == "sqlite"
    assert entry["strategy"] == "off"
    assert entry["server"] is None and entry["connections"] == []
    assert entry["notes"] == [
        "SQLite has no server that closes idle connections: nothing to guard"
    ]
    assert "nothing to guard" in table.stdout
    assert check.exit_code == 0  # nothing is wrong
    (problem,) = json.loads(check.stdout)["problems"]
    assert (problem["code"], problem["severity"]) == ("sqlite", "info")
    assert probe.exit_code == 0
    (result,) = json.loads(probe.stdout)["binds"]
    assert result["note"] == "SQLite has no network path to measure"


def test_unknown_bind_is_a_usage_error(make_app: AppFactory, tmp_path: Path) -> None:
    app, db = make_app(f"sqlite:///{tmp_path / 'app.db'}")
    with app.app_context():
        for command in ("pool", "check", "probe-idle"):
            result = invoke(app, command, "--bind", "nope")
            assert result.exit_code == 2
            assert (
                "Invalid value for '--bind': no bind 'nope'; the app's binds are:"
                " default" in result.stderr
            )


def test_snapshot_from_the_apps_own_route(
    make_app: AppFactory, mariadb_url: str
) -> None:
    app, db = make_app(mariadb_url)

    @app.get("/admin/pool")
    def admin_pool() -> t.Any:
        with db.engine.connect() as conn:  # a request holding a connection
            conn.execute(sa.text("SELECT 1"))
            return jsonify(pool_snapshot(process_list=False))

    response = app.test_client().get("/admin/pool")
    assert response.status_code == 200
    document = response.get_json()
    assert document["schema"] == 1
    (entry,) = document["binds"]
    assert set(entry) == BIND_KEYS
    assert entry["checked_out"] == 1  # the route's own connection
    assert entry["stats"]["checkouts"] == 1
    assert entry["server"]["wait_timeout"] == 28800.0
    assert entry["connections"] == []  # process_list=False


def test_seconds_read_the_same_in_the_log_and_the_pool(
    make_app: AppFactory, mariadb_url: str, guard_log: pytest.LogCaptureFixture
) -> None:
    app, _ = make_app(mariadb_url, STALEGUARD_SERVER_TIMEOUT=12)
    with app.app_context():
        result = invoke(app, "pool")
    assert "idle budget 10.8 s" in guard_log.text
    assert re.search(r"Idle budget +10\.8 s \(server timeout 12 s", result.stdout)
