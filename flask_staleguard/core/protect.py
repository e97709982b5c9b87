"""The pool guard without Flask: :func:`protect` any SQLAlchemy engine.

For FastAPI, Celery, scripts, or an engine a Flask app made by hand: the same
checks at checkout, idle budget, discovery of the server's timeout (on each new
connection), TCP keepalive, fork safety and disconnect reports as the Flask
extension. What needs an app context (leaks at the end of a request) is the
Flask extension's.
"""

from __future__ import annotations

import dataclasses
import logging
import typing as t

import sqlalchemy as sa

from .. import _private
from ..errors import ConfigError
from .derive import derive_engine_options
from .discovery import fallback_timeout
from .discovery import flavor
from .guard import PoolGuard
from .options import choice
from .options import GuardOptions
from .options import lifetime_seconds
from .options import ROLES
from .options import seconds
from .options import STRATEGIES
from .redact import Secrets
from .units import seconds_text

logger = logging.getLogger("flask_staleguard")

#: The options :func:`~flask_staleguard.protect` takes: the ``STALEGUARD_*``
#: keys in lower case, without the prefix, less the Flask-only ``leaks``.
OPTIONS = (
    "strategy",
    "idle_timeout",
    "server_timeout",
    "margin",
    "discovery_timeout",
    "leak_threshold",
    "keepalive",
    "role",
    "max_lifetime",
    "connect_timeout",
    "connect_wait",
)

#: What a pool does when it was not told otherwise: the user's own values win.
_POOL_DEFAULTS = {"pool_recycle": -1, "pool_pre_ping": False}


class Protection:
    """What :func:`~flask_staleguard.protect` returns: the engine's guard, and
    its counters.
    """

    def __init__(self, guard: PoolGuard) -> None:
        #: The guard of the engine's pool; the sender of every signal.
        self.guard = guard

    def stats(self) -> dict[str, t.Any]:
        """The counters so far, as ``StaleGuard.stats()`` gives them per bind."""
        return self.guard.stats.snapshot()


def guard_options(options: t.Mapping[str, t.Any]) -> GuardOptions:
    """Validate :func:`~flask_staleguard.protect`'s keyword options;
    :class:`~flask_staleguard.ConfigError` names the one at fault.
    """
    if "leaks" in options:
        raise ConfigError(
            "protect() has no 'leaks' option: leaks are judged when an app context"
            " ends, which takes the Flask extension; 'leak_threshold' works here."
        )
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ConfigError(
            f"protect() got the unknown option {unknown[0]!r}; it takes:"
            f" {', '.join(OPTIONS)}."
        )
    defaults = GuardOptions()
    get = options.get
    return GuardOptions(
        strategy=choice("strategy", get("strategy", defaults.strategy), STRATEGIES),
        idle_timeout=seconds("idle_timeout", get("idle_timeout"), optional=True),
        server_timeout=seconds("server_timeout", get("server_timeout"), optional=True),
        margin=seconds("margin", get("margin"), optional=True, zero=True),
        timeout=t.cast(
            float, seconds("discovery_timeout", get("discovery_timeout", 5.0))
        ),
        leaks="warn",
        leak_threshold=seconds("leak_threshold", get("leak_threshold"), optional=True),
        keepalive=seconds(
            "keepalive", get("keepalive", defaults.keepalive), optional=True
        ),
        role=choice("role", get("role", defaults.role), ROLES),
        max_lifetime=lifetime_seconds(
            "max_lifetime", get("max_lifetime", defaults.max_lifetime)
        ),
        connect_timeout=t.cast(
            float,
            seconds(
                "connect_timeout", get("connect_timeout", defaults.connect_timeout)
            ),
        ),
        connect_wait=t.cast(
            float,
            seconds(
                "connect_wait", get("connect_wait", defaults.connect_wait), zero=True
            ),
        ),
    )


def protect(
    engine: sa.engine.Engine | t.Any, *, name: str | None = None, **options: t.Any
) -> Protection:
    """Guard ``engine``'s pool (an ``Engine`` or an ``AsyncEngine``) from now on.

    :param name: The pool's name in logs; the URL's database by default.
    :param options: ``strategy``, ``idle_timeout``, ``server_timeout``,
        ``margin``, ``discovery_timeout``, ``leak_threshold``, ``keepalive``,
        ``role``, ``max_lifetime``, ``connect_timeout``, ``connect_wait``: the
        ``STALEGUARD_*`` keys of the same names, validated the same way.

    Nothing is asked of the server here: the first connection says its idle
    timeout (until then, the server's default is assumed), so this never blocks.
    """
    sync_engine = getattr(engine, "sync_engine", engine)
    label = name or sync_engine.url.database or sync_engine.url.get_backend_name()
    return Protection(guard_engine(sync_engine, label, guard_options(options)))


def guard_engine(
    engine: sa.engine.Engine,
    name: str,
    options: GuardOptions,
    *,
    key: t.Any = None,
    holder: t.Callable[[], tuple[t.Any, t.Any]] | None = None,
    describe: t.Callable[[t.Any], str] | None = None,
) -> PoolGuard:
    """A guard on an engine that exists already, attached to its pool.

    ``holder`` and ``describe`` are :class:`PoolGuard`'s. Derived pool
    options apply only where the pool still has SQLAlchemy's default.
    """
    url = engine.url
    kind = flavor(url)
    if kind == "sqlite":
        options = dataclasses.replace(options, strategy="off")
    server_timeout = options.server_timeout
    provisional = server_timeout is None and options.strategy != "off"
    if provisional:
        server_timeout = fallback_timeout(kind)
    guard = PoolGuard(
        key,
        name,
        Secrets(url),
        kind,
        options,
        server_timeout,
        provisional=provisional,
        holder=holder,
        describe=describe,
    )
    pool = engine.pool
    derived = derive_engine_options(
        options.strategy, guard.idle.finite, options.max_lifetime
    )
    for option, value in derived.items():
        if not _private.can_set_pool_option(pool, option):
            continue
        if _private.pool_option(pool, option) != _POOL_DEFAULTS[option]:
            continue  # set by the user: theirs wins
        _private.set_pool_option(pool, option, value)
        guard.applied[option] = value
    guard.attach(engine)
    logger.info(
        "pool %s (%s): strategy %s, server idle timeout %s%s, engine options %s",
        guard.name,
        guard.url,
        guard.strategy,
        seconds_text(server_timeout),
        " (until the first connection says)" if provisional else "",
        guard.applied or "unchanged",
    )
    return guard
