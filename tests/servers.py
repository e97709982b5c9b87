"""Private, throw-away database servers and middleboxes for tests.

Everything binds to 127.0.0.1 on ports picked here, so the shared MariaDB (3306) and
PostgreSQL (5432) are never reconfigured or restarted by the test suite.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import functools
import os
import pwd
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any
from typing import IO
from typing import TypeVar

import psycopg
import pymysql  # type: ignore[import-untyped, unused-ignore]
import pymysql.cursors  # type: ignore[import-untyped, unused-ignore]
from psycopg.rows import dict_row
from sqlalchemy.engine import make_url

__all__ = [
    "APP_PASSWORD",
    "APP_USER",
    "DB_NAME",
    "HAProxy",
    "MariaDBServer",
    "PgBouncer",
    "PostgresServer",
    "ServerStartError",
    "free_port",
]

LOCALHOST = "127.0.0.1"
MARIADB_INSTALL_DB = "/usr/bin/mariadb-install-db"
MARIADBD = "/usr/sbin/mariadbd"
HAPROXY = "/usr/sbin/haproxy"
PGBOUNCER = "/usr/sbin/pgbouncer"

DB_NAME = "staleguard"
APP_USER = "sg"
APP_PASSWORD = "s3cr3t-pw"

_STOP_GRACE_SECONDS = 15.0
_START_TIMEOUT_SECONDS = 20.0
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Unix socket paths are limited to 108 bytes; pytest's tmp paths can come close.
_MAX_SOCKET_PATH = 100

_D = TypeVar("_D", bound="_Daemon")


class ServerStartError(RuntimeError):
    """A helper process did not come up; the message carries its log tail."""


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out as a client's source port."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


#: Where free_port() looks: below the ephemeral range, so no client connection
#: (of this run or of a tox env running beside it) takes a stopped server's port
#: as its source port before the server restarts on it.
_PORTS = range(20000, max(20001, min(_ephemeral_low(), 32768)))


def free_port() -> int:
    """Return a 127.0.0.1 TCP port that was free a moment ago (racy, fine for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        for port in random.sample(_PORTS, min(64, len(_PORTS))):
            try:
                sock.bind((LOCALHOST, port))
                return port
            except OSError:
                continue
        sock.bind((LOCALHOST, 0))  # all tried were taken: let the kernel choose
        found: int = sock.getsockname()[1]
        return found


def as_user(user: str, death_signal: str, args: Sequence[str]) -> list[str]:
    """``args`` under ``setpriv``, as ``user``, signalled when this process dies.

    setpriv drops privileges first and then sets the parent-death signal, which a
    credential change would otherwise clear. The signal fires when the *thread*
    that started the child exits, so a server started from another thread than
    the main one gets none.
    """
    main = threading.current_thread() is threading.main_thread()
    return [
        "setpriv",
        f"--reuid={user}",
        f"--regid={user}",
        "--init-groups",
        f"--pdeathsig={death_signal if main else 'clear'}",
        "--",
        *args,
    ]


def wait_for_port(
    host: str, port: int, timeout: float, alive: Callable[[], bool]
) -> bool:
    """Poll until (host, port) accepts TCP; False on timeout or once `alive()` fails."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            return False
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def log_tail(path: Path, lines: int = 40) -> str:
    """Last lines of a log file, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


# ---------------------------------------------------------------------------
# Bookkeeping: every child is stopped (and every temp dir removed) at interpreter
# exit; children started from the main thread also die if pytest itself is killed.

_live_lock = threading.Lock()
_live: set[subprocess.Popen[bytes]] = set()
_temp_dirs: set[str] = set()

_PR_SET_PDEATHSIG = 1
_libc_prctl: Callable[..., int] | None
try:
    # Resolved before any fork: looking symbols up in the child could deadlock.
    _libc_prctl = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).prctl
except (OSError, AttributeError):
    _libc_prctl = None


def _die_with_parent() -> None:
    if _libc_prctl is not None:
        _libc_prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _spawn(args: Sequence[str], log: IO[bytes]) -> subprocess.Popen[bytes]:
    # PDEATHSIG fires when the *thread* that forked exits, so it is only armed from
    # the main thread; children started elsewhere rely on atexit alone.
    main = threading.current_thread() is threading.main_thread()
    proc = subprocess.Popen(
        list(args),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        # Ctrl-C belongs to pytest; the children are shut down in order by us.
        start_new_session=True,
        preexec_fn=_die_with_parent if main else None,
    )
    with _live_lock:
        _live.add(proc)
    return proc


def _terminate(
    proc: subprocess.Popen[bytes], grace: float = _STOP_GRACE_SECONDS
) -> None:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL; fine on a dead process."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
    with _live_lock:
        _live.discard(proc)


def _alive(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is None


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
    with _live_lock:
        _live.discard(proc)


def _make_temp_dir(prefix: str) -> str:
    path = tempfile.mkdtemp(prefix=prefix)
    with _live_lock:
        _temp_dirs.add(path)
    return path


def _remove_temp_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    with _live_lock:
        _temp_dirs.discard(path)


@atexit.register
def _stop_all_children() -> None:
    with _live_lock:
        procs = list(_live)
        dirs = list(_temp_dirs)
    # Signal everyone first so the shutdowns run in parallel.
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
    for proc in procs:
        _terminate(proc)
    for path in dirs:
        _remove_temp_dir(path)


# ---------------------------------------------------------------------------


class _Daemon:
    """A helper process on 127.0.0.1: start, stop, restart, or use in a `with` block."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return LOCALHOST

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        """What leaving a `with` block does."""
        self.stop()

    def restart(self) -> None:
        """Stop and start again on the same port."""
        self.stop()
        self.start()

    def __enter__(self: _D) -> _D:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._close()


class _PrivateServer(_Daemon):
    """A private database server with its own datadir and port; the shared lifecycle.

    Subclasses fill in the template methods: whether the datadir is initialised and
    how to initialise it, the command line, the readiness probe, and the setup done
    on the very first start. Stopping sends SIGTERM (SIGKILL after a grace period)
    and killing sends SIGKILL unless `_shutdown` / `_crash` say otherwise;
    restart() keeps the port and datadir.
    """

    _daemon = "server"  # the executable's name, for error messages
    _address_in_use = "already in use"  # its log text when the port is taken
    _not_ready: tuple[type[Exception], ...] = (OSError,)  # raised by _probe()
    _url_scheme = ""  # SQLAlchemy dialect+driver
    _admin_user = ""  # the passwordless superuser

    def __init__(self, basedir: Path, port: int | None, log_name: str) -> None:
        super().__init__()
        self.basedir = Path(basedir).resolve()
        self.log_path = self.basedir / log_name
        self._port_fixed = port is not None
        self._port = port if port is not None else free_port()

    # -- addresses -----------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return self._url_as(self._admin_user)

    def _url_as(self, userinfo: str) -> str:
        return f"{self._url_scheme}://{userinfo}@{LOCALHOST}:{self._port}/{DB_NAME}"

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    # -- template methods ----------------------------------------------------

    def _datadir_initialised(self) -> bool:
        raise NotImplementedError

    def _init_datadir(self) -> None:
        raise NotImplementedError

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _probe(self) -> None:
        """Open and close an admin connection; raise one of `_not_ready` if refused."""
        raise NotImplementedError

    def _first_start_setup(self) -> None:
        raise NotImplementedError

    def _runtime_dir(self) -> Path:
        """Where the first-start marker lives."""
        return self.basedir

    def _adopt(self, proc: subprocess.Popen[bytes]) -> None:
        self._proc = proc

    def _forget(self, proc: subprocess.Popen[bytes]) -> None:
        if self._proc is proc:
            self._proc = None

    def _shutdown(
        self, proc: subprocess.Popen[bytes], grace: float = _STOP_GRACE_SECONDS
    ) -> None:
        """Graceful shutdown: SIGTERM, then SIGKILL after `grace` seconds."""
        self._forget(proc)
        _terminate(proc, grace)

    def _crash(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL, as in a crash."""
        self._forget(proc)
        _kill(proc)

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Start the server (initialising its datadir on first use); wait for logins."""
        if self.running:
            return
        self.basedir.mkdir(parents=True, exist_ok=True)
        if not self._datadir_initialised():
            self._init_datadir()
        # A free_port() port can be grabbed by someone else before the server binds
        # it; only a port nobody has used yet may be swapped for another one.
        first = not (self._port_fixed or self._initialised_marker.exists())
        attempts = 3 if first else 1
        for attempt in range(attempts):
            try:
                self._launch()
                break
            except ServerStartError:
                in_use = self._address_in_use in log_tail(self.log_path, 10)
                if attempt + 1 == attempts or not in_use:
                    raise
                self._port = free_port()
        if not self._initialised_marker.exists():
            self._first_start_setup()
            self._initialised_marker.touch()
        self._port_fixed = True

    @property
    def _initialised_marker(self) -> Path:
        return self._runtime_dir() / ".staleguard-initialised"

    def _run_setup_tool(self, name: str, args: Sequence[str]) -> None:
        """Run a datadir initialiser to completion, its output going to the log."""
        with self.log_path.open("ab") as log:
            result = subprocess.run(
                list(args),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=120,
                check=False,
            )
        if result.returncode != 0:
            raise ServerStartError(
                f"{name} failed ({result.returncode}):\n{log_tail(self.log_path)}"
            )

    def _launch(self) -> None:
        args = self._command()
        with self.log_path.open("ab") as log:
            stamp = time.strftime("%H:%M:%S")
            log.write(f"\n=== {stamp} starting: {' '.join(args)}\n".encode())
            log.flush()
            proc = _spawn(args, log)
        self._adopt(proc)
        deadline = time.monotonic() + _START_TIMEOUT_SECONDS
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self._forget(proc)
                raise ServerStartError(
                    f"{self._daemon} exited with {proc.returncode} while starting on "
                    f"port {self._port}:\n{log_tail(self.log_path)}"
                )
            try:
                self._probe()
                return
            except self._not_ready as exc:
                last_error = exc
                time.sleep(0.1)
        self._shutdown(proc, grace=5.0)
        raise ServerStartError(
            f"{self._daemon} on port {self._port} did not accept connections within "
            f"{_START_TIMEOUT_SECONDS:.0f} s (last error: {last_error!r}):\n"
            f"{log_tail(self.log_path)}"
        )

    def stop(self) -> None:
        """Shut the server down (see `_shutdown`); a no-op if not running."""
        proc = self._proc
        if proc is not None:
            self._shutdown(proc)

    def kill(self) -> None:
        """SIGKILL the server (see `_crash`), as in a crash; start() recovers."""
        proc = self._proc
        if proc is not None:
            self._crash(proc)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} {self.basedir} port={self._port} {state}>"


class MariaDBServer(_PrivateServer):
    """A private mariadbd with its own datadir and port: restart, kill, reconfigure it.

    Root has no password; `sg` has all privileges on `staleguard.*` only (no PROCESS).
    Stopping is graceful (SIGTERM, SIGKILL after 15 s); after a kill, the next
    start() recovers InnoDB.
    """

    _daemon = "mariadbd"
    _url_scheme = "mysql+pymysql"
    _admin_user = "root"
    _address_in_use = "Address already in use"
    _not_ready = (pymysql.err.MySQLError,)

    def __init__(
        self,
        basedir: Path,
        port: int | None = None,
        *,
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(basedir, port, "mariadbd.log")
        self.datadir = self.basedir / "data"
        self.pid_path = self.basedir / "mariadbd.pid"
        self.extra_args = list(extra_args)
        sock = self.basedir / "mariadbd.sock"
        if len(str(sock)) > _MAX_SOCKET_PATH:
            sock = Path(_make_temp_dir("sg-mariadb-")) / "mariadbd.sock"
        self.socket_path = sock

    def _tmpdir(self) -> Path:
        """The server's own tmpdir. In the shared /tmp, a MariaDB starting up
        deletes every ``#sql*`` file, another server's bootstrap tables too, and
        that server's mariadb-install-db fails.
        """
        tmpdir = self.basedir / "tmp"
        tmpdir.mkdir(parents=True, exist_ok=True)
        return tmpdir

    # -- addresses -----------------------------------------------------------

    @property
    def user_url(self) -> str:
        return self._url_as(f"{APP_USER}:{APP_PASSWORD}")

    # -- lifecycle -----------------------------------------------------------

    def _datadir_initialised(self) -> bool:
        return (self.datadir / "mysql").is_dir()

    def _init_datadir(self) -> None:
        self.datadir.mkdir(parents=True, exist_ok=True)
        args = [
            MARIADB_INSTALL_DB,
            "--no-defaults",
            "--user=root",
            f"--datadir={self.datadir}",
            f"--tmpdir={self._tmpdir()}",
            "--auth-root-authentication-method=normal",
        ]
        self._run_setup_tool("mariadb-install-db", args)

    def _command(self) -> list[str]:
        return [
            MARIADBD,
            "--no-defaults",
            "--user=root",
            f"--datadir={self.datadir}",
            f"--port={self._port}",
            f"--bind-address={LOCALHOST}",
            f"--socket={self.socket_path}",
            f"--pid-file={self.pid_path}",
            f"--tmpdir={self._tmpdir()}",
            "--skip-log-bin",
            *self.extra_args,
        ]

    def _probe(self) -> None:
        self._connect(database=None, connect_timeout=1).close()

    def _first_start_setup(self) -> None:
        conn = self._connect(database=None)
        try:
            with conn.cursor() as cur:
                # Anonymous ''@'localhost' shadows 'sg'@'%' for clients on 127.0.0.1.
                cur.execute("SELECT user, host FROM mysql.user WHERE user = ''")
                for user, host in cur.fetchall():
                    cur.execute("DROP USER %s@%s", (user, host))
                cur.execute(f"CREATE DATABASE IF NOT EXISTS `{DB_NAME}`")
                for host in ("%", "localhost"):
                    cur.execute(
                        "CREATE USER IF NOT EXISTS %s@%s IDENTIFIED BY %s",
                        (APP_USER, host, APP_PASSWORD),
                    )
                    cur.execute(
                        f"GRANT ALL PRIVILEGES ON `{DB_NAME}`.* TO %s@%s",
                        (APP_USER, host),
                    )
                cur.execute("FLUSH PRIVILEGES")
        finally:
            conn.close()

    # -- SQL helpers ---------------------------------------------------------

    def _connect(
        self, database: str | None = DB_NAME, connect_timeout: float = 5
    ) -> Any:
        return pymysql.connect(
            host=LOCALHOST,
            port=self._port,
            user="root",
            password="",
            database=database,
            autocommit=True,
            connect_timeout=connect_timeout,
        )

    def execute(
        self,
        sql: str,
        params: Sequence[Any] | Mapping[str, Any] | None = None,
        *,
        database: str | None = DB_NAME,
    ) -> list[tuple[Any, ...]]:
        """Run one statement on a fresh autocommit root connection; return all rows."""
        conn = self._connect(database=database)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return [tuple(row) for row in cur.fetchall()]
        finally:
            conn.close()

    def set_global(self, name: str, value: int) -> None:
        """SET GLOBAL name = value; only connections opened afterwards pick it up."""
        if not _IDENTIFIER.match(name):
            raise ValueError(f"not a system variable name: {name!r}")
        self.execute(f"SET GLOBAL {name} = %s", (int(value),), database=None)

    def processlist(self) -> list[dict[str, Any]]:
        """information_schema.PROCESSLIST rows (upper-case keys), minus our own."""
        conn = self._connect(database=None)
        try:
            with conn.cursor(pymysql.cursors.DictCursor) as cur:
                cur.execute(
                    "SELECT * FROM information_schema.PROCESSLIST"
                    " WHERE ID <> CONNECTION_ID() ORDER BY ID"
                )
                return [dict(row) for row in cur.fetchall()]
        finally:
            conn.close()

    def kill_connections(
        self, user: str = "root", command: str | None = "Sleep"
    ) -> list[int]:
        """KILL the user's connections in state `command` (any if None); return ids."""
        sql = (
            "SELECT ID FROM information_schema.PROCESSLIST"
            " WHERE USER = %s AND ID <> CONNECTION_ID()"
        )
        params: list[Any] = [user]
        if command is not None:
            sql += " AND COMMAND = %s"
            params.append(command)
        killed: list[int] = []
        conn = self._connect(database=None)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                for (thread_id,) in cur.fetchall():
                    try:
                        cur.execute("KILL %s", (int(thread_id),))
                    except pymysql.err.OperationalError as exc:
                        # 1094 Unknown thread id: it went away on its own meanwhile.
                        if exc.args[0] != 1094:
                            raise
                    else:
                        killed.append(int(thread_id))
        finally:
            conn.close()
        return killed

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<MariaDBServer {self.basedir} port={self._port} {state}>"


# ---------------------------------------------------------------------------


def _duration_ms(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


class _ManagedProcess(_Daemon):
    """A daemon run in the foreground from a private temp dir on a port of its own.

    restart() keeps the port, so every connection through it drops.
    """

    name = "process"
    binary = ""
    install_hint = ""

    def __init__(self) -> None:
        super().__init__()
        self._port: int | None = None
        self._workdir: Path | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"{self.name} has not been started")
        return self._port

    @property
    def log_path(self) -> Path:
        if self._workdir is None:
            raise RuntimeError(f"{self.name} is not running")
        return self._workdir / f"{self.name}.log"

    def url_for(self, db_url: str) -> str:
        """The same SQLAlchemy URL, pointed at this middlebox."""
        url = make_url(db_url).set(host=LOCALHOST, port=self.port)
        return url.render_as_string(hide_password=False)

    def _command(self, workdir: Path, port: int) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        """Write the config, start the daemon, wait until its port accepts TCP."""
        if self.running:
            return
        if not os.path.exists(self.binary):
            raise RuntimeError(
                f"{self.binary} not found; install it with: "
                f"apt-get install -y {self.install_hint}"
            )
        if self._workdir is None:
            self._workdir = Path(_make_temp_dir(f"sg-{self.name}-"))
        workdir = self._workdir
        # A restart keeps its port so clients' URLs stay valid; a fresh free_port()
        # port may be taken before the daemon binds it, hence the retries.
        if self._port is not None:
            ports = [self._port]
        else:
            ports = [free_port() for _ in range(3)]
        error = ""
        for port in ports:
            with self.log_path.open("ab") as log:
                proc = _spawn(self._command(workdir, port), log)
            if wait_for_port(LOCALHOST, port, 10.0, functools.partial(_alive, proc)):
                self._proc, self._port = proc, port
                return
            _terminate(proc, grace=2.0)
            error = log_tail(self.log_path)
            if "in use" not in error:
                break
        raise ServerStartError(f"{self.name} did not start:\n{error}")

    def stop(self) -> None:
        """Stop the daemon and remove its temp dir (idempotent); the port is kept."""
        proc, self._proc = self._proc, None
        if proc is not None:
            _terminate(proc, grace=5.0)
        workdir, self._workdir = self._workdir, None
        if workdir is not None:
            _remove_temp_dir(str(workdir))


class HAProxy(_ManagedProcess):
    """HAProxy in TCP mode, closing connections idle for `idle_timeout` s with a FIN."""

    name = "haproxy"
    binary = HAPROXY
    install_hint = "haproxy"

    def __init__(self, host: str, port: int, idle_timeout: float = 2.0) -> None:
        super().__init__()
        self.target_host = host
        self.target_port = port
        self.idle_timeout = idle_timeout

    def config(self, port: int) -> str:
        idle = _duration_ms(self.idle_timeout)
        return (
            "global\n"
            "    maxconn 512\n"
            "    nbthread 1\n"
            "defaults\n"
            "    mode tcp\n"
            "    timeout connect 2s\n"
            f"    timeout client {idle}\n"
            f"    timeout server {idle}\n"
            "listen db\n"
            f"    bind {LOCALHOST}:{port}\n"
            f"    server db {self.target_host}:{self.target_port}\n"
        )

    def _command(self, workdir: Path, port: int) -> list[str]:
        cfg = workdir / "haproxy.cfg"
        cfg.write_text(self.config(port))
        return [self.binary, "-f", str(cfg), "-db"]


class PgBouncer(_ManagedProcess):
    """PgBouncer (trust auth) before PostgreSQL, closing clients idle too long.

    Transaction pooling is the default: PgBouncer applies client_idle_timeout only
    to clients holding no server connection, never true in session pooling. It
    refuses to run as root, so it runs as `postgres` from a world-readable temp dir.
    """

    name = "pgbouncer"
    binary = PGBOUNCER
    install_hint = "pgbouncer"
    run_as = "postgres"

    def __init__(
        self,
        client_idle_timeout: float = 0,
        *,
        pool_mode: str = "transaction",
        server_host: str = LOCALHOST,
        server_port: int = 5432,
        dbname: str = "test",
        user: str = "postgres",
        settings: Mapping[str, str | int | float] | None = None,
    ) -> None:
        super().__init__()
        self.client_idle_timeout = client_idle_timeout
        self.pool_mode = pool_mode
        self.server_host = server_host
        self.server_port = server_port
        self.dbname = dbname
        self.user = user
        self.settings = dict(settings or {})

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://{self.user}@{LOCALHOST}:{self.port}/{self.dbname}"

    def config(self, workdir: Path, port: int) -> str:
        settings: dict[str, str | int | float] = {
            "listen_addr": LOCALHOST,
            "listen_port": port,
            "unix_socket_dir": "",
            "auth_type": "trust",
            "auth_file": str(workdir / "userlist.txt"),
            "pool_mode": self.pool_mode,
            "client_idle_timeout": self.client_idle_timeout,
            "admin_users": self.user,
            "ignore_startup_parameters": "extra_float_digits",
            "logfile": "",
            "pidfile": "",
        }
        settings.update(self.settings)
        server = f"host={self.server_host} port={self.server_port} dbname={self.dbname}"
        lines = [
            "[databases]",
            f"{self.dbname} = {server}",
            "[pgbouncer]",
            *(f"{key} = {value}" for key, value in settings.items()),
        ]
        return "\n".join(lines) + "\n"

    def _command(self, workdir: Path, port: int) -> list[str]:
        # After dropping to `postgres`, pgbouncer re-reads these files on RELOAD.
        workdir.chmod(0o755)
        userlist = workdir / "userlist.txt"
        userlist.write_text(f'"{self.user}" ""\n')
        cfg = workdir / "pgbouncer.ini"
        cfg.write_text(self.config(workdir, port))
        for path in (userlist, cfg):
            path.chmod(0o644)
        if os.geteuid() != 0:
            return [self.binary, str(cfg)]
        if shutil.which("setpriv") is None:
            return [self.binary, "-u", self.run_as, str(cfg)]
        # `-u` would drop privileges inside pgbouncer, which clears the parent-death
        # signal; setpriv drops them first and then sets it, so it survives exec.
        return as_user(self.run_as, "TERM", [self.binary, str(cfg)])


# ---------------------------------------------------------------------------

POSTGRESQL_LIB = Path("/usr/lib/postgresql")


def postgres_bindir() -> Path:
    """The newest installed PostgreSQL's bin dir, e.g. /usr/lib/postgresql/15/bin."""
    found: list[tuple[tuple[int, ...], Path]] = []
    with contextlib.suppress(OSError):
        for entry in POSTGRESQL_LIB.iterdir():
            bindir = entry / "bin"
            version = tuple(int(p) for p in re.findall(r"\d+", entry.name))
            if version and (bindir / "postgres").exists():
                found.append((version, bindir))
    if not found:
        raise RuntimeError(
            f"no PostgreSQL server under {POSTGRESQL_LIB}; install it with: "
            "apt-get install -y postgresql"
        )
    return max(found)[1]


def _reachable_by(path: Path, uid: int) -> bool:
    """Whether user `uid` may traverse every directory from / down to `path`."""
    for directory in (path, *path.parents):
        try:
            st = directory.stat()
        except OSError:
            return False
        if st.st_uid != uid and not st.st_mode & stat.S_IXOTH:
            return False
    return True


def _children_of(pid: int) -> list[int]:
    """Pids whose parent is `pid` (from /proc; empty where there is no /proc)."""
    children: list[int] = []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if len(fields) > 1 and int(fields[1]) == pid:
                children.append(int(entry.name))
    return children


_live_postgres: set[PostgresServer] = set()


@atexit.register
def _stop_postgres_servers() -> None:
    # Registered after _stop_all_children, so it runs first: a fast shutdown here
    # beats the SIGTERM (smart shutdown, waiting for every client) sent there.
    with _live_lock:
        servers = list(_live_postgres)
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop()


class PostgresServer(_PrivateServer):
    """A private PostgreSQL with its own datadir and port: restart, kill, terminate.

    Trust auth for the superuser `postgres`; the database `staleguard` is created on
    the first start. The server refuses to run as root, so under root it runs as
    `postgres`, and its datadir lives in a private temp dir when `basedir` is out
    of that user's reach (pytest's tmp dirs are mode 0700). The log stays in
    `basedir`. Stopping is a fast shutdown: backends are terminated, clients see
    their sockets close; kill() SIGKILLs postgres and its backends.
    """

    run_as = "postgres"
    _daemon = "postgres"
    _url_scheme = "postgresql+psycopg"
    _admin_user = "postgres"
    _not_ready = (psycopg.OperationalError,)

    def __init__(
        self,
        basedir: Path,
        port: int | None = None,
        *,
        settings: Mapping[str, str | int | float] | None = None,
        bindir: Path | None = None,
    ) -> None:
        bindir = Path(bindir) if bindir is not None else postgres_bindir()
        super().__init__(basedir, port, "postgres.log")
        self.settings = dict(settings or {})
        self.bindir = bindir
        self._rundir: Path | None = None
        self._own_rundir = False

    # -- addresses -----------------------------------------------------------

    @property
    def datadir(self) -> Path:
        return self._runtime_dir() / "data"

    @property
    def socket_dir(self) -> Path:
        return self._runtime_dir() / "sock"

    # -- privileges ----------------------------------------------------------

    @property
    def _as_root(self) -> bool:
        return os.geteuid() == 0

    def _owner(self) -> tuple[int, int]:
        if not self._as_root:
            return os.geteuid(), os.getegid()
        try:
            entry = pwd.getpwnam(self.run_as)
        except KeyError:
            raise RuntimeError(
                f"PostgreSQL refuses to run as root and there is no user "
                f"{self.run_as!r}; install it with: apt-get install -y postgresql"
            ) from None
        return entry.pw_uid, entry.pw_gid

    def _as_owner(self, args: Sequence[str]) -> list[str]:
        """`args`, run as the unprivileged owner of the datadir when we are root."""
        if not self._as_root:
            return list(args)
        if shutil.which("setpriv") is None:
            raise RuntimeError("setpriv not found; install it with util-linux")
        # SIGINT is PostgreSQL's fast shutdown.
        return as_user(self.run_as, "INT", args)

    def _runtime_dir(self) -> Path:
        """Where data and sockets live: basedir if the owner can reach it."""
        if self._rundir is not None:
            return self._rundir
        uid, gid = self._owner()
        sock = self.basedir / "sock" / f".s.PGSQL.{self._port}"
        if _reachable_by(self.basedir, uid) and len(str(sock)) <= _MAX_SOCKET_PATH:
            self._rundir, self._own_rundir = self.basedir, False
        else:
            rundir = Path(_make_temp_dir("sg-postgres-"))
            rundir.chmod(0o755)
            self._rundir, self._own_rundir = rundir, True
        for sub, mode in (("data", 0o700), ("sock", 0o755)):
            path = self._rundir / sub
            path.mkdir(exist_ok=True)
            path.chmod(mode)
            if self._as_root:
                os.chown(path, uid, gid)
        return self._rundir

    # -- lifecycle -----------------------------------------------------------

    def _datadir_initialised(self) -> bool:
        return (self.datadir / "PG_VERSION").exists()

    def _init_datadir(self) -> None:
        args = [
            str(self.bindir / "initdb"),
            "-D",
            str(self.datadir),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ]
        with self.log_path.open("ab") as log:
            log.write(f"\n=== initdb: {' '.join(args)}\n".encode())
        self._run_setup_tool("initdb", self._as_owner(args))

    def _first_start_setup(self) -> None:
        self.execute(f'CREATE DATABASE "{DB_NAME}"', database="postgres")

    def _command(self) -> list[str]:
        settings: dict[str, str | int | float] = {
            "listen_addresses": LOCALHOST,
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            **self.settings,
        }
        args = [
            str(self.bindir / "postgres"),
            "-D",
            str(self.datadir),
            "-p",
            str(self._port),
            "-k",
            str(self.socket_dir),
        ]
        for name, value in settings.items():
            args += ["-c", f"{name}={value}"]
        return self._as_owner(args)

    def _probe(self) -> None:
        self._connect(database="postgres", connect_timeout=2).close()

    def _adopt(self, proc: subprocess.Popen[bytes]) -> None:
        super()._adopt(proc)
        with _live_lock:
            _live_postgres.add(self)

    def _forget(self, proc: subprocess.Popen[bytes]) -> None:
        with _live_lock:
            _live.discard(proc)
            if self._proc is proc:
                self._proc = None
                _live_postgres.discard(self)

    def _shutdown(
        self, proc: subprocess.Popen[bytes], grace: float = _STOP_GRACE_SECONDS
    ) -> None:
        """Fast shutdown (SIGINT); immediate (SIGQUIT), then SIGKILL if it hangs."""
        for sig, wait in ((signal.SIGINT, grace), (signal.SIGQUIT, 5.0)):
            if proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=wait)
        if proc.poll() is None:
            self._kill_tree(proc)
        self._forget(proc)

    @staticmethod
    def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
        # Backends call setsid(), so a process-group kill would miss them; left
        # alive they would hold the shared memory and block the next start.
        children = _children_of(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        proc.wait()

    def _crash(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL postgres and its backends."""
        if proc.poll() is None:
            self._kill_tree(proc)
        self._forget(proc)

    def _close(self) -> None:
        self.remove()

    def remove(self) -> None:
        """Stop, and delete a private temp datadir (the next start runs initdb)."""
        self.stop()
        rundir, self._rundir = self._rundir, None
        if rundir is not None and self._own_rundir:
            _remove_temp_dir(str(rundir))

    # -- SQL helpers ---------------------------------------------------------

    def _connect(
        self, database: str = DB_NAME, connect_timeout: int = 5
    ) -> psycopg.Connection[tuple[Any, ...]]:
        return psycopg.connect(
            host=LOCALHOST,
            port=self._port,
            user="postgres",
            dbname=database,
            autocommit=True,
            connect_timeout=connect_timeout,
            application_name="staleguard-tests-admin",
        )

    def execute(
        self,
        sql: str,
        params: Sequence[Any] | Mapping[str, Any] | None = None,
        *,
        database: str = DB_NAME,
    ) -> list[tuple[Any, ...]]:
        """Run one statement on a fresh autocommit superuser connection; all rows."""
        with self._connect(database=database) as conn:
            cur = conn.execute(sql.encode(), params)  # bytes: no LiteralString check
            return list(cur.fetchall()) if cur.description is not None else []

    def alter_system(self, name: str, value: str | int | float | None) -> None:
        """ALTER SYSTEM SET (RESET when None) and reload; new sessions see it."""
        if not _IDENTIFIER.match(name):
            raise ValueError(f"not a configuration parameter name: {name!r}")
        if value is None:
            self.execute(f"ALTER SYSTEM RESET {name}")
        else:
            literal = str(value).replace("'", "''")
            self.execute(f"ALTER SYSTEM SET {name} = '{literal}'")
        self.execute("SELECT pg_reload_conf()")

    def backends(self) -> list[dict[str, Any]]:
        """pg_stat_activity rows of client backends, minus our own."""
        with self._connect() as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute(
                "SELECT * FROM pg_stat_activity WHERE pid <> pg_backend_pid()"
                " AND backend_type = 'client backend' ORDER BY pid"
            )
            return list(cur.fetchall())

    def terminate_backends(
        self, application_name: str | None = None, state: str | None = "idle"
    ) -> list[int]:
        """pg_terminate_backend matching client backends (any if None), not our own.

        Waits until each has exited, so its client's socket is already closed.
        Returns the pids terminated.
        """
        where = ["pid <> pg_backend_pid()", "backend_type = 'client backend'"]
        params: list[Any] = []
        if application_name is not None:
            where.append("application_name = %s")
            params.append(application_name)
        if state is not None:
            where.append("state = %s")
            params.append(state)
        sql = f"SELECT pid FROM pg_stat_activity WHERE {' AND '.join(where)}"
        terminated: list[int] = []
        # Since PostgreSQL 14 a timeout makes pg_terminate_backend wait for the exit.
        with self._connect() as conn:
            wait = conn.info.server_version >= 140000
            terminate = (
                b"SELECT pg_terminate_backend(%s, 5000)"
                if wait
                else b"SELECT pg_terminate_backend(%s)"
            )
            pids = [int(row[0]) for row in conn.execute(sql.encode(), params)]
            for pid in pids:
                row = conn.execute(terminate, (pid,)).fetchone()
                if row is not None and row[0]:
                    terminated.append(pid)
        return terminated
