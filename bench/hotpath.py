"""Scenario ``profile``: where the guard's per-request cost goes.

Two complementary views of the hot path, both against the same server:

* **Ablation**, measured like scenario 1 (interleaved rounds, paired with bare):
  the shipped ``guard`` minus one piece at a time, so each piece's cost is the
  drop it causes. The pieces are removed on that one app only (listeners swapped
  or removed, the teardown wrapper unwrapped); the shipped code is not changed.
* **Call counts** from ``cProfile``: Python calls per request of each variant,
  and the functions that ``guard`` calls more often than ``bare``. Counts are
  deterministic, so they do not depend on how busy the machine is.
"""

from __future__ import annotations

import cProfile
import pstats
import typing as t

from sqlalchemy import event

from flask_staleguard import bind_guard

from . import pool_cost
from . import stats
from .variants import BenchApp
from .variants import build

#: The shipped module, private names included (patched on one app at a time).
bg: t.Any = bind_guard

#: Ablation name -> what it removes from the shipped guard (or, for
#: ``noop_listeners``, what it adds to bare).
ABLATIONS = {
    "guard-pool_listeners": "the checkout and checkin listeners"
    " (BindGuard._on_checkout: idle budget, socket poll, leak-tracking record;"
    " _on_checkin: return time)"
    " and with them SQLAlchemy's pool-event dispatch",
    "guard-probe": "the socket poll (SocketProbe.check) at checkout",
    "guard-teardown": "the do_teardown_appcontext wrapper (its inline nothing-to-do"
    " test and teardown.clean_up)",
    "noop_listeners": "bare plus an empty checkout and an empty checkin listener:"
    " SQLAlchemy's own cost of having pool listeners at all",
}

#: The ablation that adds to bare instead of removing from guard.
FLOOR = "noop_listeners"


def _bind_guard(bench_app: BenchApp) -> t.Any:
    state = bench_app.app.extensions["staleguard"]
    return next(iter(state.binds.values()))


def _without_pool_listeners(bench_app: BenchApp) -> None:
    guard = _bind_guard(bench_app)
    engine = bench_app.engine
    for name, listener in (
        ("checkout", guard._on_checkout),
        ("checkin", guard._on_checkin),
    ):
        if not event.contains(engine, name, listener):
            raise LookupError(f"the guard has no {name} listener")
        event.remove(engine, name, listener)
    if engine.pool.dispatch.checkout or engine.pool.dispatch.checkin:
        raise LookupError("other checkout/checkin listeners remain on the pool")


def _without_teardown(bench_app: BenchApp) -> None:
    if "do_teardown_appcontext" not in vars(bench_app.app):
        raise LookupError("the guard no longer wraps do_teardown_appcontext")
    del bench_app.app.do_teardown_appcontext  # back to Flask's own method


def _without_probe(bench_app: BenchApp) -> None:
    guard = _bind_guard(bench_app)
    engine = bench_app.engine
    original = guard._on_connect

    def on_connect(dbapi_connection: t.Any, record: t.Any) -> None:
        original(dbapi_connection, record)
        record.info[bg.STATE].probe = None

    event.remove(engine, "connect", original)
    event.listen(engine, "connect", on_connect)
    engine.dispose()  # pooled connections already carry a probe


def _noop_listeners(bench_app: BenchApp) -> None:
    def on_checkout(dbapi_connection: t.Any, record: t.Any, proxy: t.Any) -> None:
        return None

    def on_checkin(dbapi_connection: t.Any, record: t.Any) -> None:
        return None

    event.listen(bench_app.engine, "checkout", on_checkout)
    event.listen(bench_app.engine, "checkin", on_checkin)


_APPLY: dict[str, tuple[str, t.Callable[[BenchApp], None]]] = {
    "guard-pool_listeners": ("guard", _without_pool_listeners),
    "guard-probe": ("guard", _without_probe),
    "guard-teardown": ("guard", _without_teardown),
    FLOOR: ("bare", _noop_listeners),
}


def build_ablations(url: str, log: t.Callable[[str], None]) -> dict[str, BenchApp]:
    """One app per ablation that still applies to the current code."""
    apps: dict[str, BenchApp] = {}
    for name, (base, apply) in _APPLY.items():
        bench_app = build(base, url)
        try:
            apply(bench_app)
        except (LookupError, AttributeError) as e:
            log(f"ablation {name} skipped: {e}")
            bench_app.dispose()
            continue
        bench_app.variant = name
        apps[name] = bench_app
    return apps


def call_counts(
    apps: t.Mapping[str, BenchApp], *, requests: int = 1000, top: int = 25
) -> dict[str, t.Any]:
    """Python calls per request for each app, and ``guard``'s extra calls over bare."""
    per_function: dict[str, dict[str, tuple[float, float]]] = {}
    totals: dict[str, dict[str, float]] = {}
    for name, bench_app in apps.items():
        for _ in range(100):
            bench_app.request()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(requests):
            bench_app.request()
        profiler.disable()
        st = pstats.Stats(profiler)
        totals[name] = {"calls_per_request": st.total_calls / requests}  # type: ignore[attr-defined]
        table: dict[str, tuple[float, float]] = {}
        for (path, line, func), row in st.stats.items():  # type: ignore[attr-defined]
            short = path.split("site-packages/")[-1].replace(str(_repo()), "")
            table[f"{short}:{line}({func})"] = (
                row[1] / requests,
                row[3] / requests * 1e6,
            )
        per_function[name] = table
    extra: dict[str, list[dict[str, t.Any]]] = {}
    for name in apps:
        if name == "bare" or "bare" not in per_function:
            continue
        base = per_function["bare"]
        rows: list[dict[str, t.Any]] = []
        for key, (calls, cum) in per_function[name].items():
            b_calls, b_cum = base.get(key, (0.0, 0.0))
            if abs(calls - b_calls) >= 0.5:
                rows.append(
                    {
                        "function": key,
                        "extra_calls_per_request": round(calls - b_calls, 2),
                        "cumulative_us_profiled": round(cum - b_cum, 2),
                    }
                )
        rows.sort(key=lambda r: -float(r["extra_calls_per_request"]))
        extra[name] = rows[:top]
    return {"totals": totals, "extra_over_bare": extra}


def _repo() -> str:
    from .machine import REPO

    return str(REPO) + "/"


def run(
    url: str,
    *,
    rounds: int,
    requests: int,
    time_limit: float,
    log: t.Callable[[str], None],
) -> dict[str, t.Any]:
    """Ablation rounds plus call counts; returns raw and summarised figures."""
    apps: dict[str, BenchApp] = {
        "bare": build("bare", url),
        "pre_ping": build("pre_ping", url),
        "guard": build("guard", url),
        # StaleGuard's bookkeeping (pool listeners, leak tracking, teardown)
        # without any stale-connection check: what every strategy pays.
        "off": build("off", url),
    }
    apps.update(build_ablations(url, log))
    raw = pool_cost.measure(
        apps,
        rounds=rounds,
        requests=requests,
        time_limit=time_limit,
        progress=log,
    )
    summary = pool_cost.summarize(raw)
    components = {}
    for name in apps:
        if name in ABLATIONS and name != FLOOR:
            # Paired within each round: guard's time minus the ablation's.
            saves = stats.paired(raw["wall_us"]["guard"], raw["wall_us"][name])
            saves_cpu = stats.paired(raw["cpu_us"]["guard"], raw["cpu_us"][name])
            components[name] = {
                "removes": ABLATIONS[name],
                "saves_us": stats.summary(saves),
                "saves_cpu_us": stats.summary(saves_cpu),
            }
    floor = None
    if FLOOR in apps:
        # Paired within each round: the empty listeners' time minus bare's.
        adds = stats.paired(raw["wall_us"][FLOOR], raw["wall_us"]["bare"])
        adds_cpu = stats.paired(raw["cpu_us"][FLOOR], raw["cpu_us"]["bare"])
        floor = {
            "adds": ABLATIONS[FLOOR],
            "adds_us": stats.summary(adds),
            "adds_cpu_us": stats.summary(adds_cpu),
        }
    counts = call_counts(
        {
            k: v
            for k, v in apps.items()
            if k in ("bare", "pre_ping", "guard", "off", FLOOR)
        }
    )
    for bench_app in apps.values():
        bench_app.dispose()
    return {
        "raw": raw,
        "summary": summary,
        "components": components,
        "listener_floor": floor,
        "ablations": ABLATIONS,
        "call_counts": counts,
    }
