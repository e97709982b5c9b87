"""TCP keepalive on pooled connections: a silently dropped path is found by the
kernel, not by a request that hangs.

A NAT gateway, load balancer or stateful firewall that forgets an idle flow drops
its packets without a FIN or RST; the socket looks healthy until a statement
waits on it for TCP's full retransmission timeout (15 minutes on Linux). Keepalive
probes keep such a flow alive, or, once the path is gone, make the kernel declare
the connection dead within about :attr:`Keepalive.window` seconds: the socket then
polls as an error, and the checkout replaces it with no round trip.
"""

from __future__ import annotations

import dataclasses
import math
import socket
import typing as t

#: Unanswered probes after which the kernel declares the connection dead.
PROBES = 3


@dataclasses.dataclass(frozen=True)
class Keepalive:
    """The keepalive of one pool's connections, in seconds."""

    #: Silence before the first probe.
    idle: int
    #: Between unanswered probes.
    interval: int
    #: Unanswered probes before the connection is dead.
    count: int = PROBES

    @property
    def window(self) -> int:
        """Seconds of silence after which a dead path is declared dead. It also
        bounds how long unacknowledged data may wait (``TCP_USER_TIMEOUT``), so a
        statement in flight on a dead path fails as soon.
        """
        return self.idle + self.interval * self.count


def keepalive_for(
    seconds: float | None, idle_timeout: float | None
) -> Keepalive | None:
    """The keepalive for ``STALEGUARD_KEEPALIVE`` = ``seconds``: ``None`` leaves
    the driver's setting alone. A declared path timer (``idle_timeout``) shorter
    than twice ``seconds`` makes the first probe come at half of it.
    """
    if seconds is None:
        return None
    if idle_timeout:
        seconds = min(seconds, idle_timeout / 2)
    idle = max(1, math.floor(seconds))
    return Keepalive(idle, max(1, idle // 4))


#: How the platform sets each value: ``(level, option name, unit)``; unit 1000
#: means milliseconds. Linux: TCP_KEEPIDLE; macOS: TCP_KEEPALIVE; Windows 10 1709+
#: has TCP_KEEPIDLE too. TCP_USER_TIMEOUT exists on Linux only.
_IDLE_NAMES = ("TCP_KEEPIDLE", "TCP_KEEPALIVE")


def _idle_option(module: t.Any) -> int | None:
    """The platform's option for the silence before the first probe, if any."""
    return next((getattr(module, n) for n in _IDLE_NAMES if hasattr(module, n)), None)


def socket_options(
    keepalive: Keepalive, module: t.Any = socket
) -> list[tuple[int, int, int]]:
    """The ``setsockopt`` calls that set ``keepalive`` on this platform's sockets,
    found by feature detection on ``module`` (:mod:`socket`).

    Where the platform has no option for a value, that value keeps the system's
    default: Windows before 10 1709 can only switch keepalive on.
    """
    sol, tcp = module.SOL_SOCKET, module.IPPROTO_TCP
    calls = [(sol, module.SO_KEEPALIVE, 1)]
    idle = _idle_option(module)
    if idle is not None:
        calls.append((tcp, idle, keepalive.idle))
    if hasattr(module, "TCP_KEEPINTVL"):
        calls.append((tcp, module.TCP_KEEPINTVL, keepalive.interval))
    if hasattr(module, "TCP_KEEPCNT"):
        calls.append((tcp, module.TCP_KEEPCNT, keepalive.count))
    if hasattr(module, "TCP_USER_TIMEOUT"):
        calls.append((tcp, module.TCP_USER_TIMEOUT, keepalive.window * 1000))
    return calls


def set_keepalive(sock: t.Any, keepalive: Keepalive) -> bool:
    """Set ``keepalive`` on a TCP socket; ``False`` for any other socket (a Unix
    socket has no path to lose).
    """
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    for level, option, value in socket_options(keepalive):
        sock.setsockopt(level, option, value)
    return True


def read_keepalive(sock: t.Any) -> dict[str, t.Any] | None:
    """What a TCP socket's keepalive really is, read back with ``getsockopt``:
    ``enabled``, and in seconds ``idle``, ``interval``, ``count``,
    ``user_timeout`` where the platform has them. ``None`` for a non-TCP socket.
    """
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    enabled = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))
    found: dict[str, t.Any] = {"enabled": enabled}
    idle = _idle_option(socket)
    for name, option, scale in (
        ("idle", idle, 1),
        ("interval", getattr(socket, "TCP_KEEPINTVL", None), 1),
        ("count", getattr(socket, "TCP_KEEPCNT", None), 1),
        ("user_timeout", getattr(socket, "TCP_USER_TIMEOUT", None), 1000),
    ):
        if option is not None:
            value = sock.getsockopt(socket.IPPROTO_TCP, option)
            found[name] = value / scale if scale != 1 else value
    return found
