"""Shared fixtures for the reference services' unit tests (pure: no network, no docker)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from qoe import bugs

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def no_seeded_bugs() -> Iterator[None]:
    """Every test starts with no seeded bug unless it turns one on itself."""
    bugs.reset(frozenset())
    yield
    bugs.reset(frozenset())


def make_event(**overrides: Any) -> dict[str, Any]:
    """A valid wire event at NOW; override any field."""
    event: dict[str, Any] = {
        "event_id": "probe-1:boot:1",
        "probe_id": "probe-1",
        "target": "example.com",
        "ts": "2024-05-01T12:00:00.000000Z",
        "rtt_ms": 42.5,
        "jitter_ms": 3.0,
        "loss_pct": 0.1,
        "throughput_kbps": 12000,
    }
    event.update(overrides)
    return event
