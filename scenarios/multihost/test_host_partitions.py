"""Partitions between Docker hosts on the swarm backend (issue 14), each under steady traffic,
then the exactly-once verdict and the recovery time:

- one NATS node's host cut from every other host: a minority of the R3 stream; the other two
  nodes keep accepting, the cut-off node catches up after healing;
- an ingest replica's host cut from the probes' host while the probes send: the probes fail
  over to the other replica, and once healed their ledgers drain.

The hosts' own firewalls drop the packets (harness.nemesis.hosts); the harness, outside every
host, still reaches each host's published ports, so it can watch both sides of the cut.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from harness import ledger
from harness.history import Operation, Outcome
from harness.nats_admin import JetStreamAdmin
from harness.nemesis.hosts import complete
from harness.polling import wait_until
from harness.stack import NATS_NODES, Endpoints
from scenarios.common import all_ready, client_view, verify_recovery, workload

pytestmark = [pytest.mark.multihost, pytest.mark.partition]

NATS_CLIENTS = ("ingest-1", "ingest-2", "aggregator-1", "aggregator-2", "diagnoser")
STREAM = "QOE_EVENTS"


def acknowledged(ops: list[Operation]) -> int:
    return sum(op.outcome is Outcome.OK for op in ops)


def stream_cluster(endpoints: Endpoints, nodes: list[str]) -> dict[str, Any] | None:
    """The events stream's raft group as its leader reports it (leader, each other replica's
    `current`), if one of `nodes` leads it; None otherwise."""
    for node in nodes:
        try:
            body = httpx.get(f"{endpoints.nats_monitors[node]}/jsz?streams=true", timeout=2).json()
        except (httpx.HTTPError, ValueError):
            continue
        for account in body.get("account_details", []):
            for stream in account.get("stream_detail", []):
                cluster = stream.get("cluster") or {}
                if stream["name"] == STREAM and cluster.get("leader") == node:
                    return cluster
    return None


def cut_off_from(cluster: dict[str, Any] | None, node: str) -> bool:
    """The stream's leader no longer counts `node` as a current replica."""
    if cluster is None:
        return False
    replicas = {r["name"]: r for r in cluster.get("replicas", [])}
    return node in replicas and not replicas[node].get("current", False)


def caught_up(endpoints: Endpoints, node: str) -> bool:
    """The node's full JetStream health: in the cluster with a meta leader, its streams current."""
    return httpx.get(f"{endpoints.nats_monitors[node]}/healthz", timeout=2).status_code == 200


def test_nats_node_host_isolated(
    client, generator, endpoints, spread, nemesis, verifier, history, scenario_details
):
    """nats-1's host cut from every other host (it also runs ingest-1): the stream (R3) keeps
    accepting on the other two nodes through ingest-2; after healing nats-1 catches up and
    every acknowledged event is counted once, none twice."""
    node, host = "nats-1", spread.host_of("nats-1")
    majority = [n for n in NATS_NODES if n != node]
    admin = JetStreamAdmin([endpoints.nats_urls[NATS_NODES.index(n)] for n in majority])
    replicas = admin.stream_config().num_replicas
    assert replicas == 3, f"the scenario is about an R3 stream; this one has {replicas} replicas"
    leader_before = stream_cluster(endpoints, list(NATS_NODES))
    on_host = [s for s in (node, "ingest-1") if spread.host_of(s) == host]
    containers_before = {s: nemesis.control.container(s).id for s in on_host}
    with workload(client, generator) as load:
        load.progress()
        last_before = admin.last_sequence()
        with nemesis.isolated(host) as cut:
            first = len(load.sent)
            _, minority_s = wait_until(
                lambda: cut_off_from(stream_cluster(endpoints, majority), node),
                timeout_s=60,
                what=f"the stream's leader among {majority} counting {node} out",
                describe=lambda: str(stream_cluster(endpoints, majority)),
            )
            _, accepting_s = wait_until(
                lambda: acknowledged(load.sent[first:]) >= 5,
                timeout_s=90,
                what=f"5 batches acknowledged with {host} cut off",
            )
            last_during = admin.last_sequence()
            load.stop()
            scenario_details["during_fault"] = {
                "isolated": {"host": host, "node": node},
                "stream_leader_before": (leader_before or {}).get("leader"),
                "stream_leader_during": (stream_cluster(endpoints, majority) or {}).get("leader"),
                "counted_out_after_s": round(minority_s + (cut.effect_s or 0), 3),
                "acknowledged_during": acknowledged(load.sent[first:]),
                "five_acknowledged_after_s": round(accepting_s, 3),
                "stream_last_seq": [last_before, last_during],
                **client_view(history, cut.started_at, time.time()),
            }
            assert last_during > last_before, "the stream stored nothing while nats-1 was cut off"
    _, back_s = wait_until(
        lambda: caught_up(endpoints, node) and all_ready(endpoints, *NATS_CLIENTS),
        timeout_s=180,
        what=f"{node} caught up and every NATS client ready",
    )
    scenario_details["caught_up_after_heal_s"] = round(back_s, 3)
    # A swarm that marked the cut-off node down replaces its tasks when it returns.
    scenario_details["restarted_by_the_swarm"] = sorted(
        s for s, c in containers_before.items() if nemesis.control.container(s).id != c
    )
    client.settle(deadline_s=90)
    verify_recovery(verifier, history, list(generator.probes), scenario_details, timeout_s=90)


def test_ingest_host_cut_from_the_probes_host(
    client, generator, endpoints, spread, nemesis, verifier, history, scenario_details
):
    """ingest-1's host and the probes' host cut from each other while the probes send (and the
    harness too): the probes' batches to ingest-1 fail and they resend to ingest-2; after
    healing their ledgers drain, and the probes' and the harness's events are each counted
    once."""
    probes = ledger.probe_urls(endpoints)
    edge, host = spread.host_of("probe-1"), spread.host_of("ingest-1")
    with httpx.Client(timeout=5) as http:

        def acked() -> dict[str, int]:
            return {name: http.get(f"{url}/status").json()["acked"] for name, url in probes.items()}

        with workload(client, generator) as load:
            load.progress()
            with nemesis.host_partition(
                complete([[edge], [host]]), name=f"cut {host} from {edge}"
            ) as cut:
                before = acked()
                # The probes' way to ingest-1 is the edge's proxy: the harness's own proxy to
                # it takes the same hop and must fail now.
                with pytest.raises(httpx.HTTPError):
                    httpx.get(f"{endpoints.ingest_urls[0]}/healthz", timeout=3)
                _, failed_over_s = wait_until(
                    lambda: all(n >= before[p] + 100 for p, n in acked().items()),
                    timeout_s=90,
                    what="each probe with 100 more events acknowledged (by ingest-2)",
                    describe=lambda: f"acked before {before}, now {acked()}",
                )
                load.stop()
                scenario_details["during_fault"] = {
                    "cut": [edge, host],
                    "probes_acked": {"before": before, "after": acked()},
                    "probes_failed_over_after_s": round(failed_over_s, 3),
                    **client_view(history, cut.started_at, time.time()),
                }
    wait_until(lambda: all_ready(endpoints, "ingest-1", *probes), timeout_s=120, what="ready")
    client.settle(deadline_s=90)
    verify_recovery(verifier, history, list(generator.probes), scenario_details, timeout_s=90)
    status = ledger.stop_and_drain(probes, timeout_s=120)
    try:
        assert not ledger.undelivered(status), f"probes left events undelivered: {status}"
        verifier.verify(ledger.read_history(probes), list(probes), timeout_s=90)
    finally:
        ledger.start(probes)
