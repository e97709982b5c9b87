"""The zero-round-trip socket probe, against real sockets and a real server."""

from __future__ import annotations

import select
import socket
import struct
import time
import typing as t

import pymysql
import pytest

from flask_staleguard.core import probe
from tests.servers import MariaDBServer


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    return client, server


def _readable(sock: socket.socket) -> None:
    """Wait (5 s at most) until the peer's FIN, RST or bytes reached ``sock``."""
    assert select.select([sock], [], [], 5.0)[0], "nothing arrived within 5 s"


#: The verdicts that need no TCP run on a socketpair too: the fast tier's copy.
PAIRS = [
    pytest.param(socket.socketpair, id="socketpair"),
    pytest.param(_tcp_pair, id="tcp", marks=pytest.mark.integration),
]
Pair = t.Callable[[], tuple[socket.socket, socket.socket]]


@pytest.mark.parametrize("pair", PAIRS)
def test_quiet_socket_is_alive(pair: Pair) -> None:
    client, server = pair()
    try:
        assert probe.SocketProbe(client.fileno()).check() is None
    finally:
        client.close()
        server.close()


@pytest.mark.parametrize("pair", PAIRS)
def test_fin_is_eof_and_nothing_is_consumed(pair: Pair) -> None:
    client, server = pair()
    server.close()
    _readable(client)
    assert probe.SocketProbe(client.fileno()).check() == (probe.EOF, b"")
    assert client.fileno() != -1  # the probe's borrowed socket did not close it
    client.close()


@pytest.mark.integration
def test_rst_is_reset() -> None:
    client, server = _tcp_pair()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    server.close()
    _readable(client)
    assert probe.SocketProbe(client.fileno()).check() == (probe.RESET, b"")
    client.close()


@pytest.mark.parametrize("pair", PAIRS)
def test_unsolicited_bytes_are_peeked_not_read(pair: Pair) -> None:
    client, server = pair()
    # MySQL 8's ER_CLIENT_INTERACTION_TIMEOUT packet: length, seq 0, 0xFF, 4031.
    packet = b"\x0f\x00\x00\x00\xff" + (4031).to_bytes(2, "little") + b"#HY000timeout"
    server.sendall(packet)
    _readable(client)
    verdict = probe.SocketProbe(client.fileno()).check()
    assert verdict is not None
    assert verdict[0] == probe.UNKNOWN
    assert probe.mysql_error_code(verdict[1]) == 4031
    assert client.recv(100) == packet  # still there for whoever reads next
    client.close()
    server.close()


def test_mysql_error_code_ignores_other_bytes() -> None:
    assert probe.mysql_error_code(b"\x16\x03\x03\x00\x20abcdef") is None  # TLS
    assert probe.mysql_error_code(b"\xff") is None


def test_socket_fd_of_pymysql(mariadb: MariaDBServer) -> None:
    conn = pymysql.connect(host=mariadb.host, port=mariadb.port, user="root")
    try:
        fd = probe.socket_fd(conn)
        assert fd is not None and fd == conn._sock.fileno()
    finally:
        conn.close()
    assert probe.socket_fd(conn) is None
    assert probe.socket_fd(object()) is None


def test_server_kill_and_timeout_are_seen(mariadb: MariaDBServer) -> None:
    mariadb.set_global("wait_timeout", 1)
    timed_out = pymysql.connect(host=mariadb.host, port=mariadb.port, user="root")
    mariadb.set_global("wait_timeout", 28800)
    killed = pymysql.connect(host=mariadb.host, port=mariadb.port, user="root")
    alive = pymysql.connect(host=mariadb.host, port=mariadb.port, user="root")
    try:
        mariadb.execute(f"KILL {killed.thread_id()}")
        time.sleep(2)
        assert probe.SocketProbe(alive._sock.fileno()).check() is None
        for conn in (timed_out, killed):
            verdict = probe.SocketProbe(conn._sock.fileno()).check()
            assert verdict is not None and verdict[0] in (probe.EOF, probe.RESET)
    finally:
        for conn in (timed_out, killed, alive):
            try:
                conn.close()
            except Exception:
                pass


def test_a_postgres_fatal_on_an_idle_connection_is_its_last_word() -> None:
    fields = b"SFATAL\0VFATAL\0C57P01\0Mterminating connection\0\0"
    error = b"E" + (4 + len(fields)).to_bytes(4, "big") + fields
    assert probe.postgres_verdict(error) == (probe.SERVER_ERROR, "SQLSTATE 57P01")
    notify = b"A" + (4 + 9).to_bytes(4, "big") + b"\0\0\0\x01ch\0\0"
    assert probe.postgres_verdict(notify) == (probe.UNKNOWN, "")
    assert probe.postgres_verdict(b"\x17\x03\x03\x00\x20") == (probe.UNKNOWN, "")
