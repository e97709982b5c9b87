"""The options of one pool's guard, and the pure validation they pass through.

The Flask extension reads them from ``STALEGUARD_*`` keys, one set per bind; the
validators take the name to blame, so every error names the key at fault.
"""

from __future__ import annotations

import dataclasses
import math
import typing as t

from ..errors import ConfigError

#: How stale connections are kept away: ``"guard"`` (idle budget and a
#: zero-round-trip socket check at checkout), ``"recycle"`` (derived
#: ``pool_recycle`` only), ``"pre_ping"`` (derived ``pool_recycle`` plus
#: ``pool_pre_ping=True``) or ``"off"``.
STRATEGIES = ("guard", "recycle", "pre_ping", "off")
#: Which nodes a pool's new connections may land on: ``"auto"`` (any, but after
#: a failover on the pool, a read-only one is replaced until one lands on a
#: writer), ``"writer"`` (a read-only node is always replaced, within the connect
#: wait) or ``"any"`` (a replica: its refusals are never taken for a failover).
ROLES = ("auto", "writer", "any")
#: What happens to a connection still checked out when its app context ends.
LEAK_POLICIES = ("warn", "reclaim", "raise")
#: The longest span any option accepts: a year, in seconds (what PyMySQL allows
#: for its connect timeout). Longer is a mistake, and would break the drivers.
MAX_SECONDS = 365 * 24 * 3600
#: The longest connection lifetime: Flask-SQLAlchemy's own ``pool_recycle`` on
#: MySQL. Longer would keep a connection on an old node longer than no guard does.
MAX_LIFETIME = 7200


@dataclasses.dataclass(frozen=True)
class GuardOptions:
    """The validated options of one pool's guard."""

    strategy: str = "guard"
    #: A declared idle timer on the network path, in seconds.
    idle_timeout: float | None = None
    #: The server's idle timeout, declared; ``None``: ask the server.
    server_timeout: float | None = None
    #: Seconds taken off the idle timeout; ``None``: automatic.
    margin: float | None = None
    #: Seconds any exchange of the guard's own with the database may take.
    timeout: float = 5.0
    leaks: str = "reclaim"
    #: Seconds a connection may be held outside any app context before it is
    #: reported; ``None``: never.
    leak_threshold: float | None = None
    #: Seconds of silence before a TCP keepalive probe; ``None``: the driver's.
    keepalive: float | None = 60.0
    #: Which nodes its connections may be on: one of ``ROLES``.
    role: str = "auto"
    #: Seconds a connection may live; each draws its own, 75 to 100 % of this.
    #: HikariCP's ``maxLifetime`` default; at most ``MAX_LIFETIME`` (7200).
    max_lifetime: float = 1800.0
    #: Seconds one new connection (TCP connect, handshake, login) may take:
    #: PyMySQL's own default.
    connect_timeout: float = 10.0
    #: Seconds a new connection keeps being tried through transient failures (a
    #: restart, a full or silent server) before the last error is raised; 0:
    #: never. Never more than the pool's ``pool_timeout``.
    connect_wait: float = 10.0


def choice(name: str, value: object, accepted: tuple[str, ...]) -> str:
    """``value`` if it is one of ``accepted``, else :class:`ConfigError`."""
    if isinstance(value, str) and value in accepted:
        return value
    raise ConfigError(
        f"{name} is {value!r}; accepted values are: "
        + ", ".join(repr(a) for a in accepted)
        + "."
    )


def seconds(
    name: str,
    value: object,
    *,
    optional: bool = False,
    zero: bool = False,
    most: int = MAX_SECONDS,
    why: str = "a year",
) -> float | None:
    """``value`` as seconds in (0, a year], or :class:`ConfigError`.

    ``optional`` admits ``None``; ``zero`` admits 0; ``most`` lowers the cap,
    which the error explains with ``why``.
    """
    if value is None and optional:
        return None
    # bool is an int subclass, and True seconds is certainly a mistake.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        # An int beyond a float's range (10**400) cannot be seconds either.
        number = float(value) if abs(value) <= MAX_SECONDS else math.inf
        if number <= most and (number > 0 or (zero and number == 0)):
            return number
    lower = "0 or more" if zero else "more than 0"
    also = ", or None" if optional else ""
    raise ConfigError(
        f"{name} is {_shown(value)}; expected a number of seconds {lower} and at"
        f" most {most} ({why}){also}."
    )


def lifetime_seconds(name: str, value: object) -> float:
    """``value`` as a connection's maximum lifetime, in (0, ``MAX_LIFETIME``]
    seconds, or :class:`ConfigError`.
    """
    return t.cast(
        float,
        seconds(
            name,
            value,
            most=MAX_LIFETIME,
            why="Flask-SQLAlchemy's own pool_recycle on MySQL",
        ),
    )


def _shown(value: object) -> str:
    """``repr(value)``, cut short: ``10**400`` has 401 digits."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...{text[-10:]}"
