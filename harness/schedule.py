"""Fault schedules: faults composed into a sequence over a running workload (Jepsen's nemesis
generator), and Hypothesis strategies that generate them, so a failing schedule shrinks to the
smallest one that still fails.

A schedule is data (frozen dataclasses; `describe()` for reports, `to_dict()` for JSON). Time
in a schedule is counted in completed workload operations, not seconds: "hold this fault for
4 operations" means the same amount of traffic through the fault on a fast or a slow machine,
and nothing sleeps. `run_schedule` applies it through a Nemesis, healing every fault of a step
before the next (each fault heals itself, also when the run is interrupted). Faults are named
as in harness.nemesis.registry; generated schedules draw from its cheap ones. `explore` runs
generated schedules as Hypothesis examples, seeded, and keeps every example it ran and the
smallest failing schedule it shrank to, for the report.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, Phase, given, note, seed, settings
from hypothesis import strategies as st

from harness.nemesis import Fault, Nemesis
from harness.nemesis.registry import FAULTS, LINK, NamedFault, schedulable


@dataclass(frozen=True)
class Step:
    """Faults applied together, held for `hold` completed operations, then healed; then `gap`
    more operations before the next step."""

    faults: tuple[str, ...]
    hold: int = 3
    gap: int = 1

    def __post_init__(self) -> None:
        if not self.faults:
            raise ValueError("a step needs at least one fault")
        if len(set(self.faults)) != len(self.faults):
            raise ValueError(f"a step names a fault twice: {self.faults}")
        if self.hold < 1 or self.gap < 0:
            raise ValueError(f"hold must be >= 1 and gap >= 0, got {self.hold}, {self.gap}")

    def describe(self) -> str:
        return f"[{' + '.join(self.faults)}] for {self.hold} ops, then {self.gap} ops"


@dataclass(frozen=True)
class Schedule:
    steps: tuple[Step, ...]

    def describe(self) -> str:
        return "; ".join(step.describe() for step in self.steps) or "(no faults)"

    def faults(self) -> set[str]:
        return {name for step in self.steps for name in step.faults}

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": [{"faults": list(s.faults), "hold": s.hold, "gap": s.gap} for s in self.steps]
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Schedule:
        return cls(
            tuple(
                Step(tuple(s["faults"]), int(s.get("hold", 3)), int(s.get("gap", 1)))
                for s in d["steps"]
            )
        )


def check_schedule(schedule: Schedule, faults: Mapping[str, NamedFault] = FAULTS) -> None:
    unknown = schedule.faults() - set(faults)
    if unknown:
        raise ValueError(f"unknown faults {sorted(unknown)}; the named faults are {sorted(faults)}")


def run_schedule(
    schedule: Schedule,
    nemesis: Nemesis,
    progress: Callable[[int], object],
    faults: Mapping[str, NamedFault] = FAULTS,
) -> list[Fault]:
    """Apply the schedule while a workload runs. `progress(n)` must return once the workload
    has completed n more operations. Returns the faults, in order, with their timings.

    A step's faults heal in the reverse order they were applied, and its link faults are
    applied last, so healed first: a process brought back must reach what it needs (an
    aggregator held down and its NATS link cut could not come back ready while the cut held).
    """
    check_schedule(schedule, faults)
    done: list[Fault] = []
    for step in schedule.steps:
        with ExitStack() as held:
            for name in sorted(step.faults, key=lambda n: faults[n].needs == LINK):
                fault = held.enter_context(faults[name].start(nemesis))
                if isinstance(fault, Fault):
                    done.append(fault)
            progress(step.hold)
        if step.gap:
            progress(step.gap)
    return done


def steps(
    names: Sequence[str] | None = None,
    max_faults: int = 2,
    max_hold: int = 6,
    max_gap: int = 3,
) -> st.SearchStrategy[Step]:
    """Steps over the named faults (default: the cheap ones); shrinks towards one fault, short
    holds, no gap."""
    pool = tuple(names if names is not None else schedulable())
    return st.builds(
        Step,
        # Not unique=True: plain lists shrink better (elements delete); repeats are dropped.
        faults=st.lists(st.sampled_from(pool), min_size=1, max_size=max_faults).map(
            lambda names: tuple(dict.fromkeys(names))
        ),
        hold=st.integers(1, max_hold),
        gap=st.integers(0, max_gap),
    )


def schedules(
    names: Sequence[str] | None = None,
    max_steps: int = 3,
    max_faults: int = 2,
    max_hold: int = 6,
    max_gap: int = 3,
) -> st.SearchStrategy[Schedule]:
    """Random schedules of faults and heals; shrink towards fewer, simpler steps."""
    return st.lists(
        steps(names, max_faults, max_hold, max_gap), min_size=1, max_size=max_steps
    ).map(lambda s: Schedule(tuple(s)))


Example = Mapping[str, Any]  # what running one schedule reported: "valid", "summary" and more


@dataclass(frozen=True)
class Tried:
    """One example Hypothesis ran: the schedule and what running it reported."""

    schedule: Schedule
    result: Example

    @property
    def valid(self) -> bool:
        return bool(self.result["valid"])


@dataclass(frozen=True)
class Exploration:
    """A seeded search over generated schedules: every example in the order Hypothesis ran
    them, and what the search ended with (None: every schedule passed)."""

    seed: int
    max_examples: int
    tried: tuple[Tried, ...]
    failure: Exception | None
    took_s: float

    def examples_until_failure(self) -> int | None:
        """How many examples it took to find a failing schedule (None: none failed)."""
        return next((i for i, t in enumerate(self.tried, 1) if not t.valid), None)

    def shrunk(self) -> Tried | None:
        """The smallest failing schedule: Hypothesis runs the one it shrank to last, to report
        it. None when nothing failed, or when that last run passed (Hypothesis then reports
        the failure as flaky: it did not reproduce)."""
        if self.failure is None or not self.tried or self.tried[-1].valid:
            return None
        return self.tried[-1]

    def details(self) -> dict[str, Any]:
        """For the scenario's details (summary.json, and the report's line on the shrunk
        schedule)."""
        found = self.examples_until_failure()
        shrunk = self.shrunk()
        return {
            "hypothesis_seed": self.seed,
            "max_examples": self.max_examples,
            "examples": [dict(t.result) for t in self.tried],
            "examples_until_failure": found,
            **(
                {"first_failing_schedule": self.tried[found - 1].schedule.describe()}
                if found
                else {}
            ),
            # Hypothesis's replays included: the failure once more before shrinking, and the
            # shrunk schedule once more at the end.
            "examples_shrinking": len(self.tried) - found if found else 0,
            "search_s": self.took_s,
            **({"smallest_failing_schedule": shrunk.schedule.describe()} if shrunk else {}),
        }


def explore(
    strategy: st.SearchStrategy[Schedule],
    *,
    run_seed: int,
    max_examples: int,
    run: Callable[[Schedule, int], Example],
) -> Exploration:
    """Run up to `max_examples` generated schedules, `run(schedule, n)` each (n counts from 1),
    until one reports `valid` false or raises; Hypothesis then shrinks it. Seeded by the run
    seed, so `--run-seed` replays the same schedules. The failure is returned, not raised:
    a scenario raises it, a meta-test expects it."""
    tried: list[Tried] = []
    started = time.monotonic()

    @seed(run_seed)
    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,  # nothing carried over from earlier runs: the seed alone decides
        suppress_health_check=list(HealthCheck),
        phases=(Phase.explicit, Phase.generate, Phase.shrink),
        report_multiple_bugs=False,
    )
    @given(strategy)
    def keeps_exactly_once(schedule: Schedule) -> None:
        note(f"schedule: {schedule.describe()} (seed {run_seed}: --run-seed {run_seed})")
        try:
            result = run(schedule, len(tried) + 1)
        except Exception as error:  # recorded like a wrong verdict; Hypothesis shrinks both
            tried.append(Tried(schedule, _raised(schedule, error)))
            raise
        tried.append(Tried(schedule, result))
        assert result["valid"], f"schedule {schedule.describe()}: {result['summary']}"

    failure: Exception | None = None
    try:
        keeps_exactly_once()
    except Exception as error:
        failure = error
    return Exploration(
        run_seed, max_examples, tuple(tried), failure, round(time.monotonic() - started, 1)
    )


def _raised(schedule: Schedule, error: Exception) -> Example:
    return {
        "schedule": schedule.describe(),
        "valid": False,
        "summary": f"raised {type(error).__name__}: {error}",
    }
