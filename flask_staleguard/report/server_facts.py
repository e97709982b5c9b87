"""What a server says about its idle timers, its limits and the app's connections.

Read over a connection of its own, beside the pool, with constant SQL only. A
query the database user may not run (a missing privilege) becomes a note.
"""

from __future__ import annotations

import contextlib
import re
import typing as t

import sqlalchemy as sa

from .._private import pymysql_read_timeout
from .._private import side_connection
from ..core import probe
from ..core.checkout import STATE
from ..core.connect import one_try
from ..core.deadline import call_within
from ..core.disconnects import error_code
from ..core.guard import PoolGuard
from ..core.keepalive import read_keepalive
from ..core.units import seconds_text
from ..core.units import seconds_value
from ..errors import NoAnswer
from .document import Report

#: MySQL's ER_SPECIFIC_ACCESS_DENIED_ERROR and ER_TABLEACCESS_DENIED_ERROR, and
#: PostgreSQL's insufficient_privilege.
_DENIED_CODES = frozenset({1227, 1142, 1044})
_DENIED_SQLSTATE = "42501"


def read_server(
    report: Report, guard: PoolGuard, engine: sa.engine.Engine, process_list: bool
) -> None:
    """Fill ``server``, ``connections``, ``liveness_probe``, ``keepalive`` and
    ``notes``, or ``error``, within the bind's time limit
    (``STALEGUARD_DISCOVERY_TIMEOUT``).
    """
    try:
        found = call_within(
            guard.timeout,
            lambda: _read(guard, engine, process_list),
            what=f"server facts of bind {guard.name}",
        )
    except NoAnswer:
        report["error"] = (
            f"no answer from {guard.url} within {guard.timeout:g} s"
            " (STALEGUARD_DISCOVERY_TIMEOUT)"
        )
        return
    except Exception as e:  # whatever the driver raises: report it, never crash
        report["error"] = f"cannot connect to {guard.url}: {guard.secrets.one_line(e)}"
        return
    notes = found.pop("notes")
    report.update(found)
    report["notes"] += notes
    past = sum(row["past_budget"] for row in report["connections"])
    if past:
        report["notes"].append(
            f"{past} connection(s) idle past the idle budget"
            f" ({seconds_text(report['idle_budget'])})"
        )


def _read(guard: PoolGuard, engine: sa.engine.Engine, process_list: bool) -> Report:
    """What the server says, over a connection of its own; raises if it cannot
    connect, and reports any later failure as ``error``.
    """
    # A connection of our own beside the pool, not one from it: borrowing an idle
    # pooled connection would hide it from the list of the app's connections, and
    # a full pool would keep us waiting. The pool's connect listeners still run,
    # so the session looks like the app's (a SET in a "connect" hook shows).
    with one_try():  # within the report's own time limit
        record = side_connection(engine.pool)
    dbapi_connection = record.dbapi_connection
    notes: list[str] = []
    found: Report = {"notes": notes}
    try:
        if engine.dialect.driver == "pymysql":
            found["read_timeout"] = pymysql_read_timeout(dbapi_connection)
        fd = probe.socket_fd(dbapi_connection)
        found["liveness_probe"] = fd is not None
        if fd is not None:
            # Read back from the socket, not from config: what the kernel does.
            with probe.borrowed(fd) as sock:
                found["keepalive"] = read_keepalive(sock)
        if guard.kind == "mysql":
            mariadb = bool(getattr(engine.dialect, "is_mariadb", False))
            server, connections = _mysql(dbapi_connection, notes, mariadb, process_list)
        elif guard.kind == "postgresql":
            server, connections = _postgresql(dbapi_connection, notes, process_list)
        else:
            notes.append(f"no server timers are known for {engine.dialect.name}")
            return found
        # The pool's connect listener asked this very connection its node's role.
        state = record.info.get(STATE)
        server["read_only"] = None if state is None else state.read_only
        for row in connections:
            idle = row["idle"]
            row["past_budget"] = idle is not None and idle > guard.idle.seconds
        found["server"] = server
        found["connections"] = connections
    except Exception as e:
        found["error"] = (
            f"cannot read the server's settings: {guard.secrets.one_line(e)}"
        )
    finally:
        record.close()
    return found


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
        "wait_timeout": seconds_value(session),
        "global_wait_timeout": seconds_value(global_wait),
        "interactive_timeout": seconds_value(interactive),
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
        "idle_session_timeout": seconds_value(idle_session, 0.001),
        "idle_in_transaction_session_timeout": seconds_value(
            idle_in_transaction, 0.001
        ),
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
