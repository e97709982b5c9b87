"""The database the benchmarks run against: a private MariaDB, or a given URL.

A private server (``tests/servers.py:MariaDBServer``) is the default: the
reconnect scenario changes ``wait_timeout`` and KILLs connections, which must
never happen on a shared server, and a private server sees no other session's
queries.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from . import REPO

if str(REPO) not in sys.path:  # tests/ holds the server and proxy helpers
    sys.path.insert(0, str(REPO))

from tests.servers import MariaDBServer  # noqa: E402


def server_version(url: str) -> str:
    """``SELECT VERSION()`` on ``url``."""
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return str(conn.execute(sa.text("SELECT VERSION()")).scalar())
    finally:
        engine.dispose()


@contextlib.contextmanager
def private_mariadb(basedir: Path | None = None) -> Iterator[MariaDBServer]:
    """A throw-away MariaDB on a free port, stopped (and its files removed) after."""
    with contextlib.ExitStack() as stack:
        if basedir is None:
            basedir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        server = stack.enter_context(MariaDBServer(basedir / "mariadb"))
        yield server


def set_wait_timeout(server: MariaDBServer, seconds: int) -> None:
    """Set the global idle timeouts; only connections opened afterwards use them."""
    server.set_global("wait_timeout", seconds)
    server.set_global("interactive_timeout", seconds)


def kill_idle(server: MariaDBServer) -> list[int]:
    """KILL every sleeping connection of the benchmark's user (root)."""
    return server.kill_connections(user="root", command="Sleep")


__all__ = [
    "MariaDBServer",
    "kill_idle",
    "private_mariadb",
    "server_version",
    "set_wait_timeout",
]
