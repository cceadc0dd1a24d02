"""Generated fault schedules (Hypothesis) under load: after each schedule the state must equal
the oracle; a failing schedule shrinks to the smallest one that still fails.

Budget: 2 schedules by default and in CI (profile "ci"), 20 with
`--hypothesis-profile thorough`. The examples are drawn from the run seed, so
`--run-seed N` replays the same schedules; the seed and every schedule tried are in the
scenario's details in summary.json.
"""

from __future__ import annotations

import itertools
import time

import pytest
from hypothesis import HealthCheck, Phase, given, note, seed, settings

from harness.history import History
from harness.nemesis import Nemesis
from harness.schedule import Schedule, Step, run_schedule, schedules
from harness.workload import EventGenerator, IngestClient
from scenarios.common import client_view, workload

pytestmark = pytest.mark.chaos


def _budget() -> int:
    # The loaded profile decides: "thorough" explores, anything else keeps CI short.
    return 20 if getattr(settings, "_current_profile", None) == "thorough" else 2


def _run_one(
    schedule: Schedule, n: int, *, nemesis, endpoints, verifier, run, prefix, plot
) -> dict:
    history = History()
    plot(history)  # every example's traffic and faults in the scenario's picture
    # The example's own nemesis: its faults in the example's history, beside its operations.
    example_nemesis = Nemesis(nemesis.stack, nemesis.endpoints, history)
    generator = EventGenerator(
        seed=run.seed + n,
        run_prefix=f"{prefix}s{n}",
        probes=[f"{prefix}s{n}-p{i}" for i in range(2)],
        targets=["cdn.example.net", "voip.example.net"],
        window_seconds=endpoints.window_seconds,
    )
    started = time.time()
    with IngestClient(
        endpoints.ingest_urls, endpoints.ingest_token, history, process=f"schedule-{n}"
    ) as client:
        with workload(client, generator, batch_size=50) as load:
            load.progress()
            run_schedule(schedule, example_nemesis, lambda k: load.progress(more=k, timeout_s=90))
            load.stop()
        client.settle(deadline_s=90)
    verdict = verifier.observe(history, list(generator.probes), timeout_s=90)
    return {
        "schedule": schedule.describe(),
        "valid": verdict.valid,
        "duration_s": round(time.time() - started, 2),
        "recovery_s": history.recovery_s(verdict.convergence_s) if verdict.valid else None,
        "clients_saw": client_view(history, started, time.time()),
        "summary": verdict.summary() if not verdict.valid else "",
    }


@pytest.mark.slow
def test_a_fixed_schedule(
    nemesis, endpoints, verifier, run, probe_prefix, scenario_details, plot_history
):
    """A hand-written sequence (Jepsen's timed nemesis): link faults, then process faults."""
    schedule = Schedule(
        (
            Step(("cut-ingest-nats", "latency-aggregator-postgres"), hold=3, gap=1),
            Step(("down-aggregator-1", "response-cut-off-harness-ingest"), hold=3, gap=1),
            Step(("cut-aggregator-nats", "pause-diagnoser"), hold=3, gap=0),
        )
    )
    result = _run_one(
        schedule,
        0,
        nemesis=nemesis,
        endpoints=endpoints,
        verifier=verifier,
        run=run,
        prefix=probe_prefix,
        plot=plot_history,
    )
    scenario_details["examples"] = [result]
    scenario_details["recovery_s"] = result["recovery_s"]
    assert result["valid"], f"schedule {result['schedule']}: {result['summary']}"


def test_generated_fault_schedules(
    nemesis, endpoints, verifier, run, probe_prefix, scenario_details, plot_history
):
    """Random schedules of faults and heals; each must end with the state equal to the oracle."""
    counter = itertools.count(1)
    tried: list[dict] = []
    scenario_details["hypothesis_seed"] = run.seed
    scenario_details["examples"] = tried

    @seed(run.seed)
    @settings(
        max_examples=_budget(),
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=(Phase.explicit, Phase.generate, Phase.shrink),
        report_multiple_bugs=False,
    )
    @given(schedule=schedules())
    def schedule_keeps_exactly_once(schedule: Schedule) -> None:
        note(f"schedule: {schedule.describe()} (seed {run.seed}: --run-seed {run.seed})")
        result = _run_one(
            schedule,
            next(counter),
            nemesis=nemesis,
            endpoints=endpoints,
            verifier=verifier,
            run=run,
            prefix=probe_prefix,
            plot=plot_history,
        )
        tried.append(result)
        assert result["valid"], f"schedule {result['schedule']}: {result['summary']}"

    try:
        schedule_keeps_exactly_once()
    finally:
        failing = [r for r in tried if not r["valid"]]
        if failing:  # the last failure Hypothesis saw is the shrunk one
            scenario_details["smallest_failing_schedule"] = failing[-1]["schedule"]
        valid = [r["recovery_s"] for r in tried if r["recovery_s"] is not None]
        scenario_details["recovery_s"] = max(valid) if valid else None
