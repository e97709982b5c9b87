"""What a pool says of its connections now, as the semantic conventions count
them: read at collection time, so checkouts pay nothing for it.
"""

from __future__ import annotations

import dataclasses

import sqlalchemy as sa
from sqlalchemy.pool import NullPool
from sqlalchemy.pool import QueuePool

from .. import _private
from ..core.guard import PoolGuard


@dataclasses.dataclass(frozen=True)
class PoolState:
    """A pool's connection counts; ``None`` where the pool cannot tell."""

    used: int
    idle: int | None
    #: ``pool_size + max_overflow``; ``None`` without a limit.
    max: int | None
    idle_max: int | None
    idle_min: int | None


def pool_state(guard: PoolGuard, pool: sa.pool.Pool) -> PoolState:
    """``pool``'s counts now: a ``QueuePool``'s own, else the guard's holders."""
    if isinstance(pool, QueuePool):
        overflow = _private.max_overflow(pool)
        size = pool.size()
        return PoolState(
            used=pool.checkedout(),
            idle=pool.checkedin(),
            max=size + overflow if overflow >= 0 else None,  # -1: no limit
            # At checkin, a connection past pool_size is closed, not kept.
            idle_max=size,
            # SQLAlchemy never opens connections ahead of demand.
            idle_min=0,
        )
    used = len(guard.holders.checked_out)
    if isinstance(pool, NullPool):
        return PoolState(used, idle=0, max=None, idle_max=0, idle_min=0)
    # Other pools (StaticPool, SingletonThreadPool, ...) keep no counts.
    return PoolState(used, idle=None, max=None, idle_max=None, idle_min=None)
