"""``python -m bench.silent_drop``: one request after a silent drop, per strategy.

Not a benchmark of cost but of outcome, at a realistic scale: a network namespace
whose stateful firewall (conntrack, ``tcp_loose=0``, INVALID dropped) forgets a
TCP flow idle for 90 s, the way a NAT gateway or cloud load balancer does; a pool
of one PyMySQL connection to a private MariaDB inside it, idle for 100 s; then one
request, under a watchdog longer than TCP's own 15 minutes of retransmissions.
Also a statement whose path dies while it runs. Every configuration runs side by
side, so the whole takes as long as the slowest: about 16 minutes. Needs root,
``ip``, ``iptables`` and the MariaDB server binaries (as the tests do).
``--quick`` runs it at test scale (8 s, 12 s, a 20 s watchdog) in under a minute.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import typing as t
from pathlib import Path

from sqlalchemy.engine import make_url

from tests.netns import Firewall
from tests.netns import NetnsMariaDBServer
from tests.netns import Scenario

FIREWALL = 90
IDLE = 100
WATCHDOG = 1000.0
if "--quick" in sys.argv:  # a check of the harness itself, at test scale
    FIREWALL, IDLE, WATCHDOG = 8, 12, 20.0

#: Label -> (guard installed, config).
CONFIGS: dict[str, tuple[bool, dict[str, t.Any]]] = {
    "Flask-SQLAlchemy alone": (False, {}),
    "guard, keepalive off (STALEGUARD_KEEPALIVE = None)": (
        True,
        {"STALEGUARD_KEEPALIVE": None},
    ),
    "guard (default: keepalive 60 s)": (True, {}),
    "pre_ping, keepalive off": (
        True,
        {"STALEGUARD_STRATEGY": "pre_ping", "STALEGUARD_KEEPALIVE": None},
    ),
    "pre_ping (keepalive 60 s)": (True, {"STALEGUARD_STRATEGY": "pre_ping"}),
    "recycle (keepalive 60 s)": (True, {"STALEGUARD_STRATEGY": "recycle"}),
    "guard, keepalive off, STALEGUARD_IDLE_TIMEOUT = 80": (
        True,
        {"STALEGUARD_KEEPALIVE": None, "STALEGUARD_IDLE_TIMEOUT": 80},
    ),
}
IN_FLIGHT: dict[str, tuple[bool, dict[str, t.Any]]] = {
    "in flight, Flask-SQLAlchemy alone": (False, {}),
    "in flight, guard (keepalive 60 s)": (True, {}),
}


def _spec(url: str, guard: bool, config: dict[str, t.Any], steps: list[t.Any]) -> t.Any:
    return {
        "url": url,
        "guard": guard,
        "config": config,
        "engine_options": {"pool_size": 1, "max_overflow": 0},
        "id_sql": "SELECT CONNECTION_ID()",
        "steps": steps,
    }


def _summary(result: dict[str, t.Any]) -> str:
    requests = [s for s in result["steps"] if s["do"] == "request"]
    first = requests[0]["requests"][0] if requests else {}
    seconds = first.get("seconds")
    if first.get("hung"):
        outcome = f"still hanging at the {seconds:.0f} s watchdog"
    elif first.get("ok"):
        outcome = f"works in {seconds:.3f} s"
    else:
        error = " ".join(str(first.get("error")).split())[:90]
        outcome = f"fails after {seconds:.1f} s: {error}"
    replaced = (result.get("stats") or {}).get("default", {}).get("replaced")
    return f"{outcome}; replaced {replaced if replaced is not None else '-'}"


def main() -> None:
    """Run every configuration side by side; print the table."""
    with contextlib.ExitStack() as stack:
        firewall = stack.enter_context(Firewall(timeout=FIREWALL))
        basedir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        server = stack.enter_context(NetnsMariaDBServer(basedir / "m", firewall))
        url = make_url(server.user_url).render_as_string(hide_password=False)
        idle = [
            {"do": "warm", "n": 1},
            {"do": "idle", "seconds": IDLE},
            {"do": "request", "watchdog": WATCHDOG},
            {"do": "request", "watchdog": 60.0},
        ]
        flight = [
            {"do": "warm", "n": 1},
            {
                "do": "request",
                "sql": "SELECT SLEEP(3)",
                "drop_after": 0.5,
                "watchdog": WATCHDOG,
            },
            {"do": "request", "watchdog": 60.0},
        ]
        runs = {
            label: Scenario(firewall, _spec(url, g, c, idle), WATCHDOG + 120)
            for label, (g, c) in CONFIGS.items()
        }
        runs |= {
            label: Scenario(firewall, _spec(url, g, c, flight), WATCHDOG + 120)
            for label, (g, c) in IN_FLIGHT.items()
        }
        results = {label: run.result() for label, run in runs.items()}
    print(f"firewall forgets flows idle {FIREWALL} s; idle {IDLE} s; PyMySQL\n")
    print("| configuration | first request | ")
    print("| --- | --- |")
    for label, result in results.items():
        print(f"| {label} | {_summary(result)} |")
    out = Path(__file__).parent / "results" / "silent_drop.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nraw: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
