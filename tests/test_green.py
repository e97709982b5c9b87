"""gevent and eventlet, patched before or after flask_staleguard is imported.

eventlet deletes ``select.poll`` and gevent replaces it with a green one; the
probe must keep working either way: KILLed idle connections are replaced by the
socket probe while concurrent green requests run, and none of them fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import typing as t
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.servers import free_port
from tests.servers import MariaDBServer
from tests.servers import wait_for_port
from tests.webservers import get_json
from tests.webservers import Gunicorn
from tests.webservers import ROOT


class GreenServer:
    """tests/apps/green_app.py served by its green library's own server."""

    def __init__(self, log: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> GreenServer:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.apps.green_app", str(self.port)],
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        proc = self.proc
        if not wait_for_port("127.0.0.1", self.port, 30, lambda: proc.poll() is None):
            self.__exit__()
            raise RuntimeError(self.log.read_text(errors="replace"))
        return self

    def __exit__(self, *exc: object) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.kill()
            proc.wait(10)


def concurrently(url: str, n: int) -> tuple[list[t.Any], list[str]]:
    """``n`` concurrent requests; the replies, and every failure as text."""

    def one(_: int) -> t.Any:
        try:
            return get_json(url, timeout=30)
        except Exception as e:
            return f"{type(e).__name__}: {e}"

    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n)))
    return [r for r in results if isinstance(r, dict)], [
        r for r in results if isinstance(r, str)
    ]


def kill_pooled_and_query(mariadb: MariaDBServer, url: str) -> dict[str, t.Any]:
    """Warm the four pooled connections, KILL them idle, query concurrently; the
    failures must be none. Returns the guard's counters.
    """
    replies, failures = concurrently(f"{url}/q", 8)
    assert failures == []
    assert len({r["connection"] for r in replies}) == 4
    killed = mariadb.kill_connections(user="sg")
    assert len(killed) == 4
    time.sleep(0.3)  # the FINs arrive
    replies, failures = concurrently(f"{url}/q", 12)
    assert failures == [], failures[:3]
    assert not {r["connection"] for r in replies} & set(killed)
    stats: dict[str, t.Any] = get_json(f"{url}/stats")
    return stats


@pytest.fixture()
def log(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "server.log"
    yield path
    if path.exists():
        text = path.read_text(errors="replace")
        assert "AttributeError" not in text, text[-3000:]


@pytest.mark.parametrize("patch", ["before", "after"])
@pytest.mark.parametrize("green", ["gevent", "eventlet"])
def test_green_server_survives_killed_connections(
    mariadb: MariaDBServer, log: Path, green: str, patch: str
) -> None:
    env = {
        "DATABASE_URL": mariadb.user_url,
        "STALEGUARD_TEST_GREEN": green,
        "STALEGUARD_TEST_PATCH": patch,
    }
    with GreenServer(log, **env) as server:
        stats = kill_pooled_and_query(mariadb, server.url)
    # The probe saw every KILL at checkout: no statement failed on a dead one.
    assert (
        stats["replaced"].get("probe_eof", 0) + stats["replaced"].get("probe_reset", 0)
        == 4
    ), stats
    assert stats["disconnects"] == {}


@pytest.mark.parametrize("preload", [False, True], ids=["patched-first", "preload"])
def test_gunicorn_gevent_worker_survives_killed_connections(
    mariadb: MariaDBServer, log: Path, preload: bool
) -> None:
    # --preload imports the app in the master; the worker patches after the fork.
    options = ["-k", "gevent", "--workers", "1", *(["--preload"] if preload else [])]
    env = {"STALEGUARD_TEST_GREEN": "gevent", "STALEGUARD_TEST_PATCH": "none"}
    with Gunicorn(
        "tests.apps.green_app:app", log, *options, url=mariadb.user_url, **env
    ) as server:
        stats = kill_pooled_and_query(mariadb, server.url)
    assert sum(stats["replaced"].values()) == 4, stats
    assert stats["disconnects"] == {}


def test_without_the_guard_killed_connections_fail(
    mariadb: MariaDBServer, log: Path
) -> None:
    env = {
        "DATABASE_URL": mariadb.user_url,
        "STALEGUARD_TEST_GREEN": "eventlet",
        "STALEGUARD_TEST_GUARD": "0",
    }
    with GreenServer(log, **env) as server:
        concurrently(f"{server.url}/q", 8)
        mariadb.kill_connections(user="sg")
        time.sleep(0.3)
        _, failures = concurrently(f"{server.url}/q", 12)
    assert failures  # the scenario is real
