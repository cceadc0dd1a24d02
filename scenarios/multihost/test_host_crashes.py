"""Hosts lost and cut off on the swarm backend (issue 14, scenarios 3 and 4), each under steady
traffic, then the exactly-once verdict and the recovery time:

- the processing host (aggregators, diagnoser) cut from the storage host, then from NATS
  (with aggregators that acknowledge before committing, the meta-test expects it to fail);
- the processing host crashed (power off) and back: the swarm starts its tasks again;
- the PostgreSQL primary's host crashed: the standby, on another host, promoted and the
  database proxies moved to it (`Failover`, as on compose); nothing acknowledged is lost with
  synchronous replication, and with the seeded asynchronous configuration the harness reports
  the lost windows (the meta-test expects that failure).

Every cross-tier link goes through Toxiproxy on the edge host (stack/swarm/overrides.yml), so
the processing tier's links to the database and to NATS are relayed there, not direct: a cut
of the processing host is the hosts' grudge (their direct links) plus those relayed links cut
where they pass. The swarm manager runs on neither host, so neither is marked down by a cut.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from typing import Any

import httpx
import pytest

from harness import checker
from harness.history import Operation, Outcome
from harness.nats_admin import JetStreamAdmin
from harness.nemesis.hosts import MultiHost, complete
from harness.nemesis.links import LINKS
from harness.polling import wait_until
from harness.stack import Endpoints
from scenarios.common import (
    ASYNCHRONOUS_REPLICATION,
    Scenario,
    Workload,
    all_ready,
    all_unready,
    assert_lost_without_the_standby,
    client_view,
    consumer_state,
    seeded_bug,
)
from scenarios.test_failover import processed_on, sync_rep_waiters

pytestmark = pytest.mark.multihost

AGGREGATORS = ("aggregator-1", "aggregator-2")
PROCESSING = (*AGGREGATORS, "diagnoser")

DATABASE_LINKS = LINKS["aggregator-postgres"] + LINKS["diagnoser-postgres"]
NATS_LINKS = LINKS["aggregator-nats"] + LINKS["diagnoser-nats"]


def acknowledged(ops: list[Operation]) -> int:
    return sum(op.outcome is Outcome.OK for op in ops)


def stream_grew(endpoints: Endpoints, before: dict[str, int], by: int) -> float:
    """Wait until ingest stored `by` more events in the stream; returns seconds waited."""
    return wait_until(
        lambda: consumer_state(endpoints)["last_seq"] >= before["last_seq"] + by,
        timeout_s=30,
        what=f"{by} more events in the stream",
    )[1]


def processing_cut_off(scenario: Scenario, load: Workload, proxies: tuple[str, ...]) -> None:
    """Under the cut that `proxies` complete: the processing tier unready, ingest storing on,
    and nothing acknowledged to JetStream (a batch fetched before the cut may still commit:
    counted from once a backlog built up, as in scenarios/test_partitions.py)."""
    endpoints = scenario.endpoints
    with scenario.nemesis.cut(
        list(proxies), effect=lambda: all_unready(endpoints, *PROCESSING)
    ) as cut:
        before = consumer_state(endpoints)
        stream_grew(endpoints, before, by=300)
        frozen = consumer_state(endpoints)
        stream_grew(endpoints, frozen, by=300)
        load.stop()
        after = consumer_state(endpoints)
        scenario.details.update(
            unready_after_s=round(cut.effect_s or 0.0, 3),
            consumer_before=before,
            consumer_after=after,
            **client_view(scenario.history, cut.started_at, time.time()),
        )
        assert after["ack_floor"] == frozen["ack_floor"], (
            f"the aggregators acknowledged events through the cut: {frozen} -> {after}"
        )
    assert acknowledged(load.sent) == len(load.sent), "ingest should not notice the cut"


def test_processing_host_cut_from_storage_then_from_nats(
    spread: MultiHost, scenario: Scenario, primary_at_home: str
) -> None:
    """The processing host cut from the storage host (their direct link, the standby's WAL
    stream, and the aggregators' and diagnoser's database links relayed by the edge host's
    proxy), healed; then cut from NATS (its NATS links at the proxy). Ingest acknowledges on
    throughout, the aggregators acknowledge nothing while cut; after each heal the backlog is
    folded in exactly once."""
    processing = spread.host_of("aggregator-1")
    storage_cut = scenario.reporting_into({"hosts": [processing, primary_at_home]})
    scenario.details["storage_cut"] = storage_cut.details
    cut_from_storage(storage_cut, processing, primary_at_home)
    # After each heal: the tier ready, unknown batches resent, verified exactly once, the
    # recovery from the heal (in that cut's details).
    storage_cut.recover_after_refusals(PROCESSING, verify_timeout_s=90)
    nats_cut = scenario.reporting_into({"proxies": list(NATS_LINKS)})
    with nats_cut.workload() as load:
        load.progress()
        processing_cut_off(nats_cut, load, NATS_LINKS)
    scenario.details["nats_cut"] = nats_cut.details
    nats_cut.recover_after_refusals(PROCESSING, verify_timeout_s=90)
    scenario.details["recovery_s"] = nats_cut.details["recovery_s"]


def cut_from_storage(scenario: Scenario, processing: str, storage: str) -> None:
    """Steady traffic while the processing host is cut from the storage host: the hosts'
    grudge and the processing tier's database links at the proxy."""
    with scenario.workload() as load:
        load.progress()
        with scenario.nemesis.host_partition(
            complete([[processing], [storage]]), name=f"cut {processing} from {storage}"
        ):
            processing_cut_off(scenario, load, DATABASE_LINKS)


@pytest.fixture
def reconfigured(spread: MultiHost, reconfigured_stack: Endpoints, scenario: Scenario) -> Scenario:
    """A meta-test's scenario on the stack reconfigured as its parametrization says
    (`seeded_bug`, `with_settings`; the stack's own probes stopped meanwhile). The spread
    first: on another backend the test is skipped before the stack is reconfigured; the
    scenario after, on the reconfigured endpoints."""
    return scenario


@pytest.mark.meta
@seeded_bug("aggregator_ack_before_commit")
def test_aggregator_acking_before_commit_fails_the_processing_host_cut(
    spread: MultiHost, reconfigured: Scenario, primary_at_home: str
) -> None:
    """Aggregators that acknowledge a batch before committing it drop what they held when
    the processing host was cut from storage: the scenario's check that nothing is
    acknowledged through the cut fails, and the verdict names the lost windows."""
    storage_cut = reconfigured.reporting_into({})
    reconfigured.details["storage_cut"] = storage_cut.details
    with pytest.raises(AssertionError, match="acknowledged events through the cut"):
        cut_from_storage(storage_cut, spread.host_of("aggregator-1"), primary_at_home)
    # Not awaited ready: an aggregator is unready until a commit works again, and with the
    # probes stopped nothing new comes (what it held during the cut it acknowledged and
    # dropped). Dropped events never come back: a short wait is enough to call the verdict.
    reconfigured.client.settle(deadline_s=60)
    verdict = reconfigured.observe(timeout_s=15)
    reconfigured.assert_caught(verdict, "aggregators that dropped acknowledged batches")
    reconfigured.details["lost_windows"] = len(verdict.wrong())


def test_processing_host_crashed(
    spread: MultiHost, scenario: Scenario, primary_at_home: str
) -> None:
    """The processing host powered off under steady traffic (aggregators, diagnoser, nats-3
    and the PostgreSQL standby killed at once) and back: ingest acknowledges on with the
    other two NATS nodes; the swarm starts the host's tasks again; the standby catches up and
    the backlog is folded in exactly once."""
    nemesis, endpoints = scenario.nemesis, scenario.endpoints
    host = spread.host_of("aggregator-1")
    on_host = [s for s in (*PROCESSING, "nats-3", "postgres-replica") if spread.host_of(s) == host]
    containers_before = {s: nemesis.control.container(s).id for s in on_host}
    with scenario.workload() as load:
        load.progress()
        with nemesis.crashed(host) as crash:
            first = len(load.sent)
            _, accepting_s = wait_until(
                lambda: acknowledged(load.sent[first:]) >= 5,
                timeout_s=60,
                what=f"5 batches acknowledged with {host} down",
            )
            load.stop()
            scenario.details["during_fault"] = {
                "host": host,
                "down_after_s": round(crash.effect_s or 0.0, 3),
                "processes_killed": crash.notes.get("processes_killed"),
                "five_acknowledged_after_s": round(accepting_s, 3),
                **client_view(scenario.history, crash.started_at, time.time()),
            }
    _, back_s = wait_until(
        lambda: (
            all(nemesis.control.container(s).id != c for s, c in containers_before.items())
            and all_ready(endpoints, *PROCESSING)
            and caught_up(endpoints, "nats-3")
        ),
        timeout_s=180,
        what=f"the tasks of {host} started again by the swarm, ready, nats-3 caught up",
        interval_s=1.0,
    )
    scenario.details["tasks_back_after_heal_s"] = round(back_s, 3)
    scenario.client.settle(deadline_s=90)
    scenario.verify_recovery(timeout_s=90)


def caught_up(endpoints: Endpoints, node: str) -> bool:
    try:
        return httpx.get(f"{endpoints.nats_monitors[node]}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def primary_host_crash(
    scenario: Scenario, spread: MultiHost, timeout_s: float = 30.0
) -> checker.Verdict:
    """The primary's host crashed under steady traffic, with the failover of
    scenarios/test_failover.py; returns the verdict without asserting it (details filled in).

    As there, the standby first hears nothing more from the primary (its host drops the
    primary's host's packets: a one-way grudge, which heals while the primary's host is down),
    so the two replication modes differ deterministically: synchronous, the primary's commits
    wait and nothing more is acknowledged; asynchronous, 500 events are committed and
    acknowledged on the primary alone, and lost with its host."""
    nemesis, endpoints, details = scenario.nemesis, scenario.endpoints, scenario.details
    synchronous = nemesis.stack.settings.sync_replication
    details["replication"] = "synchronous" if synchronous else "asynchronous"
    with scenario.workload() as load:
        load.progress()
        with nemesis.staged_failover() as failover:
            primary, standby = failover.primary, failover.standby
            storage, other = spread.host_of(primary), spread.host_of(standby)
            with ExitStack() as crash_held:
                with nemesis.one_way_loss(storage, other):
                    details["during_cut"] = replication_cut_off(
                        scenario, load, primary, synchronous
                    )
                    crash = crash_held.enter_context(nemesis.crashed(storage))
                    failover.primary_lost()
                details["primary_host_down_after_s"] = round(crash.effect_s or 0.0, 3)
                details["promotion_s"] = round(failover.promote(), 3)
                _, reconnect_s = wait_until(
                    lambda: (
                        consumer_state(endpoints)["ack_floor"]
                        > details["during_cut"]["acked_after"]
                    ),
                    timeout_s=60,
                    what="the aggregators committing on the new primary on their own",
                )
                details["aggregators_committing_after_promotion_s"] = round(reconnect_s, 3)
                load.progress()
                load.stop()
                details["during_fault"] = client_view(
                    scenario.history, crash.started_at, time.time()
                )
                # The backlog of the outage folded in first: what is still missing then is lost.
                details["backlog_acknowledged_after_s"] = round(
                    JetStreamAdmin(endpoints.nats_urls).await_acknowledged(
                        "the aggregators acknowledging everything stored", timeout_s=120
                    ),
                    3,
                )
                # Recovery: writes work on the new primary -> the state matches the oracle
                # (before the old primary's host is back and it is rebuilt as the standby).
                first = scenario.observe(timeout_s=timeout_s)
                matched_at = (scenario.history.last_ok_at() or time.time()) + (
                    first.convergence_s or 0.0
                )
                promoted_at = failover.fault.started_at + (failover.fault.effect_s or 0.0)
                details["recovery_s"] = (
                    round(max(0.0, matched_at - promoted_at), 3) if first.valid else None
                )
        details["failover"] = failover.fault.to_dict()
    details["wrong_windows"] = len(first.wrong())
    if not first.valid:  # lost events stay lost: no need to wait for them again
        return first
    wait_until(lambda: all_ready(endpoints, *AGGREGATORS), timeout_s=60, what="aggregators ready")
    # And once more with the old primary rebuilt as the standby.
    verdict = scenario.observe(timeout_s=60)
    details["counts"] = dict(verdict.counts)
    details["wrong_windows"] = len(verdict.wrong())
    return verdict


def replication_cut_off(
    scenario: Scenario, load: Workload, primary: str, synchronous: bool
) -> dict[str, Any]:
    """What the primary does while its standby hears nothing from it: synchronous, its commits
    wait and nothing is acknowledged; asynchronous, it commits and acknowledges alone."""
    nemesis, endpoints = scenario.nemesis, scenario.endpoints
    acked_before = consumer_state(endpoints)["ack_floor"]
    stored_before = processed_on(nemesis, primary)
    if synchronous:
        _, took = wait_until(
            lambda: sync_rep_waiters(nemesis, primary) >= 1,
            timeout_s=30,
            what="a commit waiting for the cut-off synchronous standby",
        )
        load.progress(more=5)
        wait_until(
            lambda: sync_rep_waiters(nemesis, primary) >= 1, timeout_s=5, what="commits waiting"
        )
    else:
        _, took = wait_until(
            lambda: (
                processed_on(nemesis, primary) >= stored_before + 500
                and consumer_state(endpoints)["ack_floor"] >= acked_before + 500
            ),
            timeout_s=30,
            what="500 events committed and acknowledged without the standby",
        )
    return {
        "acked_before": acked_before,
        "acked_after": consumer_state(endpoints)["ack_floor"],
        "stored_on_primary": processed_on(nemesis, primary) - stored_before,
        "sync_rep_waiters": sync_rep_waiters(nemesis, primary),
        "shown_after_s": round(took, 3),
    }


@pytest.mark.failover
def test_primary_host_crashed_with_synchronous_replication(
    spread: MultiHost, scenario: Scenario, primary_at_home: str
) -> None:
    """The PostgreSQL primary's host powered off: the standby on another host promoted, the
    proxies moved to it, the aggregators reconnect on their own; zero acknowledged events
    lost; the old primary, held down while its host returns, rebuilt as the new standby."""
    if not scenario.nemesis.stack.settings.sync_replication:
        pytest.skip("this stack runs asynchronous replication (see the seeded-config meta-test)")
    verdict = primary_host_crash(scenario, spread)
    assert verdict.valid, verdict.summary()
    cut = scenario.details["during_cut"]
    assert cut["acked_after"] == cut["acked_before"], (
        f"events were acknowledged while the synchronous standby was unreachable: {cut}"
    )


@pytest.mark.meta
@pytest.mark.failover
@ASYNCHRONOUS_REPLICATION
def test_asynchronous_replication_fails_the_primary_host_crash(
    spread: MultiHost, reconfigured: Scenario, primary_at_home: str
) -> None:
    """With asynchronous replication, the events committed and acknowledged while the standby
    heard nothing from the primary exist only on the crashed host: the harness must report
    the lost windows."""
    # Lost events never come back: a short wait is enough to call the verdict.
    verdict = primary_host_crash(reconfigured, spread, timeout_s=15)
    assert_lost_without_the_standby(
        reconfigured, verdict, "a failover that lost acknowledged events"
    )
    reconfigured.details["lost_windows"] = len(verdict.wrong())
