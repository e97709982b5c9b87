"""The integration examples of example_app/integrations/, run as their pages show
them and put through a fault; what test_integration_examples*.py share.

Each example is loaded fresh from its file, so its module state is its own, with
``DATABASE_URL`` and ``STALEGUARD_STRATEGY`` in the environment, as a user would
run it. ``STALEGUARD_STRATEGY=off`` is the example with the guard left out: the
same code, no check at checkout. Counters are read through each example's own
public statistics (its ``/stats`` route, its ``pool_stats`` task).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import itertools
import os
import sys
import time
import types
import typing as t
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa
from celery.contrib.testing.worker import start_worker
from celery.signals import setup_logging
from fastapi.testclient import TestClient

from tests.servers import MariaDBServer

EXAMPLES = Path(__file__).resolve().parent.parent / "example_app" / "integrations"
#: Connections each pool holds when the fault strikes, and requests after it.
WARM = 3
REQUESTS = 6
#: ``STALEGUARD_STRATEGY`` with the guard, and with its checks left out.
GUARDED = ("guard", "off")
#: A request or a task's result waits no longer than this.
TASK_TIMEOUT = 10.0

_loaded = itertools.count()


@contextlib.contextmanager
def environment(**env: str) -> Iterator[None]:
    """``env`` in ``os.environ`` for the block, as the example's user sets it."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value


def load(name: str) -> types.ModuleType:
    """A fresh copy of the example ``name``: its file, run now, and in
    sys.modules under a name of its own (Flask, FastAPI and Celery look it up
    there) until the example is closed.
    """
    module_name = f"example_{name}_{next(_loaded)}"
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


class Example:
    """One example, running: its engine, one request (or task) through its own
    entry point, and its counters of connections replaced by reason.
    """

    engine: sa.engine.Engine
    module: types.ModuleType

    def __init__(self, integration: str, strategy: str) -> None:
        self.integration = integration
        self.strategy = strategy

    def request(self) -> None:
        """One request or task; raises what it raised."""
        raise NotImplementedError

    def replaced(self) -> dict[str, int]:
        raise NotImplementedError

    def close(self) -> None:
        self.engine.dispose()
        del sys.modules[self.module.__name__]


class FlaskExample(Example):
    """An example with an app factory, served by Flask's test client."""

    def __init__(self, integration: str, strategy: str, url: str) -> None:
        super().__init__(integration, strategy)
        with environment(DATABASE_URL=url, STALEGUARD_STRATEGY=strategy):
            self.module = module = load(integration)
            app = module.create_app()
        # The request's error itself, rather than a 500 page.
        app.config["PROPAGATE_EXCEPTIONS"] = True
        self.client = app.test_client()
        with app.app_context():
            self.engine = getattr(module, "engine", None) or module.db.engine

    def request(self) -> None:
        assert self.client.get("/").status_code == 200

    def replaced(self) -> dict[str, int]:
        (bind,) = t.cast(dict[str, t.Any], self.client.get("/stats").json).values()
        return dict(bind["replaced"])


class FastAPIExample(Example):
    """The FastAPI example, served by its test client, lifespan included."""

    def __init__(self, strategy: str, url: str) -> None:
        super().__init__("fastapi_app", strategy)
        self._stack = contextlib.ExitStack()
        with environment(DATABASE_URL=url, STALEGUARD_STRATEGY=strategy):
            self.module = module = load(self.integration)
            self.client = self._stack.enter_context(TestClient(module.app))
        self.engine = module.app.state.engine

    def request(self) -> None:
        assert self.client.get("/").status_code == 200

    def replaced(self) -> dict[str, int]:
        return dict(self.client.get("/stats").json()["replaced"])

    def close(self) -> None:
        self._stack.close()  # the lifespan disposes of the engine
        del sys.modules[self.module.__name__]


def _leave_logging_alone(**kwargs: t.Any) -> None:
    """A receiver of Celery's ``setup_logging``: with one, a worker leaves the
    test run's logging as it is (it would set the root logger to ERROR).
    """


class CeleryExample(Example):
    """The Celery example, its tasks run by a real worker (in a thread, solo
    pool) from an in-memory broker.
    """

    def __init__(self, strategy: str, url: str) -> None:
        super().__init__("celery_app", strategy)
        self._stack = contextlib.ExitStack()
        setup_logging.connect(_leave_logging_alone)
        self._stack.callback(setup_logging.disconnect, _leave_logging_alone)
        # What a worker tells the processes it would fork; none is forked here.
        self._stack.enter_context(
            environment(
                _MP_FORK_LOGLEVEL_="", _MP_FORK_LOGFILE_="", _MP_FORK_LOGFORMAT_=""
            )
        )
        with environment(
            DATABASE_URL=url,
            STALEGUARD_STRATEGY=strategy,
            CELERY_BROKER_URL="memory://",
            CELERY_RESULT_BACKEND="cache+memory://",
        ):
            self.module = module = load(self.integration)
        # The in-memory broker is one per process: a queue per worker. It is
        # polled, as are the results: often, for a fast test.
        module.app.conf.task_default_queue = module.__name__
        module.app.conf.broker_transport_options = {"polling_interval": 0.01}
        self._stack.enter_context(
            start_worker(module.app, perform_ping_check=False, shutdown_timeout=5)
        )
        self.engine = module.engine

    def request(self) -> None:
        self.module.server_time.delay().get(timeout=TASK_TIMEOUT, interval=0.01)

    def replaced(self) -> dict[str, int]:
        stats = self.module.pool_stats.delay().get(timeout=TASK_TIMEOUT, interval=0.01)
        return dict(stats["replaced"])

    def close(self) -> None:
        self._stack.close()
        super().close()


@dataclasses.dataclass
class Outcome:
    """What the requests after a fault met."""

    errors: list[str]
    #: Connections replaced at checkout, by reason, between the fault and the end.
    replaced: dict[str, int]


@dataclasses.dataclass
class Fault:
    """Something that makes pooled connections stale."""

    #: Before the pools are filled, so their connections take it up.
    prepare: Callable[[MariaDBServer], None]
    strike: Callable[[MariaDBServer], None]
    #: The server as it was.
    restore: Callable[[MariaDBServer], None]


def _nothing(server: MariaDBServer) -> None:
    pass


def _kill(server: MariaDBServer) -> None:
    assert server.kill_connections()
    time.sleep(0.2)  # the FINs reach the sockets


def _short_wait_timeout(server: MariaDBServer) -> None:
    server.set_global("wait_timeout", 2)


def _idle(server: MariaDBServer) -> None:
    time.sleep(2.5)  # past wait_timeout: the server closed them


def _default_wait_timeout(server: MariaDBServer) -> None:
    server.set_global("wait_timeout", 28800)


FAULTS = {
    "kill": Fault(_nothing, _kill, _nothing),
    "idle": Fault(_short_wait_timeout, _idle, _default_wait_timeout),
    "restart": Fault(_nothing, MariaDBServer.restart, _nothing),
}


def fill(engine: sa.engine.Engine) -> None:
    """Open ``WARM`` connections at once and return them: the pool's idle ones."""
    with contextlib.ExitStack() as stack:
        for _ in range(WARM):
            stack.enter_context(engine.connect()).execute(sa.text("SELECT 1"))


def put_through(
    fault: str, examples: list[Example], server: MariaDBServer
) -> dict[tuple[str, str], Outcome]:
    """Fill every example's pool, strike once for all, then make ``REQUESTS``
    requests to each; by (integration, strategy), what they met.
    """
    how = FAULTS[fault]
    how.prepare(server)
    try:
        before = {}
        for example in examples:
            example.engine.dispose()  # new connections, which take up `prepare`
            fill(example.engine)
            before[example] = example.replaced()
        how.strike(server)
        outcomes = {}
        for example in examples:
            errors = []
            for _ in range(REQUESTS):
                try:
                    example.request()
                except Exception as e:  # counted, and shown by the tests
                    errors.append(f"{type(e).__name__}: {e}")
            after = example.replaced()
            replaced = {
                reason: n - before[example].get(reason, 0)
                for reason, n in after.items()
                if n != before[example].get(reason, 0)
            }
            outcomes[example.integration, example.strategy] = Outcome(errors, replaced)
        return outcomes
    finally:
        if not server.running:
            server.start()
        how.restore(server)


class Scenarios:
    """Each fault put through every example once, on first demand."""

    def __init__(self, examples: list[Example], server: MariaDBServer) -> None:
        self.examples = examples
        self.server = server
        self._done: dict[str, dict[tuple[str, str], Outcome]] = {}

    def outcome(self, fault: str, integration: str, strategy: str) -> Outcome:
        if fault not in self._done:
            self._done[fault] = put_through(fault, self.examples, self.server)
        return self._done[fault][integration, strategy]


def is_gone(error: str) -> bool:
    """Whether a request's error is the stale connection the guard prevents."""
    return "OperationalError" in error and (
        "Lost connection" in error or "gone away" in error
    )


def expected(fault: str, replaced: dict[str, int]) -> bool:
    """Whether the guard replaced each stale connection for the fault's reason:
    a KILL and a restart show on the socket (the probe, no ping), an idle one
    by its budget.
    """
    if fault == "idle":
        # At least the WARM stale ones: on a loaded machine a connection opened
        # for a request may idle past the 1.8 s budget again before the next.
        return set(replaced) == {"idle_budget"} and replaced["idle_budget"] >= WARM
    if fault == "kill":
        return replaced == {"probe_eof": WARM}
    return sum(replaced.values()) == WARM and set(replaced) <= {
        "probe_eof",
        "probe_reset",
    }
