"""One scenario against a database behind the namespace's firewall, run inside it.

Run by `tests.netns.Scenario` as ``ip netns exec NS python -m tests.netns_scenario
SPEC``, where SPEC is a JSON object (see `Spec`). It builds a Flask app with
Flask-SQLAlchemy (and the guard unless ``guard`` is false), runs the steps in order
and prints one JSON object (see `main`) as its last line of output.

Every request runs in a thread under a watchdog: a request still running when its
watchdog fires is reported as hung, the result is printed and the process exits
at once (the hung thread cannot be cancelled). Being inside the namespace, the
script may call ``iptables`` and ``conntrack`` itself, on its own connections only
(found through its own file descriptors), so scenarios running side by side in one
namespace leave each other alone.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import traceback
import typing as t

import sqlalchemy as sa
from flask import Flask
from flask import jsonify
from flask import request
from flask.typing import ResponseReturnValue
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.engine import make_url

_TOOL_TIMEOUT = 10.0
# TCP_ESTABLISHED, the first byte (tcpi_state) of struct tcp_info.
_TCP_ESTABLISHED = 1


class Spec(t.TypedDict):
    """What the scenario does; every key is required."""

    #: The database's SQLAlchemy URL (127.0.0.1 inside the namespace).
    url: str
    #: Whether to install `StaleGuard` on the app.
    guard: bool
    #: Extra Flask config (``STALEGUARD_*`` keys).
    config: dict[str, t.Any]
    #: ``SQLALCHEMY_ENGINE_OPTIONS``.
    engine_options: dict[str, t.Any]
    #: The statement returning the server-side id of the current connection.
    id_sql: str
    #: The steps, in order; see `Runner`.
    steps: list[dict[str, t.Any]]


def own_client_ports(server_port: int) -> list[int]:
    """Local ports of this process's established TCP connections to ``server_port``.

    Read from the sockets themselves (each descriptor duplicated), not from
    /proc/net/tcp, which lists the whole namespace and, read while other
    scenarios open and close connections, can repeat or skip a line.
    """
    ports: set[int] = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:["):
                continue
            fd = os.dup(int(name))
        except (OSError, ValueError):
            continue  # closed meanwhile, or listdir's own descriptor
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            continue
        with sock:
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            if sock.type != socket.SOCK_STREAM:
                continue
            try:
                peer = sock.getpeername()
                state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
            except OSError:
                continue  # not connected
            if peer[1] == server_port and state == _TCP_ESTABLISHED:
                ports.add(sock.getsockname()[1])
    return sorted(ports)


def where(thread: threading.Thread) -> str:
    """The innermost frames of a running ``thread``'s stack: where it waits."""
    frame = sys._current_frames().get(t.cast(int, thread.ident))
    if frame is None:
        return ""
    return "".join(traceback.format_stack(frame)[-12:])


def _run_tool(args: list[str]) -> str:
    result = subprocess.run(
        args, capture_output=True, text=True, timeout=_TOOL_TIMEOUT, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}"
        )
    return result.stdout


def drop_paths(server_port: int, ports: list[int]) -> None:
    """iptables DROP, both ways, of the connections from ``ports`` to the server."""
    for port in ports:
        for sport, dport in ((port, server_port), (server_port, port)):
            _run_tool(
                ["iptables", "-w", "10", "-I", "INPUT", "-p", "tcp"]
                + ["--sport", str(sport), "--dport", str(dport), "-j", "DROP"]
            )


def tracked_ports(server_port: int) -> list[int]:
    """Client ports of the flows to the server that conntrack still knows."""
    out = _run_tool(["conntrack", "-L", "-p", "tcp", "--dport", str(server_port)])
    ports: set[int] = set()
    for line in out.splitlines():
        for field in line.split():
            if field.startswith("sport="):
                ports.add(int(field[len("sport=") :]))
                break  # the original direction's tuple comes first
    return sorted(ports)


class Runner:
    """The app and the steps' state; each ``do_*`` method is one kind of step.

    Steps (``do`` names the method): ``warm`` (``n`` connections at once),
    ``idle`` (``seconds``), ``drop`` (DROP every connection this process has to
    the server), ``dead`` (wait at most ``seconds`` until the kernel gave up on
    all of them), ``conntrack`` (which of ours the firewall still tracks),
    ``request`` (``sql``, optional ``drop_after`` seconds, ``watchdog`` seconds,
    ``repeat`` times).
    """

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        port = make_url(spec["url"]).port
        if port is None:
            raise ValueError("the URL needs an explicit port")
        self.server_port = port
        self.app = Flask("netns_scenario")
        self.app.config["TESTING"] = True
        self.app.config["SQLALCHEMY_DATABASE_URI"] = spec["url"]
        self.app.config["SQLALCHEMY_ENGINE_OPTIONS"] = spec["engine_options"]
        self.app.config.update(spec["config"])
        self.db = SQLAlchemy()
        self.guard: t.Any = None
        if spec["guard"]:
            from flask_staleguard import StaleGuard

            self.guard = StaleGuard(self.app)
        self.db.init_app(self.app)
        self.started = time.monotonic()
        self.hung = False
        self._add_route()

    def _add_route(self) -> None:
        db, id_sql = self.db, self.spec["id_sql"]

        @self.app.route("/q")
        def query() -> ResponseReturnValue:
            conn_id = db.session.execute(sa.text(id_sql)).scalar_one()
            sql = request.args.get("sql")
            value = conn_id if not sql else db.session.execute(sa.text(sql)).scalar()
            return jsonify(conn_id=int(conn_id), value=str(value))

    def now(self) -> float:
        return round(time.monotonic() - self.started, 3)

    # -- steps ---------------------------------------------------------------

    def do_warm(self, n: int) -> dict[str, t.Any]:
        with self.app.app_context():
            conns = [self.db.engine.connect() for _ in range(n)]
            try:
                ids = [
                    int(c.execute(sa.text(self.spec["id_sql"])).scalar_one())
                    for c in conns
                ]
            finally:
                for conn in conns:
                    conn.close()
        return {"conn_ids": ids, "ports": own_client_ports(self.server_port)}

    def do_idle(self, seconds: float) -> dict[str, t.Any]:
        time.sleep(seconds)
        return {}

    def do_dead(self, seconds: float) -> dict[str, t.Any]:
        """Wait until none of this process's connections to the server is
        established any more (the kernel declared each dead), or ``seconds``.
        """
        begun = time.monotonic()
        deadline = begun + seconds
        left = own_client_ports(self.server_port)
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = own_client_ports(self.server_port)
        return {"seconds": round(time.monotonic() - begun, 3), "left": left}

    def do_drop(self) -> dict[str, t.Any]:
        ports = own_client_ports(self.server_port)
        drop_paths(self.server_port, ports)
        return {"ports": ports}

    def do_conntrack(self) -> dict[str, t.Any]:
        ours = set(own_client_ports(self.server_port))
        tracked = [p for p in tracked_ports(self.server_port) if p in ours]
        return {"ports": sorted(ours), "tracked": tracked}

    def do_request(
        self,
        sql: str = "",
        watchdog: float = 15.0,
        drop_after: float | None = None,
        repeat: int = 1,
    ) -> dict[str, t.Any]:
        results = []
        for _ in range(repeat):
            result = self._one_request(sql, watchdog, drop_after)
            results.append(result)
            if result["hung"]:
                self.hung = True
                break
        return {"requests": results}

    def _one_request(
        self, sql: str, watchdog: float, drop_after: float | None
    ) -> dict[str, t.Any]:
        result: dict[str, t.Any] = {"ok": False, "hung": False, "error": None}
        client = self.app.test_client()

        def run() -> None:
            try:
                response = client.get("/q", query_string={"sql": sql})
                body = response.get_json()
                result["status"] = response.status_code
                result["ok"] = response.status_code == 200
                if isinstance(body, dict):
                    result.update(conn_id=body["conn_id"], value=body["value"])
            except Exception as e:  # noqa: BLE001 - the result says what it was
                orig = getattr(e, "orig", None)
                result["error"] = f"{type(e).__name__}: {e}"[:500]
                if orig is not None and getattr(orig, "args", None):
                    result["code"] = orig.args[0]
            finally:
                result["seconds"] = round(time.monotonic() - begun, 3)

        timer: threading.Timer | None = None
        if drop_after is not None:

            def drop() -> None:
                ports = own_client_ports(self.server_port)
                drop_paths(self.server_port, ports)
                result["dropped"] = {"after": round(time.monotonic() - begun, 3)}
                result["dropped"]["ports"] = ports

            timer = threading.Timer(drop_after, drop)
        begun = time.monotonic()
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        if timer is not None:
            timer.start()
        thread.join(watchdog)
        if thread.is_alive():
            result["hung"] = True
            result["seconds"] = round(time.monotonic() - begun, 3)
            # Where it waits: the one clue a hang in CI leaves.
            result["where"] = where(thread)
        if timer is not None:
            timer.join(_TOOL_TIMEOUT)
        return result

    def run(self) -> dict[str, t.Any]:
        out: dict[str, t.Any] = {"steps": []}
        for step in self.spec["steps"]:
            args = dict(step)
            name = args.pop("do")
            began = self.now()
            done = getattr(self, f"do_{name}")(**args)
            out["steps"].append({"do": name, "at": began, "until": self.now(), **done})
            if self.hung:
                break
        out["hung"] = self.hung
        if self.guard is not None:
            with self.app.app_context():
                out["stats"] = self.guard.stats(self.app)
        return out


def main(argv: list[str]) -> None:
    """Run the scenario; print ``{"steps": [...], "hung": bool, "stats": {...}}``."""
    spec: Spec = json.loads(argv[1])
    out = Runner(spec).run()
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    # A hung request's thread is stuck in a read; do not wait for it (or for the
    # pool's connections to close over a dead path) on the way out.
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv)
