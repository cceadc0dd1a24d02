"""Fixtures shared by the scenarios on top of the harness plugin."""

from __future__ import annotations

import pytest

from harness import ledger
from harness.stack import Endpoints


@pytest.fixture
def probe_history(endpoints: Endpoints):
    """Stop the stack's probes, let them drain, and return (history from their ledgers, probe ids, status)."""
    probes = {name: url for name, url in endpoints.services.items() if name.startswith("probe-")}
    if not probes:
        pytest.skip("this stack exposes no probe endpoints (ledger, stop, status)")
    status = ledger.stop_and_drain(probes)
    try:
        yield ledger.read_history(probes), list(probes), status
    finally:
        ledger.start(probes)
