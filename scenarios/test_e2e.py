"""End to end: events sent through ingest end up in the aggregates and diagnoses the oracle predicts.

Besides the probe-shaped workload (which already writes timestamps in every form and carries
maximum-length ids and unicode targets), three scenarios send one edge of the contract each:
every RFC 3339 form on and beside a window boundary, windows exactly on and one float step
beside each diagnosis threshold, and timestamps one step inside both time bounds. Each
returns what it found, so the seeded-bug meta-tests run the same scenario and require it to
fail.
"""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import partial

import httpx
import pytest

from harness import ledger
from harness.history import Event, Outcome
from harness.polling import wait_until
from harness.stack import ReferenceStack
from harness.workload import CLOCK_STEP_S, EventGenerator, IngestClient

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


def send_every_timestamp_form(client: IngestClient, generator: EventGenerator) -> list[str]:
    """A batch per RFC 3339 form (on, and a microsecond either side of, a window boundary);
    the batches ingest rejected."""
    rejected = []
    for batch in generator.form_batches():
        op = client.send(batch)
        if op.outcome is Outcome.FAIL:
            rejected.append(f"{batch[0].to_wire()['ts']}: {op.error or op.status}")
    client.settle(deadline_s=60)
    return rejected


def test_timestamps_in_every_rfc3339_form(client, generator: EventGenerator, verifier, history):
    rejected = send_every_timestamp_form(client, generator)
    assert not rejected, "valid timestamps rejected:\n" + "\n".join(rejected)
    verifier.verify(history, list(generator.probes))


def test_windows_on_the_diagnosis_thresholds(client, generator: EventGenerator, verifier, history):
    """Windows whose averages are exactly on each diagnosis threshold and one float step
    either side (the oracle judges the rules exactly, CONTRACT.md > and <)."""
    send_all(client, [generator.threshold_batch()])
    verdict = verifier.verify(history, list(generator.probes))
    on = [w for w in verdict.windows if " on #" in w.key.target]
    assert len(on) == 4 and all(not w.observed_diagnoses for w in on), on


def inside_the_time_bounds(client: IngestClient, generator: EventGenerator) -> float:
    """Send events one step inside now - 24 h and now + 5 min (every form) until a round trip
    is short enough to decide (under CLOCK_STEP_S); returns that round trip. A rejected
    batch fails the scenario."""
    trips = []
    for _ in range(5):
        started = time.time()
        op = client.send(generator.time_bound_batch())
        trip = op.completed_at - started
        if trip >= CLOCK_STEP_S:
            trips.append(trip)  # ingest's clock may have passed the step: cannot judge
            continue
        assert op.outcome is Outcome.OK, (
            f"events one step ({CLOCK_STEP_S} s) inside the time bounds rejected: "
            f"HTTP {op.status} {op.error}"
        )
        return trip
    raise AssertionError(
        f"every round trip took {CLOCK_STEP_S} s or more ({trips}): the time bounds cannot be "
        "judged one step from the bound on a machine this busy"
    )


def test_timestamps_one_step_inside_the_time_bounds(client, generator, verifier, history):
    inside_the_time_bounds(client, generator)
    client.settle(deadline_s=30)
    verifier.verify(history, list(generator.probes))


@pytest.mark.smoke
def test_probes_ledgers_match_aggregates(probe_history, verifier):
    """The compose probes' own ledgers are the history: all delivered, counted exactly once."""
    history, probe_ids, status = probe_history
    assert not ledger.undelivered(status), f"probes left events undelivered: {status}"
    assert sum(s["acked"] for s in status.values()) > 0, "the probes delivered nothing"
    verifier.verify(history, probe_ids)


RATE_WINDOW_S = 10.0  # how many seconds of generation the rate is measured over


def generated(url: str) -> int:
    """Events a probe has generated so far (its /status)."""
    return int(httpx.get(f"{url}/status", timeout=5).json()["generated"])


def generated_at_least(url: str, count: int) -> bool:
    return generated(url) >= count


def test_probes_generate_at_their_configured_rate(stack, endpoints):
    """Each of the stack's probes generates RATE events per second (CONTRACT.md): measured over
    RATE_WINDOW_S seconds of its /status, within [0.7, 1.4] x RATE (a probe starved for CPU
    catches up, so the window's edges are the only slack). A probe that generates far fewer,
    none, or too many events fails here; the ledger scenario alone cannot tell."""
    if not isinstance(stack, ReferenceStack):
        pytest.skip("a probe's configured rate is known only on a stack the harness deployed")
    probes = ledger.probe_urls(endpoints)
    if not probes:
        pytest.skip("this stack exposes no probe endpoints")
    rate = stack.settings.probe_rate
    for name, url in probes.items():
        assert not httpx.get(f"{url}/status", timeout=5).json()["stopped"], (
            f"{name} is stopped: a scenario before this one did not start it again"
        )
        first, began = generated(url), time.monotonic()
        wanted = first + round(rate * RATE_WINDOW_S)
        _, took = wait_until(
            partial(generated_at_least, url, wanted),
            timeout_s=RATE_WINDOW_S * 3,
            what=f"{name} generating {wanted - first} more events at {rate}/s",
        )
        measured = (generated(url) - first) / (time.monotonic() - began)
        assert 0.7 * rate <= measured <= 1.4 * rate, (
            f"{name} generated {measured:.1f} events/s over {took:.1f} s, configured {rate}/s"
        )
