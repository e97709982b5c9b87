"""The :class:`StaleGuard` extension."""

from __future__ import annotations

import dataclasses
import logging
import threading
import typing as t

import sqlalchemy as sa
from flask import appcontext_pushed
from flask import current_app
from flask import Flask
from flask import has_app_context
from sqlalchemy.orm import scoped_session

from . import _private
from . import binds
from . import teardown
from .bind_guard import BindGuard
from .deadline import call_within
from .deadline import NoAnswer
from .derive import merge_options
from .discovery import discover
from .discovery import fallback_timeout
from .discovery import flavor
from .plugin import NAME as PLUGIN
from .redact import Secrets
from .settings import bind_name
from .settings import BindKey
from .settings import DEFAULTS
from .settings import load_settings
from .settings import Settings
from .units import seconds_text

logger = logging.getLogger("flask_staleguard")

#: The key of the guard's state in ``app.extensions``.
EXTENSION_KEY = "staleguard"

#: Config keys of Flask-SQLAlchemy-Lite, which the guard does not support yet.
_LITE_KEYS = ("SQLALCHEMY_ENGINES", "SQLALCHEMY_ASYNC_ENGINES")


@dataclasses.dataclass
class GuardState:
    """What the guard keeps for one app, in ``app.extensions["staleguard"]``."""

    guard: StaleGuard
    settings: Settings
    binds: dict[BindKey, BindGuard] = dataclasses.field(default_factory=dict)
    #: Each bind's connections checked out now (the teardown's quick test).
    held: list[dict[t.Any, t.Any]] = dataclasses.field(default_factory=list)
    #: ``True`` while the guard waits for the app's first context to attach.
    binds_pending: bool = False

    def add(self, bind: BindGuard) -> None:
        """Guard ``bind`` from now on."""
        self.binds[bind.key] = bind
        self.held.append(bind.checked_out)


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
            configs = binds.engine_configs(app.config)
            if configs:
                state.settings = state.settings.for_binds(configs)
                _configure_binds(configs, app.config, state)
            elif any(app.config.get(k) for k in _LITE_KEYS):
                _not_guarded(app, "SQLALCHEMY_ENGINES is set: Flask-SQLAlchemy-Lite")
            else:
                _attach_at_first_context(app, state)
        elif binds.flask_sqlalchemy(app) is db:
            _attach_to_engines(app, db, state)
        else:
            _not_guarded(app, f"{type(db).__module__}.{type(db).__name__}")
        app.extensions[EXTENSION_KEY] = state
        teardown.install(app, state)

        from .cli import cli

        app.cli.add_command(cli)

    def register_session(self, session: scoped_session[t.Any]) -> None:
        """Remove ``session``'s current session at teardown, as ``db.session`` is."""
        self.sessions.append(session)

    def stats(self, app: Flask | None = None) -> dict[str, dict[str, t.Any]]:
        """Per bind (``"default"`` for the default bind), the counters so far.

        :param app: The app; the current one inside an app context.
        """
        state = get_state(app, method="guard.stats")
        return {bind_name(k): b.stats.snapshot() for k, b in state.binds.items()}


def get_state(app: Flask | None = None, *, method: str = "this") -> GuardState:
    """The guard's state for ``app`` (default: the current app)."""
    if app is None:
        if not has_app_context():
            raise RuntimeError(
                f"{method}() was called outside an app context: pass the app,"
                f" {method}(app), or call it inside 'with app.app_context()'."
            )
        app = current_app._get_current_object()  # type: ignore[attr-defined]
    try:
        return t.cast(GuardState, app.extensions[EXTENSION_KEY])
    except KeyError:
        raise RuntimeError(
            "flask-staleguard is not initialised on this app; call"
            " 'guard.init_app(app)' first."
        ) from None


def _not_guarded(app: Flask, what: str) -> None:
    logger.warning(
        "app %s: %s is not supported yet; flask-staleguard leaves its engines"
        " alone and guards nothing (only Flask-SQLAlchemy's engines are guarded)",
        app.name,
        what,
    )


def _new_bind_guard(
    key: BindKey, url: sa.engine.URL, options: t.Mapping[str, t.Any], state: GuardState
) -> BindGuard:
    """A bind's guard, with the server's idle timeout discovered or declared."""
    settings = state.settings
    kind = flavor(url)
    secrets = Secrets(url, options.get("connect_args"))
    if kind == "sqlite":
        logger.info(
            "bind %s is SQLite: there is no connection to go stale", bind_name(key)
        )
        settings = dataclasses.replace(settings, strategy="off")
    declared = settings.server_timeout_for(key)
    timeout, provisional = declared, False
    if declared is None and settings.strategy != "off":
        seconds = settings.discovery_timeout
        try:
            timeout = call_within(
                seconds,
                lambda: discover(url, options, seconds),
                what=f"discovery of bind {bind_name(key)}",
            )
        except Exception as e:
            timeout, provisional = fallback_timeout(kind), True
            reason = secrets.one_line(e)
            if isinstance(e, NoAnswer):
                reason += " (STALEGUARD_DISCOVERY_TIMEOUT)"
            logger.warning(
                "bind %s: could not reach %s to read its idle timeout (%s);"
                " assuming %s until a connection succeeds",
                bind_name(key),
                secrets.url,
                reason,
                seconds_text(timeout),
            )
    return BindGuard(key, secrets, kind, settings, timeout, provisional=provisional)


def _log_bind(bind: BindGuard) -> None:
    logger.info(
        "bind %s (%s): strategy %s, server idle timeout %s%s, idle budget %s,"
        " engine options %s",
        bind.name,
        bind.url,
        bind.strategy,
        seconds_text(bind.server_timeout),
        " (assumed)" if bind.provisional else "",
        seconds_text(bind.budget),
        bind.applied or "unchanged",
    )


def _configure_binds(
    configs: dict[BindKey, dict[str, t.Any]],
    config: t.MutableMapping[str, t.Any],
    state: GuardState,
) -> None:
    """Write each bind's derived options and the plugin into ``app.config``."""
    for key, options in configs.items():
        url = sa.engine.make_url(options["url"])
        bind = _new_bind_guard(key, url, options, state)
        _, bind.applied = merge_options(options, bind.derived)
        plugins = [*options.get("plugins", ()), PLUGIN]
        binds.add_engine_options(
            config, key, {**bind.applied, "plugins": plugins, PLUGIN: bind}
        )
        state.add(bind)
        _log_bind(bind)


def _attach_to_engines(app: Flask, db: t.Any, state: GuardState) -> None:
    """Attach to the engines Flask-SQLAlchemy created before the guard ran."""
    user = binds.engine_configs(app.config)
    if has_app_context() and current_app._get_current_object() is app:  # type: ignore[attr-defined]
        engines: dict[BindKey, sa.engine.Engine] = dict(db.engines)
    else:
        with app.app_context():
            engines = dict(db.engines)
    state.settings = state.settings.for_binds(engines)
    for key, engine in engines.items():
        # Options the user gave Flask-SQLAlchemy directly count as set, too.
        options = {**_private.constructor_engine_options(db), **user.get(key, {})}
        bind = _new_bind_guard(key, engine.url, options, state)
        _, wanted = merge_options(options, bind.derived)
        for name, value in wanted.items():
            if not _private.can_set_pool_option(engine.pool, name):
                logger.warning(
                    "bind %s: could not set %s=%r on the existing %s; call"
                    " guard.init_app(app) before db.init_app(app)",
                    bind.name,
                    name,
                    value,
                    type(engine.pool).__name__,
                )
                continue
            _private.set_pool_option(engine.pool, name, value)
            bind.applied[name] = value
        bind.attach(engine)
        # Connections pooled before now carry none of the guard's bookkeeping.
        engine.dispose()
        state.add(bind)
        _log_bind(bind)
    logger.info(
        "flask-staleguard attached to the engines Flask-SQLAlchemy had created; call"
        " guard.init_app(app) before db.init_app(app) to see the derived options"
        " in SQLALCHEMY_ENGINE_OPTIONS"
    )


def _attach_at_first_context(app: Flask, state: GuardState) -> None:
    """No database is configured yet: attach when the app first runs.

    ``SQLALCHEMY_DATABASE_URI`` may be set after ``guard.init_app(app)`` and
    before ``db.init_app(app)``; by the app's first app context (its first
    request or command) Flask-SQLAlchemy has made its engines.
    """
    lock = threading.Lock()

    def attach(sender: Flask, **kwargs: t.Any) -> None:
        with lock:
            if not state.binds_pending:
                return
            db = binds.flask_sqlalchemy(app)
            if db is not None:
                logger.warning(
                    "app %s: neither SQLALCHEMY_DATABASE_URI nor SQLALCHEMY_BINDS"
                    " was set when guard.init_app(app) ran; the guard attached to"
                    " Flask-SQLAlchemy's engines at the app's first app context."
                    " Set them before calling guard.init_app(app)",
                    app.name,
                )
                _attach_to_engines(app, db, state)
            elif app.extensions.get("sqlalchemy") is not None:
                sqlalchemy = app.extensions["sqlalchemy"]
                _not_guarded(
                    app, f"{type(sqlalchemy).__module__}.{type(sqlalchemy).__name__}"
                )
            else:
                logger.warning(
                    "app %s: no Flask-SQLAlchemy by its first app context, and"
                    " neither SQLALCHEMY_DATABASE_URI nor SQLALCHEMY_BINDS set:"
                    " flask-staleguard guards nothing",
                    app.name,
                )
            state.binds_pending = False
            appcontext_pushed.disconnect(attach, sender=app)

    state.binds_pending = True
    # Held strongly by the signal, and disconnected after its one run.
    appcontext_pushed.connect(attach, sender=app, weak=False)
