"""A SQLAlchemy ``create_engine`` plugin that attaches a bind's guard to its engine.

Flask-SQLAlchemy builds its engines inside its own ``init_app`` from
``SQLALCHEMY_ENGINE_OPTIONS`` / ``SQLALCHEMY_BINDS``. The guard adds
``plugins=["staleguard"]`` and ``staleguard=<BindGuard>`` to those options, so the
listeners are on the engine from the moment it exists, and again if
Flask-SQLAlchemy rebuilds it.
"""

from __future__ import annotations

import typing as t

import sqlalchemy as sa
from sqlalchemy.dialects import plugins
from sqlalchemy.engine import CreateEnginePlugin

#: The plugin's name, and the ``create_engine`` keyword that carries the guard.
NAME = "staleguard"


class StaleGuardPlugin(CreateEnginePlugin):
    """Takes the ``staleguard`` option out of ``create_engine``'s keywords."""

    def __init__(self, url: sa.engine.URL, kwargs: dict[str, t.Any]) -> None:
        super().__init__(url, kwargs)
        self.bind_guard = kwargs.pop(NAME, None)

    def update_url(self, url: sa.engine.URL) -> sa.engine.URL:
        return url  # the guard travels in the keywords, never in the URL

    def engine_created(self, engine: sa.engine.Engine) -> None:
        if self.bind_guard is not None:
            self.bind_guard.attach(engine)


plugins.register(NAME, __name__, "StaleGuardPlugin")
