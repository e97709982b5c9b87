"""``flask staleguard probe-idle``: measure the idle timer of the network path.

A load balancer, proxy or NAT gateway may drop idle connections long before the
server would, and ``@@wait_timeout`` cannot show its timer. The probe opens
connections, tells the server not to time them out itself, leaves them idle for
growing intervals (``start``, twice that, ... up to ``maximum``) and finds the
first interval after which the path had closed them. It then narrows the range
down, idling many connections at once so each round costs one interval.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import socket
import sys
import threading
import time
import typing as t

import click
import sqlalchemy as sa
from flask import current_app
from flask import Flask

from .. import _private
from ..core import probe
from ..core.connect import one_try
from ..core.deadline import call_within
from ..core.discovery import session_idle_timeout
from ..core.guard import PoolGuard
from ..core.units import seconds_text
from ..errors import NoAnswer
from .document import SCHEMA
from .snapshot import engine_for
from .snapshot import select_binds

#: Connections idled at once in each narrowing round: more cut a range finer per
#: round (a round lasts as long as its longest interval).
ROUND_CONNECTIONS = 15
#: At most this many rounds per stage: a path that answers erratically (or a
#: machine too slow to open the connections in time) cannot keep it going.
MAX_ROUNDS = 12
#: How long a live connection may take to answer ``SELECT 1`` before the path is
#: taken to have dropped it silently (no FIN, no RST: most NAT gateways).
ANSWER_TIMEOUT = 5.0

#: How the path closed an idle connection, as ``closed_by`` reports it.
FIN = "fin"
RST = "rst"
ERROR = "error"
NO_ANSWER = "no_answer"

#: Shows progress while the probe waits: called with a label and a duration, it
#: returns a context manager yielding a callback that takes the seconds elapsed.
Progress = t.Callable[[str, float], t.ContextManager[t.Callable[[float], None]]]


class Unreachable(RuntimeError):
    """The probe could not open a connection to the bind's database."""


@dataclasses.dataclass
class ProbeResult:
    """The timers measured, and the binds whose database could not be reached."""

    timers: list[IdleTimer]
    #: ``(bind, one-line reason)`` per bind whose database could not be reached.
    unreachable: list[tuple[str, str]]

    @property
    def exit_code(self) -> int:
        """2 when a database cannot be reached, else 0."""
        return 2 if self.unreachable else 0

    def as_dict(self) -> dict[str, t.Any]:
        """The JSON document ``probe-idle --json`` prints."""
        return {
            "schema": SCHEMA,
            "binds": [r.as_dict() for r in self.timers],
            "unreachable": [{"bind": b, "message": m} for b, m in self.unreachable],
        }


@dataclasses.dataclass
class IdleTimer:
    """What the probe found on one bind's path."""

    bind: str
    url: str
    #: The longest idle interval a connection survived, in seconds.
    alive_after: float
    #: The shortest idle interval after which the path had closed a connection;
    #: ``None`` when none was closed up to :attr:`maximum`.
    closed_after: float | None
    #: How it was closed: ``"fin"``, ``"rst"``, ``"error"`` or ``"no_answer"``.
    closed_by: str | None
    #: The longest interval tried.
    maximum: float
    #: The server's own idle timeout on this bind's connections.
    server_timeout: float | None
    #: The ``STALEGUARD_IDLE_TIMEOUT`` the app has now.
    configured_idle_timeout: float | None
    #: The ``STALEGUARD_IDLE_TIMEOUT`` to set; ``None`` when none is needed.
    recommended_idle_timeout: float | None
    #: Why nothing was measured (SQLite), if so.
    note: str | None = None
    #: The ``STALEGUARD_KEEPALIVE`` that beats a silent drop; ``None`` when the
    #: path closes idle connections visibly, or not at all.
    recommended_keepalive: float | None = None

    def as_dict(self) -> dict[str, t.Any]:
        """The JSON form."""
        return dataclasses.asdict(self)


def no_progress(
    label: str, seconds: float
) -> t.ContextManager[t.Callable[[float], None]]:
    """A :data:`Progress` that shows nothing."""
    return contextlib.nullcontext(lambda elapsed: None)


@contextlib.contextmanager
def click_progress(label: str, seconds: float) -> t.Iterator[t.Callable[[float], None]]:
    """A :data:`Progress` drawn with ``click.progressbar`` on stderr."""
    steps = max(1, math.ceil(seconds * 10))
    # stderr, read at call time (the CLI test runner swaps it), keeps stdout for
    # the result, JSON included.
    with click.progressbar(
        length=steps, label=label, file=sys.stderr, show_eta=False, show_percent=True
    ) as bar:
        done = 0

        def update(elapsed: float) -> None:
            nonlocal done
            step = min(steps, int(elapsed * 10)) - done
            if step > 0:
                bar.update(step)
                done += step

        yield update


def probe_idle(
    app: Flask | None = None,
    bind: str | None = None,
    *,
    start: float = 1.0,
    maximum: float = 900.0,
    resolution: float | None = None,
    progress: Progress = no_progress,
    answer_timeout: float = ANSWER_TIMEOUT,
) -> ProbeResult:
    """Measure each bind's path idle timer, up to ``maximum`` seconds.

    ``resolution`` is how close the bounds must come (default: 5 % of the timer,
    at least 0.25 s). A database that cannot be reached, or does not answer
    within ``STALEGUARD_DISCOVERY_TIMEOUT``, is listed as unreachable.
    """
    app = app or current_app._get_current_object()  # type: ignore[attr-defined]
    results = []
    unreachable = []
    for guard in select_binds(app, bind):
        if guard.kind == "sqlite":
            results.append(
                IdleTimer(
                    bind=guard.name,
                    url=guard.url,
                    alive_after=0.0,
                    closed_after=None,
                    closed_by=None,
                    maximum=maximum,
                    server_timeout=None,
                    configured_idle_timeout=guard.idle.idle_timeout,
                    recommended_idle_timeout=None,
                    note="SQLite has no network path to measure",
                )
            )
            continue
        connect = _connector(guard, engine_for(app, guard.key))
        try:
            server_timeout = connect(
                functools.partial(_session_timeout, guard.kind), close=True
            )
            alive, closed, how = measure(
                functools.partial(
                    connect, functools.partial(_prepare, guard.kind, maximum)
                ),
                start=start,
                maximum=maximum,
                resolution=resolution,
                progress=progress,
                label=guard.name,
                answer_timeout=answer_timeout,
            )
        except Unreachable as e:
            unreachable.append((guard.name, str(e)))
            continue
        results.append(
            IdleTimer(
                guard.name,
                guard.url,
                alive,
                closed,
                how,
                maximum,
                server_timeout,
                guard.idle.idle_timeout,
                _recommend(alive, closed, server_timeout),
                recommended_keepalive=_keepalive_below(alive, how),
            )
        )
    return ProbeResult(results, unreachable)


T = t.TypeVar("T")


class _Connect(t.Protocol):
    def __call__(
        self, prepare: t.Callable[[t.Any], T], *, close: bool = False
    ) -> T: ...


def _connector(guard: PoolGuard, engine: sa.engine.Engine) -> _Connect:
    """Opens DBAPI connections as the app's pool does, but outside it, and runs
    ``prepare`` on each, all within the bind's time limit.

    The pool's creator brings the app's connect_args and do_connect hooks; going
    around the pool leaves the app's connections and counters alone. ``prepare``
    returns what the caller gets (with ``close``, the connection is closed after).
    """

    def open_and_prepare(prepare: t.Callable[[t.Any], T], close: bool) -> T:
        with one_try():  # within the bind's own time limit
            connection = _private.raw_dbapi_connection(engine.pool)
        try:
            result = prepare(connection)
        except BaseException:
            _close(connection)
            raise
        if close:
            _close(connection)
        return result

    def connect(prepare: t.Callable[[t.Any], T], *, close: bool = False) -> T:
        try:
            # What arrives too late is closed: a connection, or nothing to close.
            result: T = call_within(
                guard.timeout,
                lambda: open_and_prepare(prepare, close),
                what=f"probe-idle of bind {guard.name}",
                discard=_close,
            )
            return result
        except NoAnswer:
            raise Unreachable(
                f"no answer from bind {guard.name} ({guard.url}) within"
                f" {guard.timeout:g} s (STALEGUARD_DISCOVERY_TIMEOUT)"
            ) from None
        except Exception as e:
            raise Unreachable(
                f"cannot reach bind {guard.name} ({guard.url}):"
                f" {guard.secrets.one_line(e)}"
            ) from None

    return connect


def growing(start: float, maximum: float) -> list[float]:
    """``start``, doubling, then ``maximum``: the first round's intervals."""
    intervals = []
    interval = start
    while interval < maximum:
        intervals.append(interval)
        interval *= 2
    intervals.append(maximum)
    return intervals


def measure(
    connect: t.Callable[[], t.Any],
    *,
    start: float,
    maximum: float,
    resolution: float | None = None,
    progress: Progress = no_progress,
    label: str = "",
    answer_timeout: float = ANSWER_TIMEOUT,
) -> tuple[float, float | None, str | None]:
    """The longest interval survived, the shortest after which a connection was
    closed (``None`` if none up to ``maximum``) and how it was closed.

    ``connect`` returns a DBAPI connection the server itself will not time out.
    """

    def round_(
        intervals: t.Sequence[float],
    ) -> tuple[float, float | None, str | None, list[float]]:
        return _round(connect, intervals, progress, label, answer_timeout)

    alive, closed, how = 0.0, None, None
    intervals = growing(start, maximum)
    for _ in range(MAX_ROUNDS):
        longest, closed, how, untried = round_(intervals)
        alive = max(alive, longest)
        if closed is not None or not untried:
            break
        intervals = untried  # the round could not open them all in time
    for _ in range(MAX_ROUNDS):
        if closed is None:
            break
        tolerance = resolution or max(0.25, 0.05 * closed)
        if closed - alive <= tolerance:
            break
        step = (closed - alive) / (ROUND_CONNECTIONS + 1)
        intervals = [alive + step * i for i in range(1, ROUND_CONNECTIONS + 1)]
        longest, shortest, verdict, _ = round_(intervals)
        alive = max(alive, longest)
        if shortest is not None and shortest < closed:
            closed, how = shortest, verdict
    return alive, closed, how


class _Idle(t.NamedTuple):
    connection: t.Any
    #: When its last exchange ended: its idling began then.
    opened: float
    due: float


def _round(
    connect: t.Callable[[], t.Any],
    intervals: t.Sequence[float],
    progress: Progress,
    label: str,
    answer_timeout: float,
) -> tuple[float, float | None, str | None, list[float]]:
    """Idle one connection per interval, all at once; check each when it is due.

    Longer idles die no earlier than shorter ones, so the first closed connection
    ends the round. Each connection counts for the time it really idled, and no
    more are opened once the first is due: on a slow path or a loaded machine,
    opening them all could take longer than the shortest interval, and a
    connection checked late must not be taken for one that died early.
    """
    idles: list[_Idle] = []
    untried = sorted(intervals)
    try:
        took = 0.0
        while untried:
            if idles and time.monotonic() + took >= idles[0].due:
                break  # the rest wait for another round
            interval = untried.pop(0)
            began = time.monotonic()
            connection = connect()
            opened = time.monotonic()
            took = max(took, opened - began)
            idles.append(_Idle(connection, opened, opened + interval))
        begin = time.monotonic()
        shortest = idles[0].due - idles[0].opened
        longest = idles[-1].due - idles[-1].opened
        text = (
            f"{label}: idling {len(idles)} connection{'s' if len(idles) > 1 else ''}"
            f" for {seconds_text(shortest)} to {seconds_text(longest)}"
        )
        alive = 0.0
        with progress(text, idles[-1].due - begin) as update:
            for idle in idles:
                while (left := idle.due - time.monotonic()) > 0:
                    time.sleep(min(left, 0.1))
                    update(time.monotonic() - begin)
                idled = time.monotonic() - idle.opened
                verdict = _check(idle.connection, answer_timeout)
                if verdict is not None:
                    update(idles[-1].due - begin)
                    return alive, max(idled, alive), verdict, untried
                alive = max(alive, idled)
        return alive, None, None, untried
    finally:
        for idle in idles:
            _close(idle.connection)


def _session_timeout(kind: str, connection: t.Any) -> float | None:
    return session_idle_timeout(connection, kind)


def _prepare(kind: str, maximum: float, connection: t.Any) -> t.Any:
    """Make ``connection`` one the server will not time out, so only the path can."""
    cursor = connection.cursor()
    try:
        if kind == "mysql":
            seconds = math.ceil(maximum) + 3600
            cursor.execute(f"SET SESSION wait_timeout = {seconds}")
        elif kind == "postgresql":
            try:
                cursor.execute("SET idle_session_timeout = 0")
            except Exception:
                connection.rollback()  # PostgreSQL 13 and older have no such timer
    finally:
        cursor.close()
    # Commit: PostgreSQL undoes a SET in a rolled-back transaction, and an open
    # transaction would fall under idle_in_transaction_session_timeout.
    connection.commit()
    return connection


def _check(connection: t.Any, answer_timeout: float) -> str | None:
    """``None`` if ``connection`` is alive; else how the path closed it."""
    fd = probe.socket_fd(connection)
    if fd is not None:
        verdict = probe.SocketProbe(fd).check()
        if verdict is not None and verdict[0] == probe.EOF:
            return FIN
        if verdict is not None and verdict[0] == probe.RESET:
            return RST
        # Bytes waiting (an error packet, a notice): the round trip reads them.
    return _round_trip(connection, fd, answer_timeout)


def _round_trip(connection: t.Any, fd: int | None, answer_timeout: float) -> str | None:
    """Run ``SELECT 1``; a silently dropped connection never answers, so give up
    after ``answer_timeout`` and shut the socket to free the waiting thread.
    """
    outcome: list[str | None] = []

    def run() -> None:
        try:
            cursor = connection.cursor()
            cursor.execute("SELECT 1")
            cursor.fetchall()
            cursor.close()
            connection.rollback()
        except Exception:
            outcome.append(ERROR)
        else:
            outcome.append(None)

    thread = threading.Thread(target=run, name="staleguard-probe-idle", daemon=True)
    thread.start()
    thread.join(answer_timeout)
    if thread.is_alive():
        if fd is not None:
            with contextlib.suppress(OSError):
                sock = socket.socket(fileno=os.dup(fd))
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            thread.join(1.0)
        return NO_ANSWER
    return outcome[0]


def _close(connection: t.Any) -> None:
    with contextlib.suppress(Exception):
        connection.close()


def _recommend(
    alive: float, closed: float | None, server_timeout: float | None
) -> float | None:
    """The ``STALEGUARD_IDLE_TIMEOUT`` for a path timer between ``alive`` and
    ``closed``: the longest idle known to survive, when the path's timer comes
    before the server's. The guard's margin comes off it.
    """
    if closed is None or alive <= 0:
        return None
    if server_timeout is not None and alive >= server_timeout:
        return None
    # Round down: a value a person can type, never above what survived.
    return float(math.floor(alive)) if alive >= 10 else math.floor(alive * 10) / 10


def _keepalive_below(alive: float, closed_by: str | None) -> float | None:
    """A keepalive whose probes come well within a silent drop's timer: half the
    longest idle known to survive, in whole seconds.
    """
    if closed_by != NO_ANSWER:
        return None
    return float(max(1, math.floor(alive / 2)))


def format_probe(results: t.Sequence[IdleTimer]) -> str:
    """The ``probe-idle`` command's human output for the binds it measured."""
    blocks = []
    for r in results:
        rows: list[tuple[str, str]] = []
        if r.note:
            rows.append(("Note", r.note))
        elif r.closed_after is None:
            rows.append(
                (
                    "Idle timer",
                    f"none found: connections survived {seconds_text(r.maximum)}"
                    " idle (raise --max to look further)",
                )
            )
        else:
            how = {
                FIN: "closed (FIN)",
                RST: "reset (RST)",
                ERROR: "closed (failed on use)",
                NO_ANSWER: "dropped silently (no answer)",
            }[t.cast(str, r.closed_by)]
            rows.append(
                (
                    "Idle timer",
                    f"{how} after between {seconds_text(r.alive_after)} and"
                    f" {seconds_text(r.closed_after)} idle",
                )
            )
        if not r.note:
            rows.append(("Server timeout", seconds_text(r.server_timeout)))
            rows.append(
                (
                    "STALEGUARD_IDLE_TIMEOUT",
                    f"{seconds_text(r.configured_idle_timeout)} now",
                )
            )
            if r.recommended_idle_timeout is not None:
                rows.append(
                    ("Set", f"STALEGUARD_IDLE_TIMEOUT = {r.recommended_idle_timeout:g}")
                )
            elif r.closed_after is not None:
                rows.append(("Set", "nothing: the server's own timeout comes first"))
            if r.recommended_keepalive is not None:
                rows.append(
                    (
                        "Keepalive",
                        f"STALEGUARD_KEEPALIVE = {r.recommended_keepalive:g} or less:"
                        " the path drops idle flows without a word, and keepalive"
                        " probes keep them alive or find them dead",
                    )
                )
            else:
                rows.append(("Set", "nothing: no timer on the path up to --max"))
        width = max(len(k) for k, _ in rows)
        lines = [f"{r.bind}  {r.url}"]
        lines += [f"  {k.ljust(width)}  {v}" for k, v in rows]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
