"""``python -m bench.proxy_server``: ``tests/proxies.py:TcpProxy`` in its own process.

The proxy forwards with two Python threads per connection. Inside the measuring
process those threads would compete for its GIL and distort every figure, so the
latency scenario starts the proxy here instead. The selector is switched to
``select()``, whose timeout has microsecond resolution; epoll rounds a 0.5 ms
wait up to 1 ms. Prints ``PORT <n>`` once listening; stops at SIGTERM, when
stdin closes, or after ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import selectors
import signal
import sys
import threading
import types
import typing as t

from . import REPO

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests import proxies  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Start the proxy, print its port, wait for the stop condition."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target-host", default="127.0.0.1")
    parser.add_argument("--target-port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.0, help="one-way, seconds")
    parser.add_argument("--max-seconds", type=float, default=900.0)
    args = parser.parse_args(argv)
    # This process only: microsecond select() timeouts instead of epoll's 1 ms.
    target: t.Any = proxies
    target.selectors = types.SimpleNamespace(
        DefaultSelector=selectors.SelectSelector, EVENT_READ=selectors.EVENT_READ
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def watch_stdin() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    proxy = proxies.TcpProxy(args.target_host, args.target_port, delay=args.delay)
    proxy.start()
    print(f"PORT {proxy.port}", flush=True)
    try:
        stop.wait(args.max_seconds)
    finally:
        proxy.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
