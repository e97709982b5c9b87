"""``flask staleguard check``: settings that let stale connections through.

:func:`find_problems` is pure: it judges the reports :func:`~.snapshot.pool_report`
gathers (pool options, guard settings, the server's timers). :func:`check` gathers
them and returns the verdict with its exit code.
"""

from __future__ import annotations

import dataclasses
import textwrap
import typing as t

import sqlalchemy as sa
from flask import Flask

from ..core.units import seconds_text
from .document import Report
from .document import SCHEMA
from .snapshot import pool_report
from .tables import format_table

#: ``pool_recycle`` does not come before the server's idle timeout, and nothing
#: checks a connection at checkout: the seed of "MySQL server has gone away".
RECYCLE_EXCEEDS_TIMEOUT = "recycle_exceeds_timeout"
#: ``STALEGUARD_SERVER_TIMEOUT`` is longer than the timeout the server enforces.
SERVER_TIMEOUT_MISMATCH = "server_timeout_mismatch"
#: The driver connects as an interactive client, so ``interactive_timeout``, not
#: ``wait_timeout``, closes the app's idle connections.
INTERACTIVE_TIMEOUT_DIFFERS = "interactive_timeout_differs"
#: ``STALEGUARD_IDLE_TIMEOUT`` is not shorter than the server's own timeout.
IDLE_TIMEOUT_POINTLESS = "idle_timeout_pointless"
#: The liveness probe cannot see the driver's socket.
UNSUPPORTED_DRIVER = "unsupported_driver"
#: The pools of all workers can take every connection the server allows.
NO_CONNECTION_HEADROOM = "no_connection_headroom"
#: A declared path timer that the TCP keepalive, as read back from a live
#: connection, does not beat: a silently dropped flow would hang a statement.
KEEPALIVE_TOO_LONG = "keepalive_too_long"
#: The server refuses writes, and the bind is not declared a replica.
READ_ONLY_SERVER = "read_only_server"
#: PyMySQL waits for a reply for ever: a server that stops answering
#: mid-statement (frozen, or a half-dead proxy) hangs the request.
NO_READ_BOUND = "no_read_bound"
#: SQLite has no server to close idle connections: nothing to guard.
SQLITE = "sqlite"


@dataclasses.dataclass(frozen=True)
class Problem:
    """One finding: a stable ``code``, the bind, what is wrong, and the fix."""

    code: str
    bind: str
    message: str
    fix: str
    severity: str = "error"

    def as_dict(self) -> dict[str, str]:
        """The JSON form."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class CheckResult:
    """The problems found, and the binds whose server could not be reached."""

    binds: list[str]
    problems: list[Problem]
    #: ``(bind, one-line reason)`` per bind whose database could not be reached.
    unreachable: list[tuple[str, str]]

    @property
    def exit_code(self) -> int:
        """2 when a database cannot be reached, 1 on problems, else 0."""
        if self.unreachable:
            return 2
        return int(any(p.severity != "info" for p in self.problems))

    def as_dict(self) -> dict[str, t.Any]:
        """The JSON document ``check --json`` prints."""
        return {
            "schema": SCHEMA,
            "binds": self.binds,
            "problems": [p.as_dict() for p in self.problems],
            "unreachable": [{"bind": b, "message": m} for b, m in self.unreachable],
        }


def check(
    app: Flask | None = None, bind: str | None = None, *, workers: int = 1
) -> CheckResult:
    """Ask each bind's server for its timers and judge the app's settings."""
    reports = pool_report(app, bind, process_list=False)
    unreachable = [(r["bind"], r["error"]) for r in reports if r["error"]]
    reachable = [r for r in reports if not r["error"]]
    return CheckResult(
        [r["bind"] for r in reports], find_problems(reachable, workers), unreachable
    )


def find_problems(reports: t.Sequence[Report], workers: int = 1) -> list[Problem]:
    """The problems in ``reports`` (as :func:`~.snapshot.pool_report` returns them)
    for an app run by ``workers`` processes.
    """
    problems: list[Problem] = []
    for report in reports:
        if report["dialect"] == "sqlite":
            problems.append(
                Problem(
                    SQLITE,
                    report["bind"],
                    "SQLite has no server that closes idle connections:"
                    " there is nothing to guard",
                    "Nothing to do; the checks apply to the MySQL, MariaDB and"
                    " PostgreSQL binds.",
                    "info",
                )
            )
            continue
        problems += _timer_problems(report)
        problems += _driver_problems(report)
        problems += _keepalive_problems(report)
        problems += _role_problems(report)
        problems += _read_bound_problems(report)
    problems += _headroom_problems(reports, workers)
    return problems


def _server_timer(report: Report) -> tuple[str, float | None]:
    """The name and value of the server's idle timeout on this app's connections."""
    server = report["server"] or {}
    if "wait_timeout" in server:
        return "wait_timeout", server["wait_timeout"]
    return "idle_session_timeout", server.get("idle_session_timeout")


def _timer_problems(report: Report) -> t.Iterator[Problem]:
    bind = report["bind"]
    name, timeout = _server_timer(report)
    server = report["server"] or {}
    idle_timeout = report["idle_timeout"]
    strategy = report["strategy"]

    # The shortest known timer on the path decides when a connection dies.
    timers = [(name, timeout), ("STALEGUARD_IDLE_TIMEOUT", idle_timeout)]
    known = [(n, v) for n, v in timers if v is not None]
    if known and report["pool_class"] != "NullPool":
        shortest, limit = min(known, key=lambda nv: nv[1])
        recycle = report["pool_recycle"]
        checked = strategy == "guard" or report["pre_ping"]
        if not checked and (recycle < 0 or recycle >= limit):
            symptom = (
                "MySQL server has gone away"
                if name == "wait_timeout"
                else "server closed the connection unexpectedly"
            )
            shown = f"{recycle} (never)" if recycle < 0 else f"{recycle}"
            yield Problem(
                RECYCLE_EXCEEDS_TIMEOUT,
                bind,
                f"pool_recycle={shown} is not below {shortest}={limit:g} s and"
                f" nothing checks a connection at checkout (STALEGUARD_STRATEGY="
                f"{strategy!r}, pool_pre_ping off): a connection idle for"
                f" {limit:g} s is handed out dead ({symptom!r})",
                f"Use STALEGUARD_STRATEGY = 'guard' (the default) or 'pre_ping', or"
                f" set pool_recycle below {limit:g}.",
            )

    declared = report["server_timeout"]
    if (
        report["server_timeout_source"] == "declared"
        and declared is not None
        and timeout is not None
        and declared > timeout
    ):
        why = ""
        if declared == server.get("interactive_timeout"):
            why = (
                " (that is interactive_timeout, which interactive clients such as"
                " the mysql shell see as their wait_timeout)"
            )
        yield Problem(
            SERVER_TIMEOUT_MISMATCH,
            bind,
            f"STALEGUARD_SERVER_TIMEOUT is {declared:g} s{why}, but the server closes"
            f" this app's idle connections after {name}={timeout:g} s, so the idle"
            f" budget ({seconds_text(report['idle_budget'])}) outlives them",
            f"Remove STALEGUARD_SERVER_TIMEOUT so staleguard asks the server, or set"
            f" it to {timeout:g}.",
        )

    interactive = server.get("interactive_timeout")
    global_wait = server.get("global_wait_timeout")
    if (
        interactive is not None
        and interactive != global_wait
        and timeout == interactive
    ):
        yield Problem(
            INTERACTIVE_TIMEOUT_DIFFERS,
            bind,
            f"the driver connects as an interactive client (CLIENT_INTERACTIVE), so"
            f" the server closes its idle connections after interactive_timeout="
            f"{interactive:g} s, not wait_timeout={global_wait:g} s: changing"
            f" wait_timeout has no effect on this app",
            "Drop the CLIENT_INTERACTIVE client flag (client_flag in the URL or"
            " connect_args), or set interactive_timeout to the timeout you want.",
            "warning",
        )

    if idle_timeout is not None and timeout is not None and idle_timeout >= timeout:
        yield Problem(
            IDLE_TIMEOUT_POINTLESS,
            bind,
            f"STALEGUARD_IDLE_TIMEOUT={idle_timeout:g} s is not shorter than the"
            f" server's {name}={timeout:g} s: the server's timer closes idle"
            f" connections first, so the setting has no effect",
            "Remove STALEGUARD_IDLE_TIMEOUT, or measure the network path's timer"
            " with 'flask staleguard probe-idle'.",
            "warning",
        )


def _driver_problems(report: Report) -> t.Iterator[Problem]:
    if report["strategy"] == "guard" and report["liveness_probe"] is False:
        yield Problem(
            UNSUPPORTED_DRIVER,
            report["bind"],
            f"the liveness probe cannot see the {report['driver']} driver's socket,"
            " so a connection the server or a proxy closed is handed out until its"
            " idle budget runs out",
            "Use PyMySQL, mysqlclient, psycopg or psycopg2, or set"
            " STALEGUARD_STRATEGY = 'pre_ping'.",
            "warning",
        )


def _role_problems(report: Report) -> t.Iterator[Problem]:
    server = report["server"] or {}
    if not server.get("read_only") or report["role"] == "any":
        return
    yield Problem(
        READ_ONLY_SERVER,
        report["bind"],
        "the server refuses writes (read_only, a standby, or a demoted primary"
        " after a failover): every write on this bind fails",
        "Point the bind at the writer; if it reads from a replica on purpose, say"
        f" so: STALEGUARD_ROLE = {{{report['bind']!r}: 'any'}}.",
        "error" if report["role"] == "writer" else "warning",
    )


def _read_bound_problems(report: Report) -> t.Iterator[Problem]:
    # Known for PyMySQL only; a live connection says, whatever set it.
    if report["driver"] != "pymysql" or report["server"] is None:
        return
    if report["read_timeout"] is None:
        yield Problem(
            NO_READ_BOUND,
            report["bind"],
            "PyMySQL waits for a reply for ever: a server that stops answering"
            " mid-statement (a frozen host, a half-dead proxy) hangs the request,"
            " as TCP keepalive cannot see it",
            "Bound every reply with connect_args={'read_timeout': N}, N longer than"
            " the slowest statement.",
            "info",
        )


def _keepalive_problems(report: Report) -> t.Iterator[Problem]:
    timer = report["idle_timeout"]
    keepalive = report["keepalive"]
    if timer is None or keepalive is None:
        return  # no declared timer, or no TCP socket read back
    idle = keepalive.get("idle") if keepalive["enabled"] else None
    if idle is not None and idle < timer:
        return
    now = "is off" if idle is None else f"sends its first probe after {idle:g} s"
    yield Problem(
        KEEPALIVE_TOO_LONG,
        report["bind"],
        f"the path drops idle flows after STALEGUARD_IDLE_TIMEOUT={timer:g} s, but"
        f" TCP keepalive {now}: a statement silent on the wire for longer (a slow"
        " query) loses its flow, and a silent drop hangs it",
        f"Set STALEGUARD_KEEPALIVE below {timer:g} (its default, 60, comes down to"
        " half of STALEGUARD_IDLE_TIMEOUT by itself).",
        "warning",
    )


def _headroom_problems(
    reports: t.Sequence[Report], workers: int
) -> t.Iterator[Problem]:
    """Binds on one server share its max_connections across all workers."""
    servers: dict[tuple[str, str | None, int | None], list[Report]] = {}
    for report in reports:
        if report["server"] is None or report["size"] is None:
            continue  # NullPool and single-connection pools have no fixed ceiling
        url = sa.engine.make_url(report["url"])
        key = (report["dialect"], url.host, url.port)
        servers.setdefault(key, []).append(report)
    for group in servers.values():
        server = group[0]["server"]
        reserved = server.get("superuser_reserved_connections", 0)
        available = server["max_connections"] - reserved
        limit = f"max_connections={server['max_connections']}"
        if reserved:
            limit += f" ({available} after {reserved} reserved for superusers)"
        unbounded = [r["bind"] for r in group if r["max_overflow"] < 0]
        if unbounded:
            yield Problem(
                NO_CONNECTION_HEADROOM,
                group[0]["bind"],
                f"max_overflow=-1 lets bind {unbounded[0]}'s pool open connections"
                f" without limit, up to the server's {limit}",
                "Set max_overflow to a number, so pool_size + max_overflow times the"
                " number of workers stays below max_connections.",
            )
            continue
        parts = []
        total = 0
        for r in group:
            each = r["size"] + r["max_overflow"]
            total += each * workers
            parts.append(
                f"({r['size']} + {r['max_overflow']}) x {workers} worker"
                f"{'s' if workers != 1 else ''} = {each * workers} for bind {r['bind']}"
            )
        if total >= available:
            yield Problem(
                NO_CONNECTION_HEADROOM,
                group[0]["bind"],
                f"{'; '.join(parts)}: {total} connections leave no headroom under the"
                f" server's {limit}",
                f"Lower pool_size or max_overflow, run fewer workers, or raise"
                f" max_connections above {total}.",
            )


def format_check(result: CheckResult) -> str:
    """The ``check`` command's human output."""
    lines = []
    if result.problems:
        rows: list[tuple[str, ...]] = []
        for p in result.problems:
            # Long lines wrap within the last column, so the others stay readable.
            text = textwrap.wrap(p.message, 64) + textwrap.wrap(f"Fix: {p.fix}", 64)
            rows.append((p.severity, p.bind, p.code, text[0]))
            rows += [("", "", "", line) for line in text[1:]]
        lines.append(format_table(["Severity", "Bind", "Code", "Problem"], rows))
        lines.append("")
    failing = [p for p in result.problems if p.severity != "info"]
    binds = ", ".join(result.binds)
    if failing:
        errors = sum(p.severity == "error" for p in failing)
        warnings = len(failing) - errors
        lines.append(
            f"{len(failing)} problem{'s' if len(failing) != 1 else ''}"
            f" ({errors} error{'s' if errors != 1 else ''}, {warnings}"
            f" warning{'s' if warnings != 1 else ''}) in {binds}."
        )
    elif not result.unreachable:
        lines.append(f"No problems found in {binds}.")
    return "\n".join(lines)
