"""Human output of the ``flask staleguard`` commands: aligned, secret-free tables."""

from __future__ import annotations

import typing as t

from ..core.lifetime import JITTER
from ..core.units import seconds_text
from .document import Report


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
    rows.append(("Max lifetime", _lifetime_text(r["max_lifetime"], r["strategy"])))
    rows.append(("Connects", _connects_text(r["connect_timeout"], r["connect_wait"])))
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
    node = {"writer": "a writer", "read-only": "read-only"}.get(r["node_role"] or "")
    learnt = f"; the newest connection's node: {node}" if node else ""
    rows.append(("Role", f"{r['role']} (STALEGUARD_ROLE){learnt}"))
    if r["liveness_probe"] is not None:
        supported = (
            "supported" if r["liveness_probe"] else "not supported by the driver"
        )
        rows.append(("Liveness probe", supported))
    if r["liveness_probe"]:
        rows.append(("TCP keepalive", keepalive_text(r["keepalive"])))
    server = r["server"]
    if server is not None:
        rows.append(
            (
                "Server",
                f"{server['version']} as {server['user']},"
                f" database {server['database']}"
                + {True: ", read-only", False: ", a writer"}.get(
                    server["read_only"], ""
                ),
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


def keepalive_text(keepalive: Report | None) -> str:
    """A socket's keepalive as read back: ``idle 60 s, every 15 s, 3 probes...``."""
    if keepalive is None:
        return "not TCP"
    if not keepalive["enabled"]:
        return "off (STALEGUARD_KEEPALIVE = None, or the driver's default)"
    parts = []
    if "idle" in keepalive:
        parts.append(f"first probe after {seconds_text(keepalive['idle'])} idle")
    if "interval" in keepalive:
        parts.append(f"then every {seconds_text(keepalive['interval'])}")
    if "count" in keepalive:
        parts.append(f"dead after {keepalive['count']} unanswered")
    if keepalive.get("user_timeout"):
        parts.append(f"unacknowledged data {seconds_text(keepalive['user_timeout'])}")
    return "on: " + ", ".join(parts) + " (read from a live connection)"


def _lifetime_text(maximum: float | None, strategy: str) -> str:
    """``"1800 s (each connection 1350 s to 1800 s)"``, or why there is none."""
    if maximum is None and strategy == "off":
        return "none (strategy off)"
    if maximum is None:
        return f"none of its own (strategy {strategy}: pool_recycle, capped at it)"
    most = seconds_text(maximum)
    return f"{most} (each connection {seconds_text(maximum * (1 - JITTER))} to {most})"


def _connects_text(timeout: float | None, wait: float | None) -> str:
    """How the guard runs a bind's new connections."""
    if timeout is None or wait is None:
        return "left to the driver (an asyncio engine, or creator=)"
    text = f"each within {seconds_text(timeout)}"
    if wait:
        return f"{text}; tried again for up to {seconds_text(wait)} through an outage"
    return f"{text}; not tried again (STALEGUARD_CONNECT_WAIT 0)"


def _or_unknown(value: t.Any) -> str:
    return "unknown" if value is None else str(value)


def _format_stats(stats: Report) -> str:
    def counts(table: dict[str, int]) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(table.items())) or "none"

    return (
        f"{stats['checkouts']} checkouts; replaced: {counts(stats['replaced'])};"
        f" disconnects: {counts(stats['disconnects'])};"
        f" leaks: {stats['leaks_detected']} ({stats['leaks_reclaimed']} reclaimed,"
        f" {stats['leaks_returned']} returned late);"
        f" outages: {stats['outages']} ({stats['connect_retries']} connects tried"
        " again)"
    )
