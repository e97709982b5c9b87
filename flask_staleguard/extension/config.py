"""The ``STALEGUARD_*`` configuration keys, their defaults, and their validation.

Everything here is pure: :func:`load_settings` reads a mapping (normally
``app.config``) and returns a frozen :class:`Settings`, or raises
:class:`~flask_staleguard.ConfigError` naming the key at fault and the values it
accepts. :meth:`Settings.options_for` gives one bind's
:class:`~flask_staleguard.core.options.GuardOptions`.
"""

from __future__ import annotations

import dataclasses
import typing as t

from ..core.options import choice
from ..core.options import GuardOptions
from ..core.options import LEAK_POLICIES
from ..core.options import lifetime_seconds
from ..core.options import ROLES
from ..core.options import seconds
from ..core.options import STRATEGIES
from ..errors import ConfigError

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
#: Seconds of silence after which the kernel sends a TCP keepalive probe on a
#: pooled connection; it probes again every quarter of that (at least 1 s) and
#: declares the connection dead after 3 unanswered probes, and unacknowledged
#: data may wait no longer than that either (``TCP_USER_TIMEOUT``, Linux). A
#: shorter ``STALEGUARD_IDLE_TIMEOUT`` brings the first probe to half of it.
#: ``None`` leaves the driver's socket options alone.
KEEPALIVE = "STALEGUARD_KEEPALIVE"
#: Which nodes a bind's connections may be on: ``"auto"`` (any; after a failover
#: on the bind, a new connection that lands on a read-only node is replaced until
#: one lands on a writer), ``"writer"`` (always so) or ``"any"`` (a replica: a
#: refused write is never taken for a failover). A string, or a dict of bind key
#: to string.
ROLE = "STALEGUARD_ROLE"
#: Seconds a pooled connection may live under the ``"guard"`` strategy, at most
#: 7200 (Flask-SQLAlchemy's own ``pool_recycle`` on MySQL). Each connection draws
#: its own lifetime at connect, 75 to 100 % of this; one past it is replaced at
#: checkout, never while in use. The backstop for what no check can see: an old
#: node that still answers after a fail-over.
MAX_LIFETIME = "STALEGUARD_MAX_LIFETIME"
#: Seconds one new connection (TCP connect, handshake, login) may take; the
#: driver's own timeouts, for the connect only. A user's ``connect_args`` win.
CONNECT_TIMEOUT = "STALEGUARD_CONNECT_TIMEOUT"
#: Seconds a new connection keeps being tried through transient failures (the
#: server restarting, full, silent) before the last error is raised; 0: never.
#: Never more than the pool's ``pool_timeout``.
CONNECT_WAIT = "STALEGUARD_CONNECT_WAIT"

#: The defaults, applied with ``app.config.setdefault`` at ``init_app``.
DEFAULTS: dict[str, t.Any] = {
    STRATEGY: "guard",
    IDLE_TIMEOUT: None,
    SERVER_TIMEOUT: None,
    MARGIN: None,
    DISCOVERY_TIMEOUT: 5.0,
    LEAKS: "reclaim",
    LEAK_THRESHOLD: None,
    KEEPALIVE: 60.0,
    ROLE: "auto",
    MAX_LIFETIME: GuardOptions.max_lifetime,
    CONNECT_TIMEOUT: 10.0,
    CONNECT_WAIT: 10.0,
}

#: A bind key: ``None`` is Flask-SQLAlchemy's default bind.
BindKey = t.Optional[str]
PerBind = t.Union[float, None, t.Mapping[BindKey, t.Optional[float]]]
PerBindRole = t.Union[str, t.Mapping[BindKey, str]]

#: How the default bind is named in logs, output, ``--bind`` and per-bind dicts
#: (where ``None``, Flask-SQLAlchemy's own key for it, works too).
DEFAULT_BIND = "default"


def bind_name(key: BindKey) -> str:
    """How a bind key reads in logs and output: ``"default"`` for ``None``."""
    return DEFAULT_BIND if key is None else key


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
    keepalive: float | None = 60.0
    role: PerBindRole = "auto"
    max_lifetime: float = GuardOptions.max_lifetime
    connect_timeout: float = 10.0
    connect_wait: float = 10.0

    def idle_timeout_for(self, bind: BindKey) -> float | None:
        """The declared middlebox idle timer for ``bind``, if any."""
        return _for_bind(self.idle_timeout, bind)

    def server_timeout_for(self, bind: BindKey) -> float | None:
        """The declared server idle timeout for ``bind``, if any."""
        return _for_bind(self.server_timeout, bind)

    def role_for(self, bind: BindKey) -> str:
        """Which nodes ``bind``'s connections may be on."""
        if isinstance(self.role, t.Mapping):
            return str(self.role.get(bind, DEFAULTS[ROLE]))
        return self.role

    def options_for(self, bind: BindKey) -> GuardOptions:
        """The guard options of ``bind``."""
        return GuardOptions(
            strategy=self.strategy,
            idle_timeout=self.idle_timeout_for(bind),
            server_timeout=self.server_timeout_for(bind),
            margin=self.margin,
            timeout=self.discovery_timeout,
            leaks=self.leaks,
            leak_threshold=self.leak_threshold,
            keepalive=self.keepalive,
            role=self.role_for(bind),
            max_lifetime=self.max_lifetime,
            connect_timeout=self.connect_timeout,
            connect_wait=self.connect_wait,
        )

    def for_binds(self, binds: t.Iterable[BindKey]) -> Settings:
        """These settings with per-bind dicts keyed by the app's real bind keys.

        Raises :class:`~flask_staleguard.ConfigError` for a key that names no
        bind of the app.
        """
        known = list(binds)
        return dataclasses.replace(
            self,
            idle_timeout=_keyed(IDLE_TIMEOUT, self.idle_timeout, known),
            server_timeout=_keyed(SERVER_TIMEOUT, self.server_timeout, known),
            role=_keyed(ROLE, self.role, known),
        )


def _for_bind(value: PerBind, bind: BindKey) -> float | None:
    if isinstance(value, t.Mapping):
        return value.get(bind)
    return value


V = t.TypeVar("V", PerBind, PerBindRole)


def _keyed(key: str, value: V, known: list[BindKey]) -> V:
    """``value`` with ``"default"`` read as the default bind, and every key checked
    against the app's binds.
    """
    if not isinstance(value, t.Mapping):
        return value
    ordered = sorted(known, key=lambda b: (b is not None, b or ""))
    names = ", ".join(repr(bind_name(b)) for b in ordered) or "none"
    keyed: dict[BindKey, t.Any] = {}
    for bind, number in value.items():
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
        keyed[actual] = number
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
        strategy=choice(STRATEGY, get[STRATEGY], STRATEGIES),
        idle_timeout=_per_bind(IDLE_TIMEOUT, get[IDLE_TIMEOUT]),
        server_timeout=_per_bind(SERVER_TIMEOUT, get[SERVER_TIMEOUT]),
        margin=seconds(MARGIN, get[MARGIN], optional=True, zero=True),
        discovery_timeout=t.cast(
            float, seconds(DISCOVERY_TIMEOUT, get[DISCOVERY_TIMEOUT])
        ),
        leaks=choice(LEAKS, get[LEAKS], LEAK_POLICIES),
        leak_threshold=seconds(LEAK_THRESHOLD, get[LEAK_THRESHOLD], optional=True),
        keepalive=seconds(KEEPALIVE, get[KEEPALIVE], optional=True),
        role=_per_bind_role(get[ROLE]),
        max_lifetime=lifetime_seconds(MAX_LIFETIME, get[MAX_LIFETIME]),
        connect_timeout=t.cast(float, seconds(CONNECT_TIMEOUT, get[CONNECT_TIMEOUT])),
        connect_wait=t.cast(float, seconds(CONNECT_WAIT, get[CONNECT_WAIT], zero=True)),
    )


def _per_bind_role(value: object) -> PerBindRole:
    if isinstance(value, t.Mapping):
        return {
            bind: choice(f"{ROLE}[{bind!r}]", v, ROLES) for bind, v in value.items()
        }
    return choice(ROLE, value, ROLES)


def _per_bind(key: str, value: object) -> PerBind:
    if isinstance(value, t.Mapping):
        return {
            bind: seconds(f"{key}[{bind!r}]", number, optional=True)
            for bind, number in value.items()
        }
    return seconds(key, value, optional=True)
