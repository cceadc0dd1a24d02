"""Meta-tests: a harness that passes a broken stack is broken.

Each test switches on one seeded bug in the reference stack (QOE_SEEDED_BUGS), runs the
scenario that should catch it, and requires the harness's verdict to FAIL with a message that
names the wrong windows. The stack is restored to its defaults afterwards.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from harness import checker, ledger
from harness.history import History, Outcome
from harness.metrics import metric
from harness.nats_admin import JetStreamAdmin
from harness.polling import wait_until
from harness.stack import Endpoints, StackSettings
from harness.workload import EventGenerator, IngestClient
from scenarios.test_dedup import resend_after_a_cut_off_answer
from scenarios.test_partitions import ingest_nats_partition

pytestmark = pytest.mark.meta


def bug(name: str):
    return pytest.mark.parametrize(
        "reconfigured_stack", [StackSettings(seeded_bugs=(name,))], indirect=True, ids=[name]
    )


def assert_caught(verdict: checker.Verdict, generator: EventGenerator) -> str:
    """The verdict is invalid and its message names at least one of this scenario's windows."""
    message = verdict.summary()
    assert not verdict.valid, "the harness passed a stack with a seeded bug"
    assert any(probe in message for probe in generator.probes), message
    return message


@bug("aggregator_no_dedup")
def test_aggregator_without_dedup_fails_the_cut_off_answer_scenario(
    reconfigured_stack, endpoints, client: IngestClient, generator, nemesis, verifier, history
):
    resend_after_a_cut_off_answer(client, endpoints, generator, nemesis)
    # The database equals the oracle until the resend is folded in: observe after that.
    JetStreamAdmin(endpoints.nats_urls).await_acknowledged(
        "the aggregators acknowledging the resend"
    )
    assert_caught(verifier.observe(history, list(generator.probes), timeout_s=10), generator)


@bug("window_off_by_one")
def test_window_off_by_one_fails_the_boundary_scenario(
    reconfigured_stack, client: IngestClient, generator, verifier, history
):
    w = generator.window_seconds
    boundary = datetime.fromtimestamp(int(datetime.now(UTC).timestamp()) // w * w, UTC)
    batch = [
        replace(e, ts=boundary - timedelta(seconds=w * i))
        for i, e in enumerate(generator.batch(20))
    ]
    assert client.send(batch).outcome is Outcome.OK
    assert_caught(verifier.observe(history, list(generator.probes), timeout_s=10), generator)


@bug("window_off_by_one")
def test_window_off_by_one_fails_the_ingest_nats_partition_scenario(
    reconfigured_stack, endpoints, client, generator, nemesis, verifier, history, scenario_details
):
    """Any fault scenario's workload puts events on window boundaries (EventGenerator's
    boundary_fraction): the partition scenario's final verdict must name the wrong windows."""
    with pytest.raises(AssertionError) as failed:
        # A correct stack matches within seconds of healing (test_partitions.py).
        ingest_nats_partition(
            client,
            generator,
            endpoints,
            nemesis,
            verifier,
            history,
            scenario_details,
            verify_timeout_s=15,
        )
    message = str(failed.value)
    assert "window" in message and any(p in message for p in generator.probes), message


@bug("ingest_early_ack")
def test_ingest_acking_before_jetstream_fails_the_partition_scenario(
    reconfigured_stack, client: IngestClient, generator, nemesis, verifier, history
):
    with nemesis.cut("ingest-nats"):
        op = client.send(generator.batch(100))
    # A correct ingest answers 503 here; the seeded one claims success for events it lost.
    assert op.outcome is Outcome.OK, f"expected the bug's early 202, got {op.status} {op.error}"
    assert_caught(verifier.observe(history, list(generator.probes), timeout_s=15), generator)


@bug("aggregator_ack_before_commit")
def test_aggregator_acking_before_commit_fails_the_database_partition_scenario(
    reconfigured_stack, endpoints, client: IngestClient, generator, nemesis, verifier, history
):
    admin = JetStreamAdmin(endpoints.nats_urls)
    with nemesis.cut("aggregator-postgres"):
        assert client.send(generator.batch(200)).outcome is Outcome.OK
        # The seeded aggregator acknowledges what it could not commit; a correct one never does.
        admin.await_acknowledged(
            "the aggregators acknowledging the batch while the database is cut off"
        )
        for service in ("aggregator-1", "aggregator-2"):
            nemesis.kill(service, await_healthy=False)
    assert_caught(verifier.observe(history, list(generator.probes), timeout_s=15), generator)


@bug("probe_drop_after_503")
def test_probe_dropping_batches_after_503_fails_the_probe_ledger_scenario(
    reconfigured_stack: Endpoints, nemesis
):
    probes = {n: url for n, url in reconfigured_stack.services.items() if n.startswith("probe-")}
    ledger.start(probes)
    with nemesis.cut("ingest-nats"):
        # Ingest answers 503 once JetStream cannot acknowledge within its publish timeout.
        wait_until(
            lambda: sum(
                metric(url, "qoe_probe_posts_total", outcome="dropped") for url in probes.values()
            ),
            timeout_s=60,
            what="a probe meeting a 503 from ingest",
        )
    status = ledger.stop_and_drain(probes, timeout_s=20)
    ledger.start(probes)
    assert ledger.undelivered(status), f"the probes' ledgers show nothing lost: {status}"


@pytest.mark.failover
@pytest.mark.parametrize(
    "reconfigured_stack",
    [StackSettings(sync_replication=False)],
    indirect=True,
    ids=["asynchronous_replication"],
)
def test_asynchronous_replication_fails_the_failover_scenario(
    reconfigured_stack,
    probes_stopped,
    client,
    generator,
    nemesis,
    verifier,
    history,
    scenario_details,
):
    """With asynchronous replication, commits acknowledged while the standby was cut off exist
    only on the crashed primary: the failover scenario must report the lost windows."""
    from scenarios.test_failover import run_failover

    # The honest stack matches within seconds of the promotion (test_failover.py); lost
    # events never come back, so a short wait is enough to call the verdict.
    verdict = run_failover(
        client,
        generator,
        reconfigured_stack,
        nemesis,
        verifier,
        history,
        scenario_details,
        timeout_s=15,
    )
    # The events really were committed and acknowledged without the standby...
    cut = scenario_details["during_cut"]
    assert cut["acked_after"] > cut["acked_before"] and cut["stored_on_primary"] > 0, cut
    # ...and the harness names the windows that lost them.
    message = assert_caught(verdict, generator)
    assert any(w.observed is None or w.problem for w in verdict.wrong()), message


def test_meta_tests_restore_a_correct_stack(
    client: IngestClient, generator, verifier, history: History
):
    """After the meta-tests the default stack is back: the same resend passes."""
    batch = generator.batch(100)
    for _ in range(2):
        assert client.send(batch).outcome is Outcome.OK
    verifier.verify(history, list(generator.probes))
