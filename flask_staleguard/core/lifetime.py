"""How long a pooled connection may live: the backstop against what no check sees.

After a fail-over that leaves the old node answering (a DNS change, a rebalanced
proxy, a demoted writer that reports nothing), neither the idle budget nor the
socket probe finds anything wrong with a busy pool's connections: only their age
moves the pool off the old node. Each connection draws its own lifetime once, at
connect, between 75 % and 100 % of the maximum, as HikariCP does: downwards only,
so the setting is a true maximum, and spread, so a pool opened at once does not
reconnect at once.
"""

from __future__ import annotations

import random
import time
import typing as t

from .._private import connect_started

#: The share of the maximum a connection's lifetime may fall short of it.
JITTER = 0.25


def lifetime(maximum: float, draw: t.Callable[[], float] = random.random) -> float:
    """One connection's lifetime in seconds: in (75 %, 100 %] of ``maximum``.

    ``draw`` returns a number in [0, 1); the module's generator is reseeded in a
    forked child, so workers forked together do not draw alike.
    """
    return maximum * (1.0 - JITTER * draw())


def born(record: t.Any, now: float) -> float:
    """When ``record``'s connection was opened, on the clock that gave ``now``.

    For a connection that predates the guard: SQLAlchemy noted its start on the
    wall clock; its age so far is moved onto the guard's monotonic clock (never
    negative, should the wall clock step back), so its lifetime stays a maximum.
    """
    started = connect_started(record)
    if started is None:
        return now
    return now - max(0.0, time.time() - started)
