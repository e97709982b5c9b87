"""A zero-round-trip liveness check of a pooled connection's socket.

An idle pooled connection has nothing to read: a MySQL server never speaks first.
When its socket polls readable or hung up, the other side has closed it (FIN),
reset it (RST), or sent a last error packet (MySQL 8's 4031) before closing. A
peek (``MSG_PEEK``, nothing consumed) tells which.

The probe uses the operating system's own ``poll`` and socket, never the green
ones gevent or eventlet put in their place: a zero timeout never blocks, and the
originals survive monkey-patching in either order.

Behind an asyncio driver (asyncpg, aiomysql, asyncmy) the event loop reads the
socket whenever it runs: what the server said last may already sit in the
driver's buffer, and a transport that saw the end closes its socket, whose number
the kernel may then give to another. So the transport is asked first
(``is_closing()``), and the socket only while the transport still owns it.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import importlib
import os
import select
import socket
import ssl
import sys
import typing as t

#: The connection is gone: the peer closed it in an orderly way (FIN).
EOF = "probe_eof"
#: The connection is gone: the peer or a middlebox reset it (RST).
RESET = "probe_reset"
#: The server wrote an error packet to an idle connection, then closed it.
SERVER_ERROR = "probe_server_error"
#: Bytes wait on an idle plain-TCP MySQL connection: the rest of a reply that an
#: interrupted statement never read. The connection is out of step with its server.
UNREAD = "probe_unread"
#: The kernel gave up on the connection: its keepalive probes or its data went
#: unanswered (ETIMEDOUT), the mark of a path that dropped it silently.
TIMED_OUT = "probe_timed_out"
#: The event loop already saw the connection end (FIN or RST) and closed its
#: asyncio transport.
CLOSED = "probe_closed"
#: Something is readable that a peek cannot classify; a real ping must decide.
UNKNOWN = "probe_unknown"

_PEEK_BYTES = 64
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)


def unpatched(module: str, name: str) -> t.Any:
    """``module.name`` as the standard library made it, before gevent or eventlet
    replaced or deleted it (``None`` if the platform has none).

    Called at import: if a patcher already ran, it is asked for the original;
    if it runs later, the object captured here is the original.
    """
    gevent_monkey = sys.modules.get("gevent.monkey")
    if gevent_monkey is not None and gevent_monkey.is_module_patched(module):
        return gevent_monkey.get_original(module, name)
    eventlet_patcher = sys.modules.get("eventlet.patcher")
    if eventlet_patcher is not None and eventlet_patcher.is_monkey_patched(module):
        return getattr(eventlet_patcher.original(module), name, None)
    return getattr(importlib.import_module(module), name, None)


_poll = unpatched("select", "poll")
_select = unpatched("select", "select")
_EVENTS = 0
for _event in ("POLLIN", "POLLPRI", "POLLERR", "POLLHUP"):
    _EVENTS |= getattr(select, _event, 0)


def socket_fd(dbapi_connection: t.Any) -> int | None:
    """The file descriptor of a DBAPI connection's socket, if the driver has one.

    PyMySQL keeps it in ``_sock`` (there is no public accessor); mysqlclient,
    psycopg and psycopg2 have ``fileno()``. Behind SQLAlchemy's asyncio adapter,
    the driver's own connection (``driver_connection``) is asked the same, or
    its asyncio transport for its socket while the transport is open.
    """
    from .._private import asyncio_transport
    from .._private import pymysql_socket

    inner = getattr(dbapi_connection, "driver_connection", None)
    if inner is not None and inner is not dbapi_connection:
        return socket_fd(inner)
    try:
        transport = asyncio_transport(dbapi_connection)
        if transport is not None:
            return transport_fd(transport)
        sock = pymysql_socket(dbapi_connection)
        if sock is not None:
            return int(sock.fileno())
        fileno = getattr(dbapi_connection, "fileno", None)
        if callable(fileno):
            return int(fileno())
    except Exception:  # a closed or broken connection has no usable socket
        return None
    return None


def transport_fd(transport: asyncio.BaseTransport) -> int | None:
    """The descriptor of an open asyncio transport's socket; ``None`` once it
    is closing (its socket is closed, or about to be) or has no socket.
    """
    if transport.is_closing():
        return None
    sock = transport.get_extra_info("socket")
    fd = -1 if sock is None else int(sock.fileno())
    return fd if fd >= 0 else None


def driver_transport(dbapi_connection: t.Any) -> asyncio.BaseTransport | None:
    """The asyncio transport behind SQLAlchemy's asyncio adapter, if any."""
    from .._private import asyncio_transport

    inner = getattr(dbapi_connection, "driver_connection", dbapi_connection)
    return asyncio_transport(inner)


def probe_for(dbapi_connection: t.Any) -> SocketProbe | None:
    """The liveness check of a new connection; ``None`` when the driver hides
    its socket.
    """
    fd = socket_fd(dbapi_connection)
    if fd is None:
        return None
    transport = driver_transport(dbapi_connection)
    return SocketProbe(fd) if transport is None else TransportProbe(fd, transport)


def uses_tls(dbapi_connection: t.Any) -> bool | None:
    """Whether the connection runs over TLS; ``None`` when the driver does not say.

    Over TLS an idle connection may have bytes waiting that are no reply at all
    (TLS 1.3 session tickets, alerts).
    """
    from .._private import pymysql_socket

    transport = driver_transport(dbapi_connection)
    if transport is not None:
        return transport.get_extra_info("ssl_object") is not None
    sock = pymysql_socket(dbapi_connection)
    if sock is None:
        return None
    return isinstance(sock, ssl.SSLSocket)


class SocketProbe:
    """Polls one connection's socket with a zero timeout; costs one syscall."""

    __slots__ = ("fd", "poll")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        #: ``poll(0)`` is truthy when the socket has anything to report. A bound
        #: method of a ``select.poll`` object, so the checkout path calls C directly.
        self.poll: t.Callable[[int], object]
        if _poll is not None:
            poller = _poll()
            poller.register(fd, _EVENTS)
            self.poll = poller.poll
        else:  # Windows: select works on sockets, poll does not exist.
            self.poll = self._select

    def _select(self, timeout: float) -> bool:
        readable, _, broken = _select([self.fd], [], [self.fd], timeout)
        return bool(readable or broken)

    def peek(self) -> tuple[str, bytes]:
        """Classify what the socket reported (after :attr:`poll` said something)."""
        return peek(self.fd)

    def check(self) -> tuple[str, bytes] | None:
        """``None`` when the socket is quiet; else a verdict and any peeked bytes."""
        return self.peek() if self.poll(0) else None


class TransportProbe(SocketProbe):
    """The probe of a connection an asyncio transport owns: the transport first.

    A transport that saw the end is closing, and its socket closed or about to
    be: that is the verdict, and the descriptor is never looked at again (its
    number may belong to another socket by now). Otherwise the socket is polled
    and peeked as any other; neither consumes a byte nor touches the event loop's
    own registration of it.
    """

    __slots__ = ("transport", "_poll_socket")

    def __init__(self, fd: int, transport: asyncio.BaseTransport) -> None:
        super().__init__(fd)
        self.transport = transport
        self._poll_socket = self.poll
        self.poll = self._poll_transport

    def _poll_transport(self, timeout: int) -> object:
        return self.transport.is_closing() or self._poll_socket(timeout)

    def peek(self) -> tuple[str, bytes]:
        if self.transport.is_closing():
            return CLOSED, b""
        return peek(self.fd)


@contextlib.contextmanager
def borrowed(fd: int) -> t.Iterator[_socket.socket]:
    """A socket object around the driver's descriptor, handed back unchanged.

    The C-level class, never a green one; and the descriptor's blocking mode is
    restored, since a default socket timeout would make the new object switch
    it (for the driver too: the mode belongs to the descriptor).
    """
    blocking = os.get_blocking(fd)
    sock = _socket.socket(fileno=fd)
    try:
        yield sock
    finally:
        sock.detach()
        if os.get_blocking(fd) != blocking:
            os.set_blocking(fd, blocking)


def peek(fd: int) -> tuple[str, bytes]:
    """Classify what is waiting on a readable socket without consuming it."""
    if not _DONTWAIT:
        return UNKNOWN, b""
    try:
        with borrowed(fd) as sock:
            data = sock.recv(_PEEK_BYTES, socket.MSG_PEEK | _DONTWAIT)
    except BlockingIOError:
        return UNKNOWN, b""
    except TimeoutError:  # ETIMEDOUT: keepalive (or TCP_USER_TIMEOUT) gave up
        return TIMED_OUT, b""
    except OSError:  # ECONNRESET, EPIPE...: the connection is broken
        return RESET, b""
    if not data:
        return EOF, b""
    return UNKNOWN, data


def mysql_verdict(data: bytes, tls: bool | None) -> tuple[str, str]:
    """What bytes waiting on an idle MySQL connection mean, with a detail.

    An error packet is the server's last word before it closed (4031). Any other
    bytes on plain TCP are an unread reply: a ping would read that reply as its
    own and leave its own answer for the next statement. Over TLS the bytes may be
    TLS records that are no reply; only a ping can tell.
    """
    code = mysql_error_code(data)
    if code is not None:
        return SERVER_ERROR, f"error {code}"
    if tls or (tls is None and looks_like_tls(data)):
        return UNKNOWN, "TLS records"
    return UNREAD, f"{len(data)}{'+' if len(data) == _PEEK_BYTES else ''} bytes"


def postgres_verdict(data: bytes) -> tuple[str, str]:
    """What bytes waiting on an idle PostgreSQL connection mean, with a detail.

    An ErrorResponse on an idle connection is always the server's last word (a
    FATAL: ``pg_terminate_backend``, ``idle_session_timeout``, a shutdown), as
    PostgreSQL sends errors unasked only before it closes. Anything else (a
    NOTIFY, a notice, a parameter change, TLS records) is no verdict: a ping
    decides.
    """
    if len(data) >= 5 and data[:1] == b"E":
        length = int.from_bytes(data[1:5], "big")
        if 4 < length < 1 << 20:
            codes = [f[1:] for f in data[5:].split(b"\0") if f[:1] == b"C"]
            sqlstate = codes[0].decode("ascii", "replace") if codes else "?"
            return SERVER_ERROR, f"SQLSTATE {sqlstate}"
    return UNKNOWN, ""


def mysql_error_code(data: bytes) -> int | None:
    """The error code of a MySQL ERR packet at the start of ``data``, else ``None``.

    A packet is a 3-byte length, a sequence number, then 0xFF for an error.
    """
    if len(data) >= 7 and data[4] == 0xFF:
        length = int.from_bytes(data[:3], "little")
        if 3 <= length <= 0xFFFFFF:
            return int.from_bytes(data[5:7], "little")
    return None


def looks_like_tls(data: bytes) -> bool:
    """Whether ``data`` starts with a TLS record header (type 20-24, version 3.x)."""
    return len(data) >= 5 and 20 <= data[0] <= 24 and data[1] == 3 and data[2] <= 4


def shut_down(fd: int) -> None:
    """Shut a socket down in both directions, so whoever blocks on it wakes up.

    Nothing is written (a close would send the driver's goodbye, which could
    interleave with another thread's bytes); the driver closes it afterwards.
    """
    with contextlib.suppress(OSError), borrowed(fd) as sock:
        sock.shutdown(socket.SHUT_RDWR)
