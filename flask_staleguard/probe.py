"""A zero-round-trip liveness check of a pooled connection's socket.

An idle pooled connection has nothing to read: a MySQL server never speaks first.
When its socket polls readable or hung up, the other side has closed it (FIN),
reset it (RST), or sent a last error packet (MySQL 8's 4031) before closing. A
peek (``MSG_PEEK``, nothing consumed) tells which. Bytes that cannot be classified
(TLS records, a PostgreSQL ``NOTIFY``) are left to a real ping.
"""

from __future__ import annotations

import functools
import select
import socket
import typing as t

#: The connection is gone: the peer closed it in an orderly way (FIN).
EOF = "probe_eof"
#: The connection is gone: the peer or a middlebox reset it (RST).
RESET = "probe_reset"
#: The server wrote an error packet to an idle connection, then closed it.
SERVER_ERROR = "probe_server_error"
#: Something is readable that a peek cannot classify; a real ping must decide.
UNKNOWN = "probe_unknown"

_PEEK_BYTES = 64
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
_HAS_POLL = hasattr(select, "poll")
if _HAS_POLL:
    _EVENTS = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP


def socket_fd(dbapi_connection: t.Any) -> int | None:
    """The file descriptor of a DBAPI connection's socket, if the driver has one.

    PyMySQL keeps it in ``_sock`` (there is no public accessor); mysqlclient,
    psycopg and psycopg2 have ``fileno()``.
    """
    try:
        sock = getattr(dbapi_connection, "_sock", None)
        if sock is not None:
            return int(sock.fileno())
        fileno = getattr(dbapi_connection, "fileno", None)
        if callable(fileno):
            return int(fileno())
    except Exception:  # a closed or broken connection has no usable socket
        return None
    return None


class SocketProbe:
    """Polls one connection's socket with a zero timeout; costs one syscall."""

    __slots__ = ("fd", "poll")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        #: ``poll(0)`` is truthy when the socket has anything to report. A bound
        #: method of a ``select.poll`` object, so the checkout path calls C directly.
        self.poll: t.Callable[[int], object]
        if _HAS_POLL:
            poller = select.poll()
            poller.register(fd, _EVENTS)
            self.poll = poller.poll
        else:  # Windows: select works on sockets, poll does not exist.
            self.poll = functools.partial(_select, fd)

    def peek(self) -> tuple[str, bytes]:
        """Classify what the socket reported (after :attr:`poll` said something)."""
        return peek(self.fd)

    def check(self) -> tuple[str, bytes] | None:
        """``None`` when the socket is quiet; else a verdict and any peeked bytes."""
        return self.peek() if self.poll(0) else None


def _select(fd: int, timeout: float) -> bool:
    readable, _, broken = select.select([fd], [], [fd], timeout)
    return bool(readable or broken)


def peek(fd: int) -> tuple[str, bytes]:
    """Classify what is waiting on a readable socket without consuming it."""
    if not _DONTWAIT:
        return UNKNOWN, b""
    # A socket object borrowed around the driver's descriptor; detach() below
    # hands it back so the driver's socket stays open.
    sock = socket.socket(fileno=fd)
    try:
        data = sock.recv(_PEEK_BYTES, socket.MSG_PEEK | _DONTWAIT)
    except BlockingIOError:
        return UNKNOWN, b""
    except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
        return RESET, b""
    except OSError:
        return RESET, b""
    finally:
        sock.detach()
    if not data:
        return EOF, b""
    return UNKNOWN, data


def mysql_error_code(data: bytes) -> int | None:
    """The error code of a MySQL ERR packet at the start of ``data``, else ``None``.

    A packet is a 3-byte length, a sequence number, then 0xFF for an error.
    """
    if len(data) >= 7 and data[4] == 0xFF:
        length = int.from_bytes(data[:3], "little")
        if 3 <= length <= 0xFFFFFF:
            return int.from_bytes(data[5:7], "little")
    return None
