"""The :class:`StaleGuard` extension."""

from __future__ import annotations

import dataclasses
import logging
import typing as t

import sqlalchemy as sa
from flask import current_app
from flask import Flask
from sqlalchemy.orm import scoped_session

from . import binds
from .bind_guard import BindGuard
from .derive import merge_options
from .discovery import discover
from .discovery import fallback_timeout
from .discovery import flavor
from .plugin import NAME as PLUGIN
from .settings import bind_name
from .settings import BindKey
from .settings import DEFAULTS
from .settings import load_settings
from .settings import Settings
from .teardown import run_after_teardowns

logger = logging.getLogger("flask_staleguard")

#: The key of the guard's state in ``app.extensions``.
EXTENSION_KEY = "staleguard"

# Pool attributes that hold create_engine's pool_* options once the pool exists.
# Private, but read on every checkout and carried over by Pool.recreate().
_POOL_ATTRIBUTES = {"pool_recycle": "_recycle", "pool_pre_ping": "_pre_ping"}


@dataclasses.dataclass
class GuardState:
    """What the guard keeps for one app, in ``app.extensions["staleguard"]``."""

    guard: StaleGuard
    settings: Settings
    binds: dict[BindKey, BindGuard] = dataclasses.field(default_factory=dict)


class StaleGuard:
    """Keeps stale pooled connections away from a Flask-SQLAlchemy app.

    Call :meth:`init_app` before ``db.init_app(app)`` so the derived engine
    options reach the engines Flask-SQLAlchemy creates; called later, the guard
    attaches to the engines that already exist.

    :param app: An app to initialise now; or call :meth:`init_app` later.
    """

    def __init__(self, app: Flask | None = None) -> None:
        #: Scoped sessions besides ``db.session`` to remove at teardown.
        self.sessions: list[scoped_session[t.Any]] = []
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Set up the guard for ``app``: derive engine options, attach to the
        pools, install the teardown clean-up and the ``flask staleguard`` commands.

        Reads the ``STALEGUARD_*`` keys (see :mod:`flask_staleguard.settings`) and,
        per bind, the server's idle timeout. Raises
        :class:`~flask_staleguard.ConfigError` for an invalid value.
        """
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError(
                "A 'StaleGuard' instance is already registered on this Flask app."
            )
        for key, value in DEFAULTS.items():
            app.config.setdefault(key, value)
        state = GuardState(self, load_settings(app.config))
        db = app.extensions.get("sqlalchemy")
        if db is None:
            _configure_binds(app, state)
        else:
            _attach_to_engines(app, db, state)
        app.extensions[EXTENSION_KEY] = state
        run_after_teardowns(app, state)

        from .cli import cli

        app.cli.add_command(cli)

    def register_session(self, session: scoped_session[t.Any]) -> None:
        """Remove ``session``'s current session at teardown, as ``db.session`` is."""
        self.sessions.append(session)

    def stats(self, app: Flask | None = None) -> dict[str, dict[str, t.Any]]:
        """Per bind (``"default"`` for the default bind), the counters so far."""
        state = get_state(app)
        return {bind_name(k): b.stats.snapshot() for k, b in state.binds.items()}


def get_state(app: Flask | None = None) -> GuardState:
    """The guard's state for ``app`` (default: the current app)."""
    app = app or current_app._get_current_object()  # type: ignore[attr-defined]
    try:
        return t.cast(GuardState, app.extensions[EXTENSION_KEY])
    except KeyError:
        raise RuntimeError(
            "flask-staleguard is not initialised on this app; call"
            " 'guard.init_app(app)' first."
        ) from None


def _new_bind_guard(
    key: BindKey, url: sa.engine.URL, options: t.Mapping[str, t.Any], state: GuardState
) -> BindGuard:
    """A bind's guard, with the server's idle timeout discovered or declared."""
    settings = state.settings
    kind = flavor(url)
    if kind == "sqlite":
        logger.info(
            "bind %s is SQLite: there is no connection to go stale", bind_name(key)
        )
        settings = dataclasses.replace(settings, strategy="off")
    declared = settings.server_timeout_for(key)
    timeout, provisional = declared, False
    if declared is None and settings.strategy != "off":
        try:
            timeout = discover(url, options, settings.discovery_timeout)
        except Exception as e:
            timeout, provisional = fallback_timeout(kind), True
            logger.warning(
                "bind %s: could not reach %s to read its idle timeout (%s); assuming"
                " %s until a connection succeeds",
                bind_name(key),
                url.render_as_string(hide_password=True),
                getattr(e, "orig", None) or e,
                "none" if timeout is None else f"{timeout:g} s",
            )
    return BindGuard(key, url, settings, timeout, provisional=provisional)


def _log_bind(bind: BindGuard) -> None:
    logger.info(
        "bind %s (%s): strategy %s, server idle timeout %s%s, idle budget %s,"
        " engine options %s",
        bind_name(bind.key),
        bind.url,
        bind.strategy,
        "none" if bind.server_timeout is None else f"{bind.server_timeout:g} s",
        " (assumed)" if bind.provisional else "",
        "none" if bind.budget == float("inf") else f"{bind.budget:g} s",
        bind.applied or "unchanged",
    )


def _configure_binds(app: Flask, state: GuardState) -> None:
    """Write each bind's derived options and the plugin into ``app.config``."""
    for key, options in binds.engine_configs(app.config).items():
        url = sa.engine.make_url(options["url"])
        bind = _new_bind_guard(key, url, options, state)
        _, bind.applied = merge_options(options, bind.derived)
        plugins = [*options.get("plugins", ()), PLUGIN]
        binds.add_engine_options(
            app.config, key, {**bind.applied, "plugins": plugins, PLUGIN: bind}
        )
        state.binds[key] = bind
        _log_bind(bind)


def _attach_to_engines(app: Flask, db: t.Any, state: GuardState) -> None:
    """Attach to the engines Flask-SQLAlchemy created before the guard ran."""
    user = binds.engine_configs(app.config)
    with app.app_context():
        engines: dict[BindKey, sa.engine.Engine] = dict(db.engines)
    for key, engine in engines.items():
        # Options the user gave Flask-SQLAlchemy directly count as set, too.
        options = {**getattr(db, "_engine_options", {}), **user.get(key, {})}
        bind = _new_bind_guard(key, engine.url, options, state)
        _, wanted = merge_options(options, bind.derived)
        for name, value in wanted.items():
            attribute = _POOL_ATTRIBUTES[name]
            if not hasattr(engine.pool, attribute):
                logger.warning(
                    "bind %s: could not set %s=%r on the existing %s; call"
                    " guard.init_app(app) before db.init_app(app)",
                    bind_name(key),
                    name,
                    value,
                    type(engine.pool).__name__,
                )
                continue
            setattr(engine.pool, attribute, value)
            bind.applied[name] = value
        bind.attach(engine)
        # Connections pooled before now carry none of the guard's bookkeeping.
        engine.dispose()
        state.binds[key] = bind
        _log_bind(bind)
    logger.info(
        "flask-staleguard attached to the engines Flask-SQLAlchemy had created; call"
        " guard.init_app(app) before db.init_app(app) to see the derived options"
        " in SQLALCHEMY_ENGINE_OPTIONS"
    )
