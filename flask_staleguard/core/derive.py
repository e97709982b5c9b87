"""Pure functions that turn idle timeouts into an idle budget and engine options."""

from __future__ import annotations

import math
import typing as t

#: The automatic margin: this share of the idle timeout...
MARGIN_SHARE = 0.1
#: ...but never more than this many seconds.
MARGIN_CAP = 30.0


def effective_timeout(
    server_timeout: float | None, idle_timeout: float | None
) -> float | None:
    """The shortest idle timer on the path, or ``None`` when nothing closes idle
    connections. ``0`` counts as no timer, as PostgreSQL's ``idle_session_timeout``
    does.
    """
    timers = [s for s in (server_timeout, idle_timeout) if s]
    return min(timers) if timers else None


def idle_budget(timeout: float | None, margin: float | None) -> float | None:
    """How long a pooled connection may idle before it is replaced.

    The budget is the timeout minus the margin (automatic when ``None``); it never
    drops below half the timeout, so a large margin cannot make every checkout
    reconnect.
    """
    if timeout is None:
        return None
    if margin is None:
        margin = min(MARGIN_CAP, timeout * MARGIN_SHARE)
    return max(timeout - margin, timeout / 2)


def derive_engine_options(
    strategy: str, budget: float | None, max_lifetime: float | None = None
) -> dict[str, t.Any]:
    """The ``create_engine`` options a strategy asks for, given the idle budget
    and the longest a connection may live.

    ``guard`` turns age-based ``pool_recycle`` off: the idle budget and its own
    lifetime check replace it, and busy connections are not reconnected for being
    old. ``recycle`` and ``pre_ping`` recycle at the budget, and never later than
    ``max_lifetime``: a guard keeps no connection longer than Flask-SQLAlchemy's
    own recycle would.
    """
    if strategy == "off":
        return {}
    if strategy == "guard":
        return {"pool_recycle": -1}
    limits = [s for s in (budget, max_lifetime) if s is not None]
    # engine_from_config coerces pool_recycle with int(); 0 would recycle on every
    # checkout, so round down but keep at least one second.
    recycle = max(1, math.floor(min(limits))) if limits else -1
    options: dict[str, t.Any] = {"pool_recycle": recycle}
    if strategy == "pre_ping":
        options["pool_pre_ping"] = True
    return options


def merge_options(
    user: t.Mapping[str, t.Any], derived: t.Mapping[str, t.Any]
) -> tuple[dict[str, t.Any], dict[str, t.Any]]:
    """Merge derived options under the user's: a value the user set always wins.

    Returns the merged options and the derived values that were applied.
    """
    merged = dict(user)
    applied = {k: v for k, v in derived.items() if k not in merged}
    merged.update(applied)
    return merged, applied
