"""End to end: events sent through ingest end up in the aggregates and diagnoses the oracle predicts."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from harness import ledger
from harness.history import Event, Outcome
from harness.workload import EventGenerator, IngestClient

pytestmark = pytest.mark.e2e


def send_all(client: IngestClient, batches: list[list[Event]]) -> None:
    """Send every batch; a 503 or timeout is an unknown outcome that a probe would resend, so
    resend those until acknowledged (the checker still treats them as maybe-counted-once)."""
    for batch in batches:
        op = client.send(batch)
        assert op.outcome is not Outcome.FAIL, f"batch rejected: status {op.status} {op.error}"
    client.settle(deadline_s=60)


@pytest.mark.smoke
def test_many_probes_targets_and_windows(client, generator: EventGenerator, verifier, history):
    send_all(client, [generator.batch(200, profile="mixed") for _ in range(10)])
    verdict = verifier.verify(history, list(generator.probes))
    assert verdict.counts["windows"] >= 9, "the workload should span many windows"


def test_boundary_and_late_events(client, generator: EventGenerator, verifier, history):
    """Events exactly on window boundaries, a microsecond either side, and late ones (hours old)."""
    w = generator.window_seconds
    now = datetime.now(UTC)
    boundary = datetime.fromtimestamp(int(now.timestamp()) // w * w, UTC)
    stamps = [
        boundary,
        boundary - timedelta(microseconds=1),
        boundary + timedelta(microseconds=1),
        boundary - timedelta(seconds=w),
        boundary - timedelta(hours=23),
        boundary - timedelta(hours=23, microseconds=1),
        boundary - timedelta(hours=5, seconds=w / 2),
    ]
    template = generator.batch(len(stamps), profile="mixed")
    batch = [replace(e, ts=ts) for e, ts in zip(template, stamps, strict=True)]
    send_all(client, [batch, generator.batch(100)])
    verifier.verify(history, list(generator.probes))


@pytest.mark.smoke
def test_probes_ledgers_match_aggregates(probe_history, verifier):
    """The compose probes' own ledgers are the history: all delivered, counted exactly once."""
    history, probe_ids, status = probe_history
    assert not ledger.undelivered(status), f"probes left events undelivered: {status}"
    assert sum(s["acked"] for s in status.values()) > 0, "the probes delivered nothing"
    verifier.verify(history, probe_ids)
