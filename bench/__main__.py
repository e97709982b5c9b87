"""``python -m bench``: run the benchmark scenarios and write the results.

Scenarios (``--scenarios``, comma-separated; default all):

``pool``        added µs per request-shaped checkout on loopback, over bare,
                without a round trip and with a ``SELECT 1``
``latency``     the same through a delaying TCP proxy
``reconnects``  reconnects and stale errors per traffic pattern
``statements``  what the guard costs a statement (nothing, by design)
``keepalive``   what setting the TCP keepalive costs a new connection
``instructions`` instructions per request of every variant, counted by valgrind
                (not in the default set: it needs valgrind and about 5 minutes)
``moves``       failover, restart and a silent server, on private servers of its
                own (not in the default set: about 2 minutes)

Writes ``<out>/<stamp>-<mode>[-label].md`` (the tables, also printed),
``.json`` (a pyperf suite: every variant's per-round values, the machine and
software; ``python -m pyperf stats|metadata FILE``) and ``.log`` (progress).
``bench/results/``, the default ``--out``, is git-ignored.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import shlex
import subprocess
import sys
import time
import typing as t
from pathlib import Path

from . import db as dbmod
from . import REPO
from . import report

SCENARIOS = ("pool", "latency", "reconnects", "statements", "keepalive")
#: Run only when asked for.
EXTRA_SCENARIOS = ("instructions", "moves")
VARIANTS = ["bare", "pre_ping", "recycle", "guard"]

#: Per mode: how long each scenario may run. ``full`` takes about 6 minutes,
#: ``quick`` under 2.
PLANS: dict[str, dict[str, t.Any]] = {
    "full": {
        "pool": {"rounds": 30, "requests": 2000, "time_limit": 130.0},
        # Through the proxy a request takes milliseconds and its timers jitter by
        # tens of µs: resolving a cost of ~10 µs takes about 30 rounds.
        "latency": {
            "delays": [0.0005, 0.001, 0.002],
            "rounds": 30,
            "round_seconds": 3.0,
            "time_limit": 100.0,
        },
        "reconnects": {"busy_seconds": 12.0, "idle_cycles": 3},
        "statements": {"rounds": 60, "statements": 2000},
        "keepalive": {"rounds": 20, "connections": 50},
        "instructions": {"small": 500, "large": 2500, "timeout": 900.0},
        "moves": {"writes": 50, "pools": 3, "threads": 6, "extra": 3, "watchdog": 25.0},
    },
    "quick": {
        "pool": {"rounds": 8, "requests": 400, "time_limit": 18.0},
        "latency": {
            "delays": [0.0005, 0.002],
            "rounds": 6,
            "round_seconds": 1.0,
            "time_limit": 8.0,
        },
        "reconnects": {"busy_seconds": 5.0, "idle_cycles": 1},
        "statements": {"rounds": 10, "statements": 500},
        "keepalive": {"rounds": 6, "connections": 20},
        "instructions": {"small": 100, "large": 500, "timeout": 600.0},
        "moves": {"writes": 20, "pools": 3, "threads": 6, "extra": 3, "watchdog": 25.0},
    },
}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="a short run (< 2 min)")
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {', '.join(SCENARIOS + EXTRA_SCENARIOS)}"
        f" (default: {', '.join(SCENARIOS)})",
    )
    parser.add_argument(
        "--url",
        help="run pool/latency against this MySQL URL (read-only load) instead of"
        " a private MariaDB; reconnects always use a private server",
    )
    parser.add_argument("--wait-timeout", type=int, default=4, help="for reconnects")
    parser.add_argument("--threads", type=int, default=3, help="for reconnects")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply rounds and time limits (0.25–4) for tighter or faster figures",
    )
    parser.add_argument("--label", default="", help="added to the result file names")
    args = parser.parse_args(argv)
    args.scenario_list = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if not 0.25 <= args.scale <= 4:
        parser.error("--scale must be between 0.25 and 4")
    unknown = set(args.scenario_list) - set(SCENARIOS + EXTRA_SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    return args


def _scaled(plan: dict[str, t.Any], scale: float) -> dict[str, t.Any]:
    """``plan`` with its rounds and time limits multiplied by ``scale``."""
    out: dict[str, t.Any] = {}
    for scenario, settings in plan.items():
        out[scenario] = dict(settings)
        for key in ("rounds", "time_limit", "busy_seconds"):
            if key in settings:
                value = settings[key] * scale
                out[scenario][key] = max(3, round(value)) if key == "rounds" else value
    return out


def _commit() -> str:
    """``git describe --always --dirty`` of the tree measured."""
    out = subprocess.run(
        ["git", "describe", "--always", "--dirty"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> int:
    """Run the chosen scenarios; write Markdown, pyperf JSON and log."""
    args = _parse(argv)
    mode = "quick" if args.quick else "full"
    plan = _scaled(PLANS[mode], args.scale)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = args.out / f"{stamp}-{mode}{f'-{args.label}' if args.label else ''}"
    log_file = logging.FileHandler(base.with_suffix(".log"))
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(message)s",
        handlers=[logging.StreamHandler(sys.stderr), log_file],
    )
    # The guard's own messages (start-up lines, the disconnects the reconnect
    # scenario provokes on purpose) go to the log file only.
    guard_logger = logging.getLogger("flask_staleguard")
    guard_logger.propagate = False
    guard_logger.addHandler(log_file)
    log = logging.getLogger("bench").info

    command = "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()
    lines: list[str] = []
    benchmarks: list[t.Any] = []
    with dbmod.private_mariadb() as server:
        url = args.url or server.url
        mariadb = dbmod.server_version(url)
        log(f"{mode} run of {args.scenario_list} against {url} (MariaDB {mariadb})")
        if "pool" in args.scenario_list:
            from . import pool_cost

            log("scenario pool: per request-shaped checkout on loopback")
            found_lines, found = pool_cost.run(url, log=log, **plan["pool"])
            lines += found_lines
            benchmarks += found
        if "latency" in args.scenario_list:
            from . import latency

            log("scenario latency: through a delaying TCP proxy")
            p = plan["latency"]
            found_lines, found = latency.run(url, variants=VARIANTS, log=log, **p)
            lines += found_lines
            benchmarks += found
        if "statements" in args.scenario_list:
            from . import statements

            log("scenario statements: a guarded engine, per statement")
            p = plan["statements"]
            found_lines, found = statements.run(log=log, **p)
            lines += found_lines
            benchmarks += found
        if "keepalive" in args.scenario_list:
            from . import keepalive

            log("scenario keepalive: setting it, per new connection")
            found_lines, found = keepalive.run(url, log=log, **plan["keepalive"])
            lines += found_lines
            benchmarks += found
        if "instructions" in args.scenario_list:
            from . import instructions
            from .variants import ALL

            log("scenario instructions: per request, counted by valgrind")
            found_lines, found = instructions.run(
                url, variants=ALL, log=log, **plan["instructions"]
            )
            lines += found_lines
            benchmarks += found
        if "moves" in args.scenario_list:
            from . import moves

            log("scenario moves: failover, restart, silent server")
            lines += moves.run(variants=VARIANTS, log=log, **plan["moves"])
        if "reconnects" in args.scenario_list:
            from . import reconnects

            log("scenario reconnects: busy, idle-then-burst, kill")
            lines += reconnects.run(
                server,
                variants=VARIANTS,
                wait_timeout=args.wait_timeout,
                threads=args.threads,
                log=log,
                **plan["reconnects"],
            )
    elapsed = time.monotonic() - started
    commit = _commit()
    header = [
        f"# Benchmark results: {time.strftime('%Y-%m-%d %H:%M %Z')}",
        "",
        f"Command: `{command.strip()}` ({elapsed:.0f} s), at {commit}, against"
        f" MariaDB {mariadb}. Medians over interleaved rounds; `added` is the"
        " per-round difference from bare in the same round, with an"
        " order-statistics 95 % interval of its median. Machine and software:"
        f" `python -m pyperf metadata {base.name}.json`.",
        "",
    ]
    summary = "\n".join(header + lines)
    base.with_suffix(".md").write_text(summary + "\n")
    if benchmarks:
        meta = {"commit": commit, "mariadb": mariadb, "command": command.strip()}
        for package in ("flask", "flask-sqlalchemy", "sqlalchemy", "pymysql"):
            meta[package] = importlib.metadata.version(package)
        for bench in benchmarks:
            bench.update_metadata(meta)
        report.write_suite(benchmarks, str(base.with_suffix(".json")))
    print(summary)
    log(f"results: {base}.md / .json / .log ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
