"""Fault schedules: faults composed into a sequence over a running workload (Jepsen's nemesis
generator), and Hypothesis strategies that generate them, so a failing schedule shrinks to the
smallest one that still fails.

A schedule is data (frozen dataclasses; `describe()` for reports, `to_dict()` for JSON). Time
in a schedule is counted in completed workload operations, not seconds: "hold this fault for
4 operations" means the same amount of traffic through the fault on a fast or a slow machine,
and nothing sleeps. `run_schedule` applies it through a Nemesis, healing every fault of a step
before the next (each fault heals itself, also when the run is interrupted). Faults are named
as in harness.nemesis.registry; generated schedules draw from its cheap ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

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
