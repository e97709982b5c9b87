"""Fork safety with real gunicorn: --preload, 3 workers x 4 threads.

The app queries the database in the master before forking, so each worker inherits
a pooled connection whose socket the master and its siblings share. No worker may
use it: several hundred concurrent requests must all succeed, each connection
belonging to exactly one worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import typing as t
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.servers import free_port
from tests.servers import MariaDBServer
from tests.servers import wait_for_port

ROOT = Path(__file__).resolve().parent.parent
WORKERS = 3
REQUESTS = 360


class Gunicorn:
    """gunicorn on a free port, stopped (TERM, then KILL) when the block ends."""

    def __init__(self, url: str, log: Path, **env: str) -> None:
        self.port = free_port()
        self.log = log
        self.env = {**os.environ, "DATABASE_URL": url, "PYTHONPATH": str(ROOT), **env}
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Gunicorn:
        args = [
            sys.executable, "-m", "gunicorn", "--preload",
            "--workers", str(WORKERS), "--threads", "4",
            # A gthread worker otherwise accepts up to 1000 clients at once, so
            # one worker could take every request; at 4, all must share.
            "--worker-connections", "4",
            "--bind", f"127.0.0.1:{self.port}", "--timeout", "30",
            "tests.apps.fork_app:app",
        ]  # fmt: skip
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                args, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        proc = self.proc
        try:
            wait_for_port("127.0.0.1", self.port, 30, lambda: proc.poll() is None)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def get(self, path: str) -> dict[str, t.Any]:
        url = f"http://127.0.0.1:{self.port}{path}"
        with urllib.request.urlopen(url, timeout=10) as response:
            body: dict[str, t.Any] = json.loads(response.read())
            return body


def hammer(server: Gunicorn) -> tuple[list[dict[str, t.Any]], list[str]]:
    """REQUESTS concurrent requests; the replies, and every failure as text."""

    def one(_: int) -> dict[str, t.Any] | str:
        try:
            return server.get("/q")
        except Exception as e:
            return f"{type(e).__name__}: {e}"

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(one, range(REQUESTS)))
    return [r for r in results if isinstance(r, dict)], [
        r for r in results if isinstance(r, str)
    ]


@pytest.fixture()
def gunicorn_log(tmp_path: Path) -> Iterator[Path]:
    log = tmp_path / "gunicorn.log"
    yield log


def test_preload_workers_never_share_the_masters_connection(
    mariadb: MariaDBServer, gunicorn_log: Path
) -> None:
    started = time.monotonic()
    with Gunicorn(mariadb.url, gunicorn_log) as server:
        master = server.get("/master")
        replies, failures = hammer(server)
    log = gunicorn_log.read_text(errors="replace")
    assert failures == [], failures[:5]
    assert "Packet sequence number wrong" not in log
    assert "Traceback" not in log, log[-3000:]
    assert len(replies) == REQUESTS
    workers = {r["pid"] for r in replies}
    assert master["pid"] not in workers
    assert len(workers) == WORKERS
    # Nobody used the master's connection, and no connection serves two workers.
    owners: dict[int, set[int]] = {}
    for r in replies:
        owners.setdefault(r["connection"], set()).add(r["pid"])
    assert master["connection"] not in owners
    assert all(len(pids) == 1 for pids in owners.values()), owners
    # Each worker dropped its inherited copy of the master's connection. The
    # counter only grows, so its largest value per worker is its final one.
    fork_counts: dict[int, int] = {}
    for r in replies:
        fork_counts[r["pid"]] = max(r["fork"], fork_counts.get(r["pid"], 0))
    assert all(n == 1 for n in fork_counts.values()), fork_counts
    assert time.monotonic() - started < 45


def test_without_guard_workers_share_the_masters_connection(
    mariadb: MariaDBServer, gunicorn_log: Path
) -> None:
    with Gunicorn(mariadb.url, gunicorn_log, STALEGUARD_TEST_GUARD="0") as server:
        master = server.get("/master")
        replies, failures = hammer(server)
    owners: dict[int, set[int]] = {}
    for r in replies:
        owners.setdefault(r["connection"], set()).add(r["pid"])
    # The bug: the inherited socket is used by the workers, shared or broken.
    assert failures or master["connection"] in owners
