"""Load: locust-driven probe traffic gated on SLOs (scenarios/load/slo.toml), ending with the
exactly-once verdict over every batch the locust workers sent.

CI runs a short steady run and a short chaos-under-load run (one fault); the other faults, the
step profile and the soak are marked `slow` (QOE_SOAK_SECONDS sets the soak's length).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness.load import LoadResult, LoadSpec, load_slo, run_load, run_step
from harness.nemesis.registry import named
from harness.pytest_plugin import VERDICT_KEY, Run
from harness.stack import Endpoints

pytestmark = pytest.mark.load

STEADY = LoadSpec(rate=1000, duration_s=20, batch_size=100, probes=10, targets=4)
CHAOS = LoadSpec(rate=1000, duration_s=30, batch_size=100, probes=10, targets=4)
CI_FAULT = "cut-ingest-nats"
# The named faults chaos under load is measured with (harness.nemesis.registry).
UNDER_LOAD = (
    "cut-ingest-nats",
    "cut-aggregator-nats",
    "cut-aggregator-postgres",
    "partition-nats",
    "latency-ingest-nats",
    "kill-ingest-1",
    "kill-aggregator-1",
    "kill-nats-2",
    "pause-aggregator-1",
    "pause-nats-2",
)


def finish(request: pytest.FixtureRequest, result: LoadResult) -> None:
    request.getfixturevalue("plot_history")(result.history)
    if result.verdict is not None:
        request.node.stash[VERDICT_KEY] = result.verdict
    assert result.ok, result.summary()


def test_steady_load(
    endpoints: Endpoints, run: Run, scenario_dir: Path, probe_prefix: str, request
) -> None:
    result = run_load(
        endpoints,
        STEADY,
        scenario_dir / "load",
        name="steady",
        prefix=f"{probe_prefix}L",
        slo=load_slo(profile="steady"),
        timeline=run.timeline,
    )
    finish(request, result)


@pytest.mark.chaos
@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(name, marks=() if name == CI_FAULT else pytest.mark.slow, id=name)
        for name in UNDER_LOAD
    ],
)
def test_chaos_under_load(
    fault: str,
    nemesis,
    endpoints: Endpoints,
    run: Run,
    scenario_dir: Path,
    probe_prefix: str,
    request,
) -> None:
    """The fault from 8 s to 16 s into the load: SLOs relaxed in the fault window (plus the
    grace), checked again after recovery; every acknowledged event counted exactly once."""
    result = run_load(
        endpoints,
        CHAOS,
        scenario_dir / "load",
        name=f"chaos {fault}",
        prefix=f"{probe_prefix}L",
        slo=load_slo(profile="chaos"),
        fault_slo=load_slo(profile="chaos.fault"),
        fault=lambda: named(fault).start(nemesis),
        fault_name=fault,
        fault_at_s=8,
        fault_for_s=8,
        timeline=run.timeline,
    )
    assert result.phases["fault"].batches > 0, "no load ran during the fault"
    finish(request, result)


@pytest.mark.slow
def test_soak(endpoints: Endpoints, run: Run, scenario_dir: Path, probe_prefix: str, request):
    spec = LoadSpec(
        rate=2000,
        duration_s=float(os.environ.get("QOE_SOAK_SECONDS", "600")),
        batch_size=200,
        probes=50,
        targets=5,
    )
    result = run_load(
        endpoints,
        spec,
        scenario_dir / "load",
        name="soak",
        prefix=f"{probe_prefix}L",
        slo=load_slo(profile="soak"),
        timeline=run.timeline,
    )
    finish(request, result)


@pytest.mark.slow
def test_step_finds_the_highest_rate_that_holds(
    endpoints: Endpoints, run: Run, scenario_dir: Path, probe_prefix: str, request
) -> None:
    step = run_step(
        endpoints,
        LoadSpec(rate=0, duration_s=15, batch_size=200, probes=20, targets=5),
        [1000, 2000, 4000, 8000, 16000, 32000],
        scenario_dir / "step",
        slo=load_slo(profile="step"),
        prefix=f"{probe_prefix}L",
        timeline=run.timeline,
    )
    if step.verdict is not None:
        request.node.stash[VERDICT_KEY] = step.verdict
    print(f"highest rate that held: {step.held_rate} ({step.held_events_per_s} events/s)")
    assert step.held_rate is not None, step.stages[0].summary()
    assert step.ok, step.verdict.summary() if step.verdict else ""
