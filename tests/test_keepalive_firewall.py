"""STALEGUARD_KEEPALIVE behind a real Linux stateful firewall (issue 10).

A network namespace of the test's own (`tests.netns.Firewall`) holds a private
MariaDB and a private PostgreSQL on its 127.0.0.1; its conntrack forgets TCP flows
idle for 8 s and drops their later packets as INVALID, silently. Each scenario is
a process inside the namespace (`tests.netns_scenario`) with a Flask app, its pool
warmed and then left idle, cut off or interrupted; a request still running at its
watchdog is reported as hung and the process exits, so nothing waits for the
kernel's 15 minutes of retransmissions.

The scenarios all start together when the module's first test needs one and run
side by side (each touches only its own connections' firewall rules), so the
module takes about as long as its longest scenario, about 30 s.
"""

from __future__ import annotations

import contextlib
import typing as t
from collections.abc import Iterator

import pytest
from sqlalchemy.engine import make_url

from tests.netns import Firewall
from tests.netns import missing_requirements
from tests.netns import NetnsMariaDBServer
from tests.netns import NetnsPostgresServer
from tests.netns import Scenario
from tests.netns import ScenarioResult
from tests.netns_scenario import Spec

#: The firewall forgets flows idle this long (nf_conntrack_tcp_timeout_established).
FIREWALL_TIMEOUT = 8
#: How long the pool sits idle: well past the firewall's timeout.
IDLE = 12
#: STALEGUARD_KEEPALIVE at test scale: a dead path is known after about 4 s
#: (1 s of silence, then 3 probes 1 s apart; TCP_USER_TIMEOUT 4 s).
KEEPALIVE = 1
KEEPALIVE_WINDOW = KEEPALIVE + 3 * max(1, KEEPALIVE // 4)
#: A request still running after this long hangs (the kernel would give up after
#: about 15 minutes of retransmissions).
WATCHDOG = 15.0
#: A request on a healthy (or correctly replaced) connection never waits for
#: the kernel's verdict on a dead path: it takes milliseconds, and seconds on a
#: loaded machine, never the keepalive window.
FAST = KEEPALIVE_WINDOW
#: What a loaded machine may add to a request's own work (Python, a new
#: connection) on top of the kernel's timers, in the bounds that allow for it.
SLACK = 5.0
POOL_SIZE = 4

MYSQL_ID = "SELECT CONNECTION_ID()"
PG_ID = "SELECT pg_backend_pid()"
ENGINE_OPTIONS: dict[str, t.Any] = {"pool_size": POOL_SIZE, "max_overflow": 0}

WITH_KEEPALIVE: dict[str, t.Any] = {"STALEGUARD_KEEPALIVE": KEEPALIVE}
WITHOUT_KEEPALIVE: dict[str, t.Any] = {"STALEGUARD_KEEPALIVE": None}
#: (guard installed, its config): the configurations that must hang when idle.
NO_KEEPALIVE = {"plain": (False, {}), "none": (True, WITHOUT_KEEPALIVE)}


def _idle_steps() -> list[dict[str, t.Any]]:
    return [
        {"do": "warm", "n": POOL_SIZE},
        {"do": "idle", "seconds": IDLE},
        {"do": "conntrack"},
        {"do": "request", "watchdog": WATCHDOG, "repeat": 2 * POOL_SIZE},
    ]


def _dead_path_steps() -> list[dict[str, t.Any]]:
    # The requests come once the kernel has declared every pooled connection
    # dead (an order, not a margin past the window that load could eat), or
    # when it has not after the window and the slack: then they find the
    # connections alive, as without the keepalive.
    return [
        {"do": "warm", "n": POOL_SIZE},
        {"do": "drop"},
        {"do": "dead", "seconds": KEEPALIVE_WINDOW + SLACK},
        {"do": "request", "watchdog": WATCHDOG, "repeat": 2 * POOL_SIZE},
    ]


#: The path dies this long into a statement that lasts longer than the watchdog:
#: however late a loaded machine drops it, the statement cannot finish first.
DROP_AFTER = 0.5
LONG = 2 * int(WATCHDOG)


def _in_flight_steps(sleep_sql: str) -> list[dict[str, t.Any]]:
    return [
        {"do": "warm", "n": 1},
        {
            "do": "request",
            "sql": sleep_sql,
            "drop_after": DROP_AFTER,
            "watchdog": WATCHDOG,
        },
        {"do": "request", "watchdog": WATCHDOG, "repeat": 2},
    ]


def _ping_steps() -> list[dict[str, t.Any]]:
    # The path dies and the next request comes at once: pre_ping's ping is the
    # first to meet the dead path, with data of its own waiting for an answer.
    return [
        {"do": "warm", "n": 1},
        {"do": "drop"},
        {"do": "request", "watchdog": WATCHDOG},
    ]


class Driver(t.NamedTuple):
    server: str  # "mariadb" or "postgres"
    scheme: str  # SQLAlchemy dialect+driver
    id_sql: str
    sleep_sql: str  # a statement of LONG seconds


DRIVERS = {
    "pymysql": Driver("mariadb", "mysql+pymysql", MYSQL_ID, f"SELECT SLEEP({LONG})"),
    "mysqldb": Driver("mariadb", "mysql+mysqldb", MYSQL_ID, f"SELECT SLEEP({LONG})"),
    "psycopg": Driver(
        "postgres", "postgresql+psycopg", PG_ID, f"SELECT pg_sleep({LONG})"
    ),
    "psycopg2": Driver(
        "postgres", "postgresql+psycopg2", PG_ID, f"SELECT pg_sleep({LONG})"
    ),
}
#: The drivers of the scenarios without a keepalive (that hang): one per server.
HANG_DRIVERS = ["pymysql", "psycopg"]
#: The drivers of the in-flight scenarios.
IN_FLIGHT_DRIVERS = ["pymysql", "psycopg", "psycopg2"]


def _specs(urls: dict[str, str]) -> dict[str, Spec]:
    """Every scenario of the module by name, given each server's URL."""

    def spec(
        driver: str,
        guard: bool,
        config: dict[str, t.Any],
        steps: list[dict[str, t.Any]],
    ) -> Spec:
        d = DRIVERS[driver]
        url = make_url(urls[d.server]).set(drivername=d.scheme)
        return {
            "url": url.render_as_string(hide_password=False),
            "guard": guard,
            "config": config,
            "engine_options": ENGINE_OPTIONS,
            "id_sql": d.id_sql,
            "steps": steps,
        }

    specs: dict[str, Spec] = {}
    for driver in DRIVERS:
        specs[f"{driver}-idle-keepalive"] = spec(
            driver, True, WITH_KEEPALIVE, _idle_steps()
        )
        specs[f"{driver}-dead-path-keepalive"] = spec(
            driver, True, WITH_KEEPALIVE, _dead_path_steps()
        )
    for driver in HANG_DRIVERS:
        for name, (guard, config) in NO_KEEPALIVE.items():
            specs[f"{driver}-idle-{name}"] = spec(driver, guard, config, _idle_steps())
    specs["pymysql-dead-path-none"] = spec(
        "pymysql", True, WITHOUT_KEEPALIVE, _dead_path_steps()
    )
    for driver in IN_FLIGHT_DRIVERS:
        sleep = _in_flight_steps(DRIVERS[driver].sleep_sql)
        specs[f"{driver}-in-flight-keepalive"] = spec(
            driver, True, WITH_KEEPALIVE, sleep
        )
    specs["pymysql-in-flight-none"] = spec(
        "pymysql",
        True,
        WITHOUT_KEEPALIVE,
        _in_flight_steps(DRIVERS["pymysql"].sleep_sql),
    )
    for name, config in (("keepalive", WITH_KEEPALIVE), ("none", WITHOUT_KEEPALIVE)):
        specs[f"pymysql-pre-ping-{name}"] = spec(
            "pymysql",
            True,
            {**config, "STALEGUARD_STRATEGY": "pre_ping"},
            _ping_steps(),
        )
    return specs


# -- fixtures ------------------------------------------------------------------


@pytest.fixture(scope="module")
def firewall() -> Iterator[Firewall]:
    """The namespace; deleted afterwards, also when a test fails."""
    missing = missing_requirements()
    if missing:
        pytest.fail(f"cannot build the firewall: {missing}")
    with Firewall(timeout=FIREWALL_TIMEOUT) as fw:
        yield fw


@pytest.fixture(scope="module")
def scenarios(
    firewall: Firewall, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Scenario]]:
    """Every scenario of the module, started together behind the firewall."""
    basedir = tmp_path_factory.mktemp("netns")
    with contextlib.ExitStack() as stack:
        mariadb = stack.enter_context(NetnsMariaDBServer(basedir / "mariadb", firewall))
        postgres = stack.enter_context(
            NetnsPostgresServer(basedir / "postgres", firewall)
        )
        settings = firewall.settings()
        assert settings["net.netfilter.nf_conntrack_tcp_loose"] == "0"
        established = "net.netfilter.nf_conntrack_tcp_timeout_established"
        assert settings[established] == str(FIREWALL_TIMEOUT)
        specs = _specs({"mariadb": mariadb.user_url, "postgres": postgres.url})
        runs = {name: Scenario(firewall, spec) for name, spec in specs.items()}
        try:
            yield runs
        finally:
            for run in runs.values():
                run.close()


def step(result: ScenarioResult, name: str, index: int = 0) -> dict[str, t.Any]:
    """The `index`-th step called `name` of a scenario's result."""
    found = [s for s in result["steps"] if s["do"] == name]
    assert len(found) > index, result
    return t.cast(dict[str, t.Any], found[index])


def requests(result: ScenarioResult, index: int = 0) -> list[dict[str, t.Any]]:
    return t.cast(list[dict[str, t.Any]], step(result, "request", index)["requests"])


def replaced(result: ScenarioResult) -> dict[str, int]:
    return t.cast(dict[str, int], result["stats"]["default"]["replaced"])


def all_fast_and_ok(done: list[dict[str, t.Any]], result: ScenarioResult) -> None:
    assert not result["hung"], result
    for request in done:
        assert request["ok"], result
        assert request["seconds"] < FAST, result


# -- idle past the firewall's timeout ------------------------------------------


@pytest.mark.parametrize("driver", sorted(DRIVERS))
def test_idle_past_the_firewall_timeout_keeps_working(
    scenarios: dict[str, Scenario], driver: str
) -> None:
    result = scenarios[f"{driver}-idle-keepalive"].result()
    warm = step(result, "warm")
    # The probes kept the firewall's memory of every pooled flow fresh...
    assert step(result, "conntrack")["tracked"] == sorted(warm["ports"]), result
    # ...so every request worked at once, on the same server connections.
    done = requests(result)
    assert len(done) == 2 * POOL_SIZE
    all_fast_and_ok(done, result)
    assert {r["conn_id"] for r in done} <= set(warm["conn_ids"]), result
    assert replaced(result) == {}, result
    print(f"{driver}: requests after {IDLE} s idle: {[r['seconds'] for r in done]}")


@pytest.mark.parametrize("config", sorted(NO_KEEPALIVE))
@pytest.mark.parametrize("driver", HANG_DRIVERS)
def test_idle_past_the_firewall_timeout_hangs_without_keepalive(
    scenarios: dict[str, Scenario], driver: str, config: str
) -> None:
    """The scenario is real: without the keepalive the firewall forgets the pool."""
    result = scenarios[f"{driver}-idle-{config}"].result()
    assert step(result, "conntrack")["tracked"] == [], result
    [request] = requests(result)
    assert result["hung"] and request["hung"], result
    assert request["seconds"] >= WATCHDOG, result
    print(f"{driver}-{config}: still running at the watchdog, {request['seconds']} s")


# -- a path that dies while the connections sit in the pool -------------------


@pytest.mark.parametrize("driver", sorted(DRIVERS))
def test_path_dead_in_the_pool_costs_no_request(
    scenarios: dict[str, Scenario], driver: str
) -> None:
    result = scenarios[f"{driver}-dead-path-keepalive"].result()
    warm = step(result, "warm")
    assert step(result, "drop")["ports"] == sorted(warm["ports"]), result
    # The kernel gave up on every pooled connection within the window (and
    # the slack for noticing it), before any request.
    dead = step(result, "dead")
    assert dead["left"] == [], result
    done = requests(result)
    all_fast_and_ok(done, result)
    # Every pooled connection was dead and replaced, without a round trip.
    assert not {r["conn_id"] for r in done} & set(warm["conn_ids"]), result
    assert replaced(result) == {"probe_timed_out": POOL_SIZE}, result
    print(
        f"{driver}: dead {dead['seconds']} s after the drop; requests then:"
        f" {[r['seconds'] for r in done]}"
    )


def test_path_dead_in_the_pool_hangs_without_keepalive(
    scenarios: dict[str, Scenario],
) -> None:
    result = scenarios["pymysql-dead-path-none"].result()
    # Nothing told the kernel the path had died: every connection looked alive.
    assert step(result, "dead")["left"] == sorted(step(result, "warm")["ports"])
    [request] = requests(result)
    assert result["hung"] and request["hung"], result
    assert replaced(result) == {}, result


# -- a statement in flight when its path dies ----------------------------------


@pytest.mark.parametrize("driver", IN_FLIGHT_DRIVERS)
def test_statement_in_flight_fails_within_the_keepalive_window(
    scenarios: dict[str, Scenario], driver: str
) -> None:
    result = scenarios[f"{driver}-in-flight-keepalive"].result()
    assert not result["hung"], result
    [cut] = requests(result, 0)
    assert cut["dropped"]["ports"], result  # its path did die
    assert not cut["ok"] and cut["error"], result
    # It failed once the kernel gave up on the path: about the keepalive window
    # after the drop (counted from when it was in place: iptables waits for its
    # lock, longer on a loaded machine), not 15 minutes later.
    dropped = cut["dropped"]["after"]
    assert DROP_AFTER < cut["seconds"] < dropped + KEEPALIVE_WINDOW + SLACK, result
    following = requests(result, 1)
    all_fast_and_ok(following, result)
    assert {r["conn_id"] for r in following}.isdisjoint(
        step(result, "warm")["conn_ids"]
    ), result
    print(
        f"{driver}: in-flight statement failed after {cut['seconds']} s: {cut['error']}"
    )


def test_statement_in_flight_hangs_without_keepalive(
    scenarios: dict[str, Scenario],
) -> None:
    result = scenarios["pymysql-in-flight-none"].result()
    [cut] = requests(result, 0)
    assert cut["dropped"]["ports"], result
    assert result["hung"] and cut["hung"], result


# -- pre_ping's ping on a dead path --------------------------------------------


def test_pre_pings_ping_is_bounded_by_the_keepalive_window(
    scenarios: dict[str, Scenario],
) -> None:
    result = scenarios["pymysql-pre-ping-keepalive"].result()
    [request] = requests(result)
    assert not result["hung"] and request["ok"], result
    # The unanswered ping gave up after the window (TCP_USER_TIMEOUT), and
    # pre_ping reconnected: a slow request, not a hung or failed one.
    assert request["seconds"] < KEEPALIVE_WINDOW + SLACK, result
    assert request["conn_id"] not in step(result, "warm")["conn_ids"], result
    print(f"pre_ping on a dead path answered after {request['seconds']} s")


def test_pre_pings_ping_hangs_without_keepalive(
    scenarios: dict[str, Scenario],
) -> None:
    result = scenarios["pymysql-pre-ping-none"].result()
    [request] = requests(result)
    assert result["hung"] and request["hung"], result
