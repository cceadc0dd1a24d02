"""Process faults under load: SIGKILL of aggregators mid-batch, ingest restarts, and an
aggregator frozen past the consumer's ack wait. After healing, every acknowledged event is
counted once; each scenario reports what clients saw and the recovery time."""

from __future__ import annotations

import time

import pytest

from harness.history import Outcome
from harness.polling import wait_until
from scenarios.common import (
    Scenario,
    all_ready,
    caught_mid_transaction,
    client_view,
    consumer_state,
    other_aggregator_carries_on,
    writing_transactions,
)

pytestmark = pytest.mark.restart

AGGREGATORS = ("aggregator-1", "aggregator-2")


def test_repeated_sigkill_of_aggregators_mid_batch(scenario: Scenario, db):
    """SIGKILL each aggregator in turn, each time while both are inside a batch transaction:
    the killed one's batch is redelivered and counted once. (scenarios/test_dedup.py kills
    three more times without aiming.)"""
    redelivered = consumer_state(scenario.endpoints)["redeliveries"]
    kills = []
    with scenario.workload() as load:
        load.progress()
        with scenario.nemesis.latency("aggregator-postgres", 300, stream="downstream"):
            for service in AGGREGATORS:
                wait_until(
                    lambda: writing_transactions(db) >= 2,
                    timeout_s=60,
                    what="both aggregators inside a batch transaction",
                )
                took = scenario.nemesis.kill(service)
                kills.append({"service": service, "back_healthy_s": round(took, 2)})
        load.stop()
    scenario.details["kills"] = kills
    scenario.details["during_fault"] = client_view(
        scenario.history, scenario.nemesis.faults[0].started_at, time.time()
    )
    assert all(op.outcome is Outcome.OK for op in load.sent), "ingest should not notice"
    scenario.verify_recovery()
    scenario.details["redeliveries"] = (
        consumer_state(scenario.endpoints)["redeliveries"] - redelivered
    )
    assert scenario.details["redeliveries"] > 0, "no kill caught an aggregator holding a batch"


def test_ingest_restart_under_load(scenario: Scenario):
    """A graceful restart of ingest-1, then SIGKILL of ingest-2, while batches flow to both:
    the client sees errors and unknown outcomes, resends, and nothing is lost or doubled."""
    with scenario.workload() as load:
        load.progress()
        restart_s = scenario.nemesis.restart("ingest-1", grace_s=3)
        load.progress()
        kill_s = scenario.nemesis.kill("ingest-2")
        load.progress()
        load.stop()
    scenario.details["restart_back_s"] = round(restart_s, 2)
    scenario.details["kill_back_s"] = round(kill_s, 2)
    scenario.details["during_fault"] = client_view(
        scenario.history,
        scenario.nemesis.faults[0].started_at,
        scenario.nemesis.faults[-1].ended_at or time.time(),
    )
    scenario.details["settled_batches"] = scenario.client.settle(deadline_s=60)
    scenario.verify_recovery()


def test_pause_an_aggregator_past_the_ack_wait(scenario: Scenario, db):
    """aggregator-1 frozen inside its batch transaction for longer than the ack wait: its batch
    must be redelivered to aggregator-2, which carries on; when aggregator-1 resumes and
    finishes the same batch, every event still counts once."""
    ack_wait_s = scenario.nemesis.stack.settings.ack_wait_s
    with scenario.workload() as load:
        load.progress()
        with caught_mid_transaction(scenario.nemesis, db, "aggregator-1") as pause:
            stalled = other_aggregator_carries_on(
                scenario,
                db,
                load,
                pause,
                ack_wait_s=ack_wait_s,
                progressed=lambda before, now: (
                    now["redeliveries"] > before["redeliveries"]
                    and now["ack_floor"] > before["ack_floor"]
                ),
                what="aggregator-1's batch redelivered and aggregator-2 acknowledging "
                "while aggregator-1 is frozen",
                key="redelivered_after_s",
            )
    wait_until(
        lambda: all_ready(scenario.endpoints, *AGGREGATORS), timeout_s=60, what="aggregators ready"
    )
    scenario.verify_recovery()
    assert stalled is None, (
        f"no redelivery to the other aggregator while one was frozen: {stalled}. Exactly-once "
        f"held after resuming (recovery {scenario.details['recovery_s']} s)."
    )
