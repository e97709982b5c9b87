"""Scenario 2: requests per second through gunicorn, one server per variant.

All variants' gunicorn servers start at once (``--workers`` sync workers each)
and stay up; a round loads each server in turn, in shuffled order, with ``wrk``
(Debian package ``wrk``) for ``--duration`` seconds, or with a bounded Python
client when ``wrk`` is missing. Only one server is under load at a time; the
figure is the median over rounds of each variant's requests/s divided by bare's
in the same round.

Requests/s on a shared 2-core machine swing by ±10 % between 1-second slices.
Beside them, each slice's CPU time of the variant's gunicorn processes (user +
system, from ``/proc``) divided by the requests served gives the CPU a request
costs the server, a second view that does not depend on how the slice shared
the CPUs with ``wrk`` and the database. ``capacity`` is bare's CPU per request
over the variant's: the requests/s ratio the same CPU allows.

A second bare server (``bare_control``) runs in every round like a variant: an
A/A control. Its ratio to bare is what two identical servers differ by in this
harness, the scale against which a variant's ratio means anything.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import typing as t
import urllib.request
from pathlib import Path

from . import stats
from .machine import REPO


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """One gunicorn serving :mod:`bench.wsgi` for one variant, under ``name``
    (the A/A control is a second server of the bare variant)."""

    def __init__(
        self, name: str, variant: str, url: str, workers: int, log_dir: Path
    ) -> None:
        self.name = name
        self.port = _free_port()
        self.log_path = log_dir / f"gunicorn-{name}.log"
        env = {
            **os.environ,
            "BENCH_VARIANT": variant,
            "BENCH_DATABASE_URL": url,
            "PYTHONPATH": str(REPO),
        }
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "--workers",
                str(workers),
                "--worker-class",
                "sync",
                "--bind",
                f"127.0.0.1:{self.port}",
                "--log-level",
                "warning",
                "--chdir",
                str(REPO),
                "bench.wsgi:app",
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Poll ``/`` until it answers 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"gunicorn for {self.name} exited: {self.log_path.read_text()}"
                )
            try:
                with urllib.request.urlopen(self.url, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"gunicorn for {self.name} did not answer in time")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the arbiter and its workers so far."""
        ticks = 0
        for pid in [self.proc.pid, *self._workers()]:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
        return ticks / _CLOCK_TICKS

    def _workers(self) -> list[int]:
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            return [int(pid) for pid in children.read_text().split()]
        except OSError:
            return []

    def worker_stats(self, tries: int = 8) -> list[dict[str, t.Any]]:
        """``/_bench/stats`` from as many distinct workers as a few tries reach."""
        import json

        seen: dict[int, dict[str, t.Any]] = {}
        for _ in range(tries):
            try:
                with urllib.request.urlopen(self.url + "_bench/stats", timeout=2) as r:
                    data = json.loads(r.read())
                    seen[data["pid"]] = data
            except OSError:
                pass
        return list(seen.values())

    def stop(self) -> None:
        """SIGTERM the arbiter (it stops its workers), SIGKILL after 10 s."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


#: The A/A control: a second, identical bare server.
CONTROL = "bare_control"

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

_WRK_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
_WRK_TOTAL = re.compile(r"(\d+) requests in")
_WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_WRK_SOCKET = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"
)
_WRK_LAT50 = re.compile(r"^\s+50%\s+([\d.]+)(us|ms|s)\s*$", re.M)


def _to_ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk_load(url: str, seconds: float, connections: int) -> dict[str, t.Any]:
    """One ``wrk`` run; requests/s, failures, median latency and the raw text."""
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--latency",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    )
    text = out.stdout
    rps = _WRK_RPS.search(text)
    total = _WRK_TOTAL.search(text)
    non2xx = _WRK_NON2XX.search(text)
    sock = _WRK_SOCKET.search(text)
    lat = _WRK_LAT50.search(text)
    return {
        "rps": float(rps.group(1)) if rps else 0.0,
        "requests": int(total.group(1)) if total else 0,
        "failed": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": sum(int(x) for x in sock.groups()) if sock else 0,
        "latency_p50_ms": _to_ms(*lat.groups()) if lat else None,
        "raw": text,
    }


def python_load(url: str, seconds: float, connections: int) -> dict[str, t.Any]:
    """A bounded fallback for ``wrk``: ``connections`` threads, time-limited."""
    host, port = "127.0.0.1", int(url.split(":")[2].split("/")[0])
    deadline = time.monotonic() + seconds

    def worker() -> tuple[int, int]:
        done = failed = 0
        while time.monotonic() < deadline and done < 1_000_000:
            conn = http.client.HTTPConnection(host, port, timeout=5)
            try:
                conn.request("GET", "/")
                response = conn.getresponse()
                response.read()
                done += 1
                failed += response.status != 200
            except OSError:
                failed += 1
            finally:
                conn.close()
        return done, failed

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(connections) as pool:
        results = list(pool.map(lambda _: worker(), range(connections)))
    elapsed = time.monotonic() - started
    done = sum(r[0] for r in results)
    return {
        "rps": done / elapsed,
        "requests": done,
        "failed": sum(r[1] for r in results),
        "socket_errors": 0,
        "latency_p50_ms": None,
        "raw": f"python client: {done} requests in {elapsed:.2f} s",
    }


def run(
    url: str,
    *,
    variants: t.Sequence[str],
    rounds: int,
    duration: float,
    workers: int,
    connections: int,
    log_dir: Path,
    log: t.Callable[[str], None],
    seed: int = 0,
) -> dict[str, t.Any]:
    """Start the servers, run the shuffled rounds, stop the servers."""
    load = wrk_load if shutil.which("wrk") else python_load
    log(f"load generator: {'wrk' if load is wrk_load else 'python client'}")
    variants = [*variants, CONTROL]
    servers = {
        v: Server(v, "bare" if v == CONTROL else v, url, workers, log_dir)
        for v in variants
    }
    rng = random.Random(seed)
    raw: dict[str, t.Any] = {
        "config": {
            "workers": workers,
            "connections": connections,
            "duration_s": duration,
            "rounds": rounds,
            "load_generator": "wrk" if load is wrk_load else "python",
        },
        "rps": {v: [] for v in variants},
        "cpu_us_per_request": {v: [] for v in variants},
        "failed": dict.fromkeys(variants, 0),
        "latency_p50_ms": {v: [] for v in variants},
        "wrk_output": {v: [] for v in variants},
    }
    try:
        for server in servers.values():
            server.wait_ready()
        for server in servers.values():  # warm every worker's pool and caches
            load(server.url, 1, connections)
        for r in range(rounds):
            order = list(variants)
            rng.shuffle(order)
            for variant in order:
                server = servers[variant]
                cpu_before = server.cpu_seconds()
                result = load(server.url, duration, connections)
                cpu = server.cpu_seconds() - cpu_before
                raw["rps"][variant].append(result["rps"])
                raw["cpu_us_per_request"][variant].append(
                    cpu / result["requests"] * 1e6 if result["requests"] else None
                )
                raw["failed"][variant] += result["failed"] + result["socket_errors"]
                raw["latency_p50_ms"][variant].append(result["latency_p50_ms"])
                raw["wrk_output"][variant].append(result["raw"])
            log(
                f"round {r + 1}/{rounds}: "
                + ", ".join(f"{v} {raw['rps'][v][-1]:.0f}" for v in variants)
                + " req/s"
            )
        raw["worker_stats"] = {v: s.worker_stats() for v, s in servers.items()}
    finally:
        for server in servers.values():
            server.stop()
    return {"raw": raw, "summary": summarize(raw)}


def summarize(raw: t.Mapping[str, t.Any], baseline: str = "bare") -> dict[str, t.Any]:
    """Median requests/s, and the median per-round ratio to ``baseline``."""
    out: dict[str, t.Any] = {}
    base = raw["rps"][baseline]
    base_cpu = raw.get("cpu_us_per_request", {}).get(baseline)
    for variant, rps in raw["rps"].items():
        out[variant] = {
            "rps_median": stats.median(rps),
            "ratio_to_bare": stats.summary(stats.ratios(rps, base)),
            "failed": raw["failed"][variant],
        }
        cpu = raw.get("cpu_us_per_request", {}).get(variant)
        if base_cpu and cpu and None not in cpu and None not in base_cpu:
            out[variant]["cpu_us_per_request"] = stats.median(cpu)
            # Requests the same CPU serves, relative to bare: bare's CPU per
            # request over this variant's, paired within each round.
            out[variant]["capacity_to_bare"] = stats.summary(
                stats.ratios(base_cpu, cpu)
            )
    return out
