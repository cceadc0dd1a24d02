"""The capacity benchmark: how much the reference stack sustains on this machine.

For each stream replica count it brings up a fresh compose stack, measures the stack's ceilings
(harness.ceiling: JetStream's publish rate and the aggregators' backlog rate, each on its own),
raises the offered rate in
steps until a stage stops holding (errors, falling behind the offered rate, or end-to-end
freshness), bisects twice between the last stage that held and the first that did not, takes
the highest stage that held as the maximum sustainable rate, then runs
steady load at 50 % and 90 % of it for latency percentiles, freshness lag and the load
generator's own cost, and proves the 50 % run exactly-once. The maximum is also given as a share
of each ceiling, a figure that does not depend on the machine's speed. Writes benchmark.json and a
self-contained benchmark.html (inline SVG plots) under reports/out/<run-id>/.
"""

from __future__ import annotations

import html
import json
import os
import platform
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from python_on_whales.exceptions import DockerException

from harness.ceiling import (
    Ceiling,
    CeilingError,
    aggregation_ceiling,
    jetstream_publish_ceiling,
)
from harness.load import (
    LOAD_HEALTH_INTERVAL_S,
    LoadResult,
    LoadSpec,
    Slo,
    run_load,
    run_step,
    stage_summary,
    step_rates,
)
from harness.nats_admin import JetStreamAdmin
from harness.report import inline_svg
from harness.stack import (
    Endpoints,
    Metered,
    ServiceControl,
    Stack,
    StackError,
    StackOptions,
    StackSettings,
    new_run_id,
    open_stack,
)

# A stage "holds" when the pipeline keeps up end to end: nearly everything acknowledged, the
# acknowledged rate close to the offered one, and events visible within 2 s (p95).
HOLD = Slo(
    max_error_rate=0.01,
    min_rate_fraction=0.95,
    max_freshness_p95_s=2.0,
    max_p99_ms=None,
    max_p95_ms=None,
    max_convergence_s=None,
)
# Bisections after the step grid: x1.15 steps narrowed to about 4 %.
REFINE_STEPS = 2


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    docker_version = subprocess.run(
        ["docker", "version", "--format", "{{.Server.Version}}"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": mem_gib,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "docker": docker_version,
        "load_average_at_start": os.getloadavg(),
    }


def _steady(result: LoadResult, cpu: dict[str, Any]) -> dict[str, Any]:
    run = result.phases["run"]
    return {
        "cpu": cpu,
        "offered": result.spec.rate,
        "batch": result.spec.batch_size,
        "events_per_s": run.events_per_s,
        "error_rate": run.error_rate,
        "latency_ms": dict(run.latency_ms),
        "freshness_s": dict(run.freshness_s),
        "freshness_samples": run.freshness_samples,
        "users": result.locust.users,
        "locust_cpu_s": result.locust.cpu_s,
        "events_per_locust_cpu_s": result.events_per_cpu_s(),
        "verdict": result.verdict.summary() if result.verdict else None,
        "valid": result.verdict.valid if result.verdict else None,
        "locust_history": result.locust_history,
        "freshness": [asdict(s) for s in result.freshness],
    }


def cpu_cost(
    before: Mapping[str, float],
    after: Mapping[str, float],
    *,
    locust_s: float,
    harness_s: float,
    wall_s: float,
    events: int,
) -> dict[str, Any]:
    """Where the CPU went during a run: microseconds per acknowledged event by consumer.

    The counters span the whole run_load call (locust's start, the load, convergence and the
    checks), so each service's idle work (health checks, sweeps) is charged to the events too,
    as it is on a real machine; "harness" is mostly merging the outcome files after the load.
    "cores" is the total divided by that wall time.
    """
    used = {name: after[name] - before.get(name, 0.0) for name in after}
    used["locust"] = locust_s
    used["harness"] = harness_s
    total = sum(used.values())
    per_event = {name: round(s / events * 1e6, 1) for name, s in used.items()} if events else {}
    return {
        "wall_s": round(wall_s, 1),
        "events": events,
        "cores": round(total / wall_s, 2) if wall_s > 0 else None,
        "us_per_event": dict(sorted(per_event.items(), key=lambda kv: -kv[1])),
        "us_per_event_total": round(total / events * 1e6, 1) if events else None,
    }


def measured_run(
    stack: Metered, endpoints: Endpoints, spec: LoadSpec, **kwargs: Any
) -> tuple[LoadResult, dict[str, Any]]:
    """run_load, and the CPU every container, locust and the harness spent on it (cpu_cost)."""
    before, wall, own = stack.cpu_seconds(), time.monotonic(), time.process_time()
    result = run_load(endpoints, spec, **kwargs)
    return result, cpu_cost(
        before,
        stack.cpu_seconds(),
        locust_s=result.locust.cpu_s,
        harness_s=time.process_time() - own,
        wall_s=time.monotonic() - wall,
        events=result.events_acknowledged,
    )


def cpu_line(cpu: Mapping[str, Any]) -> str:
    """One line: total CPU per event, cores busy, and the consumers, biggest first."""
    parts = ", ".join(f"{name} {us:.0f}" for name, us in cpu["us_per_event"].items() if us >= 1)
    return (
        f"CPU per acknowledged event: {cpu['us_per_event_total'] or 0:.0f} us "
        f"({cpu['cores'] or 0:.2f} cores over {cpu['wall_s']:.0f} s): {parts}"
    )


def measure(
    replicas: int,
    out_dir: Path,
    *,
    options: StackOptions,
    rates: Sequence[float],
    stage_s: float,
    steady_s: float,
    batch: int,
    workers: int,
    log: Any = print,
) -> dict[str, Any]:
    """One stack (the backend `options` name) with ``replicas`` stream replicas: step search,
    then 50 % and 90 % runs."""
    stack = open_stack(
        replace(
            options,
            run_id=f"{new_run_id()}-r{replicas}",
            settings=StackSettings(
                stream_replicas=replicas, health_interval_s=LOAD_HEALTH_INTERVAL_S
            ),
        )
    )
    if not isinstance(stack, Metered):
        raise StackError(f"the benchmark counts CPU per service; {stack.name} does not meter it")
    base = LoadSpec(
        rate=0, duration_s=stage_s, batch_size=batch, probes=50, targets=5, workers=workers
    )
    try:
        endpoints = stack.up()
        log(f"R{replicas}: stack up in {stack.bring_up_s:.0f}s")
        ceilings = measure_ceilings(stack, endpoints, log)
        drained(endpoints, log)
        log(f"R{replicas}: step over {list(rates)}")
        step = run_step(endpoints, base, rates, out_dir / "step", slo=HOLD, check=False)
        stages = step.to_dict()["stages"]
        if step.held_rate and len(step.stages) > 1 and step.stages[-1].breaches:
            stages += refine(
                endpoints, base, step.held_rate, step.stages[-1].spec.rate, out_dir, log
            )
        best = max(
            (s for s in stages if s["held"]), key=lambda s: s["run"]["events_per_s"], default=None
        )
        max_rate = best["run"]["events_per_s"] if best else None
        out: dict[str, Any] = {
            "stream_replicas": replicas,
            "bring_up_s": stack.bring_up_s,
            "ceilings": {name: c.to_dict() for name, c in ceilings.items()},
            "share_of_ceiling": shares_of(max_rate, ceilings),
            "stages": [{k: v for k, v in s.items()} for s in stages],
            "max_sustainable_events_per_s": max_rate,
            "max_offered_that_held": best["rate"] if best else None,
            # What ingest acknowledged at best, whether or not the pipeline kept up behind it.
            "max_acknowledged_events_per_s": max(
                (s["run"]["events_per_s"] for s in stages), default=None
            ),
        }
        if not max_rate:
            return out
        for share in (0.5, 0.9):
            drained(endpoints, log)  # the backlog of a failed stage is not this run's
            spec = replace(base, rate=round(max_rate * share), duration_s=steady_s)
            result, cpu = measured_run(
                stack,
                endpoints,
                spec,
                out_dir=out_dir / f"at-{round(share * 100)}pct",
                name=f"R{replicas} at {share:.0%}",
                slo=replace(HOLD, min_rate_fraction=0.9),
                check=share == 0.5,
            )
            out[f"at_{round(share * 100)}pct"] = _steady(result, cpu)
            log(result.summary())
            log(cpu_line(cpu))
        return out
    finally:
        stack.down()


AGGREGATORS = ("aggregator-1", "aggregator-2")


def measure_ceilings(stack: Stack, endpoints: Endpoints, log: Any) -> dict[str, Ceiling]:
    """The stack's own parts on their own (harness.ceiling), before any load: the JetStream
    publish ceiling always, the aggregation ceiling where the backend can pause services."""
    ceilings = {"jetstream_publish": jetstream_publish_ceiling(endpoints.nats_urls)}
    if isinstance(stack, ServiceControl):
        aggregators = [stack.container(name) for name in AGGREGATORS]
        try:
            ceilings["aggregation"] = aggregation_ceiling(
                endpoints.nats_urls, aggregators, run=f"{stack.name}-ceiling"
            )
        except (CeilingError, DockerException) as error:  # the rest of the benchmark still counts
            log(f"no aggregation ceiling: {error}")
    else:
        log(f"no aggregation ceiling: {stack.name} cannot pause its aggregators")
    for ceiling in ceilings.values():
        log(ceiling.line())
    return ceilings


def shares_of(max_rate: float | None, ceilings: Mapping[str, Ceiling]) -> dict[str, float]:
    """The end-to-end maximum as a fraction of each ceiling measured on the same stack."""
    if not max_rate:
        return {}
    return {
        name: round(max_rate / c.events_per_s, 3) for name, c in ceilings.items() if c.events_per_s
    }


def drained(endpoints: Endpoints, log: Any) -> None:
    """Wait until the aggregators acknowledged everything stored so far."""
    admin = JetStreamAdmin(endpoints.nats_urls)
    took = admin.await_acknowledged("the backlog of the stage before", timeout_s=300)
    log(f"backlog acknowledged after {took:.1f} s")


def refine(
    endpoints: Endpoints,
    base: LoadSpec,
    held: float,
    failed: float,
    out_dir: Path,
    log: Any,
    steps: int = REFINE_STEPS,
) -> list[dict[str, Any]]:
    """Bisect between the highest offered rate that held and the one that did not.

    The step grid alone leaves the maximum uncertain by a whole step. Each stage starts once
    the aggregators have caught up with what the stage before left, so a backlog is never
    charged to the next rate.
    """
    stages: list[dict[str, Any]] = []
    for _ in range(steps):
        rate = float(round((held + failed) / 2 / 100) * 100)
        if rate in (held, failed):
            break
        drained(endpoints, log)
        log(f"refining at {rate:g} events/s")
        stage = run_load(
            endpoints,
            replace(base, rate=rate),
            out_dir / "refine" / f"stage-{rate:g}",
            name=f"refine {rate:g}",
            slo=HOLD,
            check=False,
        )
        stages.append({**stage_summary(stage), "refined": True})
        held, failed = (held, rate) if stage.breaches else (rate, failed)
    return stages


# --- the page ---------------------------------------------------------------------------------


def plots(results: Mapping[str, Any]) -> dict[str, str]:
    """Inline SVG plots: step stages, latency at 50/90 %, and the 90 % run over time."""
    from matplotlib.figure import Figure  # no pyplot: no global state

    out: dict[str, str] = {}
    fig = Figure(figsize=(7, 3.5), layout="constrained")
    ax = fig.subplots()
    for key, r in results["replicas"].items():
        stages = sorted(r["stages"], key=lambda s: s["rate"])  # refined stages come last
        xs = [s["rate"] for s in stages]
        ys = [s["run"]["events_per_s"] for s in stages]
        ax.plot(xs, ys, marker="o", label=f"R{key} acknowledged")
        fresh = [s["run"]["freshness_s"].get("p95") or 0 for s in stages]
        for x, y, f in zip(xs, ys, fresh, strict=True):
            ax.annotate(f"{f:.1f}s", (x, y), fontsize=7, textcoords="offset points", xytext=(0, 4))
    lim = max([s["rate"] for r in results["replicas"].values() for s in r["stages"]] or [1])
    ax.plot([0, lim], [0, lim], ls=":", color="grey", label="offered")
    ax.set_xlabel("offered events/s")
    ax.set_ylabel("acknowledged events/s")
    ax.set_title("Step search (labels: freshness p95)")
    ax.legend(fontsize=8)
    out["step"] = inline_svg(fig)
    fig = Figure(figsize=(9, 3.5), layout="constrained")
    axes = fig.subplots(1, 2)
    for key, r in results["replicas"].items():
        for share, axis in (("at_50pct", axes[0]), ("at_90pct", axes[1])):
            run = r.get(share)
            if not run or not run["locust_history"]:
                continue
            hist = run["locust_history"]
            t0 = hist[0]["t"]
            axis.plot(
                [h["t"] - t0 for h in hist],
                [h["rps"] * run["batch"] for h in hist],
                label=f"R{key} events/s (locust)",
            )
            twin = axis.twinx()
            twin.plot(
                [h["t"] - t0 for h in hist],
                [h["p95_ms"] for h in hist],
                ls="--",
                color="tab:red",
                label=f"R{key} p95 ms",
            )
            twin.set_ylabel("p95 ms", fontsize=8)
            axis.set_title(f"steady at {share[3:5]} % of max")
            axis.set_xlabel("s")
    for axis in axes:
        axis.legend(fontsize=7)
    out["steady"] = inline_svg(fig)
    return out


def cpu_table(results: Mapping[str, Any]) -> str:
    """Microseconds of CPU per acknowledged event, a row per consumer, a column per steady run."""
    runs = [
        (f"R{key} at {share[3:5]} %", run["cpu"])
        for key, r in results["replicas"].items()
        for share in ("at_50pct", "at_90pct")
        if (run := r.get(share)) and run.get("cpu")
    ]
    if not runs:
        return "<p>No steady run: nothing to break down.</p>"
    names = sorted(
        {n for _, cpu in runs for n in cpu["us_per_event"]},
        key=lambda n: -max(cpu["us_per_event"].get(n, 0.0) for _, cpu in runs),
    )
    head = "<tr><th>us per event</th>" + "".join(f"<th>{html.escape(t)}</th>" for t, _ in runs)
    body = [
        f"<tr><td>{html.escape(n)}</td>"
        + "".join(f"<td>{cpu['us_per_event'].get(n, 0.0):.0f}</td>" for _, cpu in runs)
        + "</tr>"
        for n in names
    ]
    total = "<tr><th>total (cores)</th>" + "".join(
        f"<th>{cpu['us_per_event_total'] or 0:.0f} ({cpu['cores'] or 0:.2f})</th>"
        for _, cpu in runs
    )
    return f"<table>{head}</tr>{''.join(body)}{total}</tr></table>"


def ceiling_table(results: Mapping[str, Any]) -> str:
    """Each stack's ceilings and the end-to-end maximum as a share of each."""
    rows = [
        "<tr><th>replicas</th><th>ceiling</th><th>events/s</th><th>events</th><th>s</th>"
        "<th>not acknowledged</th><th>max end to end / ceiling</th></tr>"
    ]
    for key, r in results["replicas"].items():
        shares = r.get("share_of_ceiling") or {}
        for name, c in (r.get("ceilings") or {}).items():
            share = shares.get(name)
            cells = (
                f"R{key}",
                c["what"],
                f"{c['events_per_s']:.0f}",
                c["events"],
                f"{c['seconds']:.1f}",
                c["errors"],
                "-" if share is None else f"{share:.0%}",
            )
            rows.append(
                "<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in cells) + "</tr>"
            )
    return f"<table>{''.join(rows)}</table>"


def render(results: Mapping[str, Any]) -> str:
    rows = []
    for key, r in results["replicas"].items():
        for share in ("at_50pct", "at_90pct"):
            run = r.get(share) or {}
            lat, fr = run.get("latency_ms", {}), run.get("freshness_s", {})

            def f(x: Any, fmt: str = "{:.0f}") -> str:
                return "-" if x is None else fmt.format(x)

            rows.append(
                "<tr>"
                + "".join(
                    f"<td>{html.escape(str(c))}</td>"
                    for c in (
                        f"R{key}",
                        f(r.get("max_sustainable_events_per_s")),
                        share[3:5] + " %",
                        f(run.get("events_per_s")),
                        f(lat.get("p50")),
                        f(lat.get("p95")),
                        f(lat.get("p99")),
                        f(fr.get("p50"), "{:.2f}"),
                        f(fr.get("p95"), "{:.2f}"),
                        f(run.get("events_per_locust_cpu_s")),
                        run.get("verdict") or "",
                    )
                )
                + "</tr>"
            )
    svgs = plots(results)
    m = results["machine"]
    head = (
        "<tr><th>replicas</th><th>max events/s</th><th>at</th><th>events/s</th><th>p50 ms</th>"
        "<th>p95 ms</th><th>p99 ms</th><th>fresh p50 s</th><th>fresh p95 s</th>"
        "<th>events per locust CPU-s</th><th>exactly-once</th></tr>"
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>QoE stack benchmark</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{border:1px solid #ccc;padding:3px 6px;font-size:13px}}
table{{border-collapse:collapse}}</style></head><body>
<h1>QoE stack capacity benchmark</h1>
<p>{html.escape(results["started"])}: {m["cpus"]} CPUs ({html.escape(m["cpu_model"])}), {m["memory_gib"]} GiB,
kernel {html.escape(m["kernel"])}, Docker {html.escape(m["docker"])}; load average at start
{", ".join(f"{x:.1f}" for x in m["load_average_at_start"])}. Command: <code>{html.escape(results["command"])}</code></p>
<table>{head}{"".join(rows)}</table>
<h2>Ceilings</h2>
<p>The stack's parts on their own, measured on the same stack before the step search
(harness/ceiling.py): JetStream's acknowledged publish rate into a scratch stream with the
events stream's configuration, from one ingest-like publisher in the harness; and the
aggregators' rate of folding and committing a backlog stored while they were paused. The
share of each that the end-to-end maximum reaches does not depend on the machine's speed.</p>
{ceiling_table(results)}
<h2>Step search</h2>{svgs["step"]}
<h2>Steady runs</h2>{svgs["steady"]}
<h2>Where the CPU went</h2>
<p>Microseconds of CPU per acknowledged event in each steady run: container CPU counters, the
locust processes and the harness process (mostly merging the outcome files after the load),
from locust's start to the end of the checks; cores = that CPU over the same wall time.</p>
{cpu_table(results)}
<p>Raw data: benchmark.json; locust CSVs and outcome files beside it.</p></body></html>"""


def command(args: Any, options: StackOptions) -> int:
    """`python -m harness benchmark`: measure on stacks opened from `options`, write JSON and
    HTML, print the headline."""
    import sys

    run_id = new_run_id()
    run_dir = Path(args.report_dir) / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    replicas = [int(r) for r in str(args.replicas).split(",") if r.strip()]
    rates = step_rates(args.start_rate, args.step_factor, args.max_rate)
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": "python -m harness " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "rates": rates,
        "replicas": {},
    }
    for r in replicas:
        results["replicas"][str(r)] = measure(
            r,
            run_dir / f"r{r}",
            options=options,
            rates=rates,
            stage_s=args.stage,
            steady_s=max(args.stage, 30),
            batch=args.batch,
            workers=args.workers,
        )
        (run_dir / "benchmark.json").write_text(json.dumps(results, indent=1, default=str))
    (run_dir / "benchmark.html").write_text(render(results))
    for r, res in results["replicas"].items():
        half = res.get("at_50pct") or {}
        lat = half.get("latency_ms", {})
        first = res["stages"][0] if res["stages"] else {}
        if not res["max_sustainable_events_per_s"] and first:
            print(f"R{r}: not even the first stage held: {'; '.join(first['breaches'])}")
        print(
            f"R{r}: max sustainable {res['max_sustainable_events_per_s'] or 0:.0f} events/s "
            f"(ingest acknowledged up to {res.get('max_acknowledged_events_per_s') or 0:.0f}); at 50 %: "
            f"p50/p95/p99 {lat.get('p50') or 0:.0f}/{lat.get('p95') or 0:.0f}/{lat.get('p99') or 0:.0f}"
            f" ms, freshness p95 {(half.get('freshness_s') or {}).get('p95') or 0:.2f} s"
        )
        for name, c in (res.get("ceilings") or {}).items():
            share = (res.get("share_of_ceiling") or {}).get(name)
            of = f"; max sustainable = {share:.0%} of it" if share is not None else ""
            print(f"R{r}: {c['what']} {c['events_per_s']:.0f} events/s{of}")
        if half.get("cpu"):
            print(f"R{r} at 50 %: {cpu_line(half['cpu'])}")
    print(f"benchmark: {run_dir / 'benchmark.html'} and benchmark.json")
    return 0
