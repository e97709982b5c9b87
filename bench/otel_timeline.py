"""The OpenTelemetry metrics of a real load over time, for the picture in
docs/otel.rst.

``python -m bench.otel_timeline record timeline.json`` runs it against a private
MariaDB (started and removed here): load, an idle pause with a KILL of the idle
connections, load again (the guard replaces the killed ones), and one connection
held past the leak threshold, then returned. Every 0.25 s an in-memory reader
collects the metrics. ``python bench/otel_timeline.py plot timeline.json out.png``
draws them (needs matplotlib, which the project does not depend on).
"""

from __future__ import annotations

import json
import sys
import threading
import time
import typing as t
from pathlib import Path

PHASES = """\
0-8 s load (6 threads); 8-16 s idle, KILL at 12 s; 16-24 s load;
a connection held 20-25 s (threshold 2 s), then returned."""


def record(out: Path) -> None:
    """Run the scenario and write the sampled metrics to ``out`` as JSON."""
    import sqlalchemy as sa
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from flask_staleguard import protect
    from flask_staleguard.otel import instrument

    from .db import kill_idle
    from .db import private_mariadb

    with private_mariadb() as server:
        engine = sa.create_engine(server.url, pool_size=5, max_overflow=5)
        protection = protect(engine, name="bench", leak_threshold=2)
        reader = InMemoryMetricReader()
        instrument(protection, MeterProvider(metric_readers=[reader]))
        start = time.monotonic()
        samples: list[dict[str, t.Any]] = []
        events: list[tuple[float, str]] = []
        loading = threading.Event()
        done = threading.Event()

        def work() -> None:
            while not done.is_set():
                if not loading.wait(0.1):
                    continue
                with engine.connect() as conn:
                    conn.execute(sa.text("SELECT SLEEP(0.005)"))
                time.sleep(0.01)

        def sample() -> None:
            while not done.wait(0.25):
                samples.append(
                    {"t": time.monotonic() - start, "points": _points(reader)}
                )

        threads = [threading.Thread(target=work) for _ in range(6)]
        threads.append(threading.Thread(target=sample))
        for thread in threads:
            thread.start()
        try:

            def at(second: float) -> None:
                time.sleep(max(0.0, start + second - time.monotonic()))

            loading.set()
            at(8)
            loading.clear()
            at(12)
            killed = kill_idle(server)
            events.append((time.monotonic() - start, f"KILL {len(killed)} idle"))
            at(16)
            loading.set()
            at(20)
            held = engine.connect()
            events.append((time.monotonic() - start, "one held"))
            at(24)
            loading.clear()
            at(25)
            held.close()
            events.append((time.monotonic() - start, "returned"))
            at(27)
        finally:
            done.set()
            loading.set()
            for thread in threads:
                thread.join(timeout=10)
            engine.dispose()
    out.write_text(json.dumps({"samples": samples, "events": events}, indent=1))


def _points(reader: t.Any) -> dict[str, float]:
    """The reader's data as {"name{attr=value,...}": value}; a histogram's count."""
    found: dict[str, float] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    labels = ",".join(
                        f"{k}={v}"
                        for k, v in sorted(point.attributes.items())
                        if k != "db.client.connection.pool.name"
                    )
                    value = getattr(point, "value", None)
                    if value is None:
                        value = point.count
                    found[f"{metric.name}{{{labels}}}"] = value
    return found


def plot(source: Path, out: Path) -> None:
    """Draw the recorded metrics: connections by state, checkouts per second,
    and the guard's counters.
    """
    import matplotlib  # type: ignore[import-not-found, unused-ignore]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]

    data = json.loads(source.read_text())
    samples = data["samples"]
    times = [s["t"] for s in samples]

    def series(key: str) -> list[float]:
        return [s["points"].get(key, 0) for s in samples]

    figure, (top, middle, bottom) = plt.subplots(3, 1, figsize=(9, 7.5), sharex=True)
    state = "db.client.connection.count{{db.client.connection.state={}}}"
    top.plot(times, series(state.format("used")), label="used")
    top.plot(times, series(state.format("idle")), label="idle")
    top.plot(
        times, series("db.client.connection.max{}"), "--", label="max", color="grey"
    )
    top.set_ylabel("db.client.connection.count")
    top.set_ylim(-0.5, 14)
    top.legend(loc="upper left", ncol=3)
    checkouts = series("flask_staleguard.checkouts{}")
    rate = [0.0] + [
        (checkouts[i] - checkouts[i - 1]) / (times[i] - times[i - 1])
        for i in range(1, len(times))
    ]
    middle.plot(times, rate, label="flask_staleguard.checkouts / s")
    creates = series("db.client.connection.create_time{}")
    middle2 = middle.twinx()
    middle2.step(times, creates, color="tab:red", label="connections created")
    middle.set_ylabel("checkouts / s")
    middle2.set_ylabel("created (cumulative)", color="tab:red")
    replaced_keys = sorted(
        {
            k
            for s in samples
            for k in s["points"]
            if k.startswith("flask_staleguard.connections.replaced")
        }
    )
    for key in replaced_keys:
        reason = key.split("reason=")[1].rstrip("}")
        bottom.step(times, series(key), label=f"replaced ({reason})")
    bottom.step(
        times,
        series("flask_staleguard.leaks.returned{}"),
        label="leaks.returned (unleaked)",
    )
    bottom.set_ylabel("cumulative")
    bottom.set_xlabel("seconds")
    bottom.legend(loc="upper left")
    for axes in (top, middle, bottom):
        for second, _ in data["events"]:
            axes.axvline(second, color="black", linewidth=0.6, linestyle=":")
    for second, label in data["events"]:
        top.annotate(label, (second, top.get_ylim()[1]), fontsize=8, rotation=90,
                     va="top", ha="right")  # fmt: skip
    top.set_title("flask_staleguard.otel on a real MariaDB: " + PHASES, fontsize=9)
    figure.tight_layout()
    figure.savefig(out, dpi=90)


def main(argv: t.Sequence[str]) -> None:
    if argv[:1] == ["record"] and len(argv) == 2:
        record(Path(argv[1]))
    elif argv[:1] == ["plot"] and len(argv) == 3:
        plot(Path(argv[1]), Path(argv[2]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
