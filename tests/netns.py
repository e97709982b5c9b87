"""A real Linux stateful firewall for tests: a network namespace of the test's own.

`Firewall` creates a namespace with its own loopback, in which conntrack forgets
established TCP flows idle for `timeout` seconds and, with
``nf_conntrack_tcp_loose=0``, never picks a forgotten flow up again: its next
packets are INVALID and dropped, with no FIN and no RST, which is what a NAT
gateway, a load balancer or a cloud firewall does to an idle connection. The
host's own sysctls and iptables rules are not touched; all traffic stays inside
the namespace.

`NetnsMariaDBServer` and `NetnsPostgresServer` are the private servers of
`tests.servers`, run inside the namespace on its 127.0.0.1; the test process,
outside, administers them through their Unix sockets, which the firewall does
not see. `Scenario` runs `tests.netns_scenario` inside the namespace, where the
app reaches the server through the firewall.

Needs root, ``ip`` (iproute2), ``iptables`` and ``conntrack``.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg
import pymysql  # type: ignore[import-untyped, unused-ignore]

from tests.netns_scenario import Spec
from tests.servers import DB_NAME
from tests.servers import MariaDBServer
from tests.servers import PostgresServer

__all__ = [
    "Firewall",
    "NetnsMariaDBServer",
    "NetnsPostgresServer",
    "Scenario",
    "ScenarioResult",
    "missing_requirements",
]

ROOT = Path(__file__).resolve().parent.parent
_TOOL_TIMEOUT = 15.0
_TOOLS = ("ip", "iptables", "conntrack")

_counter = itertools.count()
_live_lock = threading.Lock()
_live_namespaces: set[str] = set()


def missing_requirements() -> str | None:
    """Why the namespace cannot be built here (not root, a tool missing), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    for tool in _TOOLS:
        if not any(os.access(Path(d) / tool, os.X_OK) for d in path.split(os.pathsep)):
            return f"{tool} not found; apt-get install -y iproute2 iptables conntrack"
    return None


def _run(args: Sequence[str], timeout: float = _TOOL_TIMEOUT) -> str:
    result = subprocess.run(
        list(args),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args)} failed ({result.returncode}): "
            f"{(result.stderr or result.stdout).strip()}"
        )
    return result.stdout


def _delete_namespace(name: str) -> None:
    """Kill what still runs in namespace `name` (ours: we created it), delete it."""
    with contextlib.suppress(Exception):
        pids = _run(["ip", "netns", "pids", name]).split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
    with contextlib.suppress(Exception):
        _run(["ip", "netns", "delete", name])
    with _live_lock:
        _live_namespaces.discard(name)


@atexit.register
def _delete_all_namespaces() -> None:
    with _live_lock:
        names = list(_live_namespaces)
    for name in names:
        _delete_namespace(name)


class Firewall:
    """A network namespace whose conntrack forgets flows idle for `timeout` s.

    Use it in a `with` block (or call `create` and `delete`); the name is unique
    to this process. `exec_prefix` runs a command inside it.
    """

    def __init__(self, timeout: int = 8) -> None:
        self.timeout = timeout
        self.name = f"sg-fw-{os.getpid()}-{next(_counter)}"
        self.created = False

    @property
    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def run(self, args: Sequence[str]) -> str:
        """Run a command inside the namespace; its stdout (raise if it fails)."""
        return _run([*self.exec_prefix, *args])

    def create(self) -> None:
        _run(["ip", "netns", "add", self.name])
        self.created = True
        with _live_lock:
            _live_namespaces.add(self.name)
        try:
            self.run(["ip", "link", "set", "lo", "up"])
            # The rule first: it makes the kernel track this namespace's flows (and
            # loads nf_conntrack on a fresh machine, which the sysctls need).
            self.reset()
            self.run(
                [
                    "sysctl",
                    "-q",
                    "-w",
                    "net.netfilter.nf_conntrack_tcp_loose=0",
                    f"net.netfilter.nf_conntrack_tcp_timeout_established={self.timeout}",
                ]
            )
        except BaseException:
            self.delete()
            raise

    def reset(self) -> None:
        """Leave only the INVALID-drop rule in INPUT and forget every flow."""
        self.run(["iptables", "-w", "10", "-F", "INPUT"])
        self.run(
            ["iptables", "-w", "10", "-A", "INPUT"]
            + ["-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"]
        )
        with contextlib.suppress(RuntimeError):  # "0 flow entries" exits 1 on some
            self.run(["conntrack", "-F"])

    def settings(self) -> dict[str, str]:
        """The namespace's conntrack settings and INPUT rules, as read back."""
        keys = [
            "net.netfilter.nf_conntrack_tcp_loose",
            "net.netfilter.nf_conntrack_tcp_timeout_established",
        ]
        values = {k: self.run(["sysctl", "-n", k]).strip() for k in keys}
        values["rules"] = self.run(["iptables", "-w", "10", "-S", "INPUT"])
        return values

    def delete(self) -> None:
        if self.created:
            _delete_namespace(self.name)
            self.created = False

    def __enter__(self) -> Firewall:
        self.create()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.delete()


class NetnsMariaDBServer(MariaDBServer):
    """The private MariaDB, run inside `firewall`'s namespace on its 127.0.0.1.

    Its URLs are for clients inside the namespace; the test process reaches it
    through the Unix socket (readiness, `execute`, `processlist`, ...).
    """

    def __init__(self, basedir: Path, firewall: Firewall) -> None:
        super().__init__(basedir)
        self.firewall = firewall

    def _command(self) -> list[str]:
        return [*self.firewall.exec_prefix, *super()._command()]

    def _connect(
        self, database: str | None = DB_NAME, connect_timeout: float = 5
    ) -> Any:
        return pymysql.connect(
            unix_socket=str(self.socket_path),
            user="root",
            password="",
            database=database,
            autocommit=True,
            connect_timeout=connect_timeout,
        )


class NetnsPostgresServer(PostgresServer):
    """The private PostgreSQL, run inside `firewall`'s namespace on its 127.0.0.1.

    Its URLs are for clients inside the namespace; the test process reaches it
    through the Unix socket.
    """

    def __init__(self, basedir: Path, firewall: Firewall) -> None:
        super().__init__(basedir)
        self.firewall = firewall

    def _command(self) -> list[str]:
        return [*self.firewall.exec_prefix, *super()._command()]

    def _connect(
        self, database: str = DB_NAME, connect_timeout: int = 5
    ) -> psycopg.Connection[tuple[Any, ...]]:
        return psycopg.connect(
            host=str(self.socket_dir),
            port=self.port,
            user="postgres",
            dbname=database,
            autocommit=True,
            connect_timeout=connect_timeout,
            application_name="staleguard-tests-admin",
        )


ScenarioResult = dict[str, Any]


class Scenario:
    """`tests.netns_scenario` running inside `firewall`'s namespace, started at once.

    `result` waits (at most `timeout` s, then kills it) and returns its JSON. The
    child uses this interpreter and this process's import path, so it sees the
    same `flask_staleguard` as the tests.
    """

    def __init__(self, firewall: Firewall, spec: Spec, timeout: float = 60.0) -> None:
        self.spec = spec
        self.timeout = timeout
        self.started = time.monotonic()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT), *filter(None, [env.get("PYTHONPATH")])]
        )
        self._proc = subprocess.Popen(
            [
                *firewall.exec_prefix,
                sys.executable,
                "-m",
                "tests.netns_scenario",
                json.dumps(spec),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            env=env,
            start_new_session=True,
        )
        self._result: ScenarioResult | None = None

    def result(self) -> ScenarioResult:
        """The scenario's JSON; AssertionError if it failed or ran over its time."""
        if self._result is not None:
            return self._result
        left = max(0.0, self.timeout - (time.monotonic() - self.started))
        try:
            out, err = self._proc.communicate(timeout=left)
        except subprocess.TimeoutExpired:
            self.kill()
            out, err = self._proc.communicate()
            raise AssertionError(
                f"scenario ran over {self.timeout:.0f} s; stdout: {out[-2000:]!r}\n"
                f"stderr: {err.decode(errors='replace')[-4000:]}"
            ) from None
        lines = out.decode(errors="replace").strip().splitlines()
        if self._proc.returncode != 0 or not lines:
            raise AssertionError(
                f"scenario failed ({self._proc.returncode}):\n"
                f"{err.decode(errors='replace')[-4000:]}"
            )
        result: ScenarioResult = json.loads(lines[-1])
        result["wall"] = round(time.monotonic() - self.started, 3)
        self._result = result
        return result

    def kill(self) -> None:
        """SIGKILL the scenario (a no-op once it has ended)."""
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            self._proc.wait()

    def close(self) -> None:
        """Kill the scenario if it still runs and close its pipes (for finalizers)."""
        if self._result is None and self._proc.returncode is None:
            self.kill()
            with contextlib.suppress(ValueError, OSError):
                self._proc.communicate(timeout=_TOOL_TIMEOUT)
