"""explore() and the live-shrink meta-test's checks, with a fake in place of the stack: a bug
that only one fault triggers is found and shrunk to that fault within the meta-test's budget
for every seed tried; the same seed replays the same schedules; and the meta-test's checks fail
when nothing failed, when the failure did not reproduce, or when it shrank to something else."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from harness.report import RunReport
from harness.schedule import Exploration, Schedule, explore
from scenarios.test_schedule_shrink import (
    MAX_EXAMPLES,
    SEARCH,
    SHRUNK,
    TRIGGER,
    assert_shrunk_to_the_cut,
)

Runner = Callable[[Schedule, int], dict[str, Any]]


def fails_on(fault: str, extra: int = 0) -> Runner:
    """A stack whose only bug shows whenever `fault` is scheduled: acknowledged events lost."""

    def run(schedule: Schedule, n: int) -> dict[str, Any]:
        lost = fault in schedule.faults()
        return {
            "schedule": schedule.describe(),
            "valid": not lost,
            "samples_lost": 10 if lost else 0,
            "samples_extra": extra if lost else 0,
            "summary": "INVALID: 1 of 2 windows wrong" if lost else "",
        }

    return run


def search(run: Runner, seed: int = 1) -> Exploration:
    return explore(SEARCH, run_seed=seed, max_examples=MAX_EXAMPLES, run=run)


def test_the_meta_tests_search_finds_and_shrinks_to_the_cut_for_every_seed():
    """Its budget holds: seeds 0-19 all find the trigger and shrink to it alone (the real
    run has the same search; only the stack decides which examples fail)."""
    runs = []
    for seed in range(20):
        exploration = search(fails_on(TRIGGER), seed)
        assert_shrunk_to_the_cut(exploration)
        found = exploration.examples_until_failure()
        assert found is not None and found <= MAX_EXAMPLES
        runs.append(len(exploration.tried))
    assert max(runs) <= 45, sorted(runs)  # the meta-test's docstring: about 20, 40 at most


def test_the_same_seed_replays_the_same_schedules():
    first, again = search(fails_on(TRIGGER), 7), search(fails_on(TRIGGER), 7)
    assert [t.schedule for t in first.tried] == [t.schedule for t in again.tried]
    assert [t.schedule for t in search(fails_on(TRIGGER), 8).tried] != [
        t.schedule for t in first.tried
    ]


def test_details_give_the_seed_the_shrunk_schedule_and_the_counts():
    exploration = search(fails_on(TRIGGER), 3)
    details = exploration.details()
    found = exploration.examples_until_failure()
    assert found is not None
    assert details["hypothesis_seed"] == 3
    assert details["smallest_failing_schedule"] == SHRUNK.describe()
    assert details["examples_until_failure"] == found
    assert details["first_failing_schedule"] == exploration.tried[found - 1].schedule.describe()
    assert details["examples_shrinking"] == len(exploration.tried) - found > 0
    assert len(details["examples"]) == len(exploration.tried)
    assert isinstance(exploration.failure, AssertionError)


def test_when_every_schedule_passes_the_meta_test_fails():
    exploration = search(fails_on("no such fault"))
    assert exploration.failure is None and exploration.shrunk() is None
    assert len(exploration.tried) == MAX_EXAMPLES
    assert "smallest_failing_schedule" not in exploration.details()
    with pytest.raises(AssertionError, match="none of the 12 generated schedules"):
        assert_shrunk_to_the_cut(exploration)


def test_a_failure_that_does_not_reproduce_fails_the_meta_test():
    failed_once: list[bool] = []
    honest = fails_on("no such fault")

    def once(schedule: Schedule, n: int) -> dict[str, Any]:
        if TRIGGER in schedule.faults() and not failed_once:
            failed_once.append(True)
            return fails_on(TRIGGER)(schedule, n)
        return honest(schedule, n)

    exploration = search(once)
    assert exploration.failure is not None and exploration.shrunk() is None
    with pytest.raises(AssertionError, match="did not fail again"):
        assert_shrunk_to_the_cut(exploration)


def test_shrinking_to_another_fault_fails_the_meta_test():
    with pytest.raises(AssertionError, match="expected Hypothesis to shrink to"):
        assert_shrunk_to_the_cut(search(fails_on("latency-aggregator-postgres")))


def test_events_counted_twice_fail_the_meta_test():
    with pytest.raises(AssertionError, match="none counted twice"):
        assert_shrunk_to_the_cut(search(fails_on(TRIGGER, extra=1)))


def test_an_example_that_raises_is_recorded_and_shrunk_like_a_wrong_verdict():
    def breaks(schedule: Schedule, n: int) -> dict[str, Any]:
        if TRIGGER in schedule.faults():
            raise TimeoutError("aggregator-1 not ready after 90 s")
        return fails_on("no such fault")(schedule, n)

    exploration = search(breaks)
    assert isinstance(exploration.failure, TimeoutError)
    shrunk = exploration.shrunk()
    assert shrunk is not None and shrunk.schedule == SHRUNK
    assert shrunk.result["summary"] == "raised TimeoutError: aggregator-1 not ready after 90 s"


@pytest.mark.parametrize("outcome", ["passed", "failed"])
def test_the_report_shows_the_shrunk_schedule_and_how_to_replay_it(tmp_path, outcome):
    details = search(fails_on(TRIGGER), 5).details()
    if outcome == "failed":
        details["longrepr"] = "AssertionError: schedule [cut-aggregator-postgres] ..."
    report = RunReport(tmp_path / "run", "run", 5)
    report.add_scenario("scenarios/test_schedule_shrink.py::test_x", outcome, 60.0, None, details)
    page = report.write().read_text()
    assert f"<code>{SHRUNK.describe()}</code>" in page
    assert "seed <code>5</code>" in page and "<code>--run-seed 5</code>" in page
    found = f"found after {details['examples_until_failure']} examples as <code>"
    assert found + f"{details['first_failing_schedule']}</code>" in page
