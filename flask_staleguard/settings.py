"""The ``STALEGUARD_*`` configuration keys, their defaults, and their validation.

Everything here is pure: :func:`load_settings` reads a mapping (normally
``app.config``) and returns a frozen :class:`Settings`, or raises
:class:`ConfigError` naming the key at fault and the values it accepts.
"""

from __future__ import annotations

import dataclasses
import math
import typing as t

#: How stale connections are kept away from the app: ``"guard"`` (idle budget and
#: a zero-round-trip socket check at checkout), ``"recycle"`` (derived
#: ``pool_recycle`` only), ``"pre_ping"`` (derived ``pool_recycle`` plus
#: ``pool_pre_ping=True``) or ``"off"``.
STRATEGY = "STALEGUARD_STRATEGY"
#: Seconds after which something between the app and the server (a load balancer,
#: a proxy, NAT) drops an idle connection. ``None``: nothing shorter than the
#: server's own timeout. A number, or a dict of bind key to number.
IDLE_TIMEOUT = "STALEGUARD_IDLE_TIMEOUT"
#: Seconds the server lets a connection idle. ``None``: ask the server
#: (``@@session.wait_timeout``, ``idle_session_timeout``). A number, or a dict of
#: bind key to number.
SERVER_TIMEOUT = "STALEGUARD_SERVER_TIMEOUT"
#: Seconds taken off the idle timeout so a connection is replaced before the other
#: side closes it. ``None``: 10 % of the timeout, at most 30 s.
MARGIN = "STALEGUARD_MARGIN"
#: Seconds any exchange of the guard's own with the database may take: discovery
#: at start-up and on each new connection, the probe's ping, the CLI's connections.
DISCOVERY_TIMEOUT = "STALEGUARD_DISCOVERY_TIMEOUT"
#: What to do with a connection still checked out when the app context that took
#: it ends: ``"warn"``, ``"reclaim"`` (warn, close it, free its pool slot) or
#: ``"raise"`` (reclaim, then raise :class:`~flask_staleguard.LeakError`).
LEAKS = "STALEGUARD_LEAKS"
#: Seconds a connection may stay checked out outside any app context (a thread, a
#: job) before it is reported with where it was taken. ``None``: never.
LEAK_THRESHOLD = "STALEGUARD_LEAK_THRESHOLD"

STRATEGIES = ("guard", "recycle", "pre_ping", "off")
LEAK_POLICIES = ("warn", "reclaim", "raise")

#: The defaults, applied with ``app.config.setdefault`` at ``init_app``.
DEFAULTS: dict[str, t.Any] = {
    STRATEGY: "guard",
    IDLE_TIMEOUT: None,
    SERVER_TIMEOUT: None,
    MARGIN: None,
    DISCOVERY_TIMEOUT: 5.0,
    LEAKS: "reclaim",
    LEAK_THRESHOLD: None,
}

#: A bind key: ``None`` is Flask-SQLAlchemy's default bind.
BindKey = t.Optional[str]
PerBind = t.Union[float, None, t.Mapping[BindKey, t.Optional[float]]]

#: How the default bind is named in logs, output, ``--bind`` and per-bind dicts
#: (where ``None``, Flask-SQLAlchemy's own key for it, works too).
DEFAULT_BIND = "default"
#: The longest span any key accepts: a year, in seconds (what PyMySQL allows for
#: its connect timeout). Longer is a mistake, and would break the drivers.
MAX_SECONDS = 365 * 24 * 3600


def bind_name(key: BindKey) -> str:
    """How a bind key reads in logs and output: ``"default"`` for ``None``."""
    return DEFAULT_BIND if key is None else key


class ConfigError(ValueError):
    """A ``STALEGUARD_*`` key has a value the extension cannot use."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """The validated configuration of one app."""

    strategy: str = "guard"
    idle_timeout: PerBind = None
    server_timeout: PerBind = None
    margin: float | None = None
    discovery_timeout: float = 5.0
    leaks: str = "reclaim"
    leak_threshold: float | None = None

    def idle_timeout_for(self, bind: BindKey) -> float | None:
        """The declared middlebox idle timer for ``bind``, if any."""
        return _for_bind(self.idle_timeout, bind)

    def server_timeout_for(self, bind: BindKey) -> float | None:
        """The declared server idle timeout for ``bind``, if any."""
        return _for_bind(self.server_timeout, bind)

    def for_binds(self, binds: t.Iterable[BindKey]) -> Settings:
        """These settings with per-bind dicts keyed by the app's real bind keys.

        Raises :class:`ConfigError` for a key that names no bind of the app.
        """
        known = list(binds)
        return dataclasses.replace(
            self,
            idle_timeout=_keyed(IDLE_TIMEOUT, self.idle_timeout, known),
            server_timeout=_keyed(SERVER_TIMEOUT, self.server_timeout, known),
        )


def _for_bind(value: PerBind, bind: BindKey) -> float | None:
    if isinstance(value, t.Mapping):
        return value.get(bind)
    return value


def _keyed(key: str, value: PerBind, known: list[BindKey]) -> PerBind:
    """``value`` with ``"default"`` read as the default bind, and every key checked
    against the app's binds.
    """
    if not isinstance(value, t.Mapping):
        return value
    ordered = sorted(known, key=lambda b: (b is not None, b or ""))
    names = ", ".join(repr(bind_name(b)) for b in ordered) or "none"
    keyed: dict[BindKey, float | None] = {}
    for bind, seconds in value.items():
        actual: BindKey = bind
        if bind == DEFAULT_BIND and bind not in known:
            actual = None
        elif bind == DEFAULT_BIND and None in known:
            raise ConfigError(
                f"{key} has the key 'default', which names both the default bind"
                " and the bind 'default' of SQLALCHEMY_BINDS; use None for the"
                " default bind."
            )
        if actual not in known:
            raise ConfigError(
                f"{key} has the key {bind!r}, which is not a bind of this app; its"
                f" binds are: {names} ('default' or None for the default bind)."
            )
        if actual in keyed:
            raise ConfigError(
                f"{key} gives the default bind twice, as 'default' and as None."
            )
        keyed[actual] = seconds
    return keyed


def load_settings(config: t.Mapping[str, t.Any]) -> Settings:
    """Validate the ``STALEGUARD_*`` keys of ``config`` and return them as settings."""
    unknown = sorted(
        k for k in config if k.startswith("STALEGUARD_") and k not in DEFAULTS
    )
    if unknown:
        raise ConfigError(
            f"Unknown configuration key {unknown[0]!r}; the keys flask-staleguard"
            f" reads are: {', '.join(DEFAULTS)}."
        )
    get = {k: config.get(k, v) for k, v in DEFAULTS.items()}
    return Settings(
        strategy=_choice(STRATEGY, get[STRATEGY], STRATEGIES),
        idle_timeout=_per_bind(IDLE_TIMEOUT, get[IDLE_TIMEOUT]),
        server_timeout=_per_bind(SERVER_TIMEOUT, get[SERVER_TIMEOUT]),
        margin=_seconds(MARGIN, get[MARGIN], optional=True, zero=True),
        discovery_timeout=t.cast(
            float, _seconds(DISCOVERY_TIMEOUT, get[DISCOVERY_TIMEOUT])
        ),
        leaks=_choice(LEAKS, get[LEAKS], LEAK_POLICIES),
        leak_threshold=_seconds(LEAK_THRESHOLD, get[LEAK_THRESHOLD], optional=True),
    )


def _choice(key: str, value: object, accepted: tuple[str, ...]) -> str:
    if isinstance(value, str) and value in accepted:
        return value
    raise ConfigError(
        f"{key} is {value!r}; accepted values are: "
        + ", ".join(repr(a) for a in accepted)
        + "."
    )


def _seconds(
    key: str, value: object, *, optional: bool = False, zero: bool = False
) -> float | None:
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
        f"{key} is {_shown(value)}; expected a number of seconds {lower} and at"
        f" most {MAX_SECONDS} (a year){also}."
    )


def _shown(value: object) -> str:
    """``repr(value)``, cut short: ``10**400`` has 401 digits."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...{text[-10:]}"


def _per_bind(key: str, value: object) -> PerBind:
    if isinstance(value, t.Mapping):
        return {
            bind: _seconds(f"{key}[{bind!r}]", seconds, optional=True)
            for bind, seconds in value.items()
        }
    return _seconds(key, value, optional=True)
