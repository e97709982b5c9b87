"""Facts about each bind's pool, guard and server, gathered as JSON-ready dicts.

These plain functions back ``flask staleguard pool`` and ``check``, and
:func:`pool_snapshot` serves an app's own health or admin route. The dicts follow
the schema documented in ``docs/cli.md``; :data:`SCHEMA` numbers its version.
"""

from __future__ import annotations

import math
import typing as t

import sqlalchemy as sa
from flask import current_app
from flask import Flask
from flask import has_app_context
from sqlalchemy.pool import QueuePool

from . import _private
from .bind_guard import BindGuard
from .extension import get_state
from .server_facts import read_server
from .settings import BindKey

#: The version of the JSON schema; it changes only when a field is removed or
#: changes meaning (added fields keep it).
SCHEMA = 1

#: One bind's facts, as the JSON document has them.
Report = dict[str, t.Any]


class UnknownBind(LookupError):
    """``--bind`` named a bind the app does not have."""


def select_binds(app: Flask, name: str | None = None) -> list[BindGuard]:
    """The app's bind guards, default bind first; only ``name``'s when given."""
    state = get_state(app)
    binds = sorted(state.binds.values(), key=lambda b: (b.key is not None, b.name))
    if name is None:
        return binds
    chosen = [b for b in binds if b.name == name]
    if not chosen:
        known = ", ".join(b.name for b in binds) or "none"
        raise UnknownBind(f"no bind {name!r}; the app's binds are: {known}")
    return chosen


def engine_for(app: Flask, key: BindKey) -> sa.engine.Engine:
    """The engine Flask-SQLAlchemy made for ``key`` on ``app``."""
    db = app.extensions.get("sqlalchemy")
    if db is None:
        raise RuntimeError(
            "Flask-SQLAlchemy is not initialised on this app; call"
            " 'db.init_app(app)' first."
        )
    if has_app_context() and current_app._get_current_object() is app:  # type: ignore[attr-defined]
        return t.cast(sa.engine.Engine, db.engines[key])
    # Pushing a context of our own inside another app's would be harmless, but
    # inside this app's request it would run the teardowns a second time.
    with app.app_context():
        return t.cast(sa.engine.Engine, db.engines[key])


def pool_report(
    app: Flask | None = None,
    bind: str | None = None,
    *,
    server: bool = True,
    process_list: bool = True,
) -> list[Report]:
    """Per bind, the pool, what the guard does, and (``server=True``) what the
    server says: its idle timers and, with ``process_list``, this app's connections.

    A server that cannot be reached gives the bind an ``"error"``; it never raises.
    """
    app = app or current_app._get_current_object()  # type: ignore[attr-defined]
    reports = []
    for guard in select_binds(app, bind):
        engine = engine_for(app, guard.key)
        # This process's counts first: the server reads open a connection.
        report = _identity(guard, engine)
        report.update(_pool_facts(engine.pool, guard))
        report.update(_guard_facts(guard, engine.pool))
        report["stats"] = guard.stats.snapshot()
        if guard.kind == "sqlite":
            report["notes"].append(
                "SQLite has no server that closes idle connections: nothing to guard"
            )
        elif server:
            read_server(report, guard, engine, process_list)
        reports.append(report)
    return reports


def pool_snapshot(
    app: Flask | None = None,
    bind: str | None = None,
    *,
    server: bool = True,
    process_list: bool = True,
) -> dict[str, t.Any]:
    """``flask staleguard pool --json``'s document, for an app's own route.

    Passwords are masked. The server reads use a connection of their own, never
    a pool slot; with ``server=False`` there is no database round trip at all.
    """
    binds = pool_report(app, bind, server=server, process_list=process_list)
    return {"schema": SCHEMA, "binds": binds}


def _identity(guard: BindGuard, engine: sa.engine.Engine) -> Report:
    return {
        "bind": guard.name,
        "dialect": engine.dialect.name,
        "driver": engine.dialect.driver,
        "url": guard.url,
    }


def _pool_facts(pool: sa.pool.Pool, guard: BindGuard) -> Report:
    facts: Report = {
        "pool_class": type(pool).__name__,
        "size": None,
        "max_overflow": None,
        "pool_timeout": None,
        "checked_in": None,
        # The guard tracks checkouts on every pool class, not only QueuePool.
        "checked_out": len(guard.checked_out),
        "overflow": None,
    }
    if isinstance(pool, QueuePool):
        facts.update(
            size=pool.size(),
            max_overflow=_private.max_overflow(pool),
            pool_timeout=float(pool.timeout()),
            checked_in=pool.checkedin(),
            checked_out=pool.checkedout(),
            # QueuePool counts overflow from -pool_size; only the excess is news.
            overflow=max(0, pool.overflow()),
        )
    return facts


def _guard_facts(guard: BindGuard, pool: sa.pool.Pool) -> Report:
    if guard.kind == "sqlite":
        source = None
    elif not guard.discovers:
        source = "declared"
    elif guard.provisional:
        source = "assumed"
    elif guard.strategy == "off":
        source = None  # the "off" strategy does not ask the server
    else:
        source = "server"
    recycle = _private.pool_option(pool, "pool_recycle")
    return {
        "strategy": guard.strategy,
        "server_timeout": _number(guard.server_timeout),
        "server_timeout_source": source,
        "idle_timeout": _number(guard.idle_timeout),
        "idle_budget": _number(guard.budget),
        "pool_recycle": recycle if isinstance(recycle, int) else float(recycle),
        "pre_ping": bool(_private.pool_option(pool, "pool_pre_ping")),
        "applied": dict(guard.applied),
        "liveness_probe": None,
        "server": None,
        "connections": [],
        "notes": [],
        "error": None,
    }


def _number(value: float | None) -> float | None:
    """Seconds as a JSON number; ``None`` (null) for "no timer"."""
    if value is None or math.isinf(value):
        return None
    return float(value)
