"""Partitions: cut links through Toxiproxy (and one hard partition through Docker networks)
under a steady workload. Each scenario first proves the cut is effective (clients see errors,
readiness goes red, or nothing is acknowledged), then heals and requires the exactly-once
verdict, and reports the recovery time (heal -> the database matches the oracle)."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from harness.history import Operation, Outcome
from harness.polling import wait_until
from harness.workload import IngestClient, classify_error, classify_status
from scenarios.common import (
    Scenario,
    all_ready,
    all_unready,
    caught_mid_transaction,
    client_view,
    consumer_state,
    each_commits,
    other_aggregator_carries_on,
    readiness,
)

pytestmark = pytest.mark.partition

INGEST = ("ingest-1", "ingest-2")
AGGREGATORS = ("aggregator-1", "aggregator-2")
PUBLISH_TIMEOUT_S = 2.0  # the reference stack's PUBLISH_TIMEOUT_SECONDS


def send_observed(client: IngestClient, events, url: str | None = None):
    """POST a batch, record it in the history like IngestClient.send, and return the
    operation with the response headers and how long the answer took."""
    endpoint = client._endpoint(url) if url else client.next_url()
    body = json.dumps({"events": [e.to_wire() for e in events]})
    invoked, began = time.time(), time.monotonic()
    headers: dict[str, str] = {}
    status, error = None, ""
    try:
        resp = httpx.post(endpoint, content=body, headers=client.default_headers(), timeout=10)
        status, headers = resp.status_code, dict(resp.headers)
        outcome = classify_status(status)
        error = "" if outcome is Outcome.OK else f"HTTP {status}: {resp.text[:200]}"
    except httpx.HTTPError as exc:
        outcome, error = classify_error(exc), f"{type(exc).__name__}: {exc}"
    took = time.monotonic() - began
    op = Operation(
        client.process, endpoint, invoked, time.time(), outcome, tuple(events), status, error
    )
    client.history.append(op)
    return op, headers, took


def ingest_counts(history, start: float) -> int:
    return sum(1 for op in history.operations() if op.invoked_at >= start)


def backlog_grew(endpoints, before: dict, by: int) -> None:
    wait_until(
        lambda: consumer_state(endpoints)["num_pending"] >= before["num_pending"] + by,
        timeout_s=30,
        what=f"a backlog of {by} events while the aggregators are cut off",
    )


def processed_events(db) -> int:
    return db.execute("SELECT count(*) FROM processed_events").fetchone()[0]


def test_ingest_nats_partition(scenario: Scenario):
    """Ingest cut off from every NATS node: 503 + Retry-After within the publish timeout (no
    hang, no 500), /readyz red; the client retries after healing; nothing lost or doubled."""
    ingest_nats_partition(scenario)


def ingest_nats_partition(
    scenario: Scenario,
    verify_timeout_s: float = 60.0,
) -> None:
    with scenario.workload() as load:
        load.progress()
        with scenario.nemesis.cut(
            "ingest-nats", effect=lambda: all_unready(scenario.endpoints, *INGEST)
        ) as cut:
            for url in scenario.endpoints.ingest_urls:
                op, headers, took = send_observed(
                    scenario.client, scenario.generator.batch(50), url
                )
                assert op.status == 503, f"expected 503 while NATS is cut off, got {op.error}"
                assert "retry-after" in {h.lower() for h in headers}, headers
                assert took <= PUBLISH_TIMEOUT_S + 1.5, f"503 took {took:.2f}s (hung?)"
            scenario.details["during_fault"] = scenario.refused_after_effect(load, cut)
    scenario.recover_after_refusals(
        INGEST,
        verify_timeout_s,
    )


def test_aggregator_postgres_partition(scenario: Scenario, db):
    """The aggregators cut off from PostgreSQL: nothing is acknowledged to JetStream and
    nothing recorded while the database is unreachable; exact after healing."""
    with scenario.workload() as load:
        load.progress()
        with scenario.nemesis.cut(
            "aggregator-postgres", effect=lambda: all_unready(scenario.endpoints, *AGGREGATORS)
        ) as cut:
            before, stored = consumer_state(scenario.endpoints), processed_events(db)
            wait_until(
                lambda: consumer_state(scenario.endpoints)["last_seq"] >= before["last_seq"] + 500,
                timeout_s=30,
                what="500 more events in the stream while the database is cut off",
            )
            load.stop()
            after = consumer_state(scenario.endpoints)
            assert after["ack_floor"] == before["ack_floor"], (before, after)
            assert processed_events(db) == stored, "events were recorded through a cut link"
            scenario.details["during_fault"] = {
                "consumer_before": before,
                "consumer_after": after,
                **client_view(scenario.history, cut.started_at, time.time()),
            }
    assert all(op.outcome is Outcome.OK for op in load.sent), "ingest should not notice the cut"
    scenario.verify_recovery()


def test_aggregator_postgres_heavy_latency(scenario: Scenario):
    """800 ± 400 ms each way between the aggregators and PostgreSQL: slow, never wrong."""
    with scenario.workload() as load:
        load.progress()
        scenario.details["each_committing_after_s"] = each_commits(scenario.endpoints, *AGGREGATORS)
        start = consumer_state(scenario.endpoints)
        with scenario.nemesis.latency("aggregator-postgres", 800, 400, stream="both") as slow:
            wait_until(
                lambda: consumer_state(scenario.endpoints)["ack_floor"] > start["last_seq"],
                timeout_s=60,
                what="the aggregators committing through the slow link",
            )
            load.stop()
            scenario.details["during_fault"] = {
                "consumer": consumer_state(scenario.endpoints),
                **client_view(scenario.history, slow.started_at, time.time()),
            }
    scenario.verify_recovery()


def test_aggregator_nats_partition(scenario: Scenario, db):
    """The aggregators cut off from every NATS node: ingest keeps accepting, the backlog grows,
    nothing is recorded; after healing the backlog drains exactly once."""
    with scenario.workload() as load:
        load.progress()
        with scenario.nemesis.cut(
            "aggregator-nats", effect=lambda: all_unready(scenario.endpoints, *AGGREGATORS)
        ) as cut:
            # A batch fetched before the cut may still commit (its ack then fails and the
            # redelivery is deduplicated): count from once a backlog has built up, not from
            # the cut itself.
            before = consumer_state(scenario.endpoints)
            backlog_grew(scenario.endpoints, before, by=500)
            stored = processed_events(db)
            backlog_grew(scenario.endpoints, before, by=1000)
            load.stop()
            assert processed_events(db) == stored, "events were recorded through a cut link"
            scenario.details["during_fault"] = {
                "consumer_before": before,
                "consumer_after": consumer_state(scenario.endpoints),
                **client_view(scenario.history, cut.started_at, time.time()),
            }
    assert all(op.outcome is Outcome.OK for op in load.sent), "ingest should not notice the cut"
    scenario.verify_recovery()


def test_diagnoser_nats_partition(scenario: Scenario):
    """The diagnoser cut off from NATS: no hints, readiness red, but its timer sweeps keep the
    diagnoses right (checked during the cut and after healing)."""
    with scenario.nemesis.cut(
        "diagnoser-nats", effect=lambda: all_unready(scenario.endpoints, "diagnoser")
    ):
        with scenario.workload() as load:
            load.progress(more=5)
        during = scenario.verifier.verify(scenario.history, scenario.probe_ids, timeout_s=60)
        scenario.details["converged_during_cut_s"] = during.convergence_s
        with scenario.workload() as load2:
            load2.progress(more=3)
    assert all(op.outcome is Outcome.OK for op in load.sent + load2.sent)
    scenario.verify_recovery()


def test_whole_nats_tier_partition(scenario: Scenario):
    """Every proxy into the NATS tier cut: ingest answers 503, the aggregators and diagnoser
    go unready; everything recovers on its own."""
    everyone = (*INGEST, *AGGREGATORS, "diagnoser")
    with scenario.workload() as load:
        load.progress()
        with scenario.nemesis.partition(
            "nats", effect=lambda: all_unready(scenario.endpoints, *everyone)
        ) as cut:
            scenario.details["during_fault"] = scenario.refused_after_effect(load, cut)
    scenario.recover_after_refusals(
        everyone,
    )


@pytest.mark.parametrize(
    "toxic",
    [
        pytest.param(("limit_data", "downstream", {"bytes": 64}), id="response-cut-off"),
        pytest.param(("timeout", "downstream", {"timeout": 500}), id="response-timeout"),
        pytest.param(("reset_peer", "upstream", {"timeout": 50}), id="reset-mid-request"),
    ],
)
def test_client_ingest_resets_and_timeouts(toxic, scenario: Scenario):
    """The client's link to ingest resets or times out mid-request: outcomes are unknown (the
    batch may be stored), the client resends the same ids, each event is counted once."""
    kind, stream, attributes = toxic
    with scenario.workload() as load:
        load.progress()
        with scenario.nemesis.toxic("harness-ingest", kind, stream, **attributes) as fault:
            first = len(load.sent)
            wait_until(
                lambda: sum(op.outcome is Outcome.UNKNOWN for op in load.sent[first:]) >= 3,
                timeout_s=30,
                what=f"3 unknown outcomes under {kind}",
            )
            load.stop()
            scenario.details["during_fault"] = client_view(
                scenario.history, fault.started_at, time.time()
            )
    unknown = [op for op in load.sent if op.outcome is Outcome.UNKNOWN]
    duplicates_before = _ingest_metric(scenario.endpoints, "duplicate")
    scenario.details["unknown_batches"] = len(unknown)
    scenario.details["settled_batches"] = scenario.client.settle(deadline_s=60)
    # Events JetStream already had when the client resent them: stored despite the error.
    scenario.details["stored_despite_error"] = (
        _ingest_metric(scenario.endpoints, "duplicate") - duplicates_before
    )
    scenario.verify_recovery()


def _ingest_metric(endpoints, outcome: str) -> float:
    from scenarios.common import metric

    return sum(metric(endpoints, s, "qoe_ingest_events_total", outcome=outcome) for s in INGEST)


def test_hard_partition_of_an_ingest_replica(scenario: Scenario, stack):
    """ingest-1 taken off the ingest network (Docker, no proxy involved): requests routed to it
    fail, ingest-2 keeps acknowledging; reconnected under its service alias, ingest-1 serves
    again and the resent batches count once."""
    with scenario.workload() as load:
        load.progress()
        with scenario.nemesis.disconnected(
            "ingest-1", effect=lambda: readiness(scenario.endpoints, "ingest-1") is None
        ) as cut:
            first = len(load.sent)
            load.progress(more=6)
            load.stop()
            during = load.sent[first:]
            assert any(op.outcome is not Outcome.OK for op in during), "ingest-1 still reached"
            assert any(op.outcome is Outcome.OK for op in during), "ingest-2 did not carry on"
            scenario.details["during_fault"] = client_view(
                scenario.history, cut.started_at, time.time()
            )
    # Reconnected, ingest-1 publishes new host ports: read them again.
    _, ready_s = wait_until(
        lambda: all_ready(stack.endpoints(), "ingest-1"), timeout_s=60, what="ingest-1 ready again"
    )
    scenario.details["ready_again_s"] = round(ready_s, 3)
    scenario.client.settle(deadline_s=60)
    scenario.verify_recovery()


@pytest.mark.slow
def test_hard_partition_of_an_aggregator_mid_transaction(scenario: Scenario, stack, db):
    """aggregator-1 taken off its Docker network (no proxy involved) while it is inside its
    batch transaction, for longer than the ack wait. aggregator-2 must carry on (what
    aggregator-1 held is redelivered to it); when aggregator-1 comes back everything is
    counted once."""
    ack_wait_s = scenario.nemesis.stack.settings.ack_wait_s
    with scenario.workload() as load:
        load.progress()
        with caught_mid_transaction(
            scenario.nemesis,
            db,
            "aggregator-1",
            then=lambda: scenario.nemesis.disconnected("aggregator-1"),
        ) as cut:
            stalled = other_aggregator_carries_on(
                scenario,
                db,
                load,
                cut,
                ack_wait_s=ack_wait_s,
                progressed=lambda before, now: now["ack_floor"] > before["ack_floor"],
                what="aggregator-2 acknowledging anything while aggregator-1 is partitioned",
                key="carried_on_after_s",
            )
    _, back_s = wait_until(  # reconnected: at new host ports
        lambda: all_ready(stack.endpoints(), "aggregator-1"),
        timeout_s=60,
        what="aggregator-1 ready",
    )
    scenario.details["ready_again_s"] = round(back_s, 3)
    scenario.verify_recovery()
    assert stalled is None, (
        f"the pipeline stalled while one aggregator was partitioned: {stalled}. Exactly-once "
        f"held after healing (recovery {scenario.details['recovery_s']} s)."
    )
