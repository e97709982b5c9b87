"""The two test tiers: which tests are ``integration``, and the fast tier's tripwire.

A test is ``integration`` when it asks for a fixture that needs a server (directly
or through another fixture), or when its module says so with
``pytestmark = pytest.mark.integration`` (modules that start servers, proxies or
processes by hand). Everything else is the fast tier, ``pytest -m "not integration"``.

The split is automatic, so a new test lands in the right tier without a list to
keep; the tripwire catches the one mistake it cannot see: when a session selects
no integration test, any TCP/Unix ``connect`` or process start fails the test
that made it.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import socket
import subprocess
import typing as t
from collections.abc import Iterator

import pytest

INTEGRATION = "integration"

#: Fixtures that start or reach a server, in conftest.py and in the test modules
#: (where a module fixture starts its own). A test that needs any of them, even
#: through another fixture, is in the integration tier.
SERVER_FIXTURES = frozenset(
    {
        # conftest.py
        "mariadb_url",
        "postgres_url",
        "private_mariadb",
        "mariadb",
        "short_timeout",
        "private_postgres",
        "postgres",
        # module fixtures that start a server of their own
        "infra_mariadb",
        "tls_mariadb",
        "new_mariadb",
        "new_postgres",
        "firewall",
        "mute",
    }
)


def needs_servers(item: pytest.Item) -> bool:
    """True when ``item`` asks for a server fixture or its module is integration."""
    if item.get_closest_marker(INTEGRATION) is not None:
        return True
    return not SERVER_FIXTURES.isdisjoint(getattr(item, "fixturenames", ()))


def mark_integration(items: list[pytest.Item]) -> None:
    """Add the ``integration`` marker to every collected test that needs a server."""
    for item in items:
        if needs_servers(item) and item.get_closest_marker(INTEGRATION) is None:
            item.add_marker(pytest.mark.integration)


#: Drivers that open their connection in C: (module, attribute) to refuse.
C_CONNECTS = (
    ("psycopg", "connect"),
    ("psycopg", "Connection.connect"),
    ("psycopg", "AsyncConnection.connect"),
    ("psycopg2", "connect"),
    ("MySQLdb", "connect"),
)


class FastTierError(RuntimeError):
    """A fast-tier test reached for the network or started a process."""


class Tripwire:
    """Refuses ``connect`` and process starts, and remembers each attempt.

    Remembering matters: code under test may catch the error (a reachability
    check does), and the test must fail anyway.
    """

    def __init__(self) -> None:
        self.attempts: list[str] = []

    def trip(self, what: str) -> t.NoReturn:
        self.attempts.append(what)
        raise FastTierError(
            f"{what}: a fast-tier test needs no server and starts no process; "
            "use a server fixture or mark the test (or module) integration"
        )

    @contextlib.contextmanager
    def armed(self) -> Iterator[Tripwire]:
        """Within the block, every connect and process start trips."""
        wire = self

        def connect(sock: socket.socket, address: t.Any) -> t.NoReturn:
            wire.trip(f"connect to {address!r}")

        def popen(
            self: subprocess.Popen[t.Any], args: t.Any, *a: t.Any, **k: t.Any
        ) -> None:
            wire.trip(f"process start {args!r}")

        def start(name: str) -> t.Callable[..., t.NoReturn]:
            def started(*args: t.Any, **kwargs: t.Any) -> t.NoReturn:
                wire.trip(f"os.{name}{args!r}")

            return started

        def driver(name: str) -> t.Callable[..., t.NoReturn]:
            def connected(*args: t.Any, **kwargs: t.Any) -> t.NoReturn:
                wire.trip(f"{name}()")

            return connected

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(socket.socket, "connect", connect)
            patch.setattr(socket.socket, "connect_ex", connect)
            # libpq and libmariadb connect in C, where socket.connect cannot see.
            for module, attribute in C_CONNECTS:
                try:
                    target = importlib.import_module(module)
                except ImportError:
                    continue
                owner, _, name = attribute.rpartition(".")
                holder = getattr(target, owner) if owner else target
                patch.setattr(holder, name, driver(f"{module}.{attribute}"))
            patch.setattr(subprocess.Popen, "__init__", popen)
            for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system"):
                if hasattr(os, name):
                    patch.setattr(os, name, start(name))
            yield self
