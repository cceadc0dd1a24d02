"""Fixtures shared by the scenarios on top of the harness plugin."""

from __future__ import annotations

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


@pytest.fixture
def probe_history(endpoints: Endpoints):
    """Stop the stack's probes, let them drain, and return (history from their ledgers, probe ids, status)."""
    probes = ledger.probe_urls(endpoints)
    if not probes:
        pytest.skip("this stack exposes no probe endpoints (ledger, stop, status)")
    status = ledger.stop_and_drain(probes)
    try:
        yield ledger.read_history(probes), list(probes), status
    finally:
        ledger.start(probes)
