"""How long one pool's connections may idle: the idle budget, and its learning."""

from __future__ import annotations

import math
import threading

from .derive import effective_timeout
from .derive import idle_budget
from .options import GuardOptions


class IdleBudget:
    """The shortest idle timer on the path (the server's, declared or discovered,
    and a declared middlebox timer) less a margin.

    Each new connection reports its own server timeout; the first one after an
    assumed timeout, or one that differs, is learnt here.
    """

    def __init__(
        self,
        options: GuardOptions,
        server_timeout: float | None,
        *,
        provisional: bool = False,
    ) -> None:
        #: The declared middlebox idle timer, if any.
        self.idle_timeout = options.idle_timeout
        self._margin = options.margin
        #: ``True`` while the server's timeout is discovered per connection.
        self.discovers = options.server_timeout is None
        #: ``True`` while :attr:`server_timeout` is a fallback, not the server's word.
        self.provisional = provisional
        #: The server's idle timeout in seconds, as last discovered or declared;
        #: ``None`` if the server has none.
        self.server_timeout = server_timeout
        #: The idle budget in seconds; ``math.inf`` when nothing on the path has
        #: an idle timer.
        self.seconds = self.for_timeout(server_timeout)
        self._lock = threading.Lock()

    def for_timeout(self, server_timeout: float | None) -> float:
        """The budget of a connection its server closes after ``server_timeout``."""
        timeout = effective_timeout(server_timeout, self.idle_timeout)
        budget = idle_budget(timeout, self._margin)
        return math.inf if budget is None else budget

    def is_news(self, timeout: float | None) -> bool:
        """Whether a connection's ``timeout`` changes what is known."""
        return timeout != self.server_timeout or self.provisional

    def learn(self, timeout: float | None) -> float | None:
        """Adopt the idle timeout a live connection reported; returns the old one."""
        with self._lock:
            was, self.server_timeout = self.server_timeout, timeout
            self.provisional = False
            self.seconds = self.for_timeout(timeout)
        return was

    @property
    def finite(self) -> float | None:
        """The budget for derivation: ``None`` when there is no idle limit at all."""
        return None if math.isinf(self.seconds) else self.seconds
