"""What the guard keeps for one app, in ``app.extensions["staleguard"]``."""

from __future__ import annotations

import dataclasses
import typing as t

import sqlalchemy as sa
from flask import current_app
from flask import Flask
from flask import has_app_context

from ..core.guard import PoolGuard
from ..core.holders import held_by
from .config import BindKey
from .config import Settings

if t.TYPE_CHECKING:
    from .staleguard import StaleGuard

#: The key of the guard's state in ``app.extensions``.
EXTENSION_KEY = "staleguard"


@dataclasses.dataclass
class GuardState:
    """What the guard keeps for one app, in ``app.extensions["staleguard"]``."""

    guard: StaleGuard
    settings: Settings
    binds: dict[BindKey, PoolGuard] = dataclasses.field(default_factory=dict)
    #: Engines the app made itself and added with ``guard.add_engine()``, by name.
    engines: dict[BindKey, sa.engine.Engine] = dataclasses.field(default_factory=dict)
    #: Each bind's connections checked out now (the teardown's quick test).
    held: list[dict[t.Any, t.Any]] = dataclasses.field(default_factory=list)
    #: ``True`` while the guard waits for the app's first context to attach.
    binds_pending: bool = False

    def add(self, bind: PoolGuard) -> None:
        """Guard ``bind`` from now on."""
        self.binds[bind.key] = bind
        self.held.append(bind.holders.checked_out)

    def holds(self, ctx: t.Any) -> bool:
        """Whether ``ctx`` has a connection checked out in any bind.

        Under load other requests always hold some: only the ending context's
        own make its clean-up worth running.
        """
        for checked_out in self.held:
            if held_by(checked_out, ctx):
                return True
        return False


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


def current_app_is(app: Flask) -> bool:
    """Whether ``app``'s context is the current one: then pushing another would
    run its teardowns a second time.
    """
    return has_app_context() and current_app._get_current_object() is app  # type: ignore[attr-defined]
