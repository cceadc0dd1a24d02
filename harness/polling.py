"""Waiting for the system without fixed sleeps: poll a condition until it holds or a deadline passes."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class DeadlineExceeded(AssertionError):
    """The condition did not hold before the deadline; the message says what was awaited and the last state seen."""


def wait_until(
    check: Callable[[], T | None],
    *,
    timeout_s: float,
    what: str,
    interval_s: float = 0.05,
    describe: Callable[[], str] | None = None,
) -> tuple[T, float]:
    """Poll `check` until it returns a truthy value; return (value, seconds waited). The
    value is never None (a check may return None for "not yet").

    Exceptions raised by `check` count as "not yet" (the system may still be starting), and
    the last one is quoted if the deadline passes.
    """
    started = time.monotonic()
    last_error: BaseException | None = None
    while True:
        try:
            value = check()
            if value:
                return value, time.monotonic() - started
            last_error = None
        except Exception as error:  # the system under test may refuse until it is ready
            last_error = error
        if time.monotonic() - started > timeout_s:
            seen = f"; last error: {last_error!r}" if last_error else ""
            state = f"; last state: {describe()}" if describe else ""
            raise DeadlineExceeded(f"{what}: not reached within {timeout_s:.1f} s{seen}{state}")
        time.sleep(interval_s)
