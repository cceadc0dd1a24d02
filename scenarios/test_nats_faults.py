"""NATS faults under load: one JetStream node killed and brought back (the R3 stream keeps
accepting), and the whole cluster restarted (file storage keeps the stream and the consumer)."""

from __future__ import annotations

import time

import pytest

from harness.history import Outcome
from harness.polling import wait_until
from scenarios.common import (
    Scenario,
    all_ready,
    all_unready,
    client_view,
    consumer_state,
)

pytestmark = [pytest.mark.restart, pytest.mark.chaos]

NATS_CLIENTS = ("ingest-1", "ingest-2", "aggregator-1", "aggregator-2", "diagnoser")


def _stream_leader(endpoints) -> str:
    import httpx

    for url in endpoints.nats_monitors.values():
        try:
            body = httpx.get(f"{url}/jsz?streams=true", timeout=2).json()
        except httpx.HTTPError:
            continue
        for account in body.get("account_details", []):
            for stream in account.get("stream_detail", []):
                if stream["name"] == "QOE_EVENTS":
                    return stream["cluster"]["leader"]
    raise AssertionError("no NATS node reported the QOE_EVENTS stream")


def test_nats_stream_leader_killed_and_back(scenario: Scenario):
    """SIGKILL the node leading the stream: after a leader election the remaining two keep
    accepting (R3 needs a quorum of 2); the node returns and catches up; counted once."""
    leader = _stream_leader(scenario.endpoints)
    with scenario.workload() as load:
        load.progress()
        with scenario.nemesis.nats_node_lost(leader) as lost:
            first = len(load.sent)
            _, accepting_s = wait_until(
                lambda: sum(op.outcome is Outcome.OK for op in load.sent[first:]) >= 5,
                timeout_s=60,
                what=f"5 acknowledged batches with {leader} down",
            )
            new_leader = wait_until(
                lambda: (name := _stream_leader(scenario.endpoints)) != leader and name,
                timeout_s=30,
                what="another stream leader",
            )[0]
            load.stop()
            scenario.details["during_fault"] = {
                "killed": leader,
                "new_leader": new_leader,
                "accepting_again_after_s": round(accepting_s + (lost.effect_s or 0), 3),
                **client_view(scenario.history, lost.started_at, time.time()),
            }
    wait_until(
        lambda: all_ready(scenario.endpoints, *NATS_CLIENTS), timeout_s=60, what="clients ready"
    )
    scenario.client.settle(deadline_s=60)
    scenario.verify_recovery()


def test_whole_nats_cluster_restarted(scenario: Scenario, stack):
    """All three nodes stopped together and started again: ingest answers 503 meanwhile; the
    stream (file storage) and the durable consumer survive; the backlog is counted once."""
    with scenario.workload() as load:
        load.progress()
        before = consumer_state(scenario.endpoints)
        with scenario.nemesis.nats_cluster_restarted() as restart:
            wait_until(
                lambda: all_unready(scenario.endpoints, "ingest-1", "ingest-2"),
                timeout_s=30,
                what="ingest unready with the cluster down",
            )
            load.progress(more=3)
            load.stop()
            scenario.details["during_fault"] = client_view(
                scenario.history, restart.started_at, time.time()
            )
    after = wait_until(  # the restarted nodes publish new host ports: read them again
        lambda: consumer_state(stack.endpoints()),
        timeout_s=60,
        what="the stream answering again",
    )[0]
    assert after["last_seq"] >= before["last_seq"], (
        f"the stream lost messages across the restart: {before} -> {after}"
    )
    scenario.details["stream_before"], scenario.details["stream_after"] = before, after
    _, ready_s = wait_until(
        lambda: all_ready(scenario.endpoints, *NATS_CLIENTS),
        timeout_s=90,
        what="every NATS client ready",
    )
    scenario.details["clients_ready_after_s"] = round(ready_s, 3)
    scenario.client.settle(deadline_s=60)
    scenario.verify_recovery(timeout_s=90)
