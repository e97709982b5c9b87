"""The Flask-SQLAlchemy-Lite example, as test_integration_examples.py runs the
others: a KILL, idling past ``wait_timeout`` and a server restart are served
with the guard and fail without it. (Needs Flask 3: the min env leaves this
module out.)
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.examples import expected
from tests.examples import FAULTS
from tests.examples import FlaskExample
from tests.examples import GUARDED
from tests.examples import is_gone
from tests.examples import Scenarios
from tests.servers import MariaDBServer

LITE = "flask_sqlalchemy_lite_app"


@pytest.fixture(scope="module")
def scenarios(private_mariadb: MariaDBServer) -> Iterator[Scenarios]:
    if not private_mariadb.running:
        private_mariadb.start()
    examples = [
        FlaskExample(LITE, strategy, private_mariadb.url) for strategy in GUARDED
    ]
    yield Scenarios(list(examples), private_mariadb)
    for example in reversed(examples):
        example.close()


@pytest.mark.parametrize("fault", FAULTS)
def test_with_the_guard_every_request_is_served(
    scenarios: Scenarios, fault: str
) -> None:
    outcome = scenarios.outcome(fault, LITE, "guard")
    assert outcome.errors == []
    assert expected(fault, outcome.replaced), outcome.replaced


@pytest.mark.parametrize("fault", FAULTS)
def test_without_the_guard_a_request_fails(scenarios: Scenarios, fault: str) -> None:
    outcome = scenarios.outcome(fault, LITE, "off")
    assert outcome.errors, "the stale connection was served without the guard"
    assert all(is_gone(error) for error in outcome.errors), outcome.errors
    assert outcome.replaced == {}
