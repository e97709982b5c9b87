"""``flask staleguard check``: each problem it must recognise, and its exit codes."""

from __future__ import annotations

import json
import typing as t
from pathlib import Path

import pytest
from flask import Flask

from flask_staleguard.report.check import check
from flask_staleguard.report.check import find_problems
from flask_staleguard.report.check import Problem
from flask_staleguard.report.snapshot import pool_report
from tests.clitools import invoke
from tests.clitools import run_flask
from tests.helpers import AppFactory
from tests.servers import APP_PASSWORD
from tests.servers import free_port
from tests.servers import MariaDBServer

PROBLEM_KEYS = {"code", "bind", "message", "fix", "severity"}
#: PyMySQL with a bound on every reply: no ``no_read_bound`` to report.
READ_BOUND = {"connect_args": {"read_timeout": 600}}


def problems_of(
    app: Flask, *args: str, read_bound: bool = False
) -> tuple[int, list[dict[str, t.Any]]]:
    """Exit code and problems of ``check --json ARGS``, with the schema checked.

    Every PyMySQL bind without a ``read_timeout`` has the ``no_read_bound`` info;
    it is left out unless ``read_bound``, and tested on its own.
    """
    with app.app_context():
        result = invoke(app, "check", "--json", *args)
    document = json.loads(result.stdout)
    assert set(document) == {"schema", "binds", "problems", "unreachable"}
    assert document["schema"] == 1
    for problem in document["problems"]:
        assert set(problem) == PROBLEM_KEYS
    problems = document["problems"]
    if not read_bound:
        problems = [p for p in problems if p["code"] != "no_read_bound"]
    return result.exit_code, problems


def codes(problems: list[dict[str, t.Any]]) -> list[str]:
    return [p["code"] for p in problems]


def test_a_sound_setup_exits_0(make_app: AppFactory, mariadb_url: str) -> None:
    app, db = make_app(mariadb_url, SQLALCHEMY_ENGINE_OPTIONS=READ_BOUND)
    with app.app_context():
        result = invoke(app, "check")
    assert result.exit_code == 0
    assert result.stdout == "No problems found in default.\n"
    assert problems_of(app, read_bound=True) == (0, [])


def test_pymysql_without_a_read_timeout_is_told_but_passes(
    make_app: AppFactory, mariadb_url: str
) -> None:
    app, db = make_app(mariadb_url)
    exit_code, problems = problems_of(app, read_bound=True)
    assert exit_code == 0
    (problem,) = problems
    assert (problem["code"], problem["severity"]) == ("no_read_bound", "info")
    assert "connect_args={'read_timeout': N}" in problem["fix"]
    # A read_timeout in the URL counts as well: the live connection says.
    bounded, _ = make_app(f"{mariadb_url}?read_timeout=30")
    assert problems_of(bounded, read_bound=True) == (0, [])


@pytest.mark.parametrize(
    ("strategy", "found"),
    [("off", True), ("recycle", True), ("pre_ping", False), ("guard", False)],
)
def test_pool_recycle_not_below_wait_timeout(
    make_app: AppFactory, short_timeout: MariaDBServer, strategy: str, found: bool
) -> None:
    # The seed's bug: wait_timeout 2 s, and a pool_recycle of an hour set by hand.
    app, db = make_app(
        short_timeout.url,
        STALEGUARD_STRATEGY=strategy,
        SQLALCHEMY_ENGINE_OPTIONS={"pool_recycle": 3600},
    )
    exit_code, problems = problems_of(app)
    if not found:
        assert (exit_code, problems) == (0, [])
        return
    assert exit_code == 1
    (problem,) = problems
    assert problem["code"] == "recycle_exceeds_timeout"
    assert problem["bind"] == "default"
    assert problem["severity"] == "error"
    assert problem["message"].startswith(
        "pool_recycle=3600 is not below wait_timeout=2 s and nothing checks a"
        f" connection at checkout (STALEGUARD_STRATEGY='{strategy}'"
    )
    assert "STALEGUARD_STRATEGY = 'guard'" in problem["fix"]


def test_no_pool_recycle_at_all_is_found_too(
    make_app: AppFactory, mariadb_url: str, postgres_url: str
) -> None:
    # PostgreSQL has no idle timeout here, so only a declared path timer matters.
    app, db = make_app(
        mariadb_url,
        SQLALCHEMY_BINDS={"pg": postgres_url},
        SQLALCHEMY_ENGINE_OPTIONS={"pool_recycle": -1},
        STALEGUARD_STRATEGY="off",
        STALEGUARD_IDLE_TIMEOUT={"pg": 300},
    )
    exit_code, problems = problems_of(app)
    assert exit_code == 1
    assert [(p["bind"], p["code"]) for p in problems] == [
        ("default", "recycle_exceeds_timeout"),
        ("pg", "recycle_exceeds_timeout"),
        # Strategy "off" sets no keepalive: libpq's own waits two hours.
        ("pg", "keepalive_too_long"),
    ]
    assert (
        "pool_recycle=-1 (never) is not below wait_timeout=28800 s"
        in (problems[0]["message"])
    )
    assert "is not below STALEGUARD_IDLE_TIMEOUT=300 s" in problems[1]["message"]


def test_interactive_timeout_matters_for_an_interactive_client(
    make_app: AppFactory, mariadb: MariaDBServer
) -> None:
    mariadb.set_global("interactive_timeout", 60)
    plain, _ = make_app(mariadb.url)
    assert problems_of(plain) == (0, [])  # differs, but this app never sees it
    # CLIENT_INTERACTIVE (1024): the server applies interactive_timeout instead.
    interactive, _ = make_app(f"{mariadb.url}?client_flag=1024")
    exit_code, problems = problems_of(interactive)
    assert exit_code == 1
    (problem,) = problems
    assert problem["code"] == "interactive_timeout_differs"
    assert problem["severity"] == "warning"
    assert "interactive_timeout=60 s, not wait_timeout=28800 s" in problem["message"]


def test_declared_server_timeout_longer_than_the_servers(
    make_app: AppFactory, short_timeout: MariaDBServer
) -> None:
    app, db = make_app(short_timeout.url, STALEGUARD_SERVER_TIMEOUT=28800)
    exit_code, problems = problems_of(app)
    assert exit_code == 1
    (problem,) = problems
    assert problem["code"] == "server_timeout_mismatch"
    assert problem["message"] == (
        "STALEGUARD_SERVER_TIMEOUT is 28800 s (that is interactive_timeout, which"
        " interactive clients such as the mysql shell see as their wait_timeout),"
        " but the server closes this app's idle connections after wait_timeout=2 s,"
        " so the idle budget (28770 s) outlives them"
    )


def test_idle_timeout_longer_than_the_servers_is_pointless(
    make_app: AppFactory, mariadb_url: str
) -> None:
    app, db = make_app(mariadb_url, STALEGUARD_IDLE_TIMEOUT=30000)
    exit_code, problems = problems_of(app)
    assert exit_code == 1
    assert codes(problems) == ["idle_timeout_pointless"]
    assert problems[0]["severity"] == "warning"
    shorter, _ = make_app(mariadb_url, STALEGUARD_IDLE_TIMEOUT=300)
    assert problems_of(shorter) == (0, [])


@pytest.mark.parametrize(
    ("role", "severity"), [("auto", "warning"), ("writer", "error"), ("any", None)]
)
def test_a_read_only_server_is_flagged_unless_the_bind_is_a_replica(
    make_app: AppFactory, mariadb: MariaDBServer, role: str, severity: str | None
) -> None:
    app, db = make_app(mariadb.user_url, STALEGUARD_ROLE=role)
    assert problems_of(app) == (0, [])
    mariadb.execute("SET GLOBAL read_only = 1")
    try:
        exit_code, problems = problems_of(app)
        with app.app_context():
            shown = invoke(app, "pool").stdout
    finally:
        mariadb.execute("SET GLOBAL read_only = 0")
    assert ", read-only" in shown
    assert f"{role} (STALEGUARD_ROLE); the newest connection's node: read-only" in shown
    if severity is None:
        assert (exit_code, problems) == (0, [])
        return
    assert exit_code == 1
    (problem,) = problems
    assert (problem["code"], problem["severity"]) == ("read_only_server", severity)
    assert "STALEGUARD_ROLE = {'default': 'any'}" in problem["fix"]


def test_connection_headroom_across_workers_and_binds(
    make_app: AppFactory, mariadb_url: str, postgres_url: str
) -> None:
    app, db = make_app(
        mariadb_url,
        SQLALCHEMY_ENGINE_OPTIONS={"pool_size": 40, "max_overflow": 30, **READ_BOUND},
        SQLALCHEMY_BINDS={"pg": {"url": postgres_url, "max_overflow": 20}},
    )
    report = pool_report(app, process_list=False)
    mysql_max = report[0]["server"]["max_connections"]
    pg = report[1]["server"]
    pg_max = pg["max_connections"] - pg["superuser_reserved_connections"]
    # (40 + 30) and (5 + 20) per worker: enough workers exhaust each server.
    mysql_workers = -(-mysql_max // 70)
    pg_workers = -(-pg_max // 25)
    assert [p.code for p in find_problems(report, mysql_workers - 1)] == []
    (problem,) = find_problems(report, mysql_workers)
    assert (problem.code, problem.bind) == ("no_connection_headroom", "default")
    total = 70 * mysql_workers
    assert problem.message == (
        f"(40 + 30) x {mysql_workers} workers = {total} for bind default: {total}"
        f" connections leave no headroom under the server's"
        f" max_connections={mysql_max}"
    )
    found = find_problems(report, pg_workers)
    assert ("no_connection_headroom", "pg") in [(p.code, p.bind) for p in found]
    # The CLI option reaches the same verdict.
    exit_code, problems = problems_of(app, "--workers", str(mysql_workers))
    assert exit_code == 1 and codes(problems)[0] == "no_connection_headroom"


def test_binds_on_one_server_share_its_connections(
    make_app: AppFactory, mariadb_url: str
) -> None:
    probe_app, _ = make_app(mariadb_url)
    max_connections = pool_report(probe_app)[0]["server"]["max_connections"]
    # Each bind alone fits under max_connections; the two together do not.
    half = max_connections // 2 + 1
    each = {"url": mariadb_url, "pool_size": half, "max_overflow": 0, **READ_BOUND}
    app, db = make_app(SQLALCHEMY_BINDS={"a": each, "b": each})
    (problem,) = find_problems(pool_report(app, process_list=False))
    assert (problem.code, problem.bind) == ("no_connection_headroom", "a")
    assert problem.message.startswith(
        f"({half} + 0) x 1 worker = {half} for bind a; ({half} + 0) x 1 worker ="
        f" {half} for bind b: {2 * half} connections leave no headroom"
    )
    assert find_problems(pool_report(app, "a", process_list=False)) == []


def test_unlimited_overflow_has_no_headroom(
    make_app: AppFactory, postgres_url: str
) -> None:
    app, db = make_app(postgres_url, SQLALCHEMY_ENGINE_OPTIONS={"max_overflow": -1})
    exit_code, problems = problems_of(app)
    assert exit_code == 1
    assert codes(problems) == ["no_connection_headroom"]
    assert problems[0]["message"].startswith(
        "max_overflow=-1 lets bind default's pool open connections without limit"
    )


def test_a_driver_the_liveness_probe_cannot_see(
    make_app: AppFactory, postgres_url: str
) -> None:
    # pg8000 keeps its socket behind a buffered file: no fd for the probe.
    url = postgres_url.replace("+psycopg", "+pg8000")
    app, db = make_app(url)
    exit_code, problems = problems_of(app)
    assert exit_code == 1
    (problem,) = problems
    assert (problem["code"], problem["severity"]) == ("unsupported_driver", "warning")
    assert "cannot see the pg8000 driver's socket" in problem["message"]
    # pre_ping does not use the probe: nothing to warn about, also with no idle
    # timer anywhere (no budget, so no pool_recycle either).
    pre_ping, _ = make_app(url, STALEGUARD_STRATEGY="pre_ping")
    assert problems_of(pre_ping) == (0, [])


def test_sqlite_is_reported_but_not_a_failure(
    make_app: AppFactory, mariadb_url: str, tmp_path: Path
) -> None:
    app, db = make_app(
        mariadb_url,
        SQLALCHEMY_ENGINE_OPTIONS=READ_BOUND,
        SQLALCHEMY_BINDS={"cache": f"sqlite:///{tmp_path / 'c.db'}"},
    )
    with app.app_context():
        result = invoke(app, "check")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["Severity", "Bind", "Code", "Problem"]
    assert lines[2].split()[:3] == ["info", "cache", "sqlite"]
    assert lines[-1] == "No problems found in default, cache."


@pytest.mark.integration  # connects to a closed port
@pytest.mark.parametrize("scheme", ["mysql+pymysql", "postgresql+psycopg"])
def test_unreachable_database_exits_2(make_app: AppFactory, scheme: str) -> None:
    url = f"{scheme}://sg:{APP_PASSWORD}@127.0.0.1:{free_port()}/x"
    app, db = make_app(url)
    with app.app_context():
        result = invoke(app, "check")
        as_json = invoke(app, "check", "--json")
    assert result.exit_code == 2 and as_json.exit_code == 2
    (line,) = result.stderr.splitlines()
    masked = url.replace(APP_PASSWORD, "***")
    assert line.startswith(f"Error: bind default: cannot connect to {masked}: ")
    assert "refused" in line
    assert result.stdout == ""
    document = json.loads(as_json.stdout)
    assert document["problems"] == []
    assert document["unreachable"] == [{"bind": "default", "message": line[21:]}]
    assert APP_PASSWORD not in result.stdout + result.stderr + as_json.stdout


def test_every_exit_code_from_a_real_flask_process(
    tmp_path: Path, mariadb_url: str
) -> None:
    bounded = f"{mariadb_url}?read_timeout=600"
    ok = run_flask(tmp_path, {"SQLALCHEMY_DATABASE_URI": bounded}, "check")
    assert (ok.returncode, ok.stdout) == (0, "No problems found in default.\n")
    bad = run_flask(
        tmp_path,
        {"SQLALCHEMY_DATABASE_URI": bounded, "STALEGUARD_IDLE_TIMEOUT": 30000},
        "check",
    )
    assert bad.returncode == 1
    assert "idle_timeout_pointless" in bad.stdout
    assert bad.stdout.endswith("1 problem (0 errors, 1 warning) in default.\n")
    down = run_flask(
        tmp_path,
        {"SQLALCHEMY_DATABASE_URI": f"mysql+pymysql://u@127.0.0.1:{free_port()}/x"},
        "check",
    )
    assert down.returncode == 2
    assert "Traceback" not in down.stderr
    errors = [line for line in down.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "Connection refused" in errors[0]


def test_problem_as_dict_is_the_json_form() -> None:
    problem = Problem("sqlite", "cache", "message", "fix", "info")
    assert problem.as_dict() == {
        "code": "sqlite",
        "bind": "cache",
        "message": "message",
        "fix": "fix",
        "severity": "info",
    }


def test_check_function_result(make_app: AppFactory, mariadb_url: str) -> None:
    app, db = make_app(
        mariadb_url, SQLALCHEMY_ENGINE_OPTIONS=READ_BOUND, STALEGUARD_IDLE_TIMEOUT=30000
    )
    result = check(app)
    assert result.binds == ["default"]
    assert result.unreachable == []
    assert [p.code for p in result.problems] == ["idle_timeout_pointless"]
    assert result.exit_code == 1
