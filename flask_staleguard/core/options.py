"""The options of one pool's guard, and the pure validation they pass through.

The Flask extension reads them from ``STALEGUARD_*`` keys, one set per bind; the
validators take the name to blame, so every error names the key at fault.
"""

from __future__ import annotations

import dataclasses
import math

from ..errors import ConfigError

#: How stale connections are kept away: ``"guard"`` (idle budget and a
#: zero-round-trip socket check at checkout), ``"recycle"`` (derived
#: ``pool_recycle`` only), ``"pre_ping"`` (derived ``pool_recycle`` plus
#: ``pool_pre_ping=True``) or ``"off"``.
STRATEGIES = ("guard", "recycle", "pre_ping", "off")
#: What happens to a connection still checked out when its app context ends.
LEAK_POLICIES = ("warn", "reclaim", "raise")
#: The longest span any option accepts: a year, in seconds (what PyMySQL allows
#: for its connect timeout). Longer is a mistake, and would break the drivers.
MAX_SECONDS = 365 * 24 * 3600


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
    name: str, value: object, *, optional: bool = False, zero: bool = False
) -> float | None:
    """``value`` as seconds in (0, a year], or :class:`ConfigError`.

    ``optional`` admits ``None``; ``zero`` admits 0.
    """
    if value is None and optional:
        return None
    # bool is an int subclass, and True seconds is certainly a mistake.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        # An int beyond a float's range (10**400) cannot be seconds either.
        number = float(value) if abs(value) <= MAX_SECONDS else math.inf
        if math.isfinite(number) and (number > 0 or (zero and number == 0)):
            return number
    lower = "0 or more" if zero else "more than 0"
    also = ", or None" if optional else ""
    raise ConfigError(
        f"{name} is {_shown(value)}; expected a number of seconds {lower} and at"
        f" most {MAX_SECONDS} (a year){also}."
    )


def _shown(value: object) -> str:
    """``repr(value)``, cut short: ``10**400`` has 401 digits."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...{text[-10:]}"
