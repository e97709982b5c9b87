"""End-of-context clean-up: leaked scoped sessions and leaked connections.

It runs after *all* teardown functions, even when one of them raised: Flask 3.1
and older stop at the first teardown that raises, which skips Flask-SQLAlchemy's
``session.remove()`` and leaves a session holding a connection.
"""

from __future__ import annotations

import functools
import logging
import typing as t

from flask import Flask
from flask.globals import _cv_app
from sqlalchemy.orm import scoped_session

from .errors import LeakError

if t.TYPE_CHECKING:
    from .extension import GuardState

logger = logging.getLogger("flask_staleguard")


def run_after_teardowns(app: Flask, state: GuardState) -> None:
    """Make ``app`` call :func:`clean_up` once its teardown functions have run.

    ``teardown_appcontext`` cannot promise that (a raising teardown skips the rest),
    so the app's ``do_teardown_appcontext`` is wrapped, on this app only.
    """
    original = app.do_teardown_appcontext

    extensions = app.extensions
    sessions = state.guard.sessions
    held = [bind.checked_out for bind in state.binds.values()]

    @functools.wraps(original)
    def do_teardown_appcontext(*args: t.Any, **kwargs: t.Any) -> None:
        try:
            original(*args, **kwargs)
        finally:
            # Inline and without a generator, as it runs after every request:
            # usually there is nothing to do. An empty session registry (the
            # usual case: Flask-SQLAlchemy removed the session) needs no lookup
            # of the current scope.
            db = extensions.get("sqlalchemy")
            if (
                sessions
                or (db is not None and getattr(db.session.registry, "registry", True))
                or any(map(bool, held))
            ):
                clean_up(app, state)

    app.do_teardown_appcontext = do_teardown_appcontext  # type: ignore[method-assign]


def clean_up(app: Flask, state: GuardState) -> None:
    """Remove this context's leftover sessions, then reclaim its leaked connections.

    Never raises, except :class:`LeakError` under ``STALEGUARD_LEAKS = "raise"``.
    """
    leaks = 0
    try:
        db = app.extensions.get("sqlalchemy")
        if db is not None:
            remove_session(db.session, "db.session", abnormal=True)
        for session in state.guard.sessions:
            remove_session(session, repr(session), abnormal=False)
        busy = [bind for bind in state.binds.values() if bind.checked_out]
        ctx = _cv_app.get(None) if busy else None
        if ctx is not None:
            for bind in busy:
                for record, checkout in bind.leaks_of(id(ctx)):
                    bind.reclaim(record, checkout)
                    leaks += 1
    except Exception:
        logger.exception("flask-staleguard: clean-up at teardown failed")
    if leaks and state.settings.leaks == "raise":
        raise LeakError(
            f"{leaks} connection(s) were still checked out when the app context"
            " ended (see the warnings above for where they were taken);"
            " STALEGUARD_LEAKS='raise'"
        )


def remove_session(
    session: scoped_session[t.Any], name: str, *, abnormal: bool
) -> None:
    """Close and discard the current context's session of ``session``, if any."""
    if not session.registry.has():
        return
    current = session.registry()
    unsaved = bool(current.new or current.dirty or current.deleted)
    session.remove()
    if unsaved:
        logger.warning(
            "%s was left open with unsaved changes at teardown; they were rolled back",
            name,
        )
    elif abnormal:
        logger.warning(
            "%s was still open after teardown (a teardown function raised before"
            " Flask-SQLAlchemy's ran); it was closed and its connection returned",
            name,
        )
    else:
        logger.debug("%s removed at teardown", name)
