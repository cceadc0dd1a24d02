"""Generated fault schedules (Hypothesis) under load: after each schedule the state must equal
the oracle; a failing schedule shrinks to the smallest one that still fails.

Budget: 2 schedules by default and in CI (profile "ci"), 20 with
`--hypothesis-profile thorough`. The examples are drawn from the run seed, so
`--run-seed N` replays the same schedules; the seed and every schedule tried are in the
scenario's details in summary.json. `ScheduleRunner` (one schedule as one example) is shared
with the meta-test that shrinks a schedule on a live seeded bug (test_schedule_shrink.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest
from hypothesis import settings

from harness.checker import Verdict
from harness.history import History
from harness.nats_admin import JetStreamAdmin
from harness.nemesis import Nemesis
from harness.polling import wait_until
from harness.pytest_plugin import Run, Verifier
from harness.schedule import Schedule, Step, explore, run_schedule, schedules
from harness.stack import Endpoints, Stack
from harness.workload import EventGenerator, IngestClient
from scenarios.common import Workload, client_view, workload

pytestmark = pytest.mark.chaos


def _budget() -> int:
    # The loaded profile decides: "thorough" explores, anything else keeps CI short.
    return 20 if getattr(settings, "_current_profile", None) == "thorough" else 2


@dataclass(frozen=True)
class ScheduleRunner:
    """Runs one schedule as one example: its own probes, client, workload (50-event batches,
    5 a second) and history, the schedule applied while the workload runs, then the
    exactly-once verdict over its probes. Returns what the report shows of the example."""

    stack: Stack
    endpoints: Endpoints
    verifier: Verifier
    run_seed: int
    prefix: str  # the scenario's probe prefix; each example adds its number
    plot: Callable[[History], None]  # draws the example in the scenario's picture
    verify_timeout_s: float = 90

    def __call__(self, schedule: Schedule, n: int) -> dict[str, Any]:
        history = History()
        self.plot(history)
        # The example's own nemesis: its faults in the example's history, beside its operations.
        nemesis = Nemesis(self.stack, self.endpoints, history)
        generator = EventGenerator(
            seed=self.run_seed + n,
            run_prefix=f"{self.prefix}s{n}",
            probes=[f"{self.prefix}s{n}-p{i}" for i in range(2)],
            targets=["cdn.example.net", "voip.example.net"],
            window_seconds=self.endpoints.window_seconds,
        )
        started = time.time()
        with IngestClient(
            self.endpoints.ingest_urls,
            self.endpoints.ingest_token,
            history,
            process=f"schedule-{n}",
        ) as client:
            with workload(client, generator, batch_size=50) as load:
                load.progress()
                run_schedule(schedule, nemesis, partial(sent_and_answered, load))
                load.stop()
            client.settle(deadline_s=90)
        # Aggregators acknowledge a batch only once it is committed, so from here on the
        # database holds every acknowledged event: a short verify timeout is then enough for a
        # schedule that lost some (the meta-test's failing examples wait no longer than that).
        JetStreamAdmin(self.endpoints.nats_urls).await_acknowledged(
            f"the aggregators acknowledging everything schedule {n} stored", timeout_s=90
        )
        verdict = self.verifier.observe(history, list(generator.probes), self.verify_timeout_s)
        return {
            "schedule": schedule.describe(),
            "valid": verdict.valid,
            "duration_s": round(time.time() - started, 2),
            "recovery_s": history.recovery_s(verdict.convergence_s) if verdict.valid else None,
            "clients_saw": client_view(history, started, time.time()),
            **samples_off(verdict),
            "summary": verdict.summary() if not verdict.valid else "",
        }


def sent_and_answered(load: Workload, more: int) -> None:
    """Return once `more` operations sent from now on have been answered: a step holds its
    faults for traffic sent through them, not for an answer already on its way (a batch
    stored before a cut of aggregator -> PostgreSQL and answered during it never meets it)."""
    since = time.time()
    wait_until(
        lambda: sum(op.invoked_at >= since for op in load.sent) >= more,
        timeout_s=90,
        what=f"{more} more batches sent and answered",
    )


def samples_off(verdict: Verdict) -> dict[str, int]:
    """Samples the wrong windows hold fewer than the oracle allows (acknowledged events lost)
    and more (counted twice, or moved in)."""
    lost = extra = 0
    for w in verdict.wrong():
        low, high = w.expected_samples or ((w.expected.samples,) * 2 if w.expected else (0, 0))
        observed = w.observed.samples if w.observed else 0
        lost += max(0, low - observed)
        extra += max(0, observed - high)
    return {"samples_lost": lost, "samples_extra": extra}


@pytest.fixture
def schedule_runner(
    nemesis: Nemesis,
    endpoints: Endpoints,
    verifier: Verifier,
    run: Run,
    probe_prefix: str,
    plot_history: Callable[[History], None],
) -> ScheduleRunner:
    """The scenario's ScheduleRunner: on its stack, from the run seed, with its probe prefix
    and picture. Through the nemesis fixture: a stack without process control skips it, and
    the consumer lag is sampled for the report meanwhile."""
    return ScheduleRunner(nemesis.stack, endpoints, verifier, run.seed, probe_prefix, plot_history)


@pytest.mark.slow
def test_a_fixed_schedule(
    schedule_runner: ScheduleRunner, scenario_details: dict[str, Any]
) -> None:
    """A hand-written sequence (Jepsen's timed nemesis): link faults, then process faults."""
    schedule = Schedule(
        (
            Step(("cut-ingest-nats", "latency-aggregator-postgres"), hold=3, gap=1),
            Step(("down-aggregator-1", "response-cut-off-harness-ingest"), hold=3, gap=1),
            Step(("cut-aggregator-nats", "pause-diagnoser"), hold=3, gap=0),
        )
    )
    result = schedule_runner(schedule, 0)
    scenario_details["examples"] = [result]
    scenario_details["recovery_s"] = result["recovery_s"]
    assert result["valid"], f"schedule {result['schedule']}: {result['summary']}"


def test_generated_fault_schedules(
    schedule_runner: ScheduleRunner, scenario_details: dict[str, Any]
) -> None:
    """Random schedules of faults and heals; each must end with the state equal to the oracle."""
    exploration = explore(
        schedules(),
        run_seed=schedule_runner.run_seed,
        max_examples=_budget(),
        run=schedule_runner,
    )
    scenario_details.update(exploration.details())
    recoveries = [r for t in exploration.tried if (r := t.result["recovery_s"]) is not None]
    scenario_details["recovery_s"] = max(recoveries) if recoveries else None
    if exploration.failure is not None:
        raise exploration.failure
