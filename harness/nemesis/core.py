"""The fault skeleton every mechanism shares: a fault is a context manager that always heals,
also when the body fails or is interrupted, and records in the run timeline (source "nemesis")
its start, when it took effect (duration_s = time to effect), when it was healed (duration_s =
time to heal) and the whole fault as a band. The context yields a `Fault` the scenario reads
those times from.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from harness.history import Mark, Timeline
from harness.polling import wait_until
from harness.stack import Endpoints, Stack


class NemesisError(RuntimeError):
    """A fault could not be injected or healed; the message says what was expected and seen."""


@dataclass
class Fault:
    """One injected fault: what, and its clock (seconds; None until it happened)."""

    name: str
    detail: str = ""
    started_at: float = 0.0  # time.time() when injection began
    effect_s: float | None = None  # injection start -> the fault observably in effect
    healed_at: float | None = None  # time.time() when healing began
    heal_s: float | None = None  # healing start -> healed (e.g. the service healthy again)
    ended_at: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def duration_s(self) -> float | None:
        return None if self.ended_at is None else self.ended_at - self.started_at

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "detail": self.detail,
            "started_at": self.started_at,
            "effect_s": self.effect_s,
            "healed_at": self.healed_at,
            "heal_s": self.heal_s,
            "duration_s": self.duration_s,
            **({"notes": self.notes} if self.notes else {}),
        }


def _run_all(steps: Sequence[Callable[[], object]]) -> None:
    """Run every step even if some fail; then raise the first failure."""
    errors: list[BaseException] = []
    for step in steps:
        try:
            step()
        except Exception as error:  # keep healing the rest
            errors.append(error)
    if errors:
        raise errors[0]


def seconds(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}s"


class NemesisCore:
    """One stack's faults and the run's timeline they are recorded in. Each mechanism
    (links, processes, postgres, ...) is a subclass adding its faults; `Nemesis` has them all."""

    def __init__(self, stack: Stack, endpoints: Endpoints, timeline: Timeline) -> None:
        self.stack = stack
        self.endpoints = endpoints  # the harness's ways in (through Toxiproxy: they do not move)
        self.timeline = timeline
        self.faults: list[Fault] = []

    @contextmanager
    def fault(
        self,
        name: str,
        detail: str,
        inject: Callable[[], object],
        heal: Sequence[Callable[[], object]],
        *,
        effect: Callable[[], object] | None = None,
        effect_timeout_s: float = 30.0,
        healed: Callable[[], object] | None = None,
        heal_timeout_s: float = 120.0,
    ) -> Iterator[Fault]:
        """Inject, wait for `effect` (if given), run the body, then always run every `heal`
        step and wait for `healed` (if given). Marks: start, effective, healed, and the band."""
        fault = Fault(name=name, detail=detail, started_at=time.time())
        self.faults.append(fault)
        self.timeline.append(Mark(fault.started_at, "nemesis", f"{name} start", detail))
        began = time.monotonic()
        try:
            inject()
            if effect is not None:
                wait_until(effect, timeout_s=effect_timeout_s, what=f"{name} taking effect")
            fault.effect_s = time.monotonic() - began
            self.timeline.append(
                Mark(time.time(), "nemesis", f"{name} effective", detail, fault.effect_s)
            )
            yield fault
        finally:
            fault.healed_at = time.time()
            healing = time.monotonic()
            try:
                _run_all(heal)
                if healed is not None:
                    wait_until(healed, timeout_s=heal_timeout_s, what=f"{name} healed")
                fault.heal_s = time.monotonic() - healing
            finally:
                fault.ended_at = time.time()
                self.timeline.append(
                    Mark(fault.healed_at, "nemesis", f"{name} healed", detail, fault.heal_s)
                )
                self.timeline.append(
                    Mark(
                        fault.started_at,
                        "nemesis",
                        name,
                        f"{detail}; effect {seconds(fault.effect_s)}, heal {seconds(fault.heal_s)}",
                        duration_s=fault.ended_at - fault.started_at,
                    )
                )

    def _instant(self, name: str, detail: str, action: Callable[[], object]) -> float:
        """An action that is not a state (a move, a restart): one band of its duration."""
        started, began = time.time(), time.monotonic()
        action()
        took = time.monotonic() - began
        self.timeline.append(Mark(started, "nemesis", name, detail, duration_s=took))
        return took
