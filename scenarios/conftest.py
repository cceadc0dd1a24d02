"""Fixtures shared by the scenarios on top of the harness plugin."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness import ledger
from harness.history import History
from harness.nemesis import Nemesis
from harness.pytest_plugin import Verifier
from harness.stack import Endpoints
from harness.workload import EventGenerator, IngestClient
from scenarios.common import Scenario


@pytest.fixture
def scenario(
    endpoints: Endpoints,
    client: IngestClient,
    generator: EventGenerator,
    nemesis: Nemesis,
    verifier: Verifier,
    history: History,
    scenario_details: dict,
) -> Scenario:
    """The scenario's working set in one object (scenarios.common.Scenario)."""
    return Scenario(endpoints, client, generator, nemesis, verifier, history, scenario_details)


def stack_probes(endpoints: Endpoints) -> dict[str, str]:
    return {name: url for name, url in endpoints.services.items() if name.startswith("probe-")}


@pytest.fixture
def probes_stopped(endpoints: Endpoints) -> Iterator[None]:
    """The stack's own probes stopped (drained) for the test: a scenario that loses
    acknowledged events on purpose must not lose theirs, which later ledger scenarios count."""
    probes = stack_probes(endpoints)
    ledger.stop_and_drain(probes)
    try:
        yield
    finally:
        ledger.start(probes)


@pytest.fixture
def probe_history(endpoints: Endpoints):
    """Stop the stack's probes, let them drain, and return (history from their ledgers, probe ids, status)."""
    probes = stack_probes(endpoints)
    if not probes:
        pytest.skip("this stack exposes no probe endpoints (ledger, stop, status)")
    status = ledger.stop_and_drain(probes)
    try:
        yield ledger.read_history(probes), list(probes), status
    finally:
        ledger.start(probes)
