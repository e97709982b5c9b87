"""Per-bind counters: cheap enough to stay on in production."""

from __future__ import annotations

import dataclasses
import threading
import typing as t


@dataclasses.dataclass
class BindStats:
    """What the guard saw on one bind since the app started (in this process)."""

    #: Connections handed out by the pool.
    checkouts: int = 0
    #: Connections replaced at checkout, by reason: ``idle_budget``,
    #: ``max_lifetime`` (older than its own lifetime: ``STALEGUARD_MAX_LIFETIME``
    #: less its jitter), ``probe_eof`` (FIN), ``probe_reset`` (RST),
    #: ``probe_server_error`` (an error packet, as MySQL 8's 4031 or PostgreSQL's
    #: FATAL), ``probe_unread`` (a reply nobody read),
    #: ``probe_timed_out`` (the kernel's keepalive gave up: a dead path),
    #: ``probe_closed`` (an asyncio driver's event loop saw the end first),
    #: ``probe_ping_failed``, ``probe_ping_timeout``, ``fork``.
    replaced: dict[str, int] = dataclasses.field(default_factory=dict)
    #: Disconnect errors raised by statements, by code (``2006``, ``2013``, ...).
    disconnects: dict[str, int] = dataclasses.field(default_factory=dict)
    #: Connections still checked out when their app context ended.
    leaks_detected: int = 0
    #: Of those, connections returned to the pool by the guard.
    leaks_reclaimed: int = 0
    #: Connections reported as leaked or held too long that their holder
    #: returned to the pool later ("unleaked").
    leaks_returned: int = 0
    #: Outages: a new connection failed for a transient reason (the server
    #: restarting, full, silent) and was tried again (``STALEGUARD_CONNECT_WAIT``).
    outages: int = 0
    #: Connects tried again during outages, after the one that began each.
    connect_retries: int = 0
    _lock: threading.Lock = dataclasses.field(
        default_factory=threading.Lock, repr=False, compare=False
    )

    def count(self, table: dict[str, int], key: str) -> None:
        """Add one to ``table[key]``; the rare paths take a lock, checkouts do not."""
        with self._lock:
            table[key] = table.get(key, 0) + 1

    def add(
        self,
        counter: t.Literal[
            "leaks_detected",
            "leaks_reclaimed",
            "leaks_returned",
            "outages",
            "connect_retries",
        ],
    ) -> None:
        """Add one to a counter of the rare paths, under the lock."""
        with self._lock:
            setattr(self, counter, getattr(self, counter) + 1)

    def snapshot(self) -> dict[str, t.Any]:
        """A JSON-ready copy."""
        with self._lock:
            return {
                "checkouts": self.checkouts,
                "replaced": dict(self.replaced),
                "disconnects": dict(self.disconnects),
                "leaks_detected": self.leaks_detected,
                "leaks_reclaimed": self.leaks_reclaimed,
                "leaks_returned": self.leaks_returned,
                "outages": self.outages,
                "connect_retries": self.connect_retries,
            }
