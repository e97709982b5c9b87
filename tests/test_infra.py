"""Checks that the private servers, middleboxes and fault proxy behave as advertised."""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

import psycopg
import pymysql  # type: ignore[import-untyped, unused-ignore]
import pytest
import sqlalchemy as sa

from flask_staleguard.core.probe import socket_fd
from tests.proxies import TcpProxy
from tests.servers import APP_PASSWORD
from tests.servers import APP_USER
from tests.servers import free_port
from tests.servers import HAProxy
from tests.servers import MariaDBServer
from tests.servers import PgBouncer

#: Starts its own servers and proxies (tests/tiers.py).
pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def infra_mariadb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MariaDBServer]:
    server = MariaDBServer(tmp_path_factory.mktemp("infra-mariadb"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def connect(port: int, **kwargs: Any) -> Any:
    return pymysql.connect(
        host="127.0.0.1", port=port, user="root", autocommit=True, **kwargs
    )


def select_one(conn: Any) -> Any:
    with conn.cursor() as cur:
        cur.execute("SELECT 1")
        return cur.fetchone()[0]


#: The longest wait for a middlebox's idle action: far past every idle timer here,
#: so a loaded machine only makes the wait longer, never the test fail.
PATIENCE = 30.0


def wait_until(condition: Callable[[], object], timeout: float = PATIENCE) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def closed_by_peer(dbapi_connection: Any, timeout: float = PATIENCE) -> bool:
    """Wait until an idle connection's socket has something to report: the peer's
    FIN, RST or last message before it closed. False if nothing came in ``timeout``.
    """
    fd = socket_fd(dbapi_connection)
    assert fd is not None
    return bool(select.select([fd], [], [], timeout)[0])


def test_mariadb_users_and_database(infra_mariadb: MariaDBServer) -> None:
    assert infra_mariadb.execute("SELECT DATABASE()") == [("staleguard",)]
    assert infra_mariadb.execute("SELECT COUNT(*) FROM mysql.user WHERE user = ''") == [
        (0,)
    ]
    engine = sa.create_engine(infra_mariadb.user_url)
    try:
        with engine.connect() as conn:
            assert (
                conn.execute(sa.text("SELECT CURRENT_USER()")).scalar()
                == "sg@localhost"
            )
            grants = " ".join(row[0] for row in conn.execute(sa.text("SHOW GRANTS")))
    finally:
        engine.dispose()
    assert "ALL PRIVILEGES ON `staleguard`.*" in grants
    assert "PROCESS" not in grants
    user = pymysql.connect(
        host=infra_mariadb.host,
        port=infra_mariadb.port,
        user=APP_USER,
        password=APP_PASSWORD,
    )
    user.close()


def test_set_global_wait_timeout(infra_mariadb: MariaDBServer) -> None:
    infra_mariadb.set_global("wait_timeout", 2)
    try:
        conn = connect(infra_mariadb.port)
        with conn.cursor() as cur:
            cur.execute("SELECT @@session.wait_timeout")
            assert cur.fetchone()[0] == 2
        conn.close()
    finally:
        infra_mariadb.set_global("wait_timeout", 28800)


def test_processlist_and_kill_connections(infra_mariadb: MariaDBServer) -> None:
    conn = connect(infra_mariadb.port)
    with conn.cursor() as cur:
        cur.execute("SELECT CONNECTION_ID()")
        conn_id = cur.fetchone()[0]
    assert conn_id in {row["ID"] for row in infra_mariadb.processlist()}
    assert conn_id in infra_mariadb.kill_connections(user="root", command="Sleep")
    with pytest.raises(pymysql.err.OperationalError) as info:
        select_one(conn)
    assert info.value.args[0] in (2013, 2006)


def test_restart_and_crash(infra_mariadb: MariaDBServer) -> None:
    port = infra_mariadb.port
    infra_mariadb.execute("CREATE TABLE IF NOT EXISTS infra_t (id INT PRIMARY KEY)")
    infra_mariadb.execute("REPLACE INTO infra_t VALUES (1)")
    conn = connect(port)
    infra_mariadb.restart()
    assert infra_mariadb.port == port
    with pytest.raises(pymysql.err.OperationalError):
        select_one(conn)
    infra_mariadb.kill()
    assert not infra_mariadb.running
    infra_mariadb.stop()  # idempotent, also after a crash
    infra_mariadb.start()
    assert infra_mariadb.execute("SELECT id FROM infra_t") == [(1,)]


def test_haproxy_closes_idle_connection(infra_mariadb: MariaDBServer) -> None:
    with HAProxy(infra_mariadb.host, infra_mariadb.port, idle_timeout=2) as haproxy:
        assert haproxy.url_for(infra_mariadb.url).endswith(
            f"127.0.0.1:{haproxy.port}/staleguard"
        )
        conn = connect(haproxy.port)
        assert select_one(conn) == 1
        # Waits for the close itself, not for a time that load could stretch.
        assert closed_by_peer(conn)
        with pytest.raises(pymysql.err.OperationalError) as info:
            select_one(conn)
        assert info.value.args[0] in (2013, 2006)


def test_tcpproxy_idle_close_sends_fin(infra_mariadb: MariaDBServer) -> None:
    with TcpProxy(infra_mariadb.host, infra_mariadb.port, idle_close=0.5) as proxy:
        conn = connect(proxy.port)
        assert select_one(conn) == 1
        assert closed_by_peer(conn)
        with pytest.raises(pymysql.err.OperationalError) as info:
            select_one(conn)
        assert info.value.args[0] == 2013
        assert proxy.connections_seen == 1


def test_tcpproxy_idle_reset_sends_rst(infra_mariadb: MariaDBServer) -> None:
    with TcpProxy(infra_mariadb.host, infra_mariadb.port, idle_reset=0.5) as proxy:
        conn = connect(proxy.port)
        assert select_one(conn) == 1
        assert closed_by_peer(conn)
        with pytest.raises(pymysql.err.OperationalError) as info:
            select_one(conn)
        # PyMySQL's write hits the RST: 2006 "gone away (ConnectionResetError(104...))".
        assert info.value.args[0] == 2006
        assert isinstance(info.value.__context__, ConnectionResetError)


def test_tcpproxy_idle_drop_blackholes(infra_mariadb: MariaDBServer) -> None:
    with TcpProxy(infra_mariadb.host, infra_mariadb.port, idle_drop=0.5) as proxy:
        conn = connect(proxy.port, read_timeout=1)
        assert select_one(conn) == 1
        # A black hole says nothing: ask the proxy when it started dropping.
        assert wait_until(lambda: proxy.dropping_connections == 1)
        started = time.monotonic()
        with pytest.raises(pymysql.err.OperationalError) as info:
            select_one(conn)
        elapsed = time.monotonic() - started
        assert info.value.args[0] == 2013
        assert "timed out" in str(info.value)
        # Ended by the 1 s read timeout, never sooner; the upper bound only says
        # "not TCP's 15 minutes" (load can make a timeout late, never early).
        assert 0.9 <= elapsed < PATIENCE


def _round_trips(port: int, rounds: int = 20) -> list[float]:
    """Seconds each of ``rounds`` queries took, on the proxy's clock (monotonic)."""
    conn = connect(port)
    try:
        select_one(conn)
        samples = []
        for _ in range(rounds):
            started = time.monotonic()
            select_one(conn)
            samples.append(time.monotonic() - started)
        return samples
    finally:
        conn.close()


@pytest.mark.parametrize("delay", [0.0005, 0.002])
def test_tcpproxy_delay_adds_latency(
    infra_mariadb: MariaDBServer, delay: float
) -> None:
    with TcpProxy(infra_mariadb.host, infra_mariadb.port, delay=delay) as proxy:
        proxied = _round_trips(proxy.port)
    # One request and one response per query, each held back `delay` on the same
    # clock: EVERY round trip takes at least 2 * delay. Load only adds to a round
    # trip, so it cannot break this; without the delay a local round trip takes
    # a fraction of it. (Comparing with the direct round trip could fail when
    # load slows the direct one more.)
    assert min(proxied) >= 2 * delay, proxied


def test_tcpproxy_close_all_and_throughput(infra_mariadb: MariaDBServer) -> None:
    infra_mariadb.execute("CREATE TABLE IF NOT EXISTS infra_big (b LONGBLOB)")
    infra_mariadb.execute("DELETE FROM infra_big")
    infra_mariadb.execute("INSERT INTO infra_big VALUES (REPEAT('x', 4000000))")
    with TcpProxy(infra_mariadb.host, infra_mariadb.port, delay=0.002) as proxy:
        conn = connect(proxy.port, database="staleguard")
        with conn.cursor() as cur:
            cur.execute("SELECT LENGTH(b), b FROM infra_big")
            assert cur.fetchone()[0] == 4000000
        # Chunks are delayed side by side, not one after another: 4 MB must not
        # cost 2 ms per chunk. Counted, not timed: a time bound breaks under load.
        assert proxy.most_in_flight >= 2
        assert proxy.close_all() == 1
        with pytest.raises(pymysql.err.OperationalError) as info:
            select_one(conn)
        assert info.value.args[0] == 2013


def test_tcpproxy_url_for_keeps_credentials(infra_mariadb: MariaDBServer) -> None:
    with TcpProxy(infra_mariadb.host, infra_mariadb.port) as proxy:
        url = proxy.url_for(infra_mariadb.user_url)
        assert url == f"mysql+pymysql://sg:s3cr3t-pw@127.0.0.1:{proxy.port}/staleguard"
        engine = sa.create_engine(url)
        try:
            with engine.connect() as conn:
                assert conn.execute(sa.text("SELECT 1")).scalar() == 1
        finally:
            engine.dispose()
    proxy.stop()  # idempotent


def test_pgbouncer_closes_idle_connection() -> None:
    with PgBouncer(client_idle_timeout=2) as bouncer:
        engine = sa.create_engine(bouncer.url)
        try:
            with engine.connect() as sa_conn:
                assert sa_conn.execute(sa.text("SELECT 1")).scalar() == 1
        finally:
            engine.dispose()
        conn = psycopg.connect(
            host=bouncer.host,
            port=bouncer.port,
            user="postgres",
            dbname="test",
            autocommit=True,
        )
        assert conn.execute("SELECT 1").fetchone() == (1,)
        # Its janitor checks idle clients a few times a second: wait for the close.
        assert closed_by_peer(conn)
        # PgBouncer sends a FATAL before closing: psycopg reports it as 08P01.
        with pytest.raises(
            psycopg.errors.ProtocolViolation, match="client_idle_timeout"
        ):
            conn.execute("SELECT 1")
        assert conn.closed
        conn.close()


def test_tcpproxy_counts_refused_connects_as_attempts() -> None:
    # Its backend is down: the client is reset, and the attempt still counts.
    with TcpProxy("127.0.0.1", free_port()) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            sock.settimeout(5)
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(1) == b""
        deadline = time.monotonic() + 5
        while proxy.attempts < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (proxy.attempts, proxy.connections_seen) == (1, 0)
