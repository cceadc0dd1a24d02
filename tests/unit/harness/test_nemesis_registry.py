"""The one registry of named faults: kebab-case names, one-line descriptions, each starting a
fault through the Nemesis method it names, and the capabilities each needs."""

from __future__ import annotations

import re
from contextlib import nullcontext
from types import SimpleNamespace

import pytest

from harness.nemesis.registry import FAULTS, named, schedulable
from harness.stack import ServiceControl


class RecordingNemesis:
    """Records the Nemesis method a named fault calls, and its arguments."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []

    def __getattr__(self, method: str):
        def call(*args, **kwargs):
            self.calls.append((method, args, kwargs))
            return nullcontext()

        return call


def test_names_are_kebab_case_and_descriptions_one_line():
    for name, fault in FAULTS.items():
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", name), name
        assert fault.name == name
        assert fault.description and "\n" not in fault.description, name


@pytest.mark.parametrize("name", list(FAULTS))
def test_each_fault_starts_through_the_nemesis(name):
    nemesis = RecordingNemesis()
    with FAULTS[name].start(nemesis):  # type: ignore[arg-type]
        pass
    assert nemesis.calls, f"{name} called no Nemesis method"


def test_named_faults_keep_their_meaning():
    def calls(name: str) -> list[tuple[str, tuple, dict]]:
        nemesis = RecordingNemesis()
        with FAULTS[name].start(nemesis):  # type: ignore[arg-type]
            pass
        return nemesis.calls

    assert calls("cut-ingest-nats") == [("cut", ("ingest-nats",), {})]
    assert calls("kill-aggregator-1") == [("kill", ("aggregator-1",), {})]  # back at once
    assert calls("down-aggregator-1") == [("killed", ("aggregator-1",), {})]  # down while held
    assert calls("latency-aggregator-postgres") == [
        ("latency", ("aggregator-postgres", 300, 100), {"stream": "both"})
    ]


def test_capabilities_a_stack_lacks_are_named():
    no_containers = SimpleNamespace(name="external")
    assert named("down-nats-2").missing(no_containers) == ["ServiceControl"]  # type: ignore[arg-type]
    assert named("cut-ingest-nats").missing(no_containers) == []  # type: ignore[arg-type]
    assert all(ServiceControl in FAULTS[n].needs for n in FAULTS if n.startswith(("kill", "down")))


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown fault 'cut ingest-nats'.*cut-ingest-nats"):
        named("cut ingest-nats")


def test_generated_schedules_draw_only_cheap_faults():
    assert set(schedulable()) == {n for n, f in FAULTS.items() if f.cheap}
    assert "partition-nats" not in schedulable()
