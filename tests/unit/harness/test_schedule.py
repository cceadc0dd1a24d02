"""Fault schedules: generated ones name real faults and round-trip as data, run_schedule applies
and heals them in order (also on failure), and a failing schedule shrinks to the smallest."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace

import pytest
from hypothesis import given, settings

from harness.nemesis import Fault
from harness.nemesis.registry import FAULTS, NamedFault, schedulable
from harness.schedule import (
    Schedule,
    Step,
    check_schedule,
    run_schedule,
    schedules,
)
from harness.stack import ServiceControl


class FakeNemesis:
    def __init__(self) -> None:
        self.log: list[str] = []


def fake_faults(
    log: list[str], fail_on: str | None = None, names: tuple[str, ...] = ("a", "b", "c")
) -> dict[str, NamedFault]:
    def factory(name: str):
        @contextmanager
        def fault(_nemesis):
            log.append(f"inject {name}")
            record = Fault(name=name, started_at=0.0)
            try:
                if name == fail_on:
                    raise RuntimeError(f"{name} failed")
                yield record
            finally:
                record.healed_at = 1.0
                log.append(f"heal {name}")

        return fault

    return {name: NamedFault(name, f"fake {name}", factory(name)) for name in names}


@given(schedules())
@settings(max_examples=50)
def test_generated_schedules_use_the_cheap_named_faults_and_round_trip(schedule: Schedule):
    check_schedule(schedule)
    assert schedule.faults() <= set(schedulable())
    assert 1 <= len(schedule.steps) <= 3
    assert all(1 <= len(step.faults) <= 2 for step in schedule.steps)
    assert Schedule.from_dict(schedule.to_dict()) == schedule
    assert schedule.describe()


def test_steps_are_validated():
    with pytest.raises(ValueError, match="at least one fault"):
        Step(())
    with pytest.raises(ValueError, match="twice"):
        Step(("a", "a"))
    with pytest.raises(ValueError, match="hold"):
        Step(("a",), hold=0)
    with pytest.raises(ValueError, match="unknown faults"):
        check_schedule(Schedule((Step(("no such fault",)),)))


def test_run_schedule_nests_each_step_and_heals_before_the_next():
    log: list[str] = []
    progress: list[int] = []
    schedule = Schedule((Step(("a", "b"), hold=2, gap=1), Step(("c",), hold=1, gap=0)))
    faults = run_schedule(
        schedule,
        FakeNemesis(),  # type: ignore[arg-type]
        lambda n: progress.append(n) or log.append(f"progress {n}"),
        fake_faults(log),
    )
    assert log == [
        "inject a",
        "inject b",
        "progress 2",
        "heal b",
        "heal a",
        "progress 1",
        "inject c",
        "progress 1",
        "heal c",
    ]
    assert [f.name for f in faults] == ["a", "b", "c"]


def test_a_step_heals_its_links_before_it_brings_processes_back():
    """Drawn as [link, process], applied as [process, link]: the link heals first, so the
    process comes back to a network it can reach (CI: an aggregator held down with its NATS
    link cut never came back ready while the cut held)."""
    log: list[str] = []
    faults = fake_faults(log, names=("a", "p"))
    faults["p"] = replace(faults["p"], needs=(ServiceControl,))  # a process fault
    run_schedule(
        Schedule((Step(("a", "p")),)),
        FakeNemesis(),  # type: ignore[arg-type]
        lambda n: None,
        faults,
    )
    assert log == ["inject p", "inject a", "heal a", "heal p"]


def test_a_failing_fault_still_heals_the_ones_already_in():
    log: list[str] = []
    with pytest.raises(RuntimeError, match="b failed"):
        run_schedule(
            Schedule((Step(("a", "b")),)),
            FakeNemesis(),  # type: ignore[arg-type]
            lambda n: None,
            fake_faults(log, fail_on="b"),
        )
    assert log == ["inject a", "inject b", "heal b", "heal a"]


def test_a_failing_schedule_shrinks_to_the_smallest():
    """The property fails whenever "down-aggregator-1" is scheduled: Hypothesis reports one
    step with just that fault, the shortest hold and no gap."""
    seen: list[Schedule] = []

    @given(schedules())
    @settings(max_examples=200, database=None, report_multiple_bugs=False)
    def survives(schedule: Schedule) -> None:
        if "down-aggregator-1" in schedule.faults():
            seen.append(schedule)
            raise AssertionError(schedule.describe())

    with pytest.raises(AssertionError):
        survives()
    assert seen[-1] == Schedule((Step(("down-aggregator-1",), hold=1, gap=0),))


def test_schedules_draw_from_the_registry():
    assert schedulable() and all(FAULTS[name].cheap for name in schedulable())
