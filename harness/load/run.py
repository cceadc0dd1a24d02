"""A load run (optionally with a fault in the middle), and the step profile."""

from __future__ import annotations

import json
import secrets
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from harness import checker
from harness.columnar import OutcomeSource
from harness.history import Fault, History, Outcome, Timeline
from harness.load.freshness import FreshnessMonitor, FreshnessSample
from harness.load.gates import LATE_AFTER_S, Breach, LoadStats, Slo, evaluate, intended_at, stats_of
from harness.load.locust import (
    REMOTE_WORKER_WAIT_S,
    LocustProcesses,
    LocustRun,
    read_history,
    read_locust_history,
)
from harness.load.spec import LoadSpec
from harness.polling import wait_until
from harness.stack import Endpoints

# --- a load run -------------------------------------------------------------------------------


StartFault = Callable[[], AbstractContextManager[Fault]]  # a named fault's start(nemesis)


@dataclass
class LoadResult:
    """Everything one load run produced: stats per phase, breaches, the exactly-once verdict."""

    name: str
    spec: LoadSpec
    out_dir: Path
    prefix: str
    probe_ids: list[str]
    locust: LocustRun
    history: History
    freshness: list[FreshnessSample]
    phases: dict[str, LoadStats]
    breaches: list[Breach] = field(default_factory=list)
    verdict: checker.Verdict | None = None
    fault: Mapping[str, Any] | None = None
    locust_history: list[dict[str, float]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.breaches and (self.verdict is None or self.verdict.valid)

    @property
    def events_acknowledged(self) -> int:
        return sum(op.batch_size for op in self.history if op.outcome is Outcome.OK)

    def events_per_cpu_s(self) -> float | None:
        """The load generator's cost: events acknowledged per CPU-second of locust."""
        cpu = self.locust.cpu_s
        return self.events_acknowledged / cpu if cpu > 0 else None

    def summary(self) -> str:
        whole = self.phases["run"]
        fresh = whole.freshness_s
        lines = [
            f"load {self.name}: offered {self.spec.rate:g} events/s for {self.spec.duration_s:g}s "
            f"({self.locust.users} users, batch {self.spec.batch_size}); acknowledged "
            f"{whole.events_per_s:.0f} events/s, error rate {whole.error_rate:.2%} "
            f"({whole.unanswered} of {whole.batches} batches unanswered)",
            f"  response time (from the intended send) p50/p95/p99/max {_spread(whole.latency_ms)} "
            f"ms; service time (from the send) {_spread(whole.service_ms)} ms",
            f"  late sends (over {LATE_AFTER_S * 1000:g} ms after their intended time) "
            f"{whole.late}, lateness p99/max {_ms(whole.lateness_ms['p99'])}/"
            f"{_ms(whole.lateness_ms['max'])} ms; dropped sends {whole.dropped}",
            f"  freshness p50/p95 {_s(fresh['p50'])}/{_s(fresh['p95'])} s "
            f"({whole.freshness_samples} samples)",
        ]
        if self.verdict is not None:
            lines.append(f"exactly-once: {self.verdict.summary()}")
        lines.extend(b.message() for b in self.breaches)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "spec": asdict(self.spec),
            "prefix": self.prefix,
            "ok": self.ok,
            "users": self.locust.users,
            "locust_cpu_s": self.locust.cpu_s,
            "locust_returncodes": list(self.locust.returncodes),
            "events_per_locust_cpu_s": self.events_per_cpu_s(),
            "phases": {k: v.to_dict() for k, v in self.phases.items()},
            "breaches": [asdict(b) | {"message": b.message()} for b in self.breaches],
            "verdict": self.verdict.to_dict() if self.verdict else None,
            "fault": dict(self.fault) if self.fault else None,
            "freshness": [asdict(s) for s in self.freshness],
            "locust_history": self.locust_history,
        }

    def save(self) -> Path:
        path = self.out_dir / "load.json"
        path.write_text(json.dumps(self.to_dict(), indent=1, default=str, allow_nan=True))
        return path


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def _spread(ms: Mapping[str, float | None]) -> str:
    return "/".join(_ms(ms[k]) for k in ("p50", "p95", "p99", "max"))


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def new_prefix() -> str:
    """A load-run prefix: probe ids and event ids of this run start with it."""
    return f"L{time.strftime('%H%M%S')}{secrets.token_hex(3)}"


def run_load(
    endpoints: Endpoints,
    spec: LoadSpec,
    out_dir: Path,
    *,
    name: str = "steady",
    prefix: str | None = None,
    sentinel_probe: str | None = None,
    slo: Slo | None = None,
    fault_slo: Slo | None = None,
    fault: StartFault | None = None,
    fault_name: str = "",
    fault_at_s: float = 0.0,
    fault_for_s: float = 0.0,
    check: bool = True,
    rules: checker.Rules | None = None,
    convergence_timeout_s: float = 60.0,
    timeline: Timeline | None = None,
    log: Callable[[str], None] | None = None,
) -> LoadResult:
    """Run locust for ``spec`` with the freshness monitor; optionally a fault in the middle.

    With a fault the run has three phases: before (from the start to the fault), fault (the
    fault window plus ``recovery_grace_s``, gated by the relaxed ``fault_slo``) and after (the
    rest, gated by ``slo`` again). Then, if ``check``, the exactly-once check over the merged
    history (locust workers and sentinels), with its convergence time gated too.
    """
    slo = slo or Slo()
    prefix = prefix or new_prefix()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    say = log or (
        lambda message: print(
            f"[load {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True
        )
    )
    sentinel_probe = sentinel_probe or f"{prefix}-fresh"
    fault_info: dict[str, Any] | None = None
    monitor = FreshnessMonitor(endpoints, sentinel_probe)
    say(
        f"{name}: {spec.rate:g} events/s for {spec.duration_s:g}s, prefix {prefix}, "
        f"files in {out_dir}"
    )
    with (
        monitor,
        LocustProcesses(
            spec, endpoints.ingest_urls, endpoints.ingest_token, prefix, out_dir
        ) as locust,
    ):
        if timeline is not None:
            timeline.mark("workload", f"load {name} start", f"{spec.rate:g} events/s")
        if fault is not None:
            after_s = slo.recovery_grace_s + slo.after_recovery_s
            fault_info = _inject(locust, fault, fault_name, fault_at_s, fault_for_s, after_s, say)
            locust.run_until(fault_info["end"] + after_s)
        run = locust.wait()
        fresh = monitor.stop(drain_timeout_s=convergence_timeout_s / 2)
        missing = monitor.missing()
    if any(code != 0 for code in run.returncodes):
        raise RuntimeError(
            f"locust exited with {run.returncodes} (expected 0); its log: {locust.log_tail()}"
        )
    read = read_history(
        [OutcomeSource(out_dir, run.ended_at)],
        monitor.history,
        endpoints.window_seconds if check else None,
    )
    history, expected, dropped = read.history, read.expected, read.dropped
    if timeline is not None:
        timeline.mark(
            "workload",
            f"load {name}",
            f"{len(history)} batches",
            duration_s=run.ended_at - run.started_at,
            at=run.started_at,
        )
    # The load's own span: locust spends a while importing before its first batch.
    load_ops = [op for op in history.operations() if op.process != "freshness"]
    start = min((intended_at(op) for op in load_ops), default=run.started_at)
    end = max((op.completed_at for op in load_ops), default=run.ended_at)
    gated = start + slo.warmup_s
    # The load stopped at `end`: every send the schedules held until then belongs to the run.
    phases = {
        "run": stats_of(history, gated, end, fresh, dropped=dropped, freshness_missing=missing)
    }
    if fault_info is not None:
        grace_end = fault_info["end"] + slo.recovery_grace_s
        phases["before"] = stats_of(history, gated, fault_info["start"], fresh, dropped=dropped)
        phases["fault"] = stats_of(
            history, fault_info["start"], grace_end, fresh, dropped=dropped, overlapping=True
        )
        phases["after"] = stats_of(
            history, grace_end, end, fresh, dropped=dropped, freshness_missing=missing
        )
    probe_ids = [*spec.probe_ids(prefix), sentinel_probe]
    verdict = None
    if expected is not None:
        verdict = verify(
            endpoints, expected, history.last_ok_at(), probe_ids, rules, convergence_timeout_s
        )
        say(verdict.summary().splitlines()[0])
    convergence = verdict.convergence_s if verdict else None
    breaches: list[Breach] = []
    if fault_info is None:
        breaches += evaluate(slo, phases["run"], offered_rate=spec.rate, convergence_s=convergence)
    else:
        no_convergence = replace(slo, max_convergence_s=None)
        relaxed = replace(
            fault_slo or Slo(max_error_rate=None, min_rate_fraction=None), max_convergence_s=None
        )
        breaches += evaluate(
            no_convergence, phases["before"], offered_rate=spec.rate, phase="before fault"
        )
        breaches += evaluate(relaxed, phases["fault"], offered_rate=spec.rate, phase="fault window")
        breaches += evaluate(
            slo,
            phases["after"],
            offered_rate=spec.rate,
            convergence_s=convergence,
            phase="after recovery",
        )
    result = LoadResult(
        name=name,
        spec=spec,
        out_dir=out_dir,
        prefix=prefix,
        probe_ids=probe_ids,
        locust=run,
        history=history,
        freshness=fresh,
        phases=phases,
        breaches=breaches,
        verdict=verdict,
        fault=fault_info,
        locust_history=read_locust_history(out_dir),
    )
    result.save()
    history.save(out_dir / "history.jsonl")
    return result


def _inject(
    locust: LocustProcesses,
    fault: StartFault,
    fault_name: str,
    at_s: float,
    for_s: float,
    after_s: float,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Wait until ``at_s`` into the load, hold the fault in effect for ``for_s``, heal (the
    load goes on ``after_s`` past it at least); return its window as the nemesis recorded it:
    injection started to healed (start, end), in effect from ``effect_at`` until healing began
    at ``healed_at``."""
    wait_until(
        lambda: locust.sending() or not locust.running(),
        timeout_s=60 + (REMOTE_WORKER_WAIT_S if locust.spec.remote_workers else 0),
        what="the first batch of the load",
        describe=locust.log_tail,
    )
    begin = time.time()
    wait_until(
        lambda: time.time() >= begin + at_s or not locust.running(),
        timeout_s=at_s + 30,
        what=f"{at_s:g}s of load before the fault",
        interval_s=0.05,
    )
    say(f"fault {fault_name or 'fault'} for {for_s:g}s")
    # The load goes on past its duration while the fault is held and after it (the run moves
    # this on when the fault heals late): written first, so a duration that ends during the
    # fault's injection or healing does not stop the load then.
    locust.run_until(time.time() + for_s + after_s)
    with fault() as held:
        # Held for for_s once in effect: injecting took seconds on a busy machine (docker
        # pause of both ingest replicas: 3.3 s at a load average of 90), and counted from its
        # start the fault was in effect for 2.6 s of the 5 asked for.
        in_effect = held.started_at + (held.effect_s or 0.0)
        wait_until(
            lambda: time.time() >= in_effect + for_s,
            timeout_s=for_s + 60,
            what=f"the fault window of {for_s:g}s",
            interval_s=0.05,
        )
    ended = held.ended_at or time.time()
    say(f"fault {fault_name or 'fault'} healed after {ended - held.started_at:.1f}s")
    return {
        "name": fault_name,
        "start": held.started_at,
        "end": ended,
        "effect_at": held.started_at + (held.effect_s or 0.0),
        "healed_at": held.healed_at or ended,
    }


def verify(
    endpoints: Endpoints,
    expected: checker.Expectation,
    last_ok_at: float | None,
    probe_ids: Sequence[str],
    rules: checker.Rules | None = None,
    timeout_s: float = 60.0,
) -> checker.Verdict:
    """The exactly-once check of a load run: poll the views (streamed: a long run has many
    windows) until they equal the oracle; convergence is timed from the last acknowledgement."""
    return checker.converge_on_database(
        expected,
        last_ok_at or time.time(),
        endpoints.database_dsn,
        probe_ids,
        rules or checker.Rules(),
        timeout_s,
        interval_s=0.2,
        read=checker.stream_observed,
    )


# --- step: raise the rate until an SLO breaks -------------------------------------------------


@dataclass
class StepResult:
    """The stages of a step run and the highest offered rate that held every SLO."""

    stages: list[LoadResult]
    held_rate: float | None  # highest offered rate whose stage met the SLO
    held_events_per_s: float | None  # what that stage actually sustained
    verdict: checker.Verdict | None

    @property
    def ok(self) -> bool:
        return self.verdict is None or self.verdict.valid

    def to_dict(self) -> dict[str, Any]:
        return {
            "held_rate": self.held_rate,
            "held_events_per_s": self.held_events_per_s,
            "verdict": self.verdict.to_dict() if self.verdict else None,
            "stages": [stage_summary(s) for s in self.stages],
        }


def stage_summary(stage: LoadResult) -> dict[str, Any]:
    """One stage of a rate search: offered rate, whether it held, and what it measured."""
    return {
        "rate": stage.spec.rate,
        "held": not stage.breaches,
        "breaches": [b.message() for b in stage.breaches],
        "run": stage.phases["run"].to_dict(),
        "users": stage.locust.users,
        "locust_cpu_s": stage.locust.cpu_s,
        "events_per_locust_cpu_s": stage.events_per_cpu_s(),
    }


def run_step(
    endpoints: Endpoints,
    base: LoadSpec,
    rates: Sequence[float],
    out_dir: Path,
    *,
    slo: Slo,
    prefix: str | None = None,
    check: bool = True,
    rules: checker.Rules | None = None,
    timeline: Timeline | None = None,
    log: Callable[[str], None] | None = None,
) -> StepResult:
    """One stage per rate (``base`` with that rate), stopping at the first stage that breaks
    an SLO; then one exactly-once check over every stage's history."""
    prefix = prefix or new_prefix()
    stages: list[LoadResult] = []
    held: LoadResult | None = None
    for i, rate in enumerate(rates):
        spec = replace(base, rate=rate)
        stage = run_load(
            endpoints,
            spec,
            Path(out_dir) / f"stage-{rate:g}",
            name=f"step {rate:g}",
            prefix=prefix,
            sentinel_probe=f"{prefix}-f{i}",
            slo=replace(slo, max_convergence_s=None),
            check=False,
            timeline=timeline,
            log=log,
        )
        stages.append(stage)
        if stage.breaches:
            break
        held = stage
    verdict = None
    if check:
        # The stages' histories hold the sentinels' events; the batches' are in their files.
        sentinels = History([op for s in stages for op in s.history if op.events])
        sources = [OutcomeSource(s.out_dir, s.locust.ended_at) for s in stages]
        merged = read_history(sources, sentinels, endpoints.window_seconds)
        assert merged.expected is not None
        probe_ids = sorted({p for s in stages for p in s.probe_ids})
        verdict = verify(endpoints, merged.expected, merged.history.last_ok_at(), probe_ids, rules)
    return StepResult(
        stages=stages,
        held_rate=held.spec.rate if held else None,
        held_events_per_s=held.phases["run"].events_per_s if held else None,
        verdict=verdict,
    )


# Load runs measure the platform, not Docker: on a small machine 1 s healthchecks (one
# `docker exec` per container per second) take most of a core and set the latency tail.
LOAD_HEALTH_INTERVAL_S = 10


def step_rates(start: float, factor: float, maximum: float) -> list[float]:
    """start, start*factor, ... up to maximum (rounded to 100 events/s)."""
    if start <= 0 or factor <= 1:
        raise ValueError(f"step needs --rate > 0 and --step-factor > 1, got {start} and {factor}")
    rates: list[float] = []
    rate = start
    while rate <= maximum * 1.0001:
        rates.append(float(round(rate / 100) * 100 or rate))
        rate *= factor
    return rates
