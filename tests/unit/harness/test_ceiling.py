"""The ceilings' pure parts: the events they store are valid by the contract, and the shares."""

from __future__ import annotations

from qoe.contract import decode_canonical

from harness.benchmark import shares_of
from harness.ceiling import Ceiling, event_payload


def test_ceiling_events_are_canonical_events_by_the_contract():
    for n in (1, 19, 20, 12345):
        event = decode_canonical(event_payload("run", n, 1_764_000_000.25))
        assert event.event_id == f"run.{n}"
        assert event.probe_id == f"run-p{n % 20}"


def test_a_ceiling_is_its_events_over_its_seconds():
    assert Ceiling("x", 1000, 0.5).events_per_s == 2000
    assert Ceiling("x", 0, 0.0).events_per_s == 0
    assert "3 not acknowledged" in Ceiling("x", 10, 1.0, errors=3).line()


def test_the_end_to_end_maximum_is_a_share_of_each_ceiling():
    ceilings = {"jetstream_publish": Ceiling("j", 20_000, 1.0), "aggregation": Ceiling("a", 0, 0)}
    assert shares_of(5_000, ceilings) == {"jetstream_publish": 0.25}
    assert shares_of(None, ceilings) == {}
