"""The current app context and request, and what the Flask version does at
teardown: Flask's public API only.
"""

from __future__ import annotations

import importlib.metadata
import re
import typing as t

from flask import has_request_context
from flask import request
from flask.globals import app_ctx

from ..core.holders import NOBODY

# Bound once: the checkout listener calls them for every checkout. Inside a
# context they cost what Flask's own ContextVar lookup does.
_app_context = t.cast(t.Any, app_ctx)._get_current_object
_request = t.cast(t.Any, request)._get_current_object


def flask_version() -> tuple[int, ...]:
    """Flask's version as numbers: ``(3, 2, 0)`` for ``3.2.0.dev0``."""
    numbers = re.findall(r"\d+", importlib.metadata.version("flask"))
    return tuple(int(n) for n in numbers[:3])


#: Flask 3.1 and older stop running teardown functions at the first that raises
#: (skipping Flask-SQLAlchemy's ``session.remove()``); 3.2 runs them all.
TEARDOWNS_STOP_AT_FIRST_ERROR = flask_version() < (3, 2)


def current_context() -> t.Any:
    """The current app context, or ``None`` outside of one."""
    try:
        return _app_context()
    except RuntimeError:
        return None


def current_holder() -> tuple[t.Any, t.Any]:
    """The current app context and the request it serves, each ``None`` when
    there is none: who holds a connection checked out now.
    """
    try:
        ctx = _app_context()
    except RuntimeError:
        return NOBODY
    # Asked first: an app context without a request (a job, a command) is
    # common, and the proxy's error would cost each checkout there 0.7 µs.
    return ctx, (_request() if has_request_context() else None)


def describe_request(request: t.Any) -> str:
    """How a leak report names the request that took a connection."""
    return f"during {request.method} {request.path} (endpoint {request.endpoint!r})"
