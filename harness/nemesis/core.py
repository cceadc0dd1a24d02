"""The fault skeleton every mechanism shares: a fault is a context manager that always heals,
also when the body fails or is interrupted, and is an operation of the nemesis process in the
run's History: its start, when it took effect (time to effect), when healing began and how long
it took. The context yields that `Fault`, whose clock the scenario reads.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from harness.history import Fault, History
from harness.polling import wait_until
from harness.stack import Endpoints, Stack

__all__ = ["Fault", "NemesisCore", "NemesisError", "seconds"]


class NemesisError(RuntimeError):
    """A fault could not be injected or healed; the message says what was expected and seen."""


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
    """One stack's faults and the history they are recorded in. Each mechanism
    (links, processes, postgres, ...) is a subclass adding its faults; `Nemesis` has them all."""

    def __init__(self, stack: Stack, endpoints: Endpoints, history: History) -> None:
        self.stack = stack
        self.endpoints = endpoints  # the harness's ways in (through Toxiproxy: they do not move)
        self.history = history  # the nemesis is one of its processes

    @property
    def faults(self) -> tuple[Fault, ...]:
        return self.history.faults()

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
        step and wait for `healed` (if given); the fault's clock is kept in the history."""
        fault = self.history.begin_fault(Fault(name=name, detail=detail, started_at=time.time()))
        began = time.monotonic()
        try:
            inject()
            if effect is not None:
                wait_until(effect, timeout_s=effect_timeout_s, what=f"{name} taking effect")
            fault.effect_s = time.monotonic() - began
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

    def _instant(self, name: str, detail: str, action: Callable[[], object]) -> float:
        """An action that is not a state (a move, a restart): a fault with no heal."""
        fault = self.history.begin_fault(Fault(name=name, detail=detail, started_at=time.time()))
        began = time.monotonic()
        try:
            action()
        finally:
            fault.ended_at = time.time()
        took = time.monotonic() - began
        fault.effect_s = took
        return took
