"""The :class:`StaleGuard` extension."""

from __future__ import annotations

import typing as t

from flask import Flask
from sqlalchemy.orm import scoped_session

from ..report.cli import cli
from . import binds
from . import teardown
from .attach import add_engine
from .attach import attach_at_first_context
from .attach import attach_to_engines
from .attach import attach_to_lite
from .attach import configure_binds
from .attach import not_guarded
from .config import bind_name
from .config import DEFAULTS
from .config import load_settings
from .state import EXTENSION_KEY
from .state import get_state
from .state import GuardState


class StaleGuard:
    """Keeps stale pooled connections away from a Flask-SQLAlchemy or
    Flask-SQLAlchemy-Lite app.

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

        Reads the ``STALEGUARD_*`` keys (see :mod:`flask_staleguard.extension.config`)
        and, per bind, the server's idle timeout. Raises
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
                configure_binds(configs, app.config, state)
            else:
                # Flask-SQLAlchemy-Lite, or a database configured later: the
                # engines exist by the app's first app context.
                names = binds.lite_names(app.config)
                if names:
                    state.settings = state.settings.for_binds(names)
                attach_at_first_context(app, state)
        elif binds.flask_sqlalchemy(app) is db:
            attach_to_engines(app, db, state)
        elif binds.is_lite(db):
            state.settings = state.settings.for_binds(binds.lite_names(app.config))
            attach_to_lite(app, db, state)
        else:
            not_guarded(app, binds.type_name(db))
        app.extensions[EXTENSION_KEY] = state
        teardown.install(app, state)
        app.cli.add_command(cli)

    def add_engine(self, app: Flask, engine: t.Any, name: str) -> None:
        """Guard an ``Engine`` or ``AsyncEngine`` the app made itself (the
        "SQLAlchemy in Flask" pattern), as a bind called ``name``: the commands,
        :meth:`stats`, signals and leak reports include it. It takes the app's
        ``STALEGUARD_*`` values (per-bind dicts name Flask-SQLAlchemy's binds:
        give an added engine plain numbers).
        Call it after :meth:`init_app`; it never blocks (the first connection
        says the server's idle timeout).
        """
        state = get_state(app, method="guard.add_engine")
        add_engine(app, state, getattr(engine, "sync_engine", engine), name)

    def register_session(self, session: scoped_session[t.Any]) -> None:
        """Remove ``session``'s current session at teardown, as ``db.session`` is."""
        self.sessions.append(session)

    def stats(self, app: Flask | None = None) -> dict[str, dict[str, t.Any]]:
        """Per bind (``"default"`` for the default bind), the counters so far.

        :param app: The app; the current one inside an app context.
        """
        state = get_state(app, method="guard.stats")
        return {bind_name(k): b.stats.snapshot() for k, b in state.binds.items()}
