"""Blinker signals, so an app can feed the guard's events to its own metrics.

Each is sent with the :class:`~flask_staleguard.core.guard.PoolGuard` as sender;
``sender.key`` is the bind key.
"""

from __future__ import annotations

from blinker import Namespace

_signals = Namespace()

#: A stale connection was replaced at checkout. Keyword arguments: ``reason``
#: (as :attr:`~flask_staleguard.metrics.stats.BindStats.replaced` lists them)
#: and ``idle`` (seconds, or ``None``).
connection_replaced = _signals.signal("staleguard.connection-replaced")
#: A statement failed because its connection was gone. Keyword arguments: ``code``
#: (``"2006"``, ``"2013"``, ``"4031"``, ``"reset"``, ...) and ``idle``.
disconnect_seen = _signals.signal("staleguard.disconnect-seen")
#: A connection was still checked out when its app context ended. Keyword
#: arguments: ``site`` (where it was checked out) and ``reclaimed`` (bool).
leak_detected = _signals.signal("staleguard.leak-detected")
#: A connection reported as leaked or held too long was returned to the pool at
#: last. Keyword argument: ``held`` (seconds it was out).
leak_returned = _signals.signal("staleguard.leak-returned")
