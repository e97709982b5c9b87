"""Checks that the private servers, middleboxes and fault proxy behave as advertised."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pymysql  # type: ignore[import-untyped, unused-ignore]
import pytest
import sqlalchemy as sa

from tests.proxies import TcpProxy
from tests.servers import APP_PASSWORD
from tests.servers import APP_USER
from tests.servers import HAProxy
from tests.servers import MariaDBServer
from tests.servers import PgBouncer


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
        time.sleep(2.5)
        with pytest.raises(pymysql.err.OperationalError) as info:
            select_one(conn)
        assert info.value.args[0] in (2013, 2006)


def test_tcpproxy_idle_close_sends_fin(infra_mariadb: MariaDBServer) -> None:
    with TcpProxy(infra_mariadb.host, infra_mariadb.port, idle_close=0.5) as proxy:
        conn = connect(proxy.port)
        assert select_one(conn) == 1
        time.sleep(1.0)
        with pytest.raises(pymysql.err.OperationalError) as info:
            select_one(conn)
        assert info.value.args[0] == 2013
        assert proxy.connections_seen == 1


def test_tcpproxy_idle_reset_sends_rst(infra_mariadb: MariaDBServer) -> None:
    with TcpProxy(infra_mariadb.host, infra_mariadb.port, idle_reset=0.5) as proxy:
        conn = connect(proxy.port)
        assert select_one(conn) == 1
        time.sleep(1.0)
        with pytest.raises(pymysql.err.OperationalError) as info:
            select_one(conn)
        # PyMySQL's write hits the RST: 2006 "gone away (ConnectionResetError(104...))".
        assert info.value.args[0] == 2006
        assert isinstance(info.value.__context__, ConnectionResetError)


def test_tcpproxy_idle_drop_blackholes(infra_mariadb: MariaDBServer) -> None:
    with TcpProxy(infra_mariadb.host, infra_mariadb.port, idle_drop=0.5) as proxy:
        conn = connect(proxy.port, read_timeout=1)
        assert select_one(conn) == 1
        time.sleep(1.0)
        started = time.monotonic()
        with pytest.raises(pymysql.err.OperationalError) as info:
            select_one(conn)
        elapsed = time.monotonic() - started
        assert info.value.args[0] == 2013
        assert "timed out" in str(info.value)
        assert 0.9 <= elapsed < 3


def _median_rtt(port: int, rounds: int = 20) -> float:
    conn = connect(port)
    try:
        select_one(conn)
        samples = []
        for _ in range(rounds):
            started = time.perf_counter()
            select_one(conn)
            samples.append(time.perf_counter() - started)
        return statistics.median(samples)
    finally:
        conn.close()


@pytest.mark.parametrize("delay", [0.0005, 0.002])
def test_tcpproxy_delay_adds_latency(
    infra_mariadb: MariaDBServer, delay: float
) -> None:
    direct = _median_rtt(infra_mariadb.port)
    with TcpProxy(infra_mariadb.host, infra_mariadb.port, delay=delay) as proxy:
        proxied = _median_rtt(proxy.port)
    # One request and one response per query, each delayed once.
    assert proxied >= 2 * delay
    assert proxied - direct >= 1.5 * delay


def test_tcpproxy_close_all_and_throughput(infra_mariadb: MariaDBServer) -> None:
    infra_mariadb.execute("CREATE TABLE IF NOT EXISTS infra_big (b LONGBLOB)")
    infra_mariadb.execute("DELETE FROM infra_big")
    infra_mariadb.execute("INSERT INTO infra_big VALUES (REPEAT('x', 4000000))")
    with TcpProxy(infra_mariadb.host, infra_mariadb.port, delay=0.002) as proxy:
        conn = connect(proxy.port, database="staleguard")
        started = time.monotonic()
        with conn.cursor() as cur:
            cur.execute("SELECT LENGTH(b), b FROM infra_big")
            assert cur.fetchone()[0] == 4000000
        # Chunks are delayed, not serialised: 4 MB must not cost 2 ms per chunk.
        assert time.monotonic() - started < 0.5
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
        time.sleep(3.0)  # the janitor checks idle clients a few times a second
        # PgBouncer sends a FATAL before closing: psycopg reports it as 08P01.
        with pytest.raises(
            psycopg.errors.ProtocolViolation, match="client_idle_timeout"
        ):
            conn.execute("SELECT 1")
        assert conn.closed
        conn.close()
