"""The load tests run on the scenarios' stack recreated with the load runs' healthcheck
interval (harness.load.LOAD_HEALTH_INTERVAL_S), restored afterwards. Each takes `load_runs`
(LoadRuns): what its runs need, in one object."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from harness.checker import Verdict
from harness.history import History, Timeline
from harness.load import (
    LOAD_HEALTH_INTERVAL_S,
    LoadResult,
    LoadSpec,
    StepResult,
    load_slo,
    run_load,
    run_step,
)
from harness.nemesis import Nemesis
from harness.nemesis.registry import named
from harness.pytest_plugin import VERDICT_KEY, Run
from harness.stack import Endpoints, Reconfigurable, Stack


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


@dataclass(frozen=True)
class LoadRuns:
    """A load test's working set: the stack's endpoints, the scenario's folder its runs write
    into, the probe prefix of its events, the run's timeline, and the scenario's report (its
    picture and verdict). Its methods start the runs; SLO profiles are scenarios/load/slo.toml's."""

    endpoints: Endpoints
    scenario_dir: Path
    prefix: str
    timeline: Timeline
    plot: Callable[[History], None]  # draws a run's operations in the scenario's picture
    node: pytest.Item

    def steady(self, spec: LoadSpec, name: str, profile: str) -> LoadResult:
        """`spec` without a fault, gated by the SLO profile `profile`."""
        return self._load(spec, name, profile)

    def under_fault(
        self, spec: LoadSpec, name: str, fault: str, nemesis: Nemesis, at_s: float, for_s: float
    ) -> LoadResult:
        """`spec` with the named fault (harness.nemesis.registry) from `at_s` into the load for
        `for_s`: gated by the chaos profile, relaxed in the fault window (chaos.fault)."""
        return self._load(
            spec,
            name,
            "chaos",
            fault_slo=load_slo(profile="chaos.fault"),
            fault=lambda: named(fault).start(nemesis),
            fault_name=fault,
            fault_at_s=at_s,
            fault_for_s=for_s,
        )

    def _load(self, spec: LoadSpec, name: str, profile: str, **fault: Any) -> LoadResult:
        """`run_load` into the scenario's folder, with its prefix and timeline; `fault`, the
        fault's arguments of run_load (none: a run without one)."""
        return run_load(
            self.endpoints,
            spec,
            self.scenario_dir / "load",
            name=name,
            prefix=self.prefix,
            slo=load_slo(profile=profile),
            timeline=self.timeline,
            **fault,
        )

    def step(self, base: LoadSpec, rates: Sequence[float], profile: str) -> StepResult:
        """`base` at each of `rates` in turn until one breaks the SLO profile `profile`."""
        step = run_step(
            self.endpoints,
            base,
            rates,
            self.scenario_dir / "step",
            slo=load_slo(profile=profile),
            prefix=self.prefix,
            timeline=self.timeline,
        )
        self.record(step.verdict)
        return step

    def record(self, verdict: Verdict | None) -> None:
        """The run's exactly-once verdict into the scenario's report (none: not checked)."""
        if verdict is not None:
            self.node.stash[VERDICT_KEY] = verdict

    def finish(self, result: LoadResult) -> None:
        """The run drawn and its verdict recorded for the report; then its SLO gates and
        verdict must hold."""
        self.plot(result.history)
        self.record(result.verdict)
        assert result.ok, result.summary()


@pytest.fixture
def load_runs(
    endpoints: Endpoints,
    scenario_dir: Path,
    probe_prefix: str,
    run: Run,
    plot_history: Callable[[History], None],
    request: pytest.FixtureRequest,
) -> LoadRuns:
    """The load test's LoadRuns; its events' probes are the scenario's prefix and L."""
    return LoadRuns(
        endpoints, scenario_dir, f"{probe_prefix}L", run.timeline, plot_history, request.node
    )
