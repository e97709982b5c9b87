"""Time limits for the guard's own exchanges with a database.

A server that accepts a connection and then never answers (a frozen process, a
hung host, a half-dead proxy) would block a driver for as long as TCP lets it,
and most drivers bound only the connect itself, if that. Whatever the guard asks
a database runs under one of these two limits.
"""

from __future__ import annotations

import contextlib
import os
import threading
import typing as t

from ..errors import NoAnswer
from .probe import shut_down
from .probe import socket_fd

T = t.TypeVar("T")


def call_within(
    seconds: float,
    fn: t.Callable[[], T],
    *,
    what: str,
    discard: t.Callable[[T], object] | None = None,
) -> T:
    """``fn()``'s result, or :class:`NoAnswer` once ``seconds`` have passed.

    ``what`` names the thread, for whoever lists a process's threads.

    ``fn`` runs in a daemon thread that is left behind if it overruns (the drivers'
    own timeouts, where they have them, end it later); ``discard`` then receives
    what it returns late, to close it.
    """
    lock = threading.Lock()
    outcome: list[tuple[bool, t.Any]] = []
    abandoned = False

    def run() -> None:
        try:
            value: t.Any = (True, fn())
        except BaseException as e:  # handed to the caller below
            value = (False, e)
        with lock:
            if not abandoned:
                outcome.append(value)
                return
        if value[0] and discard is not None:
            try:
                discard(value[1])
            except Exception:  # the caller has long moved on
                pass

    thread = threading.Thread(target=run, name=f"staleguard: {what}", daemon=True)
    thread.start()
    thread.join(seconds)
    with lock:
        if not outcome:
            abandoned = True
            raise NoAnswer(f"no answer within {seconds:g} s")
    ok, value = outcome[0]
    if ok:
        return t.cast(T, value)
    raise value


@contextlib.contextmanager
def shut_down_after(
    dbapi_connection: t.Any, seconds: float
) -> t.Iterator[t.Callable[[], bool]]:
    """Bound a round trip on ``dbapi_connection``: if the block takes longer than
    ``seconds``, its socket is shut down, which ends any wait on it.

    Yields a function that says whether the deadline struck. A duplicate of the
    descriptor is held meanwhile: should the driver close its own, the number can
    be reused by another socket, and the shutdown must still hit this one.
    """
    fd = socket_fd(dbapi_connection)
    if fd is None:
        yield lambda: False
        return
    duplicate = os.dup(fd)
    lock = threading.Lock()
    state = {"done": False, "struck": False}

    def strike() -> None:
        with lock:
            if not state["done"]:
                state["struck"] = True
                shut_down(duplicate)

    timer = threading.Timer(seconds, strike)
    timer.daemon = True
    timer.start()
    try:
        yield lambda: state["struck"]
    finally:
        with lock:
            state["done"] = True
        timer.cancel()
        os.close(duplicate)
