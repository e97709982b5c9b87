"""Connections still checked out when the app context that took them ends.

A streamed response runs after its app context's teardown (unless
``stream_with_context`` keeps the context), so the connections checked out in
that context are judged when the server closes the response instead.
"""

from __future__ import annotations

import functools
import logging
import typing as t

from flask import Response

from ..core.guard import PoolGuard
from ..core.holders import Checkout
from ..errors import LeakError
from ..metrics.signals import leak_detected
from .contexts import current_context
from .state import GuardState

logger = logging.getLogger("flask_staleguard")

#: The attribute of ``g`` that marks a context whose response is still streaming.
STREAMING = "_staleguard_streaming"


def defer_for_streams(state: GuardState, response: Response) -> Response:
    """``after_request``: a streamed body runs after the teardown, so its
    connections are judged when the response is closed.
    """
    # Werkzeug closes a direct-passthrough response's file, not the response.
    if response.is_streamed and not response.direct_passthrough:
        ctx = current_context()
        if ctx is not None and not getattr(ctx.g, STREAMING, False):
            setattr(ctx.g, STREAMING, True)
            response.call_on_close(functools.partial(_stream_closed, state, ctx))
    return response


def _stream_closed(state: GuardState, ctx: t.Any) -> None:
    setattr(ctx.g, STREAMING, False)
    reclaim_leaks(state, ctx)


def streaming(ctx: t.Any) -> bool:
    """Whether ``ctx``'s response is still streaming: its leaks wait for it."""
    return bool(getattr(ctx.g, STREAMING, False))


def reclaim_leaks(state: GuardState, ctx: t.Any) -> None:
    """Report, and by policy take back, the connections ``ctx`` still has out."""
    leaks = 0
    try:
        for bind in state.binds.values():
            if bind.holders.checked_out:
                for record, checkout in bind.holders.leaks_of(ctx):
                    reclaim(bind, record, checkout)
                    leaks += 1
    except Exception:
        logger.exception("flask-staleguard: reclaiming leaked connections failed")
    if leaks and state.settings.leaks == "raise":
        raise LeakError(
            f"{leaks} connection(s) were still checked out when the app context"
            " ended (see the warnings above for where they were taken);"
            " STALEGUARD_LEAKS='raise'"
        )


def reclaim(bind: PoolGuard, record: t.Any, checkout: Checkout) -> None:
    """Report a leaked connection and, by policy, take it back from its holder.

    Taking it back closes it and frees its pool slot: the holder may still use
    it, so it is never handed to anyone else. The holder's next use raises
    :class:`~flask_staleguard.ConnectionReclaimed`.
    """
    bind.stats.add("leaks_detected")
    policy = bind.options.leaks
    holders = bind.holders
    proxy = holders.proxy_of(record)
    take_back = policy != "warn" and proxy is not None
    where = holders.where(checkout)
    logger.warning(
        "bind %s: a connection checked out %s was not returned when its app"
        " context ended; %s%s",
        bind.name,
        where,
        "closed and its pool slot freed: its holder's next use raises"
        " ConnectionReclaimed"
        if take_back
        else "left checked out (STALEGUARD_LEAKS='warn')",
        "" if holders.sites else "; file and line are recorded for the next leaks",
    )
    holders.sites = True
    if take_back:
        holders.take_back(
            record,
            proxy,
            f"flask-staleguard closed this connection (checked out {where}) when"
            " the app context that checked it out ended, because it was still"
            f" checked out (STALEGUARD_LEAKS={policy!r}); return connections"
            " before the context ends",
        )
        bind.stats.add("leaks_reclaimed")
    else:
        # Reported once; from now on it is held outside any app context.
        holders.forget_owner(record, checkout)
    leak_detected.send(bind, site=checkout.site, reclaimed=take_back)
