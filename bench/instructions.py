"""Scenario ``instructions``: what each variant costs a request, counted by valgrind.

On a shared machine a few µs drown in the noise of timed rounds; a count of
executed instructions does not move with the machine's load. Each variant runs in
a process of its own under ``valgrind --tool=callgrind``, twice: the same warm-up,
then ``small`` or ``large`` requests (app context + checkout + ``SELECT 1`` +
checkin, as in ``pool``). The difference of the two totals over
``large - small`` is its instructions per request, without start-up or warm-up.
Valgrind counts user space only: the kernel's side of a syscall (the guard's
``poll``, the driver's ``send`` and ``recv``) is not in the count.

To read the counts as time, ``bare`` also runs without valgrind, timed by its
thread's user CPU: its instructions per user-CPU µs convert the others. That
conversion moves with the machine's load (and, in a VM, with the time the host
steals); the counts do not. The garbage collector is off while the requests run.

Run by hand: ``python -m bench.instructions VARIANT REQUESTS URL`` is one worker.
"""

from __future__ import annotations

import gc
import logging
import os
import resource
import shutil
import subprocess
import sys
import typing as t
from concurrent.futures import ThreadPoolExecutor

from . import REPO
from . import report
from .variants import FLOOR

_WARMUP = 300


def _worker(variant: str, requests: int, url: str) -> None:
    """Warm up, then run ``requests`` requests of ``variant``; print user-CPU µs."""
    logging.disable(logging.CRITICAL)  # the guard's start-up lines
    from .variants import build

    bench_app = build(variant, url)
    request = bench_app.request
    for _ in range(_WARMUP):
        request()
    # Collections would land at different requests in the two runs of a
    # variant and swamp its count: the figure is the code's own instructions.
    gc.collect()
    gc.disable()
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_utime
    for _ in range(requests):
        request()
    after = resource.getrusage(resource.RUSAGE_THREAD).ru_utime
    bench_app.dispose()
    print(f"user_us_per_request {(after - before) / max(requests, 1) * 1e6:.3f}")


def _instructions(variant: str, requests: int, url: str, timeout: float) -> int:
    """Instructions a worker running ``requests`` requests executes, in total."""
    done = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            "-m",
            "bench.instructions",
            variant,
            str(requests),
            url,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    for line in done.stderr.splitlines():
        if "Collected :" in line:
            return int(line.split()[-1])
    raise RuntimeError(f"valgrind gave no count for {variant}: {done.stderr[-500:]}")


def _user_us(variant: str, requests: int, url: str) -> float:
    done = subprocess.run(
        [sys.executable, "-m", "bench.instructions", variant, str(requests), url],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return float(done.stdout.split()[-1])


def run(
    url: str,
    *,
    variants: t.Sequence[str],
    small: int,
    large: int,
    timeout: float,
    log: t.Callable[[str], None],
) -> tuple[list[str], list[t.Any]]:
    """Instructions per request of every variant; the Markdown lines."""
    if shutil.which("valgrind") is None:
        log("instructions: valgrind is not installed; scenario left out")
        return ["## Instructions per request", "", "valgrind is not installed.", ""], []
    jobs = [(v, n) for v in variants for n in (small, large)]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        counts = dict(
            zip(jobs, pool.map(lambda j: _instructions(j[0], j[1], url, timeout), jobs))
        )
    per_request = {
        v: (counts[v, large] - counts[v, small]) / (large - small) for v in variants
    }
    user_us = min(_user_us("bare", 2000, url) for _ in range(5))
    per_us = per_request["bare"] / user_us
    log(
        "instructions: "
        + ", ".join(f"{v} {n:,.0f}" for v, n in per_request.items())
        + f" per request; bare runs {per_us:,.0f} per user-CPU µs"
    )
    lines = [
        "## Instructions per request (valgrind)",
        "",
        f"Each variant under callgrind, {small} and {large} requests after"
        f" {_WARMUP} of warm-up; user space only. µs at bare's"
        f" {per_us:,.0f} instructions per user-CPU µs ({user_us:.1f} µs a request).",
        "",
        "| variant | instructions per request | added over bare | ≈ added µs |"
        " added over listeners |",
        "| --- | --- | --- | --- | --- |",
    ]
    floor = per_request.get(FLOOR)
    for v, n in per_request.items():
        added = n - per_request["bare"]
        own = "–"
        if floor is not None and v not in ("bare", FLOOR, "pre_ping"):
            own = f"{n - floor:,.0f}"
        lines.append(
            f"| {v} | {n:,.0f} | "
            + ("–" if v == "bare" else f"{added:,.0f}")
            + " | "
            + ("–" if v == "bare" else report.fmt(added / per_us))
            + f" | {own} |"
        )
    lines.append("")
    return lines, []


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]), sys.argv[3])
