"""Turn a results dict into the Markdown summary and the target verdicts."""

from __future__ import annotations

import math
import typing as t

#: The issue's targets.
POOL_RATIO_MAX = 0.15
LATENCY_RATIO_MAX = 0.02
LATENCY_FROM_DELAY_MS = 0.5
THROUGHPUT_RATIO_MIN = 0.97


def _f(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def _ci(summary: t.Mapping[str, float], digits: int = 1) -> str:
    return (
        f"{_f(summary['median'], digits)} "
        f"[{_f(summary['ci95_low'], digits)}, {_f(summary['ci95_high'], digits)}]"
    )


def _verdict(met: bool, summary: t.Mapping[str, t.Any] | None, limit: float) -> str:
    """``yes``/``NO``, or ``inconclusive`` when the 95 % interval spans the limit."""
    if summary is not None:
        low, high = summary.get("ci95_low"), summary.get("ci95_high")
        if (
            low is not None
            and high is not None
            and not (math.isnan(low) or math.isnan(high))
        ):
            if low <= limit <= high:
                return "inconclusive"
    return "yes" if met else "NO"


def targets(
    results: t.Mapping[str, t.Any], variant: str = "guard"
) -> list[dict[str, t.Any]]:
    """The issue's targets for ``variant``: what was measured and whether it is met."""
    rows: list[dict[str, t.Any]] = []
    pool = results.get("pool")
    if pool and variant in pool["summary"]:
        s = pool["summary"][variant]
        rows.append(
            {
                "target": f"loopback: added cost ≤ {POOL_RATIO_MAX} × pre_ping's",
                "measured": f"{_ci(s['ratio_to_ref_summary'], 3)} (ratio of"
                f" medians {_f(s['ratio_of_medians'], 3)})",
                "verdict": _verdict(
                    s["ratio_to_ref"] <= POOL_RATIO_MAX,
                    s.get("ratio_to_ref_summary"),
                    POOL_RATIO_MAX,
                ),
            }
        )
    latency = results.get("latency")
    if latency:
        for level in latency["levels"]:
            if (
                level["delay_ms"] < LATENCY_FROM_DELAY_MS
                or variant not in level["summary"]
            ):
                continue
            s = level["summary"][variant]
            rows.append(
                {
                    "target": f"{level['delay_ms']:g} ms delay: added cost <"
                    f" {LATENCY_RATIO_MAX} × pre_ping's",
                    "measured": f"{_ci(s['ratio_to_ref_summary'], 4)} (ratio of"
                    f" medians {_f(s['ratio_of_medians'], 4)})",
                    "verdict": _verdict(
                        s["ratio_to_ref"] < LATENCY_RATIO_MAX,
                        s.get("ratio_to_ref_summary"),
                        LATENCY_RATIO_MAX,
                    ),
                }
            )
    throughput = results.get("throughput")
    if throughput and variant in throughput["summary"]:
        s = throughput["summary"][variant]["ratio_to_bare"]
        rows.append(
            {
                "target": f"throughput ≥ {THROUGHPUT_RATIO_MIN} × bare",
                "measured": _ci(s, 3),
                "verdict": _verdict(
                    s["median"] >= THROUGHPUT_RATIO_MIN, s, THROUGHPUT_RATIO_MIN
                ),
            }
        )
        capacity = throughput["summary"][variant].get("capacity_to_bare")
        if capacity is not None:
            rows.append(
                {
                    "target": f"the same, by the servers' CPU per request: bare's"
                    f" ÷ the variant's ≥ {THROUGHPUT_RATIO_MIN}",
                    "measured": _ci(capacity, 3),
                    "verdict": _verdict(
                        capacity["median"] >= THROUGHPUT_RATIO_MIN,
                        capacity,
                        THROUGHPUT_RATIO_MIN,
                    ),
                }
            )
    errors = stale_errors(results).get(variant)
    if errors is not None:
        total = sum(errors.values())
        rows.append(
            {
                "target": "zero stale errors in every scenario",
                "measured": str(total),
                "verdict": "yes" if total == 0 else "NO",
            }
        )
    reconnects = results.get("reconnects")
    if reconnects and variant in reconnects["busy"]:
        n = reconnects["busy"][variant]["reconnects"]
        recycle_n = reconnects["busy"].get("recycle", {}).get("reconnects", "–")
        rows.append(
            {
                "target": "no needless reconnects of busy connections",
                "measured": f"{n} (recycle: {recycle_n})",
                "verdict": "yes" if n == 0 else "NO",
            }
        )
    return rows


def stale_errors(results: t.Mapping[str, t.Any]) -> dict[str, dict[str, int]]:
    """Per variant, failed requests per scenario."""
    out: dict[str, dict[str, int]] = {}

    def add(variant: str, scenario: str, n: int) -> None:
        out.setdefault(variant, {})[scenario] = n

    if "pool" in results:
        for v, s in results["pool"]["summary"].items():
            add(v, "pool", s["errors"])
    if "latency" in results:
        for level in results["latency"]["levels"]:
            for v, s in level["summary"].items():
                add(v, f"latency {level['delay_ms']:g} ms", s["errors"])
    if "throughput" in results:
        for v, s in results["throughput"]["summary"].items():
            add(v, "throughput", s["failed"])
    if "reconnects" in results:
        for pattern in ("busy", "idle_burst", "kill"):
            for v, s in results["reconnects"][pattern].items():
                add(v, pattern, s["errors"])
    return out


def markdown(results: t.Mapping[str, t.Any]) -> str:
    """The human-readable summary of one run."""
    m = results["machine"]
    lines = [
        f"# Benchmark results: {results['started']}",
        "",
        f"Command: `{results['command']}` ({results['mode']} mode, "
        f"{results['elapsed_s']:.0f} s)",
        "",
        f"Machine: {m['nproc']} CPUs, {m['cpu_model']}; {m['platform']}; load average"
        f" at start {m['load_average_at_start']}. Python {m['python']}, SQLAlchemy"
        f" {m['versions']['sqlalchemy']}, Flask-SQLAlchemy"
        f" {m['versions']['flask-sqlalchemy']}, Flask {m['versions']['flask']},"
        f" PyMySQL {m['versions']['pymysql']}, gunicorn {m['versions']['gunicorn']};"
        f" MariaDB {m['mariadb']}. flask_staleguard at {m['git_head']}"
        f"{' + uncommitted changes' if m['flask_staleguard_dirty'] else ''}"
        f" (source digest {m['flask_staleguard_digest']}).",
        "",
        "All figures are medians over interleaved rounds; `added` is the per-round"
        " difference from bare in the same round, with a bootstrap 95 % interval"
        " of its median.",
        "",
    ]
    if (
        m.get("flask_staleguard_digest_at_end", m["flask_staleguard_digest"])
        != m["flask_staleguard_digest"]
    ):
        lines += [
            "**Warning: flask_staleguard/*.py changed during this run** (digest"
            f" {m['flask_staleguard_digest_at_end']} at the end); subprocesses"
            " started later (gunicorn) may have run different code.",
            "",
        ]
    pool = results.get("pool")
    if pool:
        cfg = pool["raw"]["config"]
        lines += [
            "## 1. Per-request pool cost (loopback)",
            "",
            f"{pool['raw']['rounds_done']} rounds × {cfg['requests_per_round']}"
            f" requests per variant, micro-blocks of {cfg['block']}, order shuffled.",
            "",
            "| variant | µs/request | added µs over bare [95 % CI] |"
            " added µs, by median request | added CPU µs |"
            " ratio to pre_ping's added cost | ratio of medians | errors |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for v, s in pool["summary"].items():
            lines.append(
                f"| {v} | {_f(s['per_request_us'])} | {_ci(s['added_us'])} |"
                f" {_ci(s['added_us_p50'])} |"
                f" {_f(s['added_cpu_us']['median'])} | {_f(s.get('ratio_to_ref'), 3)} |"
                f" {_f(s.get('ratio_of_medians'), 3)} | {s['errors']} |"
            )
        lines.append("")
    throughput = results.get("throughput")
    if throughput:
        cfg = throughput["raw"]["config"]
        lines += [
            "## 2. Throughput (gunicorn)",
            "",
            f"gunicorn, {cfg['workers']} sync workers per variant;"
            f" {cfg['load_generator']} with {cfg['connections']} connections,"
            f" {cfg['duration_s']:g} s per variant per round, {cfg['rounds']} rounds.",
            "",
            "`server CPU µs/request` is the CPU time (user + system) of the"
            " variant's gunicorn processes during a slice over the requests they"
            " served; `capacity` is bare's over the variant's in the same round:"
            " the requests/s ratio the same CPU allows, independent of how the"
            " slice shared the CPUs with wrk and the database. `bare_control` is a"
            " second, identical bare server (an A/A control): its ratios are how"
            " far two identical servers differ in this harness.",
            "",
            "| variant | requests/s | ratio to bare [95 % CI] | server CPU µs/request"
            " | capacity ÷ bare [95 % CI] | failed requests |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for v, s in throughput["summary"].items():
            capacity = s.get("capacity_to_bare")
            lines.append(
                f"| {v} | {_f(s['rps_median'], 0)} | {_ci(s['ratio_to_bare'], 3)} |"
                f" {_f(s.get('cpu_us_per_request'), 1)} |"
                f" {'–' if capacity is None else _ci(capacity, 3)} |"
                f" {s['failed']} |"
            )
        lines.append("")
    latency = results.get("latency")
    if latency:
        variants = [v for v in latency["levels"][0]["summary"] if v != "bare"]
        guards = [v for v in variants if v.startswith("guard")]
        lines += [
            "## 3. Latency sensitivity (TCP proxy with a fixed delay)",
            "",
            "Direct loopback COM_PING round trip:"
            f" {_f(latency['direct_ping_rtt_us'], 0)} µs."
            " Delay is the proxy's one-way delay; RTT is measured through it. Per"
            " round, a variant's figure is its 10 %-trimmed mean request (the"
            " proxy's rare timer stalls swamp the mean, and its timers make the"
            " median jumpy; the mean- and median-based figures are in the JSON).",
            "",
            "| delay | RTT µs | bare µs/request | "
            + " | ".join(f"{v} added µs" for v in variants)
            + " | "
            + " | ".join(f"{v} / pre_ping" for v in guards)
            + " |",
            "| --- | --- | --- | "
            + " | ".join("---" for _ in variants + guards)
            + " |",
        ]
        for level in latency["levels"]:
            s = level["summary"]
            row = (
                f"| {level['delay_ms']:g} ms | {_f(level['ping_rtt_us'], 0)} |"
                f" {_f(s['bare']['per_request_us'], 0)} | "
                + " | ".join(_ci(s[v]["added_us"]) for v in variants)
                + " | "
                + " | ".join(_f(s[v].get("ratio_to_ref"), 4) for v in guards)
                + " |"
            )
            lines.append(row)
        lines.append("")
    reconnects = results.get("reconnects")
    if reconnects:
        variants = list(reconnects["busy"])
        lines += [
            "## 4–5. Reconnects and stale errors",
            "",
            f"Private MariaDB, wait_timeout={reconnects['wait_timeout_s']} s,"
            f" {reconnects['threads']} threads per variant. Pool settings:"
            f" {reconnects['pool_settings']}. Cells: reconnects / errors"
            " (guard's replacement reasons).",
            "",
            "| pattern | " + " | ".join(variants) + " |",
            "| --- | " + " | ".join("---" for _ in variants) + " |",
        ]
        for pattern in ("busy", "idle_burst", "kill"):
            cells = []
            for v in variants:
                e = reconnects[pattern][v]
                why = (
                    " ("
                    + ", ".join(f"{k} {n}" for k, n in e["guard_replaced"].items())
                    + ")"
                    if e["guard_replaced"]
                    else ""
                )
                cells.append(f"{e['reconnects']} / {e['errors']}{why}")
            requests = ", ".join(
                f"{v} {reconnects[pattern][v]['requests']}" for v in variants
            )
            lines.append(
                f"| {pattern} ({requests} requests) | " + " | ".join(cells) + " |"
            )
        lines.append("")
    errors = stale_errors(results)
    if errors:
        scenarios = sorted({s for e in errors.values() for s in e})
        lines += [
            "### Failed requests (stale errors) per scenario",
            "",
            "| variant | " + " | ".join(scenarios) + " |",
            "| --- | " + " | ".join("---" for _ in scenarios) + " |",
        ]
        for v, e in errors.items():
            lines.append(
                f"| {v} | " + " | ".join(str(e.get(s, "–")) for s in scenarios) + " |"
            )
        lines.append("")
    profile = results.get("profile")
    if profile:
        lines += [
            "## Where the guard's cost goes (ablation)",
            "",
            "Each row: the shipped guard minus one piece, on one app; the saving is"
            " paired with guard within each round (median [95 % CI]).",
            "",
            "| removed from guard | saves µs (wall) | saves CPU µs |",
            "| --- | --- | --- |",
        ]
        for c in profile["components"].values():
            saves, saves_cpu = c["saves_us"], c["saves_cpu_us"]
            if isinstance(saves, dict):
                saved = f"{_ci(saves)} | {_ci(saves_cpu)}"
            else:  # results written before the savings had intervals
                saved = f"{_f(saves)} | {_f(saves_cpu)}"
            lines.append(f"| {c['removes']} | {saved} |")
        floor = profile.get("listener_floor")
        if floor:
            lines.append(
                f"| (on bare, *adds*) {floor['adds']} | {_ci(floor['adds_us'])} |"
                f" {_ci(floor['adds_cpu_us'])} |"
            )
        s = profile["summary"]
        lines += [
            "",
            "| app | added µs over bare | added CPU µs | Python calls/request |",
            "| --- | --- | --- | --- |",
        ]
        totals = profile["call_counts"]["totals"]
        for v, e in s.items():
            calls = totals.get(v, {}).get("calls_per_request")
            lines.append(
                f"| {v} | {_ci(e['added_us'])} | {_f(e['added_cpu_us']['median'])} |"
                f" {_f(calls, 0)} |"
            )
        lines.append("")
    statements = results.get("statements")
    if statements:
        s = statements["summary"]
        lines += [
            "## Per statement: the MariaDB-4031 handle_error listener",
            "",
            "| statement (SQLite in memory) | added by the listener |",
            "| --- | --- |",
            f"| {_f(s['statement_us'])} µs | {_ci(s['added_us'], 3)} µs |",
            "",
        ]
    for variant in ("guard",):
        verdicts = targets(results, variant)
        if not verdicts:
            continue
        lines += [
            f"## Targets: {variant}",
            "",
            "| target | measured (median [95 % CI]) | met |",
            "| --- | --- | --- |",
        ]
        for verdict in verdicts:
            lines.append(
                f"| {verdict['target']} | {verdict['measured']} |"
                f" {verdict['verdict']} |"
            )
        lines.append("")
    return "\n".join(lines)
