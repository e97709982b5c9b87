"""``python -m bench``: run the benchmark scenarios and write the results.

Scenarios (``--scenarios``, comma-separated; default all):

``pool``        per-request pool cost on loopback (issue item 1)
``throughput``  requests/s through gunicorn with wrk (item 2)
``latency``     per-request cost through a delaying TCP proxy (item 3)
``reconnects``  reconnects and stale errors per traffic pattern (items 4, 5)
``profile``     where the guard's per-request cost goes (ablation, call counts)
``statements``  what the guard's one statement-level listener costs a statement

Writes ``bench/results/<stamp>-<mode>.json`` (everything, raw figures included),
``.md`` (the tables), ``.log`` (progress) and ``-latency.png`` (with matplotlib).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
import time
import typing as t
from pathlib import Path

from . import db as dbmod
from .machine import load_average
from .machine import machine_facts
from .machine import REPO

SCENARIOS = ("pool", "throughput", "latency", "reconnects", "profile", "statements")

#: Per mode: how long each scenario may run. ``full`` takes about 10–11 minutes,
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
        # 1-second slices swing by ±10 %: 30 rounds bring the interval of the
        # median ratio to about ±3 %.
        "throughput": {"rounds": 30, "duration": 1.0},
        "reconnects": {"busy_seconds": 12.0, "idle_cycles": 3},
        "profile": {"rounds": 15, "requests": 1000, "time_limit": 60.0},
        "statements": {"rounds": 60, "statements": 2000},
    },
    "quick": {
        "pool": {"rounds": 8, "requests": 400, "time_limit": 18.0},
        "latency": {
            "delays": [0.0005, 0.002],
            "rounds": 5,
            "round_seconds": 1.0,
            "time_limit": 8.0,
        },
        "throughput": {"rounds": 3, "duration": 1.0},
        "reconnects": {"busy_seconds": 5.0, "idle_cycles": 1},
        "profile": {"rounds": 5, "requests": 300, "time_limit": 10.0},
        "statements": {"rounds": 10, "statements": 500},
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
        help=f"comma-separated subset of {', '.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument(
        "--url",
        help="run pool/latency/throughput against this MySQL URL (read-only load)"
        " instead of a private MariaDB; reconnects always use a private server",
    )
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers")
    parser.add_argument("--connections", type=int, default=4, help="wrk connections")
    parser.add_argument("--wait-timeout", type=int, default=4, help="for reconnects")
    parser.add_argument("--threads", type=int, default=3, help="for reconnects")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--no-plot", action="store_true")
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
    unknown = set(args.scenario_list) - set(SCENARIOS)
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


def _clean(value: t.Any) -> t.Any:
    """NaN and infinity as ``null``: the JSON file must stay strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    """Run the chosen scenarios; write JSON, Markdown, log and plot."""
    args = _parse(argv)
    mode = "quick" if args.quick else "full"
    plan = _scaled(PLANS[mode], args.scale)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    label = f"-{args.label}" if args.label else ""
    base = args.out / f"{stamp}-{mode}{label}"
    log_file = base.with_suffix(".log")
    handlers: list[logging.Handler] = [
        logging.StreamHandler(sys.stderr),
        logging.FileHandler(log_file),
    ]
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", handlers=handlers
    )
    logger = logging.getLogger("bench")
    # The guard's own messages (start-up lines, the disconnects the reconnect
    # scenario provokes on purpose) go to the log file only.
    guard_logger = logging.getLogger("flask_staleguard")
    guard_logger.propagate = False
    guard_logger.addHandler(handlers[1])
    log = logger.info

    variants = ["bare", "pre_ping", "recycle", "guard"]
    command = "python -m bench " + " ".join(
        shlex.quote(a) for a in (argv or sys.argv[1:])
    )
    results: dict[str, t.Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": command.strip(),
        "mode": mode,
        "scale": args.scale,
        "variants": variants,
    }
    started = time.monotonic()
    with dbmod.private_mariadb() as server:
        url = args.url or server.url
        results["database"] = "private MariaDB" if not args.url else "given URL"
        results["machine"] = machine_facts(dbmod.server_version(url))
        results["variants"] = variants
        log(f"{mode} run of {args.scenario_list} against {results['database']}")
        if "pool" in args.scenario_list:
            from . import pool_cost
            from .variants import build_all

            log("scenario pool: per-request cost on loopback")
            p = plan["pool"]
            apps = build_all(variants, url)
            raw = pool_cost.measure(
                apps,
                rounds=p["rounds"],
                requests=p["requests"],
                time_limit=p["time_limit"],
                progress=log,
            )
            for bench_app in apps.values():
                bench_app.dispose()
            results["pool"] = {"raw": raw, "summary": pool_cost.summarize(raw)}
        if "throughput" in args.scenario_list:
            from . import throughput

            log("scenario throughput: gunicorn + load generator")
            p = plan["throughput"]
            results["throughput"] = throughput.run(
                url,
                variants=variants,
                rounds=p["rounds"],
                duration=p["duration"],
                workers=args.workers,
                connections=args.connections,
                log_dir=args.out,
                log=log,
            )
        if "latency" in args.scenario_list:
            from . import latency

            log("scenario latency: through a delaying TCP proxy")
            p = plan["latency"]
            results["latency"] = latency.run(
                url,
                delays=p["delays"],
                variants=variants,
                rounds=p["rounds"],
                round_seconds=p["round_seconds"],
                time_limit=p["time_limit"],
                log=log,
            )
        if "profile" in args.scenario_list:
            from . import hotpath

            log("scenario profile: ablation and call counts")
            p = plan["profile"]
            results["profile"] = hotpath.run(
                url,
                rounds=p["rounds"],
                requests=p["requests"],
                time_limit=p["time_limit"],
                log=log,
            )
        if "statements" in args.scenario_list:
            from . import statements

            log("scenario statements: the handle_error listener, per statement")
            p = plan["statements"]
            results["statements"] = statements.run(
                rounds=p["rounds"], statements=p["statements"], log=log
            )
        if "reconnects" in args.scenario_list:
            from . import reconnects

            log("scenario reconnects: busy, idle-then-burst, kill")
            p = plan["reconnects"]
            results["reconnects"] = reconnects.run(
                server,
                variants=variants,
                wait_timeout=args.wait_timeout,
                threads=args.threads,
                busy_seconds=p["busy_seconds"],
                idle_cycles=p["idle_cycles"],
                log=log,
            )
    results["elapsed_s"] = time.monotonic() - started
    from .machine import source_digest

    results["machine"]["flask_staleguard_digest_at_end"] = source_digest()
    if source_digest() != results["machine"]["flask_staleguard_digest"]:
        log("WARNING: flask_staleguard/*.py changed during the run")
    results["load_average_at_end"] = load_average()
    from . import report

    results["targets"] = {"guard": report.targets(results, "guard")}
    base.with_suffix(".json").write_text(json.dumps(_clean(results), indent=1))
    summary = report.markdown(results)
    base.with_suffix(".md").write_text(summary + "\n")
    if not args.no_plot and ("latency" in results):
        from .plot import latency_plot

        png = latency_plot(
            results,
            base.parent / f"{base.name}-latency.png",
            title=f"Added cost per request vs round trip ({mode} run {stamp})",
        )
        log(f"plot: {png}" if png else "plot skipped: matplotlib is not installed")
    # Gunicorn logs are only interesting when something failed.
    for path in args.out.glob("gunicorn-*.log"):
        if path.stat().st_size == 0:
            path.unlink()
        else:
            path.rename(base.parent / f"{base.name}-{path.name}")
    print(summary)
    log(f"results: {base}.json / .md / .log ({results['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
