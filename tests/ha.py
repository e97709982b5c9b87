"""Real high-availability set-ups, private to the tests: a MariaDB primary and
replica, a Galera cluster, a PostgreSQL primary and streaming standby, each
behind an HAProxy whose backends are moved over its runtime API.

Everything binds to 127.0.0.1 on ports of its own and lives in temp dirs that
are removed on stop (and at exit, by tests/servers.py's bookkeeping).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import socket
import time
from collections.abc import Callable
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.servers import _make_temp_dir
from tests.servers import _ManagedProcess
from tests.servers import _remove_temp_dir
from tests.servers import as_user
from tests.servers import free_port
from tests.servers import HAPROXY
from tests.servers import LOCALHOST
from tests.servers import MARIADB_INSTALL_DB
from tests.servers import MariaDBServer
from tests.servers import PostgresServer

__all__ = [
    "GaleraCluster",
    "HAProxyPool",
    "MariaDBReplication",
    "PostgresPair",
    "PostgresStandby",
    "follow",
    "promote",
    "replay_caught_up",
    "wait_until",
]

#: How long replication, a cluster view or a promotion may take to show.
SETTLE_SECONDS = 20.0
#: Sessions through HAProxy may idle this long: only the tests end them.
_HAPROXY_IDLE = "1h"


def wait_until(
    what: str, check: Callable[[], bool], timeout: float = SETTLE_SECONDS
) -> None:
    """Poll ``check`` until it is true; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.05)


# ---------------------------------------------------------------------------


class HAProxyPool(_ManagedProcess):
    """HAProxy in TCP mode before several servers, exactly one of them active.

    New connections go to the active server; moving it (``set server ... state``
    over the stats socket) keeps the sessions already open on the old one, as
    HAProxy does, unless they are shut down with :meth:`shutdown_sessions`.
    """

    name = "haproxy"
    binary = HAPROXY
    install_hint = "haproxy"
    backend = "db"

    def __init__(self, servers: dict[str, int], active: str) -> None:
        super().__init__()
        self.servers = dict(servers)
        self.active = active

    @property
    def socket_path(self) -> Path:
        return self.log_path.with_name("admin.sock")

    def config(self, port: int) -> str:
        lines = [
            "global",
            "    maxconn 512",
            "    nbthread 1",
            f"    stats socket {self.socket_path} mode 600 level admin",
            "defaults",
            "    mode tcp",
            "    timeout connect 2s",
            f"    timeout client {_HAPROXY_IDLE}",
            f"    timeout server {_HAPROXY_IDLE}",
            f"listen {self.backend}",
            f"    bind {LOCALHOST}:{port}",
        ]
        for name, server_port in self.servers.items():
            # "disabled": in maintenance from the start, so one server is active.
            state = "" if name == self.active else " disabled"
            lines.append(f"    server {name} {LOCALHOST}:{server_port}{state}")
        return "\n".join(lines) + "\n"

    def _command(self, workdir: Path, port: int) -> list[str]:
        cfg = workdir / "haproxy.cfg"
        cfg.write_text(self.config(port))
        return [self.binary, "-f", str(cfg), "-db"]

    def command(self, line: str) -> None:
        """Send one runtime API command; raise with HAProxy's answer if any."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5.0)
            sock.connect(str(self.socket_path))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        answer = b"".join(chunks).decode().strip()
        if answer:
            raise RuntimeError(f"haproxy refused {line!r}: {answer}")

    def move_to(self, name: str) -> None:
        """Send new connections to server ``name`` only; old sessions stay put."""
        self.command(f"set server {self.backend}/{name} state ready")
        for other in self.servers:
            if other != name:
                self.command(f"set server {self.backend}/{other} state maint")
        self.active = name

    def shutdown_sessions(self, name: str) -> None:
        """Close every session HAProxy holds to server ``name``."""
        self.command(f"shutdown sessions server {self.backend}/{name}")

    def sessions(self, name: str) -> int:
        """The sessions HAProxy holds to server ``name`` now (``show stat`` scur)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5.0)
            sock.connect(str(self.socket_path))
            sock.sendall(b"show stat\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        header, *rows = data.decode().splitlines()
        columns = header.lstrip("# ").split(",")
        for row in rows:
            fields = dict(zip(columns, row.split(",")))
            if fields.get("pxname") == self.backend and fields.get("svname") == name:
                return int(fields["scur"] or 0)
        raise KeyError(name)


# ---------------------------------------------------------------------------


def _one(server: MariaDBServer, sql: str) -> Any:
    """The first value of the first row of ``sql`` run as root on ``server``."""
    return server.execute(sql, database=None)[0][0]


class MariaDBReplication:
    """A MariaDB primary and a replica (binlog, GTID) behind an HAProxyPool.

    Both start from their own datadirs with the same users and database, and
    empty binlogs; the replica is ``read_only``. :meth:`switch_over` moves the
    roles and HAProxy the way an orchestrator does, the old primary becoming
    the new one's replica.
    """

    def __init__(self, basedir: Path) -> None:
        self.servers = {
            name: MariaDBServer(
                basedir / name,
                extra_args=[
                    "--log-bin=mariadb-bin",
                    f"--server-id={server_id}",
                    "--log-slave-updates",
                    "--binlog-format=ROW",
                ],
            )
            for server_id, name in enumerate(("m1", "m2"), start=1)
        }
        self.primary, self.replica = self.servers["m1"], self.servers["m2"]
        self.haproxy = HAProxyPool({n: s.port for n, s in self.servers.items()}, "m1")

    def name_of(self, server: MariaDBServer) -> str:
        (name,) = [n for n, s in self.servers.items() if s is server]
        return name

    def start(self) -> None:
        for server in self.servers.values():
            server.start()
            # The set-up each ran on its own stays out of replication.
            server.execute("RESET MASTER", database=None)
        self.haproxy.servers = {n: s.port for n, s in self.servers.items()}
        self.haproxy.start()
        self.replica.execute("SET GLOBAL gtid_slave_pos = ''", database=None)
        self._replicate(self.replica, self.primary, "slave_pos")

    def stop(self) -> None:
        self.haproxy.stop()
        for server in self.servers.values():
            server.stop()

    @staticmethod
    def _replicate(replica: MariaDBServer, primary: MariaDBServer, gtid: str) -> None:
        """Make ``replica`` a read-only replica of ``primary``; wait until it runs."""
        replica.execute("SET GLOBAL read_only = 1", database=None)
        replica.execute(
            f"CHANGE MASTER TO MASTER_HOST = '{LOCALHOST}',"
            f" MASTER_PORT = {primary.port},"
            f" MASTER_USER = 'root', MASTER_CONNECT_RETRY = 1,"
            f" MASTER_USE_GTID = {gtid}",
            database=None,
        )
        replica.execute("START SLAVE", database=None)

        def running() -> bool:
            conn = replica._connect(database=None)
            try:
                with conn.cursor() as cur:
                    cur.execute("SHOW SLAVE STATUS")
                    row = cur.fetchone()
                    names = [d[0] for d in cur.description]
            finally:
                conn.close()
            status = dict(zip(names, row or ()))
            if status.get("Last_SQL_Error"):
                # It cannot apply the primary's events: waiting will not help.
                raise RuntimeError(f"replication failed: {status['Last_SQL_Error']}")
            threads = ("Slave_IO_Running", "Slave_SQL_Running")
            return all(status.get(name) == "Yes" for name in threads)

        wait_until("replication running", running)

    def catch_up(self) -> None:
        """Wait until the replica has applied everything the primary logged.

        One GTID domain: the replica's current position (its applied events, or
        its own binlog's when it was the primary) equals the primary's.
        """
        position = _one(self.primary, "SELECT @@global.gtid_binlog_pos")
        wait_until(
            f"replica at {position!r}",
            lambda: _one(self.replica, "SELECT @@global.gtid_current_pos") == position,
        )

    def demote(self) -> None:
        """The first step of a switchover: the primary stops taking writes."""
        self.primary.execute("SET GLOBAL read_only = 1", database=None)

    def switch_over(self, *, shut_down_sessions: bool = False) -> None:
        """Demote the primary, promote the caught-up replica, move HAProxy, and
        make the old primary a replica of the new one. HAProxy keeps the old
        primary's sessions unless ``shut_down_sessions``.
        """
        old, new = self.primary, self.replica
        self.demote()
        self.catch_up()
        new.execute("STOP SLAVE", database=None)
        new.execute("RESET SLAVE ALL", database=None)
        new.execute("SET GLOBAL read_only = 0", database=None)
        self.haproxy.move_to(self.name_of(new))
        if shut_down_sessions:
            self.haproxy.shutdown_sessions(self.name_of(old))
        self.primary, self.replica = new, old
        # The old primary's own binlog says where it stopped: current_pos.
        self._replicate(old, new, "current_pos")


# ---------------------------------------------------------------------------

GALERA_PROVIDER = "/usr/lib/galera/libgalera_smm.so"
#: Galera's state transfer script runs an rsync daemon, which as root would
#: write as `nobody`; the nodes run as `mysql` instead.
GALERA_USER = "mysql"


class GaleraNode(MariaDBServer):
    """A MariaDB Galera node run as `mysql`; ``joiner`` nodes start empty and
    receive their data by state transfer (rsync) from the cluster.
    """

    _daemon = "mariadbd (galera)"

    def __init__(self, basedir: Path, extra_args: Sequence[str], joiner: bool) -> None:
        super().__init__(basedir, extra_args=extra_args)
        self.joiner = joiner
        entry = pwd.getpwnam(GALERA_USER)
        self._owner = (entry.pw_uid, entry.pw_gid)

    def _datadir_initialised(self) -> bool:
        # A joiner's datadir is filled by the state transfer, its users included.
        return self.joiner or super()._datadir_initialised()

    def _tmpdir(self) -> Path:
        path = super()._tmpdir()
        os.chown(path, *self._owner)  # the server writes there as `mysql`
        return path

    def _init_datadir(self) -> None:
        self.datadir.mkdir(parents=True, exist_ok=True)
        os.chown(self.datadir, *self._owner)
        args = [
            MARIADB_INSTALL_DB,
            "--no-defaults",
            f"--user={GALERA_USER}",
            f"--datadir={self.datadir}",
            f"--tmpdir={self._tmpdir()}",
            "--auth-root-authentication-method=normal",
        ]
        self._run_setup_tool("mariadb-install-db", args)

    def start(self) -> None:
        self.basedir.mkdir(parents=True, exist_ok=True)
        os.chown(self.basedir, *self._owner)
        if self.joiner:
            self.datadir.mkdir(exist_ok=True)
            os.chown(self.datadir, *self._owner)
            self._initialised_marker.touch()
        super().start()

    def _command(self) -> list[str]:
        args = [a for a in super()._command() if a != "--user=root"]
        return as_user(GALERA_USER, "TERM", args)

    def status(self, name: str) -> str:
        """A ``wsrep_*`` status variable, e.g. ``wsrep_ready``."""
        rows = self.execute("SHOW STATUS LIKE %s", (name,), database=None)
        return str(rows[0][1]) if rows else ""

    def isolate(self, on: bool) -> None:
        """Cut this node off the cluster's group communication (or reconnect it)."""
        value = 1 if on else 0
        self.execute(
            f"SET GLOBAL wsrep_provider_options = 'gmcast.isolate={value}'",
            database=None,
        )


class GaleraCluster:
    """Three Galera nodes on 127.0.0.1, behind an HAProxyPool (node g1 active).

    Each node has its own client, group (gmcast), IST and SST port; the first
    bootstraps the cluster, the others join it by state transfer.
    """

    #: Group communication timeouts shorter than the 5 s default, so a node
    #: cut off leaves the view within a few seconds, yet loose enough for a
    #: loaded machine.
    _EVS = (
        "evs.suspect_timeout=PT3S;evs.inactive_timeout=PT4S;"
        "evs.inactive_check_period=PT0.5S;evs.keepalive_period=PT0.5S"
    )

    def __init__(self) -> None:
        # Galera runs as `mysql`, who cannot enter pytest's private tmp dirs.
        self.basedir = Path(_make_temp_dir("sg-galera-"))
        self.basedir.chmod(0o755)
        names = ("g1", "g2", "g3")
        group = {name: free_port() for name in names}
        cluster = ",".join(f"{LOCALHOST}:{port}" for port in group.values())
        self.nodes: dict[str, GaleraNode] = {}
        for index, name in enumerate(names):
            gport, ist, sst = group[name], free_port(), free_port()
            options = (
                f"gmcast.listen_addr=tcp://{LOCALHOST}:{gport};"
                f"ist.recv_addr={LOCALHOST}:{ist};base_port={gport};"
                f"gcache.size=16M;{self._EVS}"
            )
            args = [
                "--wsrep-on=ON",
                f"--wsrep-provider={GALERA_PROVIDER}",
                "--wsrep-cluster-name=staleguard",
                f"--wsrep-cluster-address=gcomm://{cluster}",
                f"--wsrep-node-name={name}",
                f"--wsrep-node-address={LOCALHOST}:{gport}",
                f"--wsrep-provider-options={options}",
                f"--wsrep-sst-receive-address={LOCALHOST}:{sst}",
                "--wsrep-sst-method=rsync",
                "--binlog-format=ROW",
                "--default-storage-engine=InnoDB",
                "--innodb-autoinc-lock-mode=2",
                "--innodb-buffer-pool-size=32M",
                "--innodb-log-file-size=16M",
            ]
            if index == 0:
                args.append("--wsrep-new-cluster")
            self.nodes[name] = GaleraNode(self.basedir / name, args, joiner=index > 0)
        self.haproxy = HAProxyPool({n: s.port for n, s in self.nodes.items()}, "g1")

    def start(self) -> None:
        for node in self.nodes.values():
            node.start()
            # A restart must join the cluster, never found a second one.
            with contextlib.suppress(ValueError):
                node.extra_args.remove("--wsrep-new-cluster")
        self.wait_for_view(set(self.nodes))
        self.haproxy.servers = {n: s.port for n, s in self.nodes.items()}
        self.haproxy.start()

    def wait_for_view(self, members: set[str]) -> None:
        """Wait until exactly ``members`` form the primary component, synced."""
        size = str(len(members))

        def formed() -> bool:
            return all(
                self.nodes[name].status("wsrep_cluster_size") == size
                and self.nodes[name].status("wsrep_local_state_comment") == "Synced"
                and self.nodes[name].status("wsrep_ready") == "ON"
                for name in members
            )

        wait_until(f"galera view {sorted(members)}", formed)

    def stop(self) -> None:
        self.haproxy.stop()
        for node in reversed(list(self.nodes.values())):
            node.stop()
        _remove_temp_dir(str(self.basedir))


# ---------------------------------------------------------------------------


class PostgresStandby(PostgresServer):
    """A PostgreSQL streaming standby, its datadir a ``pg_basebackup -R`` of
    ``primary``; :meth:`follow` turns a stopped server into a standby too.
    """

    def __init__(self, basedir: Path, primary: PostgresServer) -> None:
        super().__init__(basedir, settings=primary.settings, bindir=primary.bindir)
        self.primary = primary

    def _init_datadir(self) -> None:
        args = [
            str(self.bindir / "pg_basebackup"),
            "-h",
            LOCALHOST,
            "-p",
            str(self.primary.port),
            "-U",
            "postgres",
            "-D",
            str(self.datadir),
            "-R",
            "-X",
            "stream",
            "--no-sync",
            "--checkpoint=fast",
        ]
        self._run_setup_tool("pg_basebackup", self._as_owner(args))

    def _first_start_setup(self) -> None:
        """The database came with the base backup."""


def follow(server: PostgresServer, primary: PostgresServer) -> None:
    """Restart the stopped ``server`` as a streaming standby of ``primary``,
    as Patroni does with a demoted primary after a switchover.
    """
    if server.running:
        raise RuntimeError("stop the server before it follows another")
    conninfo = f"host={LOCALHOST} port={primary.port} user=postgres"
    auto = server.datadir / "postgresql.auto.conf"
    lines = [
        line
        for line in auto.read_text().splitlines()
        if not line.startswith("primary_conninfo")
    ]
    lines.append(f"primary_conninfo = '{conninfo}'")
    auto.write_text("\n".join(lines) + "\n")
    signal_file = server.datadir / "standby.signal"
    signal_file.touch()
    owner = server.datadir.stat()
    os.chown(signal_file, owner.st_uid, owner.st_gid)
    server.start()


def promote(server: PostgresServer) -> None:
    """Promote a standby and wait until it takes writes."""
    (ok,) = server.execute("SELECT pg_promote(true, 20)", database="postgres")[0]
    if not ok:
        raise TimeoutError(f"{server!r} was not promoted within 20 s")


def replay_caught_up(primary: PostgresServer, standby: PostgresServer) -> None:
    """Wait until ``standby`` has replayed everything ``primary`` has written."""
    # The insert position: with synchronous_commit off, the last commits may not
    # be written yet (the WAL writer writes them within wal_writer_delay).
    sql = "SELECT pg_current_wal_insert_lsn()::text"
    (lsn,) = primary.execute(sql, database="postgres")[0]

    def replayed() -> bool:
        rows = standby.execute(
            "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,), database="postgres"
        )
        return bool(rows[0][0])

    wait_until("standby replay", replayed)


class PostgresPair:
    """A PostgreSQL primary and its streaming standby behind an HAProxyPool."""

    def __init__(self, basedir: Path) -> None:
        first = PostgresServer(basedir / "p1")
        self.servers: dict[str, PostgresServer] = {
            "p1": first,
            "p2": PostgresStandby(basedir / "p2", first),
        }
        self.primary, self.standby = self.servers["p1"], self.servers["p2"]
        self.haproxy = HAProxyPool({}, "p1")

    def name_of(self, server: PostgresServer) -> str:
        (name,) = [n for n, s in self.servers.items() if s is server]
        return name

    def start(self) -> None:
        for server in self.servers.values():
            server.start()
        self.haproxy.servers = {n: s.port for n, s in self.servers.items()}
        self.haproxy.start()

    def swap(self) -> None:
        """After a promotion: the standby is the primary and vice versa."""
        self.primary, self.standby = self.standby, self.primary

    def stop(self) -> None:
        self.haproxy.stop()
        for server in self.servers.values():
            server.remove()
