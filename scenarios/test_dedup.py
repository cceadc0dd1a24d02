"""Deduplication: whatever path a duplicate takes, every event is counted once."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest

from harness.history import Event, Outcome
from harness.nats_admin import JetStreamAdmin
from harness.polling import wait_until
from harness.workload import MAX_MILLIS, EventGenerator, IngestClient
from scenarios.common import background_sender, wait_for_progress

pytestmark = pytest.mark.dedup


def ok(op) -> None:
    assert op.outcome is Outcome.OK, f"batch not acknowledged: status {op.status} {op.error}"


@pytest.mark.smoke
def test_same_batch_resent(client: IngestClient, generator: EventGenerator, verifier, history):
    batch = generator.batch(300)
    for _ in range(3):
        ok(client.send(batch))
    verifier.verify(history, list(generator.probes))


def test_ids_repeated_inside_a_batch(client: IngestClient, generator, verifier, history):
    batch = generator.batch(100)
    op = client.send(batch + batch[:40] + batch[10:20])
    ok(op)
    verifier.verify(history, list(generator.probes))


def test_same_ids_concurrently_to_both_ingest_replicas(
    client, endpoints, generator, verifier, history
):
    batches = [generator.batch(200) for _ in range(5)]
    sends = [(batch, url) for batch in batches for url in endpoints.ingest_urls for _ in range(2)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda pair: client.send(pair[0], url=pair[1]), sends))
    # Under this burst ingest may answer 503 (unknown outcome); a real probe resends, so do we.
    client.settle(deadline_s=60)
    verifier.verify(history, list(generator.probes))


def another_payload(e: Event) -> Event:
    """The same id with other values, still valid (the generator sends values at the bounds)."""
    rtt = e.rtt_ms + 500 if e.rtt_ms <= MAX_MILLIS - 500 else e.rtt_ms - 500
    return replace(e, rtt_ms=rtt, loss_pct=abs(e.loss_pct - 7))


def test_same_id_with_a_different_payload(client, generator, verifier, history):
    batch = generator.batch(100)
    ok(client.send(batch))
    variants = [another_payload(e) for e in batch]
    ok(client.send(variants))
    verdict = verifier.verify(history, list(generator.probes))
    assert verdict.counts["acked_events"] == 100


def test_duplicates_after_the_jetstream_dedup_window(
    client, endpoints, generator, verifier, history
):
    resend_after_the_jetstream_dedup_window(client, endpoints, generator)
    verifier.verify(history, list(generator.probes))


@pytest.mark.partition
def test_resend_after_a_cut_off_answer_past_the_dedup_window(
    client, endpoints, generator, nemesis, verifier, history
):
    """The link cuts ingest's answer off: the batch is stored, the client cannot know. Its
    resend comes after JetStream's (shortened) dedup window: only the aggregator can drop it."""
    resend_after_a_cut_off_answer(client, endpoints, generator, nemesis)
    verifier.verify(history, list(generator.probes))


def resend_after_a_cut_off_answer(client, endpoints, generator, nemesis) -> float:
    def cut_off_answer(batch) -> None:
        with nemesis.toxic("harness-ingest", "limit_data", "downstream", bytes=64):
            op = client.send(batch)
        assert op.outcome is Outcome.UNKNOWN, (
            f"expected the answer cut off by the link (unknown outcome), got {op.status} {op.error}"
        )

    return resend_after_the_jetstream_dedup_window(client, endpoints, generator, cut_off_answer)


def resend_after_the_jetstream_dedup_window(
    client, endpoints, generator, first_send: Callable[[list[Event]], None] | None = None
) -> float:
    """With a 1 s JetStream window a resend is new to JetStream: only the aggregator can drop it.
    `first_send` sends the batch the first time (default: acknowledged by ingest).

    Returns how long JetStream took to forget the ids.
    """
    admin = JetStreamAdmin(endpoints.nats_urls)
    original = admin.stream_config().duplicate_window
    admin.set_duplicate_window(1.0)
    try:
        batch = generator.batch(200)
        (first_send or (lambda b: ok(client.send(b))))(batch)
        # Resend only after a whole window: a resend the server half-forgot stores the
        # forgotten ids afresh, and resending faster than the window keeps some ids always fresh.
        return wait_until(
            lambda: _new_to_jetstream(client.send(batch)),
            timeout_s=30,
            interval_s=1.5,
            what="a resend that JetStream no longer calls a duplicate (1 s dedup window)",
        )[1]
    finally:
        admin.set_duplicate_window(original)


def _new_to_jetstream(op) -> bool:
    ok(op)
    return op.duplicates == 0


@pytest.mark.restart
def test_redelivery_after_aggregators_are_killed_mid_batch(
    client, generator, nemesis, verifier, history
):
    """SIGKILL each aggregator while batches flow: whatever it had fetched is redelivered, counted once."""
    with background_sender(client, generator, batch_size=250) as sent:
        for service in ("aggregator-1", "aggregator-2", "aggregator-1"):
            wait_for_progress(sent)
            nemesis.kill(service)
    # Aggregator kills do not concern ingest, but on a loaded machine a publish may still time
    # out (503, unknown outcome): resend those like a probe, and count every event once.
    assert all(op.outcome is not Outcome.FAIL for op in sent), "ingest rejected valid batches"
    client.settle(deadline_s=60)
    verifier.verify(history, list(generator.probes), timeout_s=60)
