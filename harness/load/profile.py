"""`python -m harness load PROFILE`: the stack, the run, the gates and the report (the
arguments are read in harness.cli)."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import checker
from harness.history import History, Timeline
from harness.load.gates import Slo
from harness.load.locust import REMOTE_WORKER_WAIT_S
from harness.load.run import run_load, run_step
from harness.load.spec import LoadSpec
from harness.nemesis.registry import FAULTS
from harness.stack import StackError, StackOptions, new_run_id, open_stack


@dataclass(frozen=True)
class LoadPlan:
    """A load profile to run, as `python -m harness load` was asked (harness.cli reads the
    arguments and checks them)."""

    profile: str  # steady | step | soak | chaos
    spec: LoadSpec
    slo: Slo
    report_dir: Path
    fault_slo: Slo | None = None  # chaos: the relaxed gates in the fault window
    fault: str = ""  # chaos: a name in harness.nemesis.registry.FAULTS
    fault_at_s: float = 0.0
    fault_for_s: float = 0.0
    step_rates: tuple[float, ...] = ()  # step: the offered rates, in order


def run_profile(plan: LoadPlan, options: StackOptions) -> int:
    """Bring up (or attach to) the stack `options` describe, run the plan's profile, gate,
    report.

    Exit status 0 when every SLO held and the exactly-once check passed, 1 otherwise (each
    breach is printed with its threshold, limit and measured value), 2 when the stack cannot
    be opened or lacks what the fault needs.
    """
    from harness.report import RunReport

    spec, slo, fault_slo, profile = plan.spec, plan.slo, plan.fault_slo, plan.profile
    if spec.remote_workers:
        print(
            f"the master waits up to {REMOTE_WORKER_WAIT_S} s for {spec.remote_workers} remote "
            f"worker(s): on each machine run `python -m harness load worker --master "
            f"<this host>:{spec.master_port}` (add --ingest URL when it reaches the ingest at "
            "another address than this machine does)",
            flush=True,
        )
    # The run's id names its report folder and, unless it uses the kept stack, its stack.
    run_id = new_run_id() if options.keep else options.run_id
    run_dir = plan.report_dir / run_id
    out_dir = run_dir / "load"
    timeline = Timeline()
    faults = History()  # the nemesis's operations (the load's own are in its outcome files)
    try:
        stack = open_stack(options)
    except StackError as exc:
        print(exc, file=sys.stderr)
        return 2
    report = RunReport(
        run_dir,
        run_id,
        seed=None,
        stack_info={"stack": stack.name, "stream_replicas": options.settings.stream_replicas},
        command="python -m harness " + " ".join(sys.argv[1:]),
    )

    started = time.time()
    ok = False
    verdict: checker.Verdict | None = None
    details: dict[str, Any] = {}
    text = ""
    try:
        endpoints = stack.up()
        if profile == "step":
            step = run_step(
                endpoints, spec, list(plan.step_rates), out_dir, slo=slo, timeline=timeline
            )
            verdict = step.verdict
            details = {"step": step.to_dict()}
            (out_dir / "step.json").write_text(json.dumps(details, indent=1, default=str))
            held = "none" if step.held_rate is None else f"{step.held_rate:g} offered"
            sustained = step.held_events_per_s
            text = "\n".join(
                [
                    *(stage.summary() for stage in step.stages),
                    f"step: highest rate that held every SLO: {held}"
                    + (f" ({sustained:.0f} events/s acknowledged)" if sustained else ""),
                    step.verdict.summary() if step.verdict else "",
                ]
            )
            print(text)
            ok = step.ok and step.held_rate is not None
        else:
            fault = None
            if profile == "chaos":
                from harness.nemesis import Nemesis

                named = FAULTS[plan.fault]
                if missing := named.missing(stack):
                    print(
                        f"chaos under load with {named.name} needs {', '.join(missing)}, "
                        f"which {stack.name} lacks",
                        file=sys.stderr,
                    )
                    return 2
                nemesis = Nemesis(stack, endpoints, faults)
                fault = lambda: named.start(nemesis)  # noqa: E731
            result = run_load(
                endpoints,
                spec,
                out_dir,
                name=profile,
                slo=slo,
                fault_slo=fault_slo,
                fault=fault,
                fault_name=plan.fault if fault else "",
                fault_at_s=plan.fault_at_s,
                fault_for_s=plan.fault_for_s,
                timeline=timeline,
            )
            verdict = result.verdict
            details = {
                "load": {k: v for k, v in result.to_dict().items() if k != "freshness"},
                "faults": [f.to_dict() for f in faults.faults()],
            }
            text = result.summary()
            print(text)
            ok = result.ok
    except KeyboardInterrupt:
        print("interrupted: tearing the stack down", file=sys.stderr)
        return 130
    except (RuntimeError, ValueError) as exc:  # locust failed, or its outcomes are incomplete
        text = f"load {profile} could not be checked: {exc}"
        print(text, file=sys.stderr)
        return 1
    finally:
        stack.down()
        report.add_scenario(
            nodeid=f"load {profile}",
            outcome="passed" if ok else "failed",
            duration_s=time.time() - started,
            verdict=verdict.to_dict() if verdict else None,
            details={"longrepr": "" if ok else text, **details},
        )
        report.add_timeline(timeline)
        page = report.write()
        print(f"load report: {page} (locust CSV and outcome files in {out_dir})")
    if verdict is not None and not verdict.valid:
        print("FAILED: the aggregates are not exactly what the acknowledged events imply")
    print("PASSED" if ok else "FAILED")
    return 0 if ok else 1
