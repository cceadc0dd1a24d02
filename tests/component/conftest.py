"""Component fixtures: one real PostgreSQL and one real NATS from the stack's images."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness import containers
from harness.containers import Service


@pytest.fixture(scope="module")
def postgres_service(run) -> Iterator[Service]:
    with containers.postgres(run.run_id) as service:
        yield service


@pytest.fixture(scope="module")
def nats_service(run) -> Iterator[Service]:
    with containers.nats_server(run.run_id) as service:
        yield service
