"""A SQLAlchemy ``create_engine`` plugin that attaches a pool's guard to its engine.

Flask-SQLAlchemy builds its engines inside its own ``init_app`` from
``SQLALCHEMY_ENGINE_OPTIONS`` / ``SQLALCHEMY_BINDS``. The guard adds
``plugins=["staleguard"]`` and ``staleguard="<token>"`` to those options: config
stays plain data, and the token names the guard registered here, so the listeners
are on the engine from the moment it exists, and again if Flask-SQLAlchemy
rebuilds it.
"""

from __future__ import annotations

import typing as t
import uuid
import weakref

import sqlalchemy as sa
from sqlalchemy.dialects import plugins
from sqlalchemy.engine import CreateEnginePlugin

if t.TYPE_CHECKING:
    from .guard import PoolGuard

#: The plugin's name, and the ``create_engine`` keyword that carries the token.
NAME = "staleguard"

# Held weakly: the guard lives as long as its app's state does.
_guards: weakref.WeakValueDictionary[str, PoolGuard] = weakref.WeakValueDictionary()


def token_for(guard: PoolGuard) -> str:
    """A token for ``guard``, to pass as ``create_engine(..., staleguard=token)``."""
    token = f"{guard.name}-{uuid.uuid4().hex}"
    _guards[token] = guard
    return token


class StaleGuardPlugin(CreateEnginePlugin):
    """Takes the ``staleguard`` token out of ``create_engine``'s keywords."""

    def __init__(self, url: sa.engine.URL, kwargs: dict[str, t.Any]) -> None:
        super().__init__(url, kwargs)
        token = kwargs.pop(NAME, None)
        self.guard = None if token is None else _guards.get(token)

    def update_url(self, url: sa.engine.URL) -> sa.engine.URL:
        return url  # the token travels in the keywords, never in the URL

    def engine_created(self, engine: sa.engine.Engine) -> None:
        if self.guard is not None:
            self.guard.attach(engine)


plugins.register(NAME, __name__, "StaleGuardPlugin")
