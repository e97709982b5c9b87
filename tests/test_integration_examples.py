"""The integration examples (example_app/integrations/, which the docs include
as they are) against a real private MariaDB: a KILL of the idle pooled
connections, idling past ``wait_timeout``, and a server restart. With the guard
every request and task is served, and the stale connections are counted by
reason in the example's own statistics; with it left out
(``STALEGUARD_STRATEGY=off``), a request or task fails.

Each fault strikes once for all the examples. Flask-SQLAlchemy-Lite's example,
which needs Flask 3, is in test_integration_examples_lite.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.examples import CeleryExample
from tests.examples import Example
from tests.examples import expected
from tests.examples import FastAPIExample
from tests.examples import FAULTS
from tests.examples import FlaskExample
from tests.examples import GUARDED
from tests.examples import is_gone
from tests.examples import Scenarios
from tests.servers import MariaDBServer

INTEGRATIONS = ("flask_sqlalchemy_app", "hand_made_app", "fastapi_app", "celery_app")


def start(integration: str, strategy: str, url: str) -> Example:
    if integration == "fastapi_app":
        return FastAPIExample(strategy, url)
    if integration == "celery_app":
        return CeleryExample(strategy, url)
    return FlaskExample(integration, strategy, url)


@pytest.fixture(scope="module")
def scenarios(private_mariadb: MariaDBServer) -> Iterator[Scenarios]:
    if not private_mariadb.running:
        private_mariadb.start()
    examples: list[Example] = []
    try:
        for integration in INTEGRATIONS:
            for strategy in GUARDED:
                examples.append(start(integration, strategy, private_mariadb.url))
        yield Scenarios(examples, private_mariadb)
    finally:
        for example in reversed(examples):  # last started, first closed
            example.close()


@pytest.mark.parametrize("integration", INTEGRATIONS)
@pytest.mark.parametrize("fault", FAULTS)
def test_with_the_guard_every_request_is_served(
    scenarios: Scenarios, fault: str, integration: str
) -> None:
    outcome = scenarios.outcome(fault, integration, "guard")
    assert outcome.errors == []
    assert expected(fault, outcome.replaced), outcome.replaced


@pytest.mark.parametrize("integration", INTEGRATIONS)
@pytest.mark.parametrize("fault", FAULTS)
def test_without_the_guard_a_request_fails(
    scenarios: Scenarios, fault: str, integration: str
) -> None:
    outcome = scenarios.outcome(fault, integration, "off")
    assert outcome.errors, "the stale connection was served without the guard"
    assert all(is_gone(error) for error in outcome.errors), outcome.errors
    assert outcome.replaced == {}
