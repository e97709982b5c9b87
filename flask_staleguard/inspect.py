"""Facts about each bind's pool, guard and server, gathered as JSON-ready dicts.

These plain functions back ``flask staleguard pool`` and ``check``, and
:func:`pool_snapshot` serves an app's own health or admin route. The dicts follow
the schema documented in ``docs/cli.md``; :data:`SCHEMA` numbers its version.
"""

from __future__ import annotations

import contextlib
import math
import re
import typing as t
import urllib.parse

import sqlalchemy as sa
from flask import current_app
from flask import Flask
from flask import has_app_context
from sqlalchemy.pool import QueuePool
from sqlalchemy.pool.base import _ConnectionRecord

from . import probe
from .bind_guard import BindGuard
from .errors import error_code
from .extension import get_state
from .settings import BindKey

#: The version of the JSON schema; it changes only when a field is removed or
#: changes meaning (added fields keep it).
SCHEMA = 1

#: MySQL's ER_SPECIFIC_ACCESS_DENIED_ERROR and ER_TABLEACCESS_DENIED_ERROR, and
#: PostgreSQL's insufficient_privilege.
_DENIED_CODES = frozenset({1227, 1142, 1044})
_DENIED_SQLSTATE = "42501"

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


def one_line(error: BaseException, url: sa.engine.URL) -> str:
    """The driver's message for ``error`` on one line, with the password masked."""
    original = getattr(error, "orig", None) or error
    text = " ".join(str(original).split()) or type(original).__name__
    return mask(text, url)


def mask(text: str, url: sa.engine.URL) -> str:
    """``text`` with every spelling of ``url``'s password replaced by ``***``."""
    password = url.password
    if not password:
        return text
    secret = str(password)
    for spelling in {
        secret,
        urllib.parse.quote(secret, safe=""),
        urllib.parse.quote_plus(secret),
    }:
        text = text.replace(spelling, "***")
    return text


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
            _read_server(report, guard, engine, process_list)
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
            max_overflow=int(getattr(pool, "_max_overflow", 0)),
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
    recycle = getattr(pool, "_recycle", -1)
    return {
        "strategy": guard.strategy,
        "server_timeout": _number(guard.server_timeout),
        "server_timeout_source": source,
        "idle_timeout": _number(guard.idle_timeout),
        "idle_budget": _number(guard.budget),
        "pool_recycle": recycle if isinstance(recycle, int) else float(recycle),
        "pre_ping": bool(getattr(pool, "_pre_ping", False)),
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


# -- the server's view -------------------------------------------------------------


def _read_server(
    report: Report, guard: BindGuard, engine: sa.engine.Engine, process_list: bool
) -> None:
    """Fill ``server``, ``connections``, ``liveness_probe`` and ``notes``."""
    notes: list[str] = report["notes"]
    # A connection of our own beside the pool, not one from it: borrowing an idle
    # pooled connection would hide it from the list of the app's connections, and
    # a full pool would keep us waiting. The pool's connect listeners still run,
    # so the session looks like the app's (a SET in a "connect" hook shows).
    try:
        record = _ConnectionRecord(engine.pool)
    except Exception as e:  # whatever the driver raises: report it, never crash
        report["error"] = f"cannot connect to {guard.url}: {one_line(e, engine.url)}"
        return
    dbapi_connection = record.dbapi_connection
    try:
        report["liveness_probe"] = probe.socket_fd(dbapi_connection) is not None
        if guard.kind == "mysql":
            mariadb = bool(getattr(engine.dialect, "is_mariadb", False))
            server, connections = _mysql(dbapi_connection, notes, mariadb, process_list)
        elif guard.kind == "postgresql":
            server, connections = _postgresql(dbapi_connection, notes, process_list)
        else:
            notes.append(f"no server timers are known for {engine.dialect.name}")
            return
        for row in connections:
            idle = row["idle"]
            row["past_budget"] = idle is not None and idle > guard.budget
        report["server"] = server
        report["connections"] = connections
        past = sum(row["past_budget"] for row in connections)
        if past:
            notes.append(
                f"{past} connection(s) idle past the idle budget"
                f" ({report['idle_budget']:g} s)"
            )
    except Exception as e:
        reason = one_line(e, engine.url)
        report["error"] = f"cannot read the server's settings: {reason}"
    finally:
        record.close()


def _rows(dbapi_connection: t.Any, sql: str) -> list[tuple[t.Any, ...]]:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(sql)
        return [tuple(row) for row in cursor.fetchall()]
    finally:
        cursor.close()


def _attempt(
    dbapi_connection: t.Any, notes: list[str], what: str, sql: str
) -> list[tuple[t.Any, ...]] | None:
    """Rows of ``sql``, or ``None`` with a note when it fails (a missing privilege)."""
    try:
        return _rows(dbapi_connection, sql)
    except Exception as e:  # a diagnostic query must never fail the report
        # PostgreSQL refuses every statement of a failed transaction until rollback.
        with contextlib.suppress(Exception):
            dbapi_connection.rollback()
        code = error_code(e)
        sqlstate = getattr(e, "sqlstate", None) or getattr(e, "pgcode", None)
        reason = " ".join(str(e).split())
        if code in _DENIED_CODES or sqlstate == _DENIED_SQLSTATE:
            missing = re.search(r"the (\w+) privilege", reason)
            if missing:
                privilege = f"the {missing.group(1)} privilege"
            else:
                privilege = f"a privilege ({reason})"
            notes.append(f"{what} not shown: the database user lacks {privilege}")
        else:
            notes.append(f"{what} not shown: {reason}")
        return None


def _seconds(value: t.Any, scale: float = 1.0) -> float | None:
    """A timer setting in seconds; 0 or a missing setting means "no timer"."""
    if value is None:
        return None
    number = float(value) * scale
    return number or None


# Constant SQL only: no parameters, so no paramstyle differences between drivers.
_MYSQL_TIMERS = (
    "SELECT VERSION(), @@session.wait_timeout, @@global.wait_timeout,"
    " @@global.interactive_timeout, @@global.max_connections,"
    " SUBSTRING_INDEX(USER(), '@', 1), DATABASE()"
)
_MYSQL_CONNECTIONS = (
    "SELECT ID, HOST, COMMAND, {elapsed} FROM information_schema.PROCESSLIST"
    " WHERE USER = SUBSTRING_INDEX(USER(), '@', 1)"
    " AND (DB = DATABASE() OR DATABASE() IS NULL)"
    " AND ID <> CONNECTION_ID() ORDER BY ID"
)


def _mysql(
    dbapi_connection: t.Any, notes: list[str], mariadb: bool, process_list: bool
) -> tuple[Report, list[Report]]:
    (row,) = _rows(dbapi_connection, _MYSQL_TIMERS)
    version, session, global_wait, interactive, max_connections, user, database = row
    status = _attempt(
        dbapi_connection,
        notes,
        "Threads_connected",
        "SHOW GLOBAL STATUS LIKE 'Threads_connected'",
    )
    server: Report = {
        "version": _text(version),
        "user": _text(user),
        "database": _text(database),
        # What the server enforces on this app's connections: the session value,
        # which interactive clients take from interactive_timeout.
        "wait_timeout": _seconds(session),
        "global_wait_timeout": _seconds(global_wait),
        "interactive_timeout": _seconds(interactive),
        "max_connections": int(max_connections),
        "threads_connected": int(status[0][1]) if status else None,
    }
    if not process_list:
        return server, []
    # MariaDB's TIME_MS has the precision a few-second budget needs; MySQL has none.
    elapsed = "TIME_MS / 1000" if mariadb else "TIME"
    rows = _attempt(
        dbapi_connection,
        notes,
        "the server's connections",
        _MYSQL_CONNECTIONS.format(elapsed=elapsed),
    )
    transactions = _attempt(
        dbapi_connection,
        notes,
        "open transactions (information_schema.INNODB_TRX)",
        "SELECT trx_mysql_thread_id FROM information_schema.INNODB_TRX",
    )
    in_transaction = {int(r[0]) for r in transactions or ()}
    connections = []
    for id_, host, command, seconds in rows or ():
        command = _text(command)
        if command == "Sleep":
            state = "idle in transaction" if id_ in in_transaction else "idle"
            idle: float | None = float(seconds)
        else:
            state = "active" if command == "Query" else command.lower()
            idle = None
        connections.append(
            {"id": int(id_), "host": _text(host), "state": state, "idle": idle}
        )
    return server, connections


def _text(value: t.Any) -> t.Any:
    """A string column as ``str``: some drivers return bytes for utf8mb3 columns."""
    return value.decode() if isinstance(value, bytes) else value


_PG_SETTING = "(SELECT setting FROM pg_settings WHERE name = '{}')"
_PG_TIMERS = (
    "SELECT current_setting('server_version'), current_user, current_database(),"
    + ", ".join(
        _PG_SETTING.format(name)
        for name in (
            "idle_session_timeout",
            "idle_in_transaction_session_timeout",
            "max_connections",
            "superuser_reserved_connections",
        )
    )
)
_PG_CONNECTIONS = (
    "SELECT pid, client_addr, client_port, state,"
    " EXTRACT(EPOCH FROM clock_timestamp() - state_change)"
    " FROM pg_stat_activity WHERE usename = current_user"
    " AND datname = current_database() AND pid <> pg_backend_pid()"
    " AND backend_type = 'client backend' ORDER BY pid"
)


def _postgresql(
    dbapi_connection: t.Any, notes: list[str], process_list: bool
) -> tuple[Report, list[Report]]:
    try:
        return _postgresql_reads(dbapi_connection, notes, process_list)
    finally:
        # Leave no transaction open on a connection the pool's listeners know.
        with contextlib.suppress(Exception):
            dbapi_connection.rollback()


def _postgresql_reads(
    dbapi_connection: t.Any, notes: list[str], process_list: bool
) -> tuple[Report, list[Report]]:
    (row,) = _rows(dbapi_connection, _PG_TIMERS)
    version, user, database, idle_session, idle_in_transaction, maximum, reserved = row
    backends = _attempt(
        dbapi_connection,
        notes,
        "the number of connections",
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'",
    )
    server: Report = {
        "version": str(version),
        "user": user,
        "database": database,
        # pg_settings has milliseconds, 0 for none; PostgreSQL 13 and older have
        # no idle_session_timeout (NULL here).
        "idle_session_timeout": _seconds(idle_session, 0.001),
        "idle_in_transaction_session_timeout": _seconds(idle_in_transaction, 0.001),
        "max_connections": int(maximum),
        "superuser_reserved_connections": int(reserved),
        "client_backends": int(backends[0][0]) if backends else None,
    }
    if not process_list:
        return server, []
    rows = _attempt(
        dbapi_connection, notes, "the server's connections", _PG_CONNECTIONS
    )
    connections = []
    hidden = 0
    for pid, address, port, state, seconds in rows or ():
        if state is None:
            hidden += 1  # another role's session, without pg_read_all_stats
            continue
        host = "local" if address is None else f"{address}:{port}"
        idle = (
            float(seconds) if state.startswith("idle") and seconds is not None else None
        )
        connections.append({"id": int(pid), "host": host, "state": state, "idle": idle})
    if hidden:
        notes.append(
            f"{hidden} connection(s) not shown: the database user lacks the"
            " pg_read_all_stats privilege"
        )
    return server, connections


# -- human output ------------------------------------------------------------------


def format_table(headers: t.Sequence[str], rows: t.Iterable[t.Sequence[t.Any]]) -> str:
    """Columns aligned under a dashed header, as ``flask routes`` prints them."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [
        max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(headers)
    ]
    lines = [headers, ["-" * w for w in widths], *cells]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip()
        for line in lines
    )


def seconds_text(value: float | None) -> str:
    """``"28800 s"``, ``"1.8 s"``, or ``"none"`` for no timer."""
    if value is None or math.isinf(value):
        return "none"
    return f"{value:.3g} s" if value < 10 else f"{value:.0f} s"


def format_pool(reports: t.Sequence[Report]) -> str:
    """The ``pool`` command's human output: one aligned block per bind."""
    return "\n\n".join(_format_bind(r) for r in reports)


def _format_bind(r: Report) -> str:
    rows: list[tuple[str, str]] = []
    if r["size"] is not None:
        overflow = "unlimited" if r["max_overflow"] < 0 else r["max_overflow"]
        rows.append(
            (
                "Pool",
                f"{r['pool_class']}: size {r['size']}, max_overflow {overflow},"
                f" pool_timeout {seconds_text(r['pool_timeout'])}",
            )
        )
        rows.append(
            (
                "This process",
                f"{r['checked_in']} checked in, {r['checked_out']} checked out,"
                f" {r['overflow']} overflow",
            )
        )
    else:
        rows.append(("Pool", r["pool_class"]))
        rows.append(("This process", f"{r['checked_out']} checked out"))
    rows.append(("Strategy", r["strategy"]))
    source = {
        "server": "from the server",
        "declared": "STALEGUARD_SERVER_TIMEOUT",
        "assumed": "assumed: the server was unreachable at start-up",
    }.get(r["server_timeout_source"] or "")
    timer = f"server timeout {seconds_text(r['server_timeout'])}"
    if source:
        timer += f", {source}"
    if r["idle_timeout"] is not None:
        timer += f"; STALEGUARD_IDLE_TIMEOUT {seconds_text(r['idle_timeout'])}"
    rows.append(("Idle budget", f"{seconds_text(r['idle_budget'])} ({timer})"))
    set_by = " (set by staleguard)"
    rows.append(
        (
            "pool_recycle",
            f"{r['pool_recycle']}{set_by if 'pool_recycle' in r['applied'] else ''}",
        )
    )
    pre_ping = "yes" if r["pre_ping"] else "no"
    rows.append(
        (
            "pool_pre_ping",
            f"{pre_ping}{set_by if 'pool_pre_ping' in r['applied'] else ''}",
        )
    )
    if r["liveness_probe"] is not None:
        supported = (
            "supported" if r["liveness_probe"] else "not supported by the driver"
        )
        rows.append(("Liveness probe", supported))
    server = r["server"]
    if server is not None:
        rows.append(
            (
                "Server",
                f"{server['version']} as {server['user']},"
                f" database {server['database']}",
            )
        )
        if "wait_timeout" in server:
            rows += [
                (
                    "wait_timeout",
                    f"{seconds_text(server['wait_timeout'])} (session),"
                    f" {seconds_text(server['global_wait_timeout'])} (global)",
                ),
                ("interactive_timeout", seconds_text(server["interactive_timeout"])),
                ("max_connections", str(server["max_connections"])),
                ("Threads_connected", _or_unknown(server["threads_connected"])),
            ]
        else:
            rows += [
                ("idle_session_timeout", seconds_text(server["idle_session_timeout"])),
                (
                    "idle_in_transaction_session_timeout",
                    seconds_text(server["idle_in_transaction_session_timeout"]),
                ),
                (
                    "max_connections",
                    f"{server['max_connections']}"
                    f" ({server['superuser_reserved_connections']} reserved)",
                ),
                ("Client backends", _or_unknown(server["client_backends"])),
            ]
    stats = r["stats"]
    if any(stats[k] for k in stats):
        rows.append(("Stats", _format_stats(stats)))
    if r["error"]:
        rows.append(("Error", r["error"]))
    rows += [("Note", note) for note in r["notes"]]
    width = max(len(k) for k, _ in rows)
    lines = [f"{r['bind']}  {r['url']}"]
    lines += [f"  {key.ljust(width)}  {value}" for key, value in rows]
    if server is not None:
        lines.append("")
        if r["connections"]:
            table = format_table(
                ["ID", "Host", "State", "Idle", "Note"],
                [
                    (
                        c["id"],
                        c["host"],
                        c["state"],
                        "" if c["idle"] is None else f"{c['idle']:.1f} s",
                        "past the idle budget" if c["past_budget"] else "",
                    )
                    for c in r["connections"]
                ],
            )
            lines += ["  " + line for line in table.splitlines()]
        else:
            lines.append("  No other connections of this user and database.")
    return "\n".join(lines)


def _or_unknown(value: t.Any) -> str:
    return "unknown" if value is None else str(value)


def _format_stats(stats: Report) -> str:
    def counts(table: dict[str, int]) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(table.items())) or "none"

    return (
        f"{stats['checkouts']} checkouts; replaced: {counts(stats['replaced'])};"
        f" disconnects: {counts(stats['disconnects'])};"
        f" leaks: {stats['leaks_detected']} ({stats['leaks_reclaimed']} reclaimed)"
    )
