"""``flask_staleguard.protect(engine)``: the pool guard without Flask, on engines a
script, a job or a FastAPI app makes itself; real servers, no app context.
"""

from __future__ import annotations

import asyncio
import time
import typing as t
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from flask_staleguard import ConfigError
from flask_staleguard import protect
from flask_staleguard.core import probe
from flask_staleguard.core.keepalive import read_keepalive
from tests.helpers import outlive
from tests.servers import MariaDBServer
from tests.servers import PostgresServer

POOL = {"pool_size": 3, "max_overflow": 0}


@pytest.fixture()
def engines() -> Iterator[list[sa.engine.Engine]]:
    made: list[sa.engine.Engine] = []
    yield made
    for engine in made:
        engine.dispose()


def engine_for(url: str, made: list[sa.engine.Engine], **kw: t.Any) -> sa.engine.Engine:
    engine = sa.create_engine(url, **{**POOL, **kw})
    made.append(engine)
    return engine


def warm(engine: sa.engine.Engine, sql: str, n: int = 3) -> set[int]:
    """``n`` pooled connections; their server ids."""
    conns = [engine.connect() for _ in range(n)]
    try:
        return {int(c.execute(sa.text(sql)).scalar_one()) for c in conns}
    finally:
        for c in conns:
            c.close()


def ids(engine: sa.engine.Engine, sql: str, n: int = 6) -> list[int]:
    found = []
    for _ in range(n):
        with engine.connect() as conn:
            found.append(int(conn.execute(sa.text(sql)).scalar_one()))
    return found


def served_after_fault(
    engine: sa.engine.Engine, sql: str, protection: t.Any
) -> list[int]:
    """The server ids of six checkouts after a fault; without the guard (no
    ``protection``) the first one fails, and nothing is returned.
    """
    if protection is None:
        with pytest.raises(sa.exc.OperationalError):
            ids(engine, sql)
        return []
    return ids(engine, sql)


MYSQL_ID = "SELECT CONNECTION_ID()"
PG_ID = "SELECT pg_backend_pid()"


@pytest.mark.parametrize("guarded", [True, False])
def test_idle_past_wait_timeout(
    short_timeout: MariaDBServer, engines: list[sa.engine.Engine], guarded: bool
) -> None:
    engine = engine_for(short_timeout.url, engines)
    protection = protect(engine) if guarded else None
    before = warm(engine, MYSQL_ID)
    outlive(short_timeout, before)  # the server's wait_timeout of 2 s ran out
    after = served_after_fault(engine, MYSQL_ID, protection)
    if protection is None:
        return
    assert not before & set(after)
    stats = protection.stats()
    # Learnt from the first connection: 2 s, so a budget of 1.8 s.
    assert protection.guard.idle.server_timeout == 2
    assert stats["replaced"] == {"idle_budget": 3}
    assert stats["checkouts"] >= 9


@pytest.mark.parametrize("guarded", [True, False])
def test_killed_idle_connections(
    mariadb: MariaDBServer, engines: list[sa.engine.Engine], guarded: bool
) -> None:
    engine = engine_for(mariadb.url, engines)
    protection = protect(engine) if guarded else None
    before = warm(engine, MYSQL_ID)
    mariadb.kill_connections()
    time.sleep(0.2)
    after = served_after_fault(engine, MYSQL_ID, protection)
    if protection is None:
        return
    assert not before & set(after)
    # Caught by the socket probe, with no round trip; no ping involved.
    assert protection.stats()["replaced"] == {"probe_eof": 3}


def test_server_restart(
    mariadb: MariaDBServer, engines: list[sa.engine.Engine]
) -> None:
    engine = engine_for(mariadb.url, engines)
    protection = protect(engine)
    warm(engine, MYSQL_ID)
    mariadb.restart()
    ids(engine, MYSQL_ID)  # every one works
    replaced = protection.stats()["replaced"]
    assert sum(replaced.values()) == 3
    assert set(replaced) <= {"probe_eof", "probe_reset"}


@pytest.mark.parametrize("guarded", [True, False])
def test_terminated_postgres_backends(
    postgres: PostgresServer, engines: list[sa.engine.Engine], guarded: bool
) -> None:
    engine = engine_for(postgres.url, engines)
    protection = protect(engine) if guarded else None
    before = warm(engine, PG_ID)
    postgres.terminate_backends()
    after = served_after_fault(engine, PG_ID, protection)
    if protection is None:
        return
    assert not before & set(after)
    # The server's FATAL on each idle connection, read by the probe: no ping.
    assert protection.stats()["replaced"] == {"probe_server_error": 3}


@pytest.mark.parametrize("guarded", [True, False])
def test_an_async_engine(postgres: PostgresServer, guarded: bool) -> None:
    async def scenario() -> tuple[set[int], list[int], dict[str, t.Any] | None]:
        engine = create_async_engine(postgres.url, **POOL)
        protection = protect(engine) if guarded else None
        try:
            conns = [await engine.connect() for _ in range(3)]
            before = set()
            for conn in conns:
                before.add(int((await conn.execute(sa.text(PG_ID))).scalar_one()))
            for conn in conns:
                await conn.close()
            postgres.terminate_backends()
            after = []
            for _ in range(6):
                async with engine.connect() as conn:
                    after.append(int((await conn.execute(sa.text(PG_ID))).scalar_one()))
            return before, after, None if protection is None else protection.stats()
        finally:
            await engine.dispose()

    if not guarded:
        with pytest.raises(sa.exc.DBAPIError):
            asyncio.run(scenario())
        return
    before, after, stats = asyncio.run(scenario())
    assert not before & set(after)
    # The socket behind the asyncio adapter is probed as the sync drivers' are.
    assert stats is not None and stats["replaced"] == {"probe_server_error": 3}


def test_keepalive_and_user_options(
    mariadb_url: str, engines: list[sa.engine.Engine]
) -> None:
    engine = engine_for(mariadb_url, engines, pool_recycle=600)
    protection = protect(engine, strategy="recycle", keepalive=9)
    with engine.connect() as conn:
        fd = probe.socket_fd(conn.connection.dbapi_connection)
        assert fd is not None
        with probe.borrowed(fd) as sock:
            found = read_keepalive(sock)
    assert found is not None and found["idle"] == 9
    # The user's pool_recycle wins over the one derived from the budget.
    assert engine.pool._recycle == 600  # about internals: the pool's own setting
    assert protection.guard.applied == {}


def test_a_connection_pooled_before_protect_gets_keepalive_too(
    mariadb_url: str, engines: list[sa.engine.Engine]
) -> None:
    engine = engine_for(mariadb_url, engines)
    engine.connect().close()  # pooled before the guard: no connect listener ran
    protect(engine, keepalive=9)

    def keepalive() -> t.Any:
        with engine.connect() as conn:
            fd = probe.socket_fd(conn.connection.dbapi_connection)
            assert fd is not None
            with probe.borrowed(fd) as sock:
                return read_keepalive(sock)

    first = keepalive()  # the same connection: taken over at this checkin
    assert first is None or first["idle"] != 9
    found = keepalive()
    assert found is not None and found["idle"] == 9


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"strategy": "ping"}, "strategy is 'ping'; accepted values are:"),
        ({"idle_timout": 5}, "unknown option 'idle_timout'; it takes: strategy,"),
        ({"keepalive": 0}, "keepalive is 0; expected a number of seconds"),
        ({"role": "primary"}, "role is 'primary'; accepted values are: 'auto',"),
        ({"max_lifetime": 0}, "max_lifetime is 0; expected a number of seconds"),
        ({"max_lifetime": -1}, "max_lifetime is -1; expected a number of seconds"),
        ({"max_lifetime": 7201}, "max_lifetime is 7201; .* at most 7200 (Flask-"),
        ({"max_lifetime": True}, "max_lifetime is True; expected a number of"),
        ({"max_lifetime": "x"}, "max_lifetime is 'x'; expected a number of"),
        ({"max_lifetime": None}, "max_lifetime is None; expected a number of"),
        ({"connect_timeout": 0}, "connect_timeout is 0; expected a number of"),
        ({"connect_wait": -1}, "connect_wait is -1; expected a number of seconds 0"),
        ({"leaks": "raise"}, "no 'leaks' option: leaks are judged when an app"),
    ],
)
def test_options_are_validated(
    mariadb_url: str,
    engines: list[sa.engine.Engine],
    options: dict[str, t.Any],
    message: str,
) -> None:
    engine = engine_for(mariadb_url, engines)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        protect(engine, **options)
