"""Facts about each bind's pool, guard and server, gathered as JSON-ready dicts.

These plain functions back ``flask staleguard pool`` and ``check``, and
:func:`pool_snapshot` serves an app's own health or admin route. The dicts follow
the schema documented in ``docs/cli.md``; :data:`SCHEMA` numbers its version.
"""

from __future__ import annotations

import typing as t

import sqlalchemy as sa
from flask import current_app
from flask import Flask
from sqlalchemy.pool import QueuePool

from .. import _private
from ..core.guard import PoolGuard
from ..core.units import seconds_value
from ..errors import UnknownBind
from ..extension.config import BindKey
from ..extension.state import current_app_is
from ..extension.state import get_state
from .document import Report
from .document import SCHEMA
from .server_facts import read_server


def select_binds(app: Flask, name: str | None = None) -> list[PoolGuard]:
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
    """The engine Flask-SQLAlchemy made for ``key`` on ``app``, or the one the
    app added with :meth:`~flask_staleguard.StaleGuard.add_engine`.
    """
    added = get_state(app).engines.get(key)
    if added is not None:
        return added
    db = app.extensions.get("sqlalchemy")
    if db is None:
        raise RuntimeError(
            "Flask-SQLAlchemy is not initialised on this app; call"
            " 'db.init_app(app)' first."
        )
    if current_app_is(app):
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


def _identity(guard: PoolGuard, engine: sa.engine.Engine) -> Report:
    return {
        "bind": guard.name,
        "dialect": engine.dialect.name,
        "driver": engine.dialect.driver,
        "url": guard.url,
    }


def _pool_facts(pool: sa.pool.Pool, guard: PoolGuard) -> Report:
    facts: Report = {
        "pool_class": type(pool).__name__,
        "size": None,
        "max_overflow": None,
        "pool_timeout": None,
        "checked_in": None,
        # The guard tracks checkouts on every pool class, not only QueuePool.
        "checked_out": len(guard.holders.checked_out),
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


def _guard_facts(guard: PoolGuard, pool: sa.pool.Pool) -> Report:
    if guard.kind == "sqlite":
        source = None
    elif not guard.idle.discovers:
        source = "declared"
    elif guard.idle.provisional:
        source = "assumed"
    elif guard.strategy == "off":
        source = None  # the "off" strategy does not ask the server
    else:
        source = "server"
    recycle = _private.pool_option(pool, "pool_recycle")
    return {
        "strategy": guard.strategy,
        "server_timeout": seconds_value(guard.idle.server_timeout),
        "server_timeout_source": source,
        "idle_timeout": seconds_value(guard.idle.idle_timeout),
        "idle_budget": seconds_value(guard.idle.seconds),
        # Only the "guard" strategy gives connections a lifetime.
        "max_lifetime": (
            guard.options.max_lifetime if guard.strategy == "guard" else None
        ),
        "pool_recycle": recycle if isinstance(recycle, int) else float(recycle),
        "pre_ping": bool(_private.pool_option(pool, "pool_pre_ping")),
        "applied": dict(guard.applied),
        "role": guard.options.role,
        "node_role": guard.node_role,
        # None where the guard does not run the connects (asyncio, creator=).
        "connect_timeout": guard.connector.timeout if guard.connector.running else None,
        "connect_wait": guard.connector.wait if guard.connector.running else None,
        "liveness_probe": None,
        "keepalive": None,
        "read_timeout": None,
        "server": None,
        "connections": [],
        "notes": [],
        "error": None,
    }
