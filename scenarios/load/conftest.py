"""The load tests run on the scenarios' stack recreated with the load runs' healthcheck
interval (harness.load.LOAD_HEALTH_INTERVAL_S), restored afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest

from harness.load import LOAD_HEALTH_INTERVAL_S
from harness.stack import Reconfigurable, Stack


@pytest.fixture(scope="module", autouse=True)
def quiet_healthchecks(stack: Stack) -> Iterator[None]:
    if not isinstance(stack, Reconfigurable):
        yield  # a stack that cannot be reconfigured (a deployed one) keeps its healthchecks
        return
    usual = stack.settings
    stack.apply(replace(usual, health_interval_s=LOAD_HEALTH_INTERVAL_S))
    try:
        yield
    finally:
        stack.apply(usual)
