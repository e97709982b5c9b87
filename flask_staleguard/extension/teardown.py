"""End-of-context clean-up: leaked scoped sessions and leaked connections.

It runs after *all* teardown functions. Flask 3.2 runs them all anyway, and the
clean-up is the last of them; Flask 3.1 and older stop at the first teardown that
raises, which skips Flask-SQLAlchemy's ``session.remove()`` and leaves a session
holding a connection, so there the app's ``do_teardown_appcontext`` is wrapped.
"""

from __future__ import annotations

import functools
import logging
import types
import typing as t

from flask import Flask
from sqlalchemy.orm import scoped_session

from .._private import pop_lite_async_sessions
from .._private import pop_lite_sessions
from .._private import sessions_open
from ..errors import LeakError
from .binds import flask_sqlalchemy
from .binds import is_lite
from .contexts import current_context
from .contexts import TEARDOWNS_STOP_AT_FIRST_ERROR
from .leaks import defer_for_streams
from .leaks import reclaim_leaks
from .leaks import streaming
from .state import GuardState

logger = logging.getLogger("flask_staleguard")


def install(app: Flask, state: GuardState) -> None:
    """Make ``app`` call :func:`clean_up` after its teardown functions, and after
    a streamed response is closed.
    """
    app.after_request(functools.partial(defer_for_streams, state))
    if TEARDOWNS_STOP_AT_FIRST_ERROR:
        _wrap_teardowns(app, state)
    else:
        # Teardown functions run in reverse order of registration: first is last.
        app.teardown_appcontext_funcs.insert(
            0, functools.partial(_teardown, app, state)
        )


#: Stands for "no ``exc`` given": Flask's own default (``sys.exc_info()``) applies.
_FLASKS_DEFAULT = object()


def _wrap_teardowns(app: Flask, state: GuardState) -> None:
    """Wrap ``app.do_teardown_appcontext``: a raising teardown skips the rest."""
    original = app.do_teardown_appcontext
    sessions = state.guard.sessions
    held = state.held

    @functools.wraps(original)
    def do_teardown_appcontext(exc: t.Any = _FLASKS_DEFAULT) -> None:
        try:
            if exc is _FLASKS_DEFAULT:
                original()
            else:
                original(exc)
        except BaseException as e:
            try:
                clean_up(app, state, current_context(), failure=e)
            except LeakError:
                pass  # the teardown's own error is the one to see; leaks were logged
            raise
        # Inline, as it runs after every request: usually there is nothing to do.
        # (any() of the dicts: whether any bind has a connection checked out.)
        if sessions or any(held):
            ctx = current_context()
            if sessions or state.holds(ctx):
                clean_up(app, state, ctx)

    app.do_teardown_appcontext = do_teardown_appcontext  # type: ignore[method-assign]


def _teardown(app: Flask, state: GuardState, exc: BaseException | None) -> None:
    # Flask-SQLAlchemy's teardown ran before this one; a session still there
    # means its remove() failed.
    db = flask_sqlalchemy(app)
    if state.guard.sessions or (db is not None and sessions_open(db.session)):
        clean_up(app, state, current_context())
    elif any(state.held):
        ctx = current_context()
        if state.holds(ctx):
            clean_up(app, state, ctx)


def clean_up(
    app: Flask,
    state: GuardState,
    ctx: t.Any,
    *,
    failure: BaseException | None = None,
) -> None:
    """Remove this context's leftover sessions, then reclaim its leaked connections
    (those of a still-streaming response wait for it to close).

    ``failure`` is what a teardown function raised, if one did. Never raises,
    except :class:`LeakError` under ``STALEGUARD_LEAKS = "raise"``.
    """
    try:
        db = flask_sqlalchemy(app)
        if db is not None:
            remove_session(db.session, "db.session", left_by=_culprit(failure))
        for session in state.guard.sessions:
            remove_session(session, repr(session))
        if ctx is not None and is_lite(app.extensions.get("sqlalchemy")):
            close_lite_sessions(ctx, _culprit(failure))
    except Exception:
        logger.exception("flask-staleguard: clean-up at teardown failed")
    if ctx is not None and not streaming(ctx):
        reclaim_leaks(state, ctx)


def close_lite_sessions(ctx: t.Any, left_by: str) -> None:
    """Close the sessions Flask-SQLAlchemy-Lite left on ``g``, async ones too:
    its teardown did not run (Flask 3.1 and older stop at the first teardown
    that raises).
    """
    left_by = left_by.replace("Flask-SQLAlchemy's", "Flask-SQLAlchemy-Lite's")
    sessions = [(name, s.close) for name, s in pop_lite_sessions(ctx.g).items()]
    for name, session in pop_lite_async_sessions(ctx.g).items():
        # Flask's own bridge from sync code to a coroutine (asgiref, which
        # Flask-SQLAlchemy-Lite's async support needs anyway).
        sessions.append((f"{name} (async)", ctx.app.ensure_sync(session.close)))
    for name, close in sessions:
        try:
            close()
        except Exception as e:
            logger.warning(
                "Flask-SQLAlchemy-Lite's session %r could not be closed at"
                " teardown (%s: %s); it was discarded",
                name,
                type(e).__name__,
                e,
            )
            continue
        logger.warning(
            "Flask-SQLAlchemy-Lite's session %r was still open after teardown (%s);"
            " it was closed and its connection returned",
            name,
            left_by,
        )


def _culprit(failure: BaseException | None) -> str:
    """Why Flask-SQLAlchemy's session may still be open: who raised, and what."""
    if failure is None:
        return (
            "Flask-SQLAlchemy's session.remove() failed, or a teardown function"
            " that ran after it used db.session"
        )
    raised = f"{type(failure).__name__}: {failure}"
    function = _raising_teardown(failure.__traceback__)
    if function is not None and function[0].startswith("flask_sqlalchemy"):
        return f"Flask-SQLAlchemy's session.remove() raised {raised}"
    name = "a teardown function" if function is None else "teardown function %s.%s"
    if function is not None:
        name %= function
    return f"{name} raised {raised} before Flask-SQLAlchemy's teardown ran"


def _raising_teardown(tb: types.TracebackType | None) -> tuple[str, str] | None:
    """Module and name of the function called by ``do_teardown_appcontext`` in
    which the exception was raised: the teardown function at fault.
    """
    while tb is not None:
        next_tb = tb.tb_next
        if tb.tb_frame.f_code.co_name == "do_teardown_appcontext" and next_tb:
            frame = next_tb.tb_frame
            if frame.f_code.co_name != "do_teardown_appcontext":
                return str(frame.f_globals.get("__name__", "?")), frame.f_code.co_name
        tb = next_tb
    return None


def remove_session(
    session: scoped_session[t.Any], name: str, *, left_by: str | None = None
) -> None:
    """Close and discard the current context's session of ``session``, if any.

    ``left_by`` says why the session is still open; ``None`` when it is expected
    (a session the app registered with the guard for removal).
    """
    if not session.registry.has():
        return
    current = session.registry()
    unsaved = bool(current.new or current.dirty or current.deleted)
    try:
        session.remove()
    except Exception as e:
        # Discard it anyway: a later context with the same scope key would
        # inherit a broken session.
        session.registry.clear()
        logger.warning(
            "%s could not be closed at teardown (%s: %s); it was discarded",
            name,
            type(e).__name__,
            e,
        )
        return
    if unsaved:
        logger.warning(
            "%s was left open with unsaved changes at teardown; they were rolled back",
            name,
        )
    elif left_by is not None:
        logger.warning(
            "%s was still open after teardown (%s); it was closed and its"
            " connection returned",
            name,
            left_by,
        )
    else:
        logger.debug("%s removed at teardown", name)
