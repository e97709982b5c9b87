"""Failover on real high-availability set-ups (tests/ha.py), behind HAProxy.

In each scenario two apps, one bare and one guarded, fill their pools through
HAProxy before the failover, as two processes of a service would; then each
makes the same writes. The counts of failed writes are printed for the docs.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from flask import Flask

from tests.ha import follow
from tests.ha import GaleraCluster
from tests.ha import MariaDBReplication
from tests.ha import PostgresPair
from tests.ha import promote
from tests.ha import replay_caught_up
from tests.ha import wait_until
from tests.helpers import AppFactory
from tests.helpers import failed_writes
from tests.helpers import stats
from tests.servers import MariaDBServer
from tests.servers import PostgresServer

#: Starts servers, proxies and clusters of its own.
pytestmark = pytest.mark.integration

POOL = {"pool_size": 5, "max_overflow": 0}
WRITES = 20
MYSQL_TABLE = "CREATE TABLE moves (id SERIAL PRIMARY KEY, node INT)"
PG_TABLE = "CREATE TABLE moves (id SERIAL PRIMARY KEY, node INT)"


def writing_app(make_app: AppFactory, url: str, guard: bool, node: str) -> Flask:
    """An app whose ``POST /w`` inserts a row naming its node (SQL ``node``),
    its pool filled with connections to wherever HAProxy leads now.
    """
    app, db = make_app(url, guard=guard, SQLALCHEMY_ENGINE_OPTIONS=POOL)

    @app.post("/w")
    def write() -> str:
        db.session.execute(sa.text(f"INSERT INTO moves (node) SELECT {node}"))
        db.session.commit()
        return "ok"

    with app.app_context():
        conns = [db.engine.connect() for _ in range(POOL["pool_size"])]
        for conn in conns:
            conn.execute(sa.text("SELECT 1"))
            conn.close()
    return app


def rows(server: MariaDBServer | PostgresServer, node: int) -> int:
    """Rows on ``server`` written on node ``node``."""
    sql = "SELECT count(*) FROM moves WHERE node = %s"
    return int(server.execute(sql, (node,))[0][0])


def assert_probe_saved_all(bare_failed: int, guarded: Flask) -> None:
    """The sessions ended with the failover: bare, the first write fails and
    SQLAlchemy invalidates the pool; the guard's socket check at checkout
    replaces each dead connection before any write is sent on it.
    """
    assert bare_failed == 1
    assert sum(stats(guarded)["replaced"].values()) == POOL["pool_size"]
    assert stats(guarded)["disconnects"] == {}


def report(scenario: str, bare: int, guarded: int) -> None:
    print(f"{scenario}: {WRITES} writes each, failed bare {bare}, guarded {guarded}")


# -- MariaDB primary and replica ---------------------------------------------


@pytest.fixture(scope="module")
def replication(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[MariaDBReplication]:
    basedir = tmp_path_factory.mktemp("replication")
    pair = MariaDBReplication(basedir)
    try:
        pair.start()
        pair.primary.execute(MYSQL_TABLE)
        pair.catch_up()
        yield pair
    finally:
        pair.stop()
        shutil.rmtree(basedir, ignore_errors=True)


def _server_id(server: MariaDBServer) -> int:
    return int(server.execute("SELECT @@server_id")[0][0])


@pytest.mark.parametrize("shut_down", [False, True], ids=["kept", "shut-down"])
def test_mariadb_switchover(
    make_app: AppFactory, replication: MariaDBReplication, shut_down: bool
) -> None:
    old = replication.primary
    url = replication.haproxy.url_for(old.user_url)
    guarded = writing_app(make_app, url, True, "@@server_id")
    bare = writing_app(make_app, url, False, "@@server_id")
    old_name = replication.name_of(old)
    assert replication.haproxy.sessions(old_name) == 2 * POOL["pool_size"]

    replication.switch_over(shut_down_sessions=shut_down)
    new = replication.primary
    # HAProxy keeps the old sessions after the move, unless told otherwise.
    left = 0 if shut_down else 2 * POOL["pool_size"]
    wait_until("sessions", lambda: replication.haproxy.sessions(old_name) == left)
    assert _server_id(new) != _server_id(old)
    before = rows(new, _server_id(new))
    failed = failed_writes(bare, WRITES), failed_writes(guarded, WRITES)
    sessions = "shut down" if shut_down else "kept"
    report(f"MariaDB switchover, sessions {sessions}", *failed)

    bare_failed, guard_failed = failed
    # Every write that did not fail landed on the new primary, and replicates.
    assert rows(new, _server_id(new)) - before == 2 * WRITES - sum(failed)
    replication.catch_up()
    assert rows(old, _server_id(new)) == rows(new, _server_id(new))
    if shut_down:
        assert guard_failed == 0
        assert_probe_saved_all(bare_failed, guarded)
    else:
        # HAProxy kept them on the demoted primary: bare, every write fails.
        assert bare_failed == WRITES
        assert guard_failed <= 1
        assert stats(guarded)["disconnects"] == {"read_only": 1}


# -- Galera --------------------------------------------------------------------


@pytest.fixture(scope="module")
def galera() -> Iterator[GaleraCluster]:
    cluster = GaleraCluster()
    try:
        cluster.start()
        cluster.nodes["g1"].execute(MYSQL_TABLE)
        yield cluster
    finally:
        cluster.stop()


def test_galera_node_leaves_the_primary_component(
    make_app: AppFactory, galera: GaleraCluster
) -> None:
    name = galera.haproxy.active
    node = galera.nodes[name]
    url = galera.haproxy.url_for(node.user_url)
    guarded = writing_app(make_app, url, True, "@@port")
    bare = writing_app(make_app, url, False, "@@port")

    node.isolate(True)
    try:
        others = set(galera.nodes) - {name}
        wait_until("isolated", lambda: node.status("wsrep_ready") == "OFF")
        galera.wait_for_view(others)
        target = min(others)
        galera.haproxy.move_to(target)
        before = rows(galera.nodes[target], galera.nodes[target].port)
        failed = failed_writes(bare, WRITES), failed_writes(guarded, WRITES)
        report("Galera node out of the primary component (1047)", *failed)
        landed = rows(galera.nodes[target], galera.nodes[target].port) - before
    finally:
        node.isolate(False)
    galera.wait_for_view(set(galera.nodes))

    bare_failed, guard_failed = failed
    assert landed == 2 * WRITES - sum(failed)
    # Bare, each pooled connection fails one write, then its rollback fails too
    # and the pool discards it: one failure per pooled connection.
    assert bare_failed == POOL["pool_size"]
    assert guard_failed <= 1
    assert stats(guarded)["disconnects"] == {"wsrep_not_ready": 1}


def test_galera_node_killed(make_app: AppFactory, galera: GaleraCluster) -> None:
    name = galera.haproxy.active
    node = galera.nodes[name]
    url = galera.haproxy.url_for(node.user_url)
    guarded = writing_app(make_app, url, True, "@@port")
    bare = writing_app(make_app, url, False, "@@port")

    node.kill()
    others = set(galera.nodes) - {name}
    target = min(others)
    galera.haproxy.move_to(target)
    galera.wait_for_view(others)
    before = rows(galera.nodes[target], galera.nodes[target].port)
    failed = failed_writes(bare, WRITES), failed_writes(guarded, WRITES)
    report("Galera node killed", *failed)

    landed = rows(galera.nodes[target], galera.nodes[target].port) - before
    assert landed == 2 * WRITES - sum(failed)
    assert failed[1] == 0
    assert_probe_saved_all(failed[0], guarded)


# -- PostgreSQL primary and streaming standby ----------------------------------


@pytest.fixture(scope="module")
def streaming(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresPair]:
    basedir = tmp_path_factory.mktemp("streaming")
    pair = PostgresPair(basedir)
    try:
        pair.start()
        pair.primary.execute(PG_TABLE)
        replay_caught_up(pair.primary, pair.standby)
        yield pair
    finally:
        pair.stop()
        shutil.rmtree(basedir, ignore_errors=True)


PG_NODE = "current_setting('port')::int"


def test_postgres_switchover_restarts_the_old_primary_as_standby(
    make_app: AppFactory, streaming: PostgresPair
) -> None:
    old, new = streaming.primary, streaming.standby
    url = streaming.haproxy.url_for(old.url)
    guarded = writing_app(make_app, url, True, PG_NODE)
    bare = writing_app(make_app, url, False, PG_NODE)

    # Patroni's switchover: stop the primary (its sessions end), promote the
    # standby, move the proxy, restart the old primary as the new one's standby.
    old.stop()
    promote(new)
    streaming.haproxy.move_to(streaming.name_of(new))
    follow(old, new)
    streaming.swap()
    before = rows(new, new.port)
    failed = failed_writes(bare, WRITES), failed_writes(guarded, WRITES)
    report("PostgreSQL switchover, old primary restarted as standby", *failed)

    assert rows(new, new.port) - before == 2 * WRITES - sum(failed)
    replay_caught_up(new, old)
    assert rows(old, new.port) == rows(new, new.port)
    assert failed[1] == 0
    assert_probe_saved_all(failed[0], guarded)


def test_postgres_soft_demotion(make_app: AppFactory, streaming: PostgresPair) -> None:
    old, new = streaming.primary, streaming.standby
    url = streaming.haproxy.url_for(old.url)
    guarded = writing_app(make_app, url, True, PG_NODE)
    bare = writing_app(make_app, url, False, PG_NODE)

    # The old primary stays up, read-only, and keeps its sessions.
    old.alter_system("default_transaction_read_only", "on")
    replay_caught_up(old, new)
    promote(new)
    streaming.haproxy.move_to(streaming.name_of(new))
    streaming.swap()
    before = rows(new, new.port)
    failed = failed_writes(bare, WRITES), failed_writes(guarded, WRITES)
    report("PostgreSQL soft demotion (default_transaction_read_only)", *failed)

    assert rows(new, new.port) - before == 2 * WRITES - sum(failed)
    assert failed[0] == WRITES
    assert failed[1] <= 1
    assert stats(guarded)["disconnects"] == {"read_only": 1}
