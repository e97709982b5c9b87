"""Who holds each checked-out connection, since when and where: leak tracking.

The integration says who the current holder is (Flask: the app context, and the
request it serves) through the ``holder`` callable; outside any, a connection is
held by "nobody", and :attr:`Holders.threshold` reports it once it has been out
too long.
"""

from __future__ import annotations

import itertools
import logging
import operator
import time
import typing as t

from sqlalchemy import event

from .._private import checked_out_proxy
from .._private import leave_error_for_holder
from ..errors import LeakError
from . import probe
from .sites import checkout_site
from .sites import format_site
from .sites import Site
from .units import seconds_text

logger = logging.getLogger("flask_staleguard")


class Checkout(t.NamedTuple):
    """A connection the app holds: who took it, where, and when."""

    #: The app context that took it, or ``None``.
    context: t.Any
    #: The app's frames that took it, when recorded.
    site: Site
    at: float
    #: The request that took it, while the bind names leaks by request.
    request: t.Any


#: Who holds a connection outside any context: no owner, no request.
NOBODY: tuple[None, None] = (None, None)


def _nobody() -> tuple[t.Any, t.Any]:
    return NOBODY


_owner_of = operator.itemgetter(0)
_is = operator.is_
_repeat = itertools.repeat


def held_by(checked_out: dict[t.Any, tuple[t.Any, ...]], owner: t.Any) -> bool:
    """Whether ``owner`` holds one of ``checked_out``'s connections.

    A teardown asks while other requests hold connections, so it runs in C: no
    frame per connection.
    """
    # Copied in one step: other threads check out and in meanwhile.
    owners = map(_owner_of, tuple(checked_out.values()))
    return any(map(_is, owners, _repeat(owner)))


class Holders:
    """The connections of one pool checked out now, and what to do with leaks."""

    def __init__(
        self,
        name: str,
        *,
        threshold: float | None = None,
        record_sites: bool = False,
        holder: t.Callable[[], tuple[t.Any, t.Any]] | None = None,
        describe: t.Callable[[t.Any], str] | None = None,
        clock: t.Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        #: Seconds a connection may be held by nobody before it is reported.
        self.threshold = threshold
        #: Connections checked out now, with who took them, where and when: the
        #: fields of a :class:`Checkout`, as a plain tuple (cheaper to build).
        #: ``hold()`` adds to it; the checkin listener removes from it.
        self.checked_out: dict[t.Any, tuple[t.Any, Site, float, t.Any]] = {}
        self._sites = record_sites
        #: Who would hold a connection checked out now: one call, as it runs
        #: for every checkout.
        self.holder = holder or _nobody
        #: Whether :meth:`hold` only notes the owner, the request and the time,
        #: as it does until the pool's first leak: a checkout then inlines it.
        self.plain = not record_sites and threshold is None
        self._describe = describe or repr
        self._clock = clock
        self._held_scan = 0.0
        #: Connections reported as leaked or held too long, until they return.
        self.reported: dict[t.Any, tuple[t.Any, ...]] = {}
        #: Called with the seconds it was out when a reported connection returns.
        self.on_unleaked: t.Callable[[float], None] | None = None

    def attach(self, engine: t.Any) -> None:
        """Forget connections the pool detaches. Checkouts and checkins come from
        :class:`~.checkout.CheckoutChecks`' listeners: one listener per pool
        event keeps SQLAlchemy's dispatch off the hot path.
        """
        event.listen(engine, "detach", self._on_detach)

    @property
    def sites(self) -> bool:
        """Whether checkouts by an owner record their site: from the pool's first
        leak on, or from the start (``record_sites``, for test suites).
        """
        return self._sites

    @sites.setter
    def sites(self, value: bool) -> None:
        self._sites = value
        self.plain = not value and self.threshold is None

    def hold(self, record: t.Any, now: float) -> None:
        """Note who checked out ``record``'s connection at ``now``.

        The checkout listener inlines the :attr:`plain` case.
        """
        owner, request = self.holder()
        if owner is not None:
            # The stack walk is most of a checkout's cost, so it waits for the
            # pool's first leak; that one is reported by its request instead.
            sites = self._sites
            self.checked_out[record] = (
                owner,
                checkout_site() if sites else (),
                now,
                None if sites else request,
            )
        else:
            self.checked_out[record] = (
                None,
                checkout_site() if self.threshold is not None else (),
                now,
                None,
            )
        if self.threshold is not None:
            self._report_held()

    def release(self, record: t.Any) -> None:
        """``record``'s connection is back (or detached): it is held no more.

        The pool's checkin listener does the same inline.
        """
        raw = self.checked_out.pop(record, None)
        if raw is not None and self.reported:  # rare: only after a report
            self.returned_late(record, raw)

    def _on_detach(self, dbapi_connection: t.Any, record: t.Any) -> None:
        self.release(record)

    def leaks_of(self, owner: t.Any) -> list[tuple[t.Any, Checkout]]:
        """Connections checked out by ``owner`` and still out."""
        return [
            (r, Checkout(*c))
            for r, c in self.checked_out.copy().items()
            if c[0] is owner
        ]

    def where(self, checkout: Checkout) -> str:
        """``at file:line in function ...``, or the request that took it."""
        if checkout.site or checkout.request is None:
            return f"at {format_site(checkout.site)}"
        return self._describe(checkout.request)

    def forget_owner(self, record: t.Any, checkout: Checkout) -> None:
        """From now on ``record``'s connection is held by nobody (reported once)."""
        if self.checked_out.get(record) == tuple(checkout):
            raw = (None, checkout.site, checkout.at, None)
            self.checked_out[record] = self.reported[record] = raw

    @staticmethod
    def proxy_of(record: t.Any) -> t.Any:
        """The proxy the holder of ``record``'s connection has, if it still lives."""
        return checked_out_proxy(record)

    def take_back(self, record: t.Any, proxy: t.Any, message: str) -> None:
        """Close a leaked connection under its holder and free its pool slot.

        It is never handed to anyone else: the holder's next use raises
        :class:`~flask_staleguard.ConnectionReclaimed` with ``message``.
        """
        try:
            dbapi_connection = proxy.dbapi_connection
            if dbapi_connection is not None:
                # Shut the socket first: a holder busy on it in another thread
                # fails at once, and the driver's goodbye can never interleave
                # with its bytes.
                fd = probe.socket_fd(dbapi_connection)
                if fd is not None:
                    probe.shut_down(fd)
                proxy.invalidate(LeakError(message))
                leave_error_for_holder(proxy, message)
        except Exception as e:
            logger.warning(
                "bind %s: could not close the leaked connection: %s", self.name, e
            )
        self.checked_out.pop(record, None)

    def _report_held(self) -> None:
        """Report connections held by nobody past the threshold."""
        now = self._clock()
        if now - self._held_scan < 1.0:
            return
        self._held_scan = now
        threshold = t.cast(float, self.threshold)
        held = self.checked_out.copy()
        # In place: the checkin listener holds this dict.
        for record, raw in self.reported.copy().items():
            if held.get(record) is not raw:
                self.reported.pop(record, None)
        for record, raw in held.items():
            checkout = Checkout(*raw)
            if (
                checkout.context is None
                and now - checkout.at > threshold
                and record not in self.reported
            ):
                self.reported[record] = raw
                logger.warning(
                    "bind %s: a connection checked out %s has been held for %.0f s"
                    " (STALEGUARD_LEAK_THRESHOLD=%s)",
                    self.name,
                    self.where(checkout),
                    now - checkout.at,
                    seconds_text(threshold),
                )

    # Reported connections that come back (HikariCP's "unleaked"): said once.

    def returned_late(self, record: t.Any, raw: tuple[t.Any, ...]) -> None:
        """Say that a connection reported as leaked or held too long came back."""
        if self.reported.pop(record, None) is not raw:
            return
        checkout = Checkout(*raw)
        held = self._clock() - checkout.at
        logger.warning(
            "bind %s: a connection reported as leaked or held too long (checked"
            " out %s) was returned to the pool after %.1f s (unleaked)",
            self.name,
            self.where(checkout),
            held,
        )
        if self.on_unleaked is not None:
            self.on_unleaked(held)
