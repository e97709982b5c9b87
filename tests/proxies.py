"""A pure-Python TCP proxy that misbehaves on purpose: latency, idle FIN/RST, drops.

It reproduces what load balancers, NAT gateways and firewalls do to pooled connections.
"""

from __future__ import annotations

import collections
import contextlib
import selectors
import socket
import struct
import threading
import time
from types import TracebackType
from typing import Literal
from typing import TypeVar

from sqlalchemy.engine import make_url

__all__ = ["MuteServer", "TcpProxy"]

LOCALHOST = "127.0.0.1"
_POLL = 0.05  # how quickly threads notice stop() / an idle action
_CHUNK = 65536

_CloseMode = Literal["fin", "rst"]
_T = TypeVar("_T", bound="TcpProxy")


def _set_abortive(sock: socket.socket) -> None:
    # linger on with timeout 0 makes close() send RST instead of FIN.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class _Connection:
    """One proxied client connection: two pump threads, one per direction."""

    def __init__(
        self, proxy: TcpProxy, client: socket.socket, upstream: socket.socket
    ) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.last_activity = time.monotonic()
        self.dropping = False
        self.close_mode: _CloseMode | None = None
        self.closing = threading.Event()
        self.closed = False
        self.threads = [
            threading.Thread(
                target=self._pump,
                args=(client, upstream),
                name="tcpproxy-c2u",
                daemon=True,
            ),
            threading.Thread(
                target=self._pump,
                args=(upstream, client),
                name="tcpproxy-u2c",
                daemon=True,
            ),
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def pumps_done(self) -> bool:
        return not any(thread.is_alive() for thread in self.threads)

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        # Chunks wait in `pending` until due instead of the thread sleeping, so a
        # delayed stream keeps reading (and its throughput) while chunks are in flight.
        delay = self.proxy.delay
        pending: collections.deque[tuple[float, bytes]] = collections.deque()
        eof = False
        sel = selectors.DefaultSelector()
        sel.register(src, selectors.EVENT_READ)
        try:
            while not self.closing.is_set() and not self.proxy.stopping.is_set():
                now = time.monotonic()
                wait = (
                    _POLL if not pending else min(_POLL, max(0.0, pending[0][0] - now))
                )
                if eof:
                    time.sleep(wait)
                elif sel.select(wait):
                    data = src.recv(_CHUNK)
                    self.touch()
                    if not data:
                        eof = True
                    elif (
                        src is self.client
                        and self.proxy.drop_on is not None
                        and self.proxy.drop_on in data
                    ):
                        self.dropping = True  # this chunk, and all after it
                    elif src is self.client and self.proxy.closes_on(data):
                        self.terminate("fin")  # as a KILL would, mid-query
                        return
                    elif not self.dropping:
                        pending.append((time.monotonic() + delay, data))
                        self.proxy.note_in_flight(len(pending))
                if self.dropping:
                    # A black hole forwards nothing, not even a FIN; sockets stay open.
                    pending.clear()
                    if eof:
                        return
                    continue
                now = time.monotonic()
                while pending and pending[0][0] <= now:
                    dst.sendall(pending.popleft()[1])
                    self.touch()
                if eof and not pending:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    return
        except OSError:
            # A reset or broken pipe on either side: pass the abort on to both peers.
            if self.close_mode is None:
                self.close_mode = "rst"
            self.closing.set()
        finally:
            sel.close()

    def terminate(self, mode: _CloseMode) -> None:
        """Ask both pumps to stop; the sockets are closed by finish() once they have."""
        if self.close_mode is None:
            self.close_mode = mode
        self.closing.set()
        if mode == "fin":
            # shutdown() sends the FINs right away and wakes both pumps.
            for sock in (self.client, self.upstream):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        """Close both sockets; call only after the pumps have exited."""
        if self.closed:
            return
        self.closed = True
        if self.close_mode == "rst":
            _set_abortive(self.client)
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.close()


class TcpProxy:
    """Forward 127.0.0.1:<port> to (host, port), adding latency or idle faults.

    delay: one-way delay per forwarded chunk, both directions.
    idle_close / idle_reset / idle_drop: after that many seconds without traffic either
    way, FIN both sides / RST the client (FIN upstream) / silently forward nothing more.
    drop_on: once a client sends bytes containing this, forward nothing more on its
    connection, that chunk included (a server that stops answering mid-session).
    close_on: the first ``closes`` times a client sends bytes containing this, close
    its connection with a FIN instead of forwarding them (a KILL mid-query).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        delay: float = 0.0,
        idle_close: float | None = None,
        idle_reset: float | None = None,
        idle_drop: float | None = None,
        drop_on: bytes | None = None,
        close_on: bytes | None = None,
        closes: int = 1,
    ) -> None:
        if sum(x is not None for x in (idle_close, idle_reset, idle_drop)) > 1:
            raise ValueError("choose at most one of idle_close, idle_reset, idle_drop")
        self.target_host = host
        self.target_port = port
        self.delay = delay
        self.idle_close = idle_close
        self.idle_reset = idle_reset
        self.idle_drop = idle_drop
        self.drop_on = drop_on
        self.close_on = close_on
        self.closes_left = closes
        self.connections_seen = 0
        #: Clients accepted, those refused because the backend is down included:
        #: every connect attempt that reached the proxy.
        self.attempts = 0
        #: The most chunks one direction of a connection held back at once.
        self.most_in_flight = 0
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._connections: list[_Connection] = []
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None

    @property
    def host(self) -> str:
        return LOCALHOST

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("TcpProxy is not started")
        return self._port

    @property
    def active_connections(self) -> int:
        with self._lock:
            return sum(not conn.closed for conn in self._connections)

    @property
    def dropping_connections(self) -> int:
        """Current connections that forward nothing more (idle_drop, drop_on)."""
        with self._lock:
            return sum(conn.dropping for conn in self._connections)

    def note_in_flight(self, chunks: int) -> None:
        """Record that a pump holds ``chunks`` delayed chunks at once."""
        with self._lock:  # both pumps of a connection report
            self.most_in_flight = max(self.most_in_flight, chunks)

    def url_for(self, db_url: str) -> str:
        """The same SQLAlchemy URL, pointed at this proxy."""
        url = make_url(db_url).set(host=LOCALHOST, port=self.port)
        return url.render_as_string(hide_password=False)

    def start(self) -> None:
        """Bind a free port and start accepting; returns once the port is listening."""
        if self._thread is not None:
            return
        self.stopping.clear()
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((LOCALHOST, self._port or 0))
        listener.listen(128)
        listener.setblocking(False)
        self._listener = listener
        self._port = listener.getsockname()[1]
        self._thread = threading.Thread(
            target=self._serve, name="tcpproxy-accept", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Close the listener and all connections, join all threads (idempotent)."""
        self.stopping.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=5)
        with self._lock:
            conns, self._connections = self._connections, []
        for conn in conns:
            conn.terminate("fin")
        for conn in conns:
            for pump in conn.threads:
                if pump.ident is not None:
                    pump.join(timeout=5)
            conn.finish()
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def say_and_close(self, data: bytes) -> int:
        """Send ``data`` to every client, then close with FIN, as MySQL 8 does with
        its 4031 packet on ``wait_timeout``; return the count."""
        with self._lock:
            conns = [conn for conn in self._connections if not conn.closing.is_set()]
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.client.sendall(data)
            conn.terminate("fin")
        return len(conns)

    def say_and_drop(self, data: bytes) -> int:
        """Send ``data`` to every client, then forward nothing more either way: the
        client sees bytes it must ask about, and the question is never answered.
        """
        with self._lock:
            conns = [conn for conn in self._connections if not conn.closing.is_set()]
        for conn in conns:
            conn.dropping = True
            with contextlib.suppress(OSError):
                conn.client.sendall(data)
        return len(conns)

    def drop_all(self) -> int:
        """Forward nothing more on every current connection, as ``idle_drop`` does
        once its timer runs out, but now: no timer for a loaded machine to race."""
        with self._lock:
            conns = [conn for conn in self._connections if not conn.closing.is_set()]
        for conn in conns:
            conn.dropping = True
        return len(conns)

    def close_all(self, *, reset: bool = False) -> int:
        """Close every current connection now (FIN, or RST to clients); return count."""
        with self._lock:
            conns = [conn for conn in self._connections if not conn.closing.is_set()]
        for conn in conns:
            conn.terminate("rst" if reset else "fin")
        return len(conns)

    def __enter__(self: _T) -> _T:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def closes_on(self, data: bytes) -> bool:
        """Whether a client's ``data`` closes its connection (see ``close_on``)."""
        with self._lock:
            if self.close_on is None or self.close_on not in data:
                return False
            if self.closes_left <= 0:
                return False
            self.closes_left -= 1
            return True

    def _serve(self) -> None:
        assert self._listener is not None
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ)
        try:
            while not self.stopping.is_set():
                if sel.select(_POLL):
                    self._accept()
                self._sweep()
        finally:
            sel.close()

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            client, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        with self._lock:
            self.attempts += 1
        client.setblocking(True)
        try:
            upstream = socket.create_connection(
                (self.target_host, self.target_port), timeout=5
            )
        except OSError:
            # Refuse the way an unreachable backend behind a proxy would: a reset.
            _set_abortive(client)
            client.close()
            return
        upstream.settimeout(None)
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Connection(self, client, upstream)
        with self._lock:
            self.connections_seen += 1
            self._connections.append(conn)
        conn.start()

    def _sweep(self) -> None:
        now = time.monotonic()
        with self._lock:
            conns = list(self._connections)
        finished: list[_Connection] = []
        for conn in conns:
            if conn.pumps_done():
                conn.finish()
                finished.append(conn)
                continue
            if conn.closing.is_set() or conn.dropping:
                continue
            idle = now - conn.last_activity
            if self.idle_close is not None and idle >= self.idle_close:
                conn.terminate("fin")
            elif self.idle_reset is not None and idle >= self.idle_reset:
                conn.terminate("rst")
            elif self.idle_drop is not None and idle >= self.idle_drop:
                conn.dropping = True
        if finished:
            with self._lock:
                self._connections = [c for c in self._connections if c not in finished]

    def __repr__(self) -> str:
        return f"<TcpProxy :{self._port} -> {self.target_host}:{self.target_port}>"


class MuteServer:
    """A port on 127.0.0.1 that never answers, in one of two ways.

    ``"silent"``: it accepts connections and never sends a byte, as a frozen
    server or a half-dead proxy does. ``"syn-drop"``: its accept queue is full, so
    the kernel drops every SYN, as a firewall does; a connect waits for TCP's
    retries (about two minutes) unless its own timeout ends it.
    """

    def __init__(self, mode: Literal["silent", "syn-drop"] = "silent") -> None:
        self.mode = mode
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind((LOCALHOST, 0))
        self.port: int = self._listener.getsockname()[1]
        self._held: list[socket.socket] = []
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def url(self, driver: str) -> str:
        """A SQLAlchemy URL for ``driver`` (``mysql+pymysql``, ...) at this port."""
        return f"{driver}://sg:s3cr3t-pw@{LOCALHOST}:{self.port}/staleguard"

    def __enter__(self) -> MuteServer:
        if self.mode == "syn-drop":
            self._listener.listen(0)
            # The one connection the queue holds; nobody accepts it.
            self._held.append(socket.create_connection((LOCALHOST, self.port)))
        else:
            self._listener.listen(128)
            self._listener.settimeout(_POLL)
            self._thread = threading.Thread(
                target=self._accept, name="mute-server", daemon=True
            )
            self._thread.start()
        return self

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            self._held.append(conn)

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(5)
        # Closing ends every wait on them: abandoned clients finish too.
        for sock in self._held:
            _set_abortive(sock)
            sock.close()
        self._listener.close()
