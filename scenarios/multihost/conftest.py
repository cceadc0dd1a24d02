"""The multihost scenarios need a stack spread over Docker hosts of its own (the swarm
backend, `--stack swarm`); on any other stack they are skipped, saying why."""

from __future__ import annotations

import pytest

from harness.nemesis.hosts import MultiHost
from harness.pytest_plugin import require
from harness.stack import Stack


@pytest.fixture
def spread(stack: Stack) -> MultiHost:
    """The stack, as one whose services run on hosts the host faults can reach."""
    return require(stack, MultiHost, "host faults need hosts of their own (--stack swarm)")
