"""Load runs measure the platform, not Docker: on a small machine the 1 s healthchecks of the
scenarios' stack (one `docker exec` per container per second) take most of a core."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest

from harness.stack import ComposeStack, ExternalStack

LOAD_HEALTH_INTERVAL_S = 10  # as `python -m harness benchmark`


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
