"""Meta-test: generated fault schedules find a live seeded bug, and Hypothesis shrinks the
failing schedule to the one fault that triggers it.

With `aggregator_ack_before_commit` on, an aggregator acknowledges a batch before it commits
it and drops the batch when the commit fails. Cutting the aggregators' link to PostgreSQL
fails every commit tried during the cut: the cut held for one batch sent through it (a step's
hold counts batches sent after its faults, ScheduleRunner) loses acknowledged events.
None of the other faults drawn here makes a commit fail (latency on the same link only slows
it), so the search must find a schedule with the cut and shrink it to exactly
`[cut-aggregator-postgres] for 1 ops, then 0 ops`, whose verdict shows acknowledged events
lost and none counted twice; with the bug off, that schedule passes.

The faults are link faults only: a process fault (a SIGKILL or a pause of an aggregator) loses
a batch with this bug only if it lands between the ack and the commit, so a schedule with one
would fail by chance and not again when Hypothesis replays it. The cut together with
ingest's cut from NATS loses a batch only if one was stored in the moment between the two cuts
taking hold, which timing decides: such a schedule can fail in one run and pass in the next
with the same seed, and the shrinking path differs there, not the schedule it shrinks to.

Budget: up to MAX_EXAMPLES generated schedules; shrinking ends when Hypothesis finds nothing
smaller that fails, or after its own limit of 5 minutes of shrinking. Offline, with a fake
stack failing exactly when the cut is scheduled, seeds 0-99 all found it (after 4.5 examples
on average, 11 at most) and shrank to it, in 18 runs in all on average, 40 at most; for 26 of
them the first failing schedule was already the smallest (tests/unit/harness/
test_schedule_explore.py checks seeds 0-19). Live examples take 1-45 s each on this machine
(load average 5-100), so a long shrink can reach that limit; every example is recorded with
the seed in the scenario's details. Marked slow; its suite is `python -m harness run shrink`.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from harness.pytest_plugin import require
from harness.schedule import Exploration, Schedule, Step, Tried, explore, schedules
from harness.stack import Reconfigurable, StackSettings
from scenarios.test_fault_schedules import ScheduleRunner

pytestmark = [pytest.mark.meta, pytest.mark.slow]

BUG = "aggregator_ack_before_commit"
TRIGGER = "cut-aggregator-postgres"
# In registry order (shrinking moves towards the first); the trigger among the links around it.
POOL = (
    "cut-ingest-nats",
    "cut-aggregator-nats",
    "cut-diagnoser-nats",
    TRIGGER,
    "latency-aggregator-postgres",
    "bandwidth-aggregator-nats",
)
SEARCH = schedules(POOL, max_steps=2, max_faults=2, max_hold=3, max_gap=2)
MAX_EXAMPLES = 12
SHRUNK = Schedule((Step((TRIGGER,), hold=1, gap=0),))
# Once the aggregators have acknowledged everything (ScheduleRunner) only the diagnoser may lag,
# by a sweep (1 s); a failing example waits this long for nothing, so it decides how long a
# shrink takes (seed 1005 with 10 s: both runs reached Hypothesis's 5-minute shrink limit; with
# 5 s the shrink ended by itself, 229 s of search).
VERIFY_TIMEOUT_S = 5


def assert_shrunk_to_the_cut(exploration: Exploration) -> Tried:
    """The search found a failing schedule and Hypothesis shrank it to what the bug's
    mechanism predicts: the cut alone, at its smallest, losing acknowledged events."""
    assert exploration.examples_until_failure() is not None, (
        f"none of the {len(exploration.tried)} generated schedules (seed {exploration.seed}) "
        f"failed with {BUG} on: the search would pass this bug"
    )
    shrunk = exploration.shrunk()
    assert shrunk is not None, (
        f"the smallest failing schedule did not fail again when Hypothesis replayed it: "
        f"{exploration.failure!r}"
    )
    assert shrunk.schedule == SHRUNK, (
        f"expected Hypothesis to shrink to {SHRUNK.describe()} (the one fault that fails a "
        f"commit after the ack, at its smallest), got {shrunk.schedule.describe()}: "
        f"{shrunk.result['summary']}"
    )
    lost, extra = shrunk.result.get("samples_lost", 0), shrunk.result.get("samples_extra", 0)
    assert lost > 0 and extra == 0, (
        f"expected acknowledged events lost and none counted twice, got {lost} samples lost "
        f"and {extra} extra: {shrunk.result['summary']}"
    )
    return shrunk


@pytest.mark.parametrize(
    "reconfigured_stack", [StackSettings(seeded_bugs=(BUG,))], indirect=True, ids=[BUG]
)
def test_generated_schedules_shrink_to_the_cut_that_loses_acknowledged_batches(
    reconfigured_stack,
    stack,
    nemesis,
    endpoints,
    verifier,
    run,
    probe_prefix,
    scenario_details,
    plot_history,
):
    runner = ScheduleRunner(
        stack, endpoints, verifier, run.seed, probe_prefix, plot_history, VERIFY_TIMEOUT_S
    )
    exploration = explore(SEARCH, run_seed=run.seed, max_examples=MAX_EXAMPLES, run=runner)
    scenario_details.update(exploration.details())
    shrunk = assert_shrunk_to_the_cut(exploration)

    # The bug, not the harness, fails it: the same schedule passes on the correct stack.
    correct = require(stack, Reconfigurable, "seeded bugs need a reconfigurable stack").apply(
        StackSettings()
    )
    without_the_bug = replace(
        runner, endpoints=correct, verifier=replace(verifier, endpoints=correct)
    )
    result = without_the_bug(shrunk.schedule, len(exploration.tried) + 1)
    scenario_details["shrunk_schedule_without_the_bug"] = result
    assert result["valid"], f"{shrunk.schedule.describe()} fails without {BUG}: {result['summary']}"
