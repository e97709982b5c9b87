"""The async drivers through SQLAlchemy's asyncio extension: asyncmy and aiomysql
on MariaDB, asyncpg on PostgreSQL, in real event loops against real servers.

Every scenario runs two engines side by side on the same server, one under
``protect()`` and one bare: the guarded one serves every request after the
fault, the bare one fails.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import typing as t

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.ext.asyncio import create_async_engine

from flask_staleguard import protect
from flask_staleguard.core import probe
from flask_staleguard.core.checkout import STATE
from flask_staleguard.core.keepalive import read_keepalive
from tests.proxies import TcpProxy
from tests.servers import MariaDBServer
from tests.servers import PostgresServer

#: Its target fixture picks a server with getfixturevalue, which tests/tiers.py
#: cannot see.
pytestmark = pytest.mark.integration

POOL = {"pool_size": 3, "max_overflow": 0}
REQUESTS = 6
MYSQL_ID = "SELECT CONNECTION_ID()"
PG_ID = "SELECT pg_backend_pid()"
#: What a probe may see once the event loop has read the end of a connection:
#: a transport that closed (asyncpg, asyncmy 0.2.17+), or one left half-open
#: whose socket still shows the FIN (aiomysql and older asyncmy).
LOOP_SAW_IT = {"probe_closed", "probe_eof"}


@dataclasses.dataclass
class Target:
    """A driver and the private server it talks to."""

    driver: str
    server: MariaDBServer | PostgresServer
    url: str
    id_sql: str

    @property
    def postgres(self) -> bool:
        return isinstance(self.server, PostgresServer)

    def end_idle_connections(self) -> None:
        """KILL (MariaDB) or terminate (PostgreSQL) every idle connection."""
        if isinstance(self.server, PostgresServer):
            self.server.terminate_backends()
        else:
            self.server.kill_connections()

    def set_idle_timeout(self, seconds: int) -> None:
        """The server's idle timeout for connections opened from now on."""
        if isinstance(self.server, PostgresServer):
            self.server.alter_system("idle_session_timeout", seconds * 1000)
        else:
            self.server.set_global("wait_timeout", seconds)


@pytest.fixture(params=["asyncmy", "aiomysql", "asyncpg"])
def target(request: pytest.FixtureRequest) -> Target:
    driver = request.param
    if driver == "asyncpg":
        pg: PostgresServer = request.getfixturevalue("postgres")
        return Target(driver, pg, pg.url.replace("+psycopg", "+asyncpg"), PG_ID)
    db: MariaDBServer = request.getfixturevalue("mariadb")
    return Target(driver, db, db.url.replace("+pymysql", f"+{driver}"), MYSQL_ID)


@dataclasses.dataclass
class Outcome:
    """What the two engines did after the fault."""

    #: Server ids of the guarded engine's pooled connections before the fault.
    before: set[int]
    #: Server ids that served the guarded engine's requests after it.
    served: list[int]
    #: Requests that failed, per engine.
    failed_guarded: int
    failed_bare: int
    stats: dict[str, t.Any]


async def warm(engine: AsyncEngine, sql: str) -> set[int]:
    """Fill the pool: three connections used at once, then returned."""
    conns = [await engine.connect() for _ in range(3)]
    try:
        return {int((await c.execute(sa.text(sql))).scalar_one()) for c in conns}
    finally:
        for c in conns:
            await c.close()


async def requests(engine: AsyncEngine, sql: str) -> tuple[list[int], int]:
    """Run one statement per checkout; the server ids seen and the failures."""
    served, failed = [], 0
    for _ in range(REQUESTS):
        try:
            async with engine.connect() as conn:
                served.append(int((await conn.execute(sa.text(sql))).scalar_one()))
        except sa.exc.DBAPIError:
            failed += 1
    return served, failed


def after_fault(
    target: Target, fault: t.Callable[[], t.Awaitable[None]], **options: t.Any
) -> Outcome:
    """Warm a guarded and a bare pool, run ``fault``, then serve requests."""

    async def scenario() -> Outcome:
        guarded = create_async_engine(target.url, **POOL)
        bare = create_async_engine(target.url, **POOL)
        protection = protect(guarded, **options)
        try:
            before = await warm(guarded, target.id_sql)
            await warm(bare, target.id_sql)
            await fault()
            served, failed_guarded = await requests(guarded, target.id_sql)
            _, failed_bare = await requests(bare, target.id_sql)
            return Outcome(
                before, served, failed_guarded, failed_bare, protection.stats()
            )
        finally:
            await guarded.dispose()
            await bare.dispose()

    return asyncio.run(scenario())


def assert_served(outcome: Outcome) -> None:
    """No request failed under the guard, on connections all new; without it, some."""
    assert outcome.failed_guarded == 0
    assert len(outcome.served) == REQUESTS
    assert not outcome.before & set(outcome.served)
    assert outcome.failed_bare >= 1


def test_the_drivers_socket_is_found(target: Target) -> None:
    """Through the asyncio transport: the probe, and TCP keepalive, on its socket."""

    async def scenario() -> tuple[object, dict[str, t.Any] | None, bool | None]:
        engine = create_async_engine(target.url, **POOL)
        protect(engine, keepalive=9)
        records: list[t.Any] = []
        sa.event.listen(engine.sync_engine, "connect", lambda _, r: records.append(r))
        try:
            async with engine.connect() as conn:
                raw = await conn.get_raw_connection()
                fd = probe.socket_fd(raw.dbapi_connection)
                assert fd is not None
                with probe.borrowed(fd) as sock:
                    keepalive = read_keepalive(sock)
                tls = probe.uses_tls(raw.dbapi_connection)
            return records[0].info[STATE].probe, keepalive, tls
        finally:
            await engine.dispose()

    socket_probe, keepalive, tls = asyncio.run(scenario())
    assert isinstance(socket_probe, probe.TransportProbe)
    assert keepalive is not None and keepalive["idle"] == 9
    assert tls is False  # the private servers speak plain TCP


def test_idle_past_the_server_timeout(target: Target) -> None:
    target.set_idle_timeout(1)

    async def idle() -> None:
        await asyncio.sleep(1.5)  # the loop runs meanwhile, as in a served app

    outcome = after_fault(target, idle)
    assert_served(outcome)
    # Budget 0.9 s, learnt from the first connection: replaced before the server
    # could close them, with no probe needed.
    assert outcome.stats["replaced"] == {"idle_budget": 3}


@pytest.mark.parametrize("loop_ran", [True, False], ids=["loop-ran", "loop-blocked"])
def test_idle_connections_ended_by_the_server(target: Target, loop_ran: bool) -> None:
    async def end() -> None:
        target.end_idle_connections()
        if loop_ran:
            await asyncio.sleep(0.2)  # the drivers read the end meanwhile
        else:
            time.sleep(0.2)  # the loop is blocked: the end waits on the socket

    outcome = after_fault(target, end)
    assert_served(outcome)
    replaced = outcome.stats["replaced"]
    assert sum(replaced.values()) == 3
    # Caught by the probe, with no round trip: never by a ping.
    if loop_ran:
        assert set(replaced) <= LOOP_SAW_IT
    else:
        # The first checkout reads the socket before the loop does: the FIN, or
        # PostgreSQL's FATAL; by the next ones the loop may have seen the end.
        on_socket = "probe_server_error" if target.postgres else "probe_eof"
        assert on_socket in replaced
        assert set(replaced) <= LOOP_SAW_IT | {on_socket}


def test_server_restart(target: Target) -> None:
    async def restart() -> None:
        target.server.restart()
        await asyncio.sleep(0.2)

    outcome = after_fault(target, restart)
    assert_served(outcome)
    replaced = outcome.stats["replaced"]
    assert sum(replaced.values()) == 3
    assert set(replaced) <= LOOP_SAW_IT | {"probe_reset", "probe_server_error"}


def test_a_peek_leaves_the_bytes_to_the_driver(postgres: PostgresServer) -> None:
    """A NOTIFY waiting on an idle asyncpg connection: the probe peeks at it,
    a ping finds the connection alive, and asyncpg still reads the notification.
    """
    url = postgres.url.replace("+psycopg", "+asyncpg")
    heard: list[str] = []
    records: list[t.Any] = []

    async def scenario() -> dict[str, t.Any]:
        engine = create_async_engine(url, pool_size=1, max_overflow=0)
        protection = protect(engine)
        sa.event.listen(engine.sync_engine, "connect", lambda _, r: records.append(r))
        try:
            async with engine.connect() as conn:
                raw = await conn.get_raw_connection()
                assert raw.driver_connection is not None
                await raw.driver_connection.add_listener(
                    "staleguard", lambda *args: heard.append(args[-1])
                )
                before = (await conn.execute(sa.text(PG_ID))).scalar_one()
            postgres.execute("NOTIFY staleguard, 'peeked, not read'")
            time.sleep(0.1)  # the loop is blocked: the bytes wait on the socket
            socket_probe = records[0].info[STATE].probe
            assert isinstance(socket_probe, probe.TransportProbe)
            # A NotificationResponse ("A"), whole on the socket: the loop is blocked.
            verdict, data = socket_probe.check() or ("quiet", b"")
            assert verdict == probe.UNKNOWN
            assert data[:1] == b"A" and b"peeked, not read" in data
            async with engine.connect() as conn:
                after = (await conn.execute(sa.text(PG_ID))).scalar_one()
            await asyncio.sleep(0.05)  # asyncpg calls listeners soon after
            assert after == before
            return protection.stats()
        finally:
            await engine.dispose()

    stats = asyncio.run(scenario())
    # Peeked twice (here, then at checkout), read once, by asyncpg.
    assert heard == ["peeked, not read"]
    assert stats["replaced"] == {}


# A ParameterStatus message: PostgreSQL may send one to an idle client any time.
PARAMETER_STATUS = b"S" + (4 + 13).to_bytes(4, "big") + b"TimeZone\x00UTC\x00"


def test_the_probes_ping_ends_within_the_limit(postgres_url: str) -> None:
    """Bytes to ask about on an idle asyncpg connection, on a path that then
    dies: the ping is cut off at the time limit, from outside the event loop.
    """
    url = sa.make_url(postgres_url).set(drivername="postgresql+asyncpg")

    async def scenario(proxy: TcpProxy) -> tuple[int, float, dict[str, t.Any]]:
        engine = create_async_engine(
            proxy.url_for(url.render_as_string(False)), pool_size=1, max_overflow=0
        )
        protection = protect(engine, discovery_timeout=1)
        try:
            async with engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))
            assert proxy.say_and_drop(PARAMETER_STATUS) == 1
            time.sleep(0.2)  # the loop is blocked: the bytes wait on the socket
            started = time.monotonic()
            async with engine.connect() as conn:
                one = (await conn.execute(sa.text("SELECT 1"))).scalar_one()
            return one, time.monotonic() - started, protection.stats()
        finally:
            await engine.dispose()

    with TcpProxy("127.0.0.1", url.port or 5432) as proxy:
        one, elapsed, stats = asyncio.run(asyncio.wait_for(scenario(proxy), 15))
    assert one == 1  # on a new connection
    assert elapsed < 8  # generous for a loaded machine; a hang is the 15 s watchdog
    assert stats["replaced"] == {"probe_ping_timeout": 1}
