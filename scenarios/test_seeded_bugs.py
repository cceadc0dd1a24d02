"""Meta-tests: a harness that passes a broken stack is broken.

Each test switches on one seeded bug in the reference stack (QOE_SEEDED_BUGS), runs the
scenario that should catch it, and requires the harness's verdict to FAIL with a message that
names the wrong windows. The stack is restored to its defaults afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from harness import checker, ledger
from harness.history import Outcome
from harness.metrics import metric
from harness.nats_admin import JetStreamAdmin
from harness.nemesis import Nemesis
from harness.polling import wait_until
from harness.stack import Endpoints
from harness.workload import THRESHOLD_FIELDS
from scenarios.common import (
    ASYNCHRONOUS_REPLICATION,
    Scenario,
    assert_lost_without_the_standby,
    seeded_bug,
)
from scenarios.test_bad_input import PAST_CASE_EVENTS, send_bad_input_at_the_bounds
from scenarios.test_dedup import resend_after_a_cut_off_answer
from scenarios.test_e2e import send_every_timestamp_form
from scenarios.test_partitions import ingest_nats_partition

pytestmark = pytest.mark.meta


@seeded_bug("aggregator_no_dedup")
def test_aggregator_without_dedup_fails_the_cut_off_answer_scenario(
    reconfigured_stack: Endpoints, scenario: Scenario
) -> None:
    resend_after_a_cut_off_answer(
        scenario.client, scenario.endpoints, scenario.generator, scenario.nemesis
    )
    # The database equals the oracle until the resend is folded in: observe after that.
    JetStreamAdmin(scenario.endpoints.nats_urls).await_acknowledged(
        "the aggregators acknowledging the resend"
    )
    scenario.assert_caught(scenario.observe(timeout_s=10))


@seeded_bug("window_off_by_one")
def test_window_off_by_one_fails_the_boundary_scenario(
    reconfigured_stack: Endpoints, scenario: Scenario
) -> None:
    w = scenario.generator.window_seconds
    boundary = datetime.fromtimestamp(int(datetime.now(UTC).timestamp()) // w * w, UTC)
    batch = [
        replace(e, ts=boundary - timedelta(seconds=w * i))
        for i, e in enumerate(scenario.generator.batch(20))
    ]
    assert scenario.client.send(batch).outcome is Outcome.OK
    scenario.assert_caught(scenario.observe(timeout_s=10))


@seeded_bug("window_off_by_one")
def test_window_off_by_one_fails_the_ingest_nats_partition_scenario(
    reconfigured_stack: Endpoints, scenario: Scenario
) -> None:
    """Any fault scenario's workload puts events on window boundaries (EventGenerator's
    boundary_fraction): the partition scenario's final verdict must name the wrong windows."""
    with pytest.raises(AssertionError) as failed:
        # A correct stack matches within seconds of healing (test_partitions.py).
        ingest_nats_partition(
            scenario,
            verify_timeout_s=15,
        )
    message = str(failed.value)
    assert "window" in message and any(p in message for p in scenario.generator.probes), message


@seeded_bug("ingest_early_ack")
def test_ingest_acking_before_jetstream_fails_the_partition_scenario(
    reconfigured_stack: Endpoints, scenario: Scenario
) -> None:
    with scenario.nemesis.cut("ingest-nats"):
        op = scenario.client.send(scenario.generator.batch(100))
    # A correct ingest answers 503 here; the seeded one claims success for events it lost.
    assert op.outcome is Outcome.OK, f"expected the bug's early 202, got {op.status} {op.error}"
    scenario.assert_caught(scenario.observe(timeout_s=15))


@seeded_bug("aggregator_ack_before_commit")
def test_aggregator_acking_before_commit_fails_the_database_partition_scenario(
    reconfigured_stack: Endpoints, scenario: Scenario
) -> None:
    admin = JetStreamAdmin(scenario.endpoints.nats_urls)
    with scenario.nemesis.cut("aggregator-postgres"):
        assert scenario.client.send(scenario.generator.batch(200)).outcome is Outcome.OK
        # The seeded aggregator acknowledges what it could not commit; a correct one never does.
        admin.await_acknowledged(
            "the aggregators acknowledging the batch while the database is cut off"
        )
        for service in ("aggregator-1", "aggregator-2"):
            scenario.nemesis.kill(service, await_healthy=False)
    scenario.assert_caught(scenario.observe(timeout_s=15))


@seeded_bug("probe_drop_after_503")
def test_probe_dropping_batches_after_503_fails_the_probe_ledger_scenario(
    reconfigured_stack: Endpoints, nemesis: Nemesis
) -> None:
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


def caught_showing(
    signature: Callable[[checker.Verdict], bool],
    what: str,
    scenario: Scenario,
    timeout_s: float = 60,
) -> str:
    """The bug caught (`Scenario.assert_caught`, whose message is returned) by the verdict
    once it shows the bug's own signature. Until the aggregators and the diagnoser have
    caught up (slow on a busy machine) it is wrong for other reasons too, so it is polled
    until it is wrong in exactly the way the bug predicts."""
    probes = scenario.probe_ids
    seen: list[checker.Verdict] = []

    def shows() -> bool:
        # One reading each, not recorded: polling must not flood the run's timeline.
        seen[:] = [
            checker.check_database(
                scenario.history,
                scenario.verifier.endpoints.database_dsn,
                probes,
                scenario.verifier.endpoints.window_seconds,
                scenario.verifier.rules,
                timeout_s=0,
            )
        ]
        return signature(seen[0])

    wait_until(
        shows,
        timeout_s=timeout_s,
        interval_s=0.5,
        what=what,
        describe=lambda: seen[0].summary() if seen else "no verdict read",
    )
    verdict = scenario.observe(timeout_s=0)  # recorded for the report
    assert signature(verdict), verdict.summary()
    return scenario.assert_caught(verdict)


def wrong_targets(verdict: checker.Verdict) -> set[str]:
    return {w.key.target for w in verdict.wrong()}


@seeded_bug("ingest_offset_sign_ignored")
def test_ingest_ignoring_the_offset_sign_fails_the_timestamp_form_scenario(
    reconfigured_stack: Endpoints, scenario: Scenario
) -> None:
    """-hh:mm read as +hh:mm puts an event 2 x hh:mm early: a window missing where the event
    belongs and one nothing explains where it landed; -23:59 lands past the 24 h bound."""
    rejected = send_every_timestamp_form(scenario.client, scenario.generator)
    assert any("-23:59: HTTP 422" in r for r in rejected), rejected
    negative = {
        f"form {i} #1"
        for i, form in enumerate(scenario.generator.forms)
        if -1439 < form.offset_minutes < 0
    }

    def shifted(verdict: checker.Verdict) -> bool:
        problems = " ".join(w.problem for w in verdict.wrong())
        return wrong_targets(verdict) == negative and all(
            p in problems for p in ("window missing", "unexpected window")
        )

    caught_showing(
        shifted,
        f"the windows of the negative-offset forms ({sorted(negative)}), and only those, moved",
        scenario,
    )


@seeded_bug("diagnoser_threshold_inclusive")
def test_diagnoser_comparing_with_or_equal_fails_the_threshold_scenario(
    reconfigured_stack: Endpoints, scenario: Scenario
) -> None:
    """>= and <= diagnose exactly the four windows whose average is on a threshold."""
    assert scenario.client.send(scenario.generator.threshold_batch()).outcome is Outcome.OK
    on_a_threshold = {f"{kind} on #1" for kind in THRESHOLD_FIELDS}

    def diagnosed_on_the_threshold(verdict: checker.Verdict) -> bool:
        return wrong_targets(verdict) == on_a_threshold and all(
            "unexpected diagnosis" in w.problem and "is not" in w.problem for w in verdict.wrong()
        )

    caught_showing(
        diagnosed_on_the_threshold,
        f"diagnoses in exactly the windows {sorted(on_a_threshold)}",
        scenario,
    )


@seeded_bug("ingest_ts_bounds_in_whole_minutes")
def test_ingest_counting_whole_minutes_fails_the_bounds_scenario(
    reconfigured_stack: Endpoints, scenario: Scenario
) -> None:
    """Both time bounds a minute loose: the two cases one step past them are answered 202, and
    the one sent unrecorded (before now - 24 h) is stored whole: its day-old event a window
    nothing explains, its other events extra samples."""
    started = datetime.now(UTC)
    failures = send_bad_input_at_the_bounds(
        scenario.client, scenario.generator, scenario.endpoints.ingest_token
    )
    text = "\n".join(failures)
    assert len(failures) == 2, text
    assert failures[0].startswith("ts one step before now - 24 h: expected 422"), text
    assert failures[1].startswith("ts one step after now + 5 min: expected 422"), text
    day_ago = started - timedelta(hours=24)

    def the_past_case_stored(verdict: checker.Verdict) -> bool:
        # The bug lets the past case's whole batch in, sent unrecorded: its day-old event is a
        # window nothing explains, and its other events (generated times, up to a day old) are
        # extra samples, in windows of their own or beside recorded ones. Nothing else may be
        # wrong (until the rest have converged, other windows are too).
        wrong = verdict.wrong()
        extra = [
            (w.observed.samples if w.observed else 0) - (w.expected.samples if w.expected else 0)
            for w in wrong
        ]
        day_old = [
            w
            for w in wrong
            if w.expected is None
            and w.observed is not None
            and abs(w.key.window_start - day_ago) < timedelta(minutes=3)
        ]
        return bool(day_old) and all(n > 0 for n in extra) and sum(extra) == PAST_CASE_EVENTS

    message = caught_showing(
        the_past_case_stored,
        f"a day-old window nothing explains among {PAST_CASE_EVENTS} extra samples: the past "
        "case's batch stored, and nothing else wrong",
        scenario,
    )
    assert "unexpected window" in message


@pytest.mark.failover
@ASYNCHRONOUS_REPLICATION
def test_asynchronous_replication_fails_the_failover_scenario(
    reconfigured_stack,
    scenario: Scenario,
):
    """With asynchronous replication, commits acknowledged while the standby was cut off exist
    only on the crashed primary: the failover scenario must report the lost windows."""
    from scenarios.test_failover import run_failover

    # The honest stack matches within seconds of the promotion (test_failover.py); lost
    # events never come back, so a short wait is enough to call the verdict.
    verdict = run_failover(scenario, timeout_s=15)
    assert_lost_without_the_standby(scenario, verdict, "a stack with a seeded bug")


def test_meta_tests_restore_a_correct_stack(scenario: Scenario) -> None:
    """After the meta-tests the default stack is back: the same resend passes."""
    batch = scenario.generator.batch(100)
    for _ in range(2):
        assert scenario.client.send(batch).outcome is Outcome.OK
    scenario.verifier.verify(scenario.history, scenario.probe_ids)
