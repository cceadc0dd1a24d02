"""Database failover under load: the primary crashes, the standby is promoted, the database
proxies move to it, and the old primary is rebuilt as the new standby.

To make the difference between synchronous and asynchronous replication deterministic, the
standby is first cut off from the primary (taken off the storage network) while writes go on:

- synchronous (the default): the primary cannot confirm any commit; the aggregators' batch
  transactions wait in SyncRep and nothing is acknowledged to JetStream. The primary then
  crashes; after promotion the aggregators reconnect on their own, commit the held batches on
  the new primary, and nothing acknowledged is lost.
- asynchronous (the seeded configuration): commits and acks go ahead on the primary alone, so
  the events committed during the cut exist only on the crashed primary. After failover they
  are gone although ingest and the aggregators acknowledged them: the checker must report the
  lost windows (scenarios/test_seeded_bugs.py expects that failure).

A cut (rather than pausing the standby) makes this deterministic: a frozen standby's kernel
still receives WAL into its socket buffers and would apply it on thaw; a detached one gets
nothing after the cut.
"""

from __future__ import annotations

import time

import pytest

from harness import checker
from harness.polling import wait_until
from scenarios.common import (
    Scenario,
    all_ready,
    client_view,
    consumer_state,
)

pytestmark = pytest.mark.failover

AGGREGATORS = ("aggregator-1", "aggregator-2")


def sync_rep_waiters(nemesis, primary: str) -> int:
    return int(
        nemesis.psql(primary, "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'")
    )


def processed_on(nemesis, node: str) -> int:
    return int(nemesis.psql(node, "SELECT count(*) FROM processed_events") or 0)


def run_failover(
    scenario: Scenario,
    timeout_s: float = 30.0,
) -> checker.Verdict:
    """The failover scenario; returns the verdict without asserting it (details filled in).
    `timeout_s`: how long the checker waits for the state to match the oracle."""
    synchronous = scenario.nemesis.stack.settings.sync_replication
    scenario.details["replication"] = "synchronous" if synchronous else "asynchronous"
    with scenario.workload() as load:
        load.progress()
        with scenario.nemesis.staged_failover() as failover:
            primary = failover.primary
            with scenario.nemesis.replication_cut() as cut:
                acked_before = consumer_state(scenario.endpoints)["ack_floor"]
                stored_before = processed_on(scenario.nemesis, primary)
                if synchronous:
                    # The proof: commits wait for the standby, nothing is acknowledged.
                    _, took = wait_until(
                        lambda: sync_rep_waiters(scenario.nemesis, primary) >= 1,
                        timeout_s=30,
                        what="a commit waiting for the cut-off synchronous standby",
                    )
                    load.progress(more=5)
                    wait_until(
                        lambda: sync_rep_waiters(scenario.nemesis, primary) >= 1,
                        timeout_s=5,
                        what="commits still waiting",
                    )
                    acked_after = consumer_state(scenario.endpoints)["ack_floor"]
                    scenario.details["commits_blocked_after_s"] = round(took, 3)
                else:
                    # Commits and acks go ahead on the primary alone.
                    _, took = wait_until(
                        lambda: (
                            processed_on(scenario.nemesis, primary) >= stored_before + 500
                            and consumer_state(scenario.endpoints)["ack_floor"]
                            >= acked_before + 500
                        ),
                        timeout_s=30,
                        what="500 events committed and acknowledged without the standby",
                    )
                    acked_after = consumer_state(scenario.endpoints)["ack_floor"]
                    scenario.details["committed_without_standby_after_s"] = round(took, 3)
                scenario.details["during_cut"] = {
                    "acked_before": acked_before,
                    "acked_after": acked_after,
                    "stored_on_primary": processed_on(scenario.nemesis, primary) - stored_before,
                    "sync_rep_waiters": sync_rep_waiters(scenario.nemesis, primary),
                }
                failover.stop_primary()
            # The standby is back on its network; the primary is gone: promote it.
            promotion_s = failover.promote()
            scenario.details["promotion_s"] = round(promotion_s, 3)
            _, reconnect_s = wait_until(
                lambda: consumer_state(scenario.endpoints)["ack_floor"] > acked_after,
                timeout_s=60,
                what="the aggregators committing on the new primary on their own",
            )
            scenario.details["aggregators_committing_after_promotion_s"] = round(reconnect_s, 3)
            load.progress()
            load.stop()
            scenario.details["during_fault"] = client_view(
                scenario.history, cut.started_at, time.time()
            )
            # Recovery: writes work on the new primary -> the state matches the oracle (before
            # the old primary is rebuilt; that only restores redundancy).
            first = scenario.verifier.observe(
                scenario.history, scenario.probe_ids, timeout_s=timeout_s
            )
            matched_at = (scenario.history.last_ok_at() or time.time()) + (
                first.convergence_s or 0.0
            )
            promoted_at = failover.fault.started_at + (failover.fault.effect_s or 0.0)
            scenario.details["recovery_s"] = (
                round(max(0.0, matched_at - promoted_at), 3) if first.valid else None
            )
        scenario.details["failover"] = failover.fault.to_dict()
    if not first.valid:  # lost events stay lost: no need to wait for them again
        scenario.details["wrong_windows"] = len(first.wrong())
        return first
    wait_until(
        lambda: all_ready(scenario.endpoints, *AGGREGATORS), timeout_s=60, what="aggregators ready"
    )
    # And once more with the old primary rebuilt as the standby.
    verdict = scenario.verifier.observe(scenario.history, scenario.probe_ids, timeout_s=60)
    scenario.details["counts"] = dict(verdict.counts)
    scenario.details["wrong_windows"] = len(verdict.wrong())
    return verdict


def test_failover_with_synchronous_replication(scenario: Scenario):
    """Zero acknowledged events lost across a crash of the primary; the aggregators reconnect
    to the promoted standby on their own; the old primary comes back as the new standby."""
    if not scenario.nemesis.stack.settings.sync_replication:
        pytest.skip("this stack runs asynchronous replication (see the seeded-config meta-test)")
    verdict = run_failover(scenario)
    assert verdict.valid, verdict.summary()
    assert (
        scenario.details["during_cut"]["acked_after"]
        == (scenario.details["during_cut"]["acked_before"])
    ), "events were acknowledged while the synchronous standby was unreachable"
