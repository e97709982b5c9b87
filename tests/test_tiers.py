"""The fast tier's rules (tests/tiers.py): who is integration, and the tripwire."""

from __future__ import annotations

import socket
import subprocess
import sys
import typing as t

import psycopg
import pytest

from tests.tiers import FastTierError
from tests.tiers import needs_servers
from tests.tiers import Tripwire


class Collected:
    """What needs_servers reads of a collected test: its fixtures and markers."""

    def __init__(self, fixturenames: list[str], marked: bool = False) -> None:
        self.fixturenames = fixturenames
        self.marked = marked

    def get_closest_marker(self, name: str) -> object | None:
        return object() if self.marked and name == "integration" else None


@pytest.mark.parametrize(
    "fixturenames, marked, expected",
    [
        (["tmp_path", "make_app"], False, False),
        (["tmp_path", "make_app", "short_timeout", "mariadb"], False, True),
        (["postgres_url"], False, True),
        (["tmp_path"], True, True),
    ],
)
def test_a_server_fixture_or_the_marker_makes_a_test_integration(
    fixturenames: list[str], marked: bool, expected: bool
) -> None:
    item = t.cast(pytest.Item, Collected(fixturenames, marked))
    assert needs_servers(item) is expected


def test_this_module_is_in_the_fast_tier(request: pytest.FixtureRequest) -> None:
    assert request.node.get_closest_marker("integration") is None


def test_the_tripwire_refuses_a_connect_and_remembers_it_when_swallowed() -> None:
    wire = Tripwire()
    with wire.armed():
        with pytest.raises(FastTierError):
            socket.create_connection(("127.0.0.1", 9), timeout=1)
        try:  # as a reachability check would
            socket.create_connection(("127.0.0.1", 9), timeout=1)
        except Exception:
            pass
    assert len(wire.attempts) == 2
    assert all("127.0.0.1" in attempt for attempt in wire.attempts)


def test_the_tripwire_refuses_a_process_and_a_connect_made_in_c() -> None:
    wire = Tripwire()
    with wire.armed():
        with pytest.raises(FastTierError):
            subprocess.run([sys.executable, "-c", "pass"], check=False)
        with pytest.raises(FastTierError):
            psycopg.connect("host=127.0.0.1 port=9 connect_timeout=1")
    assert len(wire.attempts) == 2


def test_the_tripwire_leaves_socketpairs_alone_and_disarms() -> None:
    before = (socket.socket.connect, subprocess.Popen.__init__, psycopg.connect)
    wire = Tripwire()
    with wire.armed():
        left, right = socket.socketpair()
        left.sendall(b"x")
        assert right.recv(1) == b"x"
        left.close()
        right.close()
    assert wire.attempts == []
    assert (socket.socket.connect, subprocess.Popen.__init__, psycopg.connect) == before
