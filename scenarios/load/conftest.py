"""The load tests run on the scenarios' stack recreated with the load runs' healthcheck
interval (harness.load.LOAD_HEALTH_INTERVAL_S), restored afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest

from harness.load import LOAD_HEALTH_INTERVAL_S
from harness.stack import ComposeStack, ExternalStack


@pytest.fixture(scope="module", autouse=True)
def quiet_healthchecks(stack: ComposeStack | ExternalStack) -> Iterator[None]:
    if not isinstance(stack, ComposeStack):
        yield  # an external deployment's healthchecks are its own
        return
    usual = stack.settings
    stack.current_endpoints = stack.apply(  # type: ignore[attr-defined]
        replace(usual, health_interval_s=LOAD_HEALTH_INTERVAL_S)
    )
    try:
        yield
    finally:
        stack.current_endpoints = stack.apply(usual)  # type: ignore[attr-defined]
