"""The optional plot: per-request added cost against the network round trip.

Needs matplotlib (``pip install matplotlib``); without it the harness skips the
plot and says so.
"""

from __future__ import annotations

import typing as t
from pathlib import Path


def latency_plot(
    results: t.Mapping[str, t.Any], path: Path, *, title: str
) -> Path | None:
    """Write a PNG of added µs/request (over bare) per variant vs ping RTT.

    Points: the direct loopback measurement (scenario 1) and each proxy delay
    (scenario 3). Returns the path, or ``None`` when matplotlib is missing or
    there is nothing to plot.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    points: list[tuple[float, str, t.Mapping[str, t.Any]]] = []
    latency = results.get("latency")
    pool = results.get("pool")
    if pool and latency:
        points.append((latency["direct_ping_rtt_us"], "loopback", pool["summary"]))
    if latency:
        for level in latency["levels"]:
            points.append(
                (level["ping_rtt_us"], f"{level['delay_ms']:g} ms", level["summary"])
            )
    if len(points) < 2:
        return None
    points.sort(key=lambda p: p[0])
    variants = [v for v in points[-1][2] if v != "bare"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    markers = {
        "pre_ping": "o",
        "recycle": "s",
        "guard": "^",
    }
    for variant in variants:
        xs, ys, lows, highs = [], [], [], []
        for rtt, _, summary in points:
            if variant not in summary:
                continue
            added = summary[variant]["added_us"]
            xs.append(rtt / 1000)
            ys.append(added["median"])
            lows.append(added["median"] - added["ci95_low"])
            highs.append(added["ci95_high"] - added["median"])
        ax.errorbar(
            xs,
            ys,
            yerr=[lows, highs],
            marker=markers.get(variant, "x"),
            capsize=3,
            label=variant,
        )
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=10)
    ax.axhline(0, color="grey", linewidth=0.6)
    ax.set_xlabel("round trip to the database, ms (measured COM_PING, log scale)")
    ax.set_ylabel("added µs per request over bare (symlog)")
    ax.set_title(title, fontsize=10)
    for rtt, label, _ in points:
        ax.annotate(
            label,
            (rtt / 1000, 0),
            textcoords="offset points",
            xytext=(0, -14),
            ha="center",
            fontsize=7,
            color="grey",
        )
    ax.grid(True, which="both", linewidth=0.3)
    ax.legend(title="variant (median, 95 % CI)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
