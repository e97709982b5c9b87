"""Put a guard on each of the app's Flask-SQLAlchemy engines, in either init order.

Before ``db.init_app(app)``, the derived options and the plugin go into
``app.config``, so the engines are born guarded; after it, the guard attaches to
the engines that exist; with no database configured yet, at the app's first app
context.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import typing as t

import sqlalchemy as sa
from flask import appcontext_pushed
from flask import Flask

from .. import _private
from ..core.deadline import call_within
from ..core.derive import merge_options
from ..core.discovery import discover
from ..core.discovery import fallback_timeout
from ..core.discovery import flavor
from ..core.guard import PoolGuard
from ..core.plugin import NAME as PLUGIN
from ..core.plugin import token_for
from ..core.protect import guard_engine
from ..core.redact import Secrets
from ..core.units import seconds_text
from ..errors import NoAnswer
from . import binds
from .config import bind_name
from .config import BindKey
from .contexts import current_holder
from .contexts import describe_request
from .state import current_app_is
from .state import GuardState

logger = logging.getLogger("flask_staleguard")


def not_guarded(app: Flask, what: str) -> None:
    """Say once that ``app``'s engines are left alone."""
    logger.warning(
        "app %s: %s is not supported yet; flask-staleguard leaves its engines"
        " alone and guards nothing (Flask-SQLAlchemy's and Flask-SQLAlchemy-Lite's"
        " engines are guarded, and those given to guard.add_engine())",
        app.name,
        what,
    )


def new_bind_guard(
    key: BindKey, url: sa.engine.URL, options: t.Mapping[str, t.Any], state: GuardState
) -> PoolGuard:
    """A bind's guard, with the server's idle timeout discovered or declared."""
    guard_options = state.settings.options_for(key)
    kind = flavor(url)
    secrets = Secrets(url, options.get("connect_args"))
    if kind == "sqlite":
        logger.info(
            "bind %s is SQLite: there is no connection to go stale", bind_name(key)
        )
        guard_options = dataclasses.replace(guard_options, strategy="off")
    timeout, provisional = guard_options.server_timeout, False
    if timeout is None and guard_options.strategy != "off":
        seconds = guard_options.timeout
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
    return PoolGuard(
        key,
        bind_name(key),
        secrets,
        kind,
        guard_options,
        timeout,
        provisional=provisional,
        holder=current_holder,
        describe=describe_request,
    )


def add_engine(
    app: Flask, state: GuardState, engine: sa.engine.Engine, name: str
) -> PoolGuard:
    """Guard an engine the app made itself, under ``name`` among its binds."""
    taken = {bind_name(k) for k in state.binds}
    if name in taken:
        raise ValueError(
            f"guard.add_engine(): the name {name!r} is taken by a bind of app"
            f" {app.name}; its binds are: {', '.join(sorted(taken))}."
        )
    guard = guard_engine(
        engine,
        name,
        state.settings.options_for(name),
        key=name,
        holder=current_holder,
        describe=describe_request,
    )
    state.engines[name] = engine
    state.add(guard)
    return guard


def attach_to_lite(app: Flask, db: t.Any, state: GuardState) -> None:
    """Guard each engine Flask-SQLAlchemy-Lite made (its async engines as
    ``async/<name>``), as :func:`add_engine` guards an engine made by hand.
    """
    if current_app_is(app):
        engines, async_engines = dict(db.engines), dict(db.async_engines)
    else:
        with app.app_context():
            engines, async_engines = dict(db.engines), dict(db.async_engines)
    for name, engine in engines.items():
        add_engine(app, state, engine, name)
    for name, engine in async_engines.items():
        add_engine(app, state, engine.sync_engine, f"{binds.ASYNC_PREFIX}{name}")


def _log_bind(bind: PoolGuard) -> None:
    logger.info(
        "bind %s (%s): strategy %s, server idle timeout %s%s, idle budget %s,"
        " engine options %s",
        bind.name,
        bind.url,
        bind.strategy,
        seconds_text(bind.idle.server_timeout),
        " (assumed)" if bind.idle.provisional else "",
        seconds_text(bind.idle.seconds),
        bind.applied or "unchanged",
    )


def configure_binds(
    configs: dict[BindKey, dict[str, t.Any]],
    config: t.MutableMapping[str, t.Any],
    state: GuardState,
) -> None:
    """Write each bind's derived options and the plugin into ``app.config``."""
    for key, options in configs.items():
        url = sa.engine.make_url(options["url"])
        bind = new_bind_guard(key, url, options, state)
        _, bind.applied = merge_options(options, bind.derived)
        plugins = [*options.get("plugins", ()), PLUGIN]
        binds.add_engine_options(
            config, key, {**bind.applied, "plugins": plugins, PLUGIN: token_for(bind)}
        )
        state.add(bind)
        _log_bind(bind)


def attach_to_engines(app: Flask, db: t.Any, state: GuardState) -> None:
    """Attach to the engines Flask-SQLAlchemy created before the guard ran."""
    user = binds.engine_configs(app.config)
    if current_app_is(app):
        engines: dict[BindKey, sa.engine.Engine] = dict(db.engines)
    else:
        with app.app_context():
            engines = dict(db.engines)
    state.settings = state.settings.for_binds(engines)
    for key, engine in engines.items():
        # Options the user gave Flask-SQLAlchemy directly count as set, too.
        options = {**_private.constructor_engine_options(db), **user.get(key, {})}
        bind = new_bind_guard(key, engine.url, options, state)
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


def attach_at_first_context(app: Flask, state: GuardState) -> None:
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
            other = app.extensions.get("sqlalchemy")
            if other is not None and binds.is_lite(other):
                attach_to_lite(app, other, state)
            elif db is not None:
                logger.warning(
                    "app %s: neither SQLALCHEMY_DATABASE_URI nor SQLALCHEMY_BINDS"
                    " was set when guard.init_app(app) ran; the guard attached to"
                    " Flask-SQLAlchemy's engines at the app's first app context."
                    " Set them before calling guard.init_app(app)",
                    app.name,
                )
                attach_to_engines(app, db, state)
            elif other is not None:
                not_guarded(app, binds.type_name(other))
            elif not state.engines:
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
