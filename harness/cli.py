"""The command-line face of the harness:
`python -m harness up|down|status|run|report|build|fault|load|benchmark|check-bench|mutate`."""

from __future__ import annotations

import argparse
import math
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from harness.stack import (
    BACKENDS,
    ROOT,
    STATE_DIR,
    StackError,
    StackOptions,
    StackSettings,
    kept_project,
    open_stack,
    reap_orphans,
)

if TYPE_CHECKING:
    from harness.load import LoadPlan

SUITES: dict[str, list[str]] = {
    "smoke": ["scenarios", "-m", "smoke"],
    "e2e": ["scenarios", "-m", "e2e"],
    "dedup": ["scenarios", "-m", "dedup"],
    "chaos": ["scenarios", "-m", "(chaos or partition or restart or failover) and not slow"],
    "load": ["scenarios", "-m", "load and not slow"],
    "shrink": ["scenarios/test_schedule_shrink.py"],  # a live seeded bug's schedule shrunk
    "full": ["tests", "scenarios"],
    "ci": ["tests", "scenarios", "-m", "not slow"],
    # The swarm backend: host faults, and the scenarios that run on any backend as they are.
    "multihost": [
        "scenarios",
        "-m",
        "(multihost or e2e or dedup) and not slow",
        "--stack",
        "swarm",
    ],
}


def _kept_stack_options(args: argparse.Namespace, *, keep: bool = True) -> StackOptions:
    """The kept stack (`up`, `down`, `fault`, --reuse-stack): one fixed project, left up."""
    return StackOptions(
        backend=args.stack,
        run_id=kept_project(args.stack),
        project=kept_project(args.stack),
        state_dir=STATE_DIR,
        keep=keep,
        hosts_file=args.hosts,
    )


def _load_stack_options(args: argparse.Namespace, settings: StackSettings) -> StackOptions:
    """A load run's own stack, the kept one (--reuse-stack), or a deployed one (external)."""
    if args.reuse_stack:
        return replace(_kept_stack_options(args), settings=settings)
    return StackOptions(
        backend=args.stack,
        settings=settings,
        endpoints_file=args.stack_endpoints,
        hosts_file=args.hosts,
    )


def cmd_up(args: argparse.Namespace) -> int:
    options = _kept_stack_options(args)
    stack = open_stack(options)
    stack.up()
    print(
        f"stack {stack.name} is up; endpoints: {options.state_dir / stack.name / 'endpoints.json'}"
    )
    print(
        "run scenarios against it with: python -m harness run smoke --reuse-stack"
        + ("" if args.stack == "compose" else f" --stack {args.stack}")
    )
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    open_stack(_kept_stack_options(args, keep=False)).down()
    reap_orphans()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from harness import hosts, stack

    for line in [*stack.status_lines(), *hosts.status_lines()]:
        print(line)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    command = [sys.executable, "-m", "pytest", *SUITES[args.suite], *args.pytest_args]
    print("running:", " ".join(command), flush=True)
    return subprocess.call(command, cwd=ROOT)


def cmd_report(args: argparse.Namespace) -> int:
    from harness.report import render

    run_dir = args.run_dir or max((ROOT / "reports" / "out").iterdir(), key=lambda p: p.name)
    print(render(Path(run_dir)))
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    return subprocess.call([sys.executable, str(ROOT / "stack" / "build.py")])


def cmd_load(args: argparse.Namespace) -> int:
    from harness import load

    if args.profile == "worker":
        return _load_worker(args)
    try:
        plan = _load_plan(args)
    except ValueError as exc:  # a bad rate, factor or fault: nothing was started
        print(f"load {args.profile}: {exc}", file=sys.stderr)
        return 2
    settings = StackSettings(
        stream_replicas=args.stream_replicas, health_interval_s=load.LOAD_HEALTH_INTERVAL_S
    )
    _interrupt_on(signal.SIGINT, signal.SIGTERM)
    return load.run_profile(plan, _load_stack_options(args, settings))


def _load_worker(args: argparse.Namespace) -> int:
    """`load worker`: one locust worker for a master started elsewhere."""
    from harness.load.locust import run_worker

    if not args.master:
        print("load worker needs --master HOST:PORT (the master's address)", file=sys.stderr)
        return 2
    out = args.out or Path(args.report_dir) / f"worker-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        return run_worker(args.master, out, args.ingest or "")
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2


def _load_plan(args: argparse.Namespace) -> LoadPlan:
    """The profile's plan from the arguments; ValueError saying what is wrong with them."""
    from harness import load
    from harness.nemesis.registry import FAULTS

    profile = args.profile
    if profile == "chaos" and args.fault not in FAULTS:
        raise ValueError(f"unknown fault {args.fault!r}; faults are {', '.join(FAULTS)}")
    slo = load.load_slo(args.slo, profile).overridden(
        max_error_rate=args.max_error_rate,
        max_p95_ms=args.max_p95_ms,
        max_p99_ms=args.max_p99_ms,
        min_events_per_s=args.min_events_per_s,
        max_freshness_p95_s=args.max_freshness_p95_s,
        max_convergence_s=args.max_convergence_s,
    )
    duration = args.duration if args.duration is not None else (600 if profile == "soak" else 30)
    spec = load.LoadSpec(
        rate=args.rate,
        duration_s=duration,
        users=args.users,
        batch_size=args.batch,
        probes=args.probes,
        targets=args.targets,
        degraded=args.degraded,
        workers=args.workers,
        remote_workers=args.remote_workers,
        master_bind=args.master_bind or ("0.0.0.0" if args.remote_workers else "127.0.0.1"),
        master_port=args.master_port or (5557 if args.remote_workers else 0),
    )
    return load.LoadPlan(
        profile=profile,
        spec=spec,
        slo=slo,
        report_dir=Path(args.report_dir),
        fault_slo=load.load_slo(args.slo, "chaos.fault") if profile == "chaos" else None,
        fault=args.fault if profile == "chaos" else "",
        fault_at_s=args.fault_at if args.fault_at is not None else duration / 3,
        fault_for_s=args.fault_for,
        step_rates=tuple(load.step_rates(args.rate, args.step_factor, args.max_rate))
        if profile == "step"
        else (),
    )


def cmd_benchmark(args: argparse.Namespace) -> int:
    from harness import benchmark

    _interrupt_on(signal.SIGINT, signal.SIGTERM)
    # Each replica count gets a stack of its own: these options with its run id and settings.
    return benchmark.command(args, StackOptions(backend=args.stack, hosts_file=args.hosts))


def cmd_mutate(args: argparse.Namespace) -> int:
    from harness import mutate

    _interrupt_on(signal.SIGINT, signal.SIGTERM)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    plan = mutate.MutationPlan(
        sample=args.sample,
        seed=seed,
        budget_minutes=args.budget_minutes,
        only=tuple(args.only or ()),
    )
    return mutate.run_mutations(plan)


def _mutant_count(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"expected a whole number of mutants > 0, got {text}")
    return int(text)


def cmd_check_bench(args: argparse.Namespace) -> int:
    from harness import checkbench

    try:
        spec = checkbench.BenchSpec(
            events=args.events,
            batch=args.batch,
            events_per_s=args.events_per_s,
            lost=args.lost,
            doubled=args.doubled,
            moved=args.moved,
            seed=args.seed,
        )
    except ValueError as exc:
        print(f"check-bench: {exc}", file=sys.stderr)
        return 2
    engines = ("columnar", "memory") if args.engine == "both" else (args.engine,)
    return checkbench.main(spec, engines=engines, keep=args.keep, memory_limit=args.memory_limit)


def cmd_fault(args: argparse.Namespace) -> int:
    """Hold a named fault on the kept stack, then heal; print when it took effect and healed."""
    import threading

    from harness.history import History
    from harness.nemesis import Nemesis
    from harness.nemesis.core import seconds
    from harness.nemesis.registry import named

    fault = named(args.name)
    stack = open_stack(_kept_stack_options(args))
    if missing := fault.missing(stack):
        print(
            f"{fault.name} needs {', '.join(missing)}, which the {args.stack} stack {stack.name} "
            "lacks",
            file=sys.stderr,
        )
        return 2
    endpoints = stack.up()  # the kept stack; brought up first if it is not running
    history = History()
    nemesis = Nemesis(stack, endpoints, history)
    print(f"{args.name} on {stack.name} for {args.hold:g} s (Ctrl-C heals at once)", flush=True)
    _interrupt_on(signal.SIGINT, signal.SIGTERM)
    try:
        with fault.start(nemesis):
            threading.Event().wait(args.hold)  # the fault's length is the user's choice
    except KeyboardInterrupt:
        print("interrupted: healed", file=sys.stderr)
    for f in history.faults():
        print(
            f"{f.name}: {f.detail}; effect {seconds(f.effect_s)}, held {seconds(f.duration_s)}, "
            f"heal {seconds(f.heal_s)}"
        )
    return 0


def cmd_hosts(args: argparse.Namespace) -> int:
    from harness import hosts

    _interrupt_on(signal.SIGINT, signal.SIGTERM)
    if args.action == "up":
        return hosts.command_up(args.names.split(","), args.hosts)
    if args.action == "down":
        return hosts.command_down(args.hosts)
    return hosts.command_status()


def _interrupt_on(*signals: signal.Signals) -> None:
    """KeyboardInterrupt on these signals, so faults heal and stacks come down on the way out
    (also when started in the background, where SIGINT arrives ignored). Not for `run`:
    its pytest child gets the signal itself and cleans up."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in signals:
        signal.signal(sig, interrupt)


def _backend_options(command: argparse.ArgumentParser, backends: tuple[str, ...]) -> None:
    command.add_argument(
        "--stack", choices=backends, default="compose", help="the stack backend (default compose)"
    )
    command.add_argument(
        "--hosts",
        type=Path,
        help="with --stack swarm: a file listing real machines' Docker engines (default: "
        "hosts made on this machine)",
    )


KEPT_BACKENDS = ("compose", "swarm")  # what `up` can bring up and keep


def _stack_options(command: argparse.ArgumentParser) -> None:
    _backend_options(command, BACKENDS)
    command.add_argument("--stack-endpoints", type=Path, help="with --stack external")
    command.add_argument(
        "--reuse-stack",
        action="store_true",
        help="use the kept stack (qoe-dev; qoe-dev-swarm with --stack swarm)",
    )
    command.add_argument("--stream-replicas", type=int, default=3, help="compose: default 3")
    command.add_argument("--report-dir", type=Path, default=ROOT / "reports" / "out")


def _load_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    load = sub.add_parser(
        "load",
        help="run a locust load profile with SLO gates and the exactly-once check",
        description="Exit status 1 names each breached threshold with its limit and value.",
    )
    load.add_argument(
        "profile",
        choices=("steady", "step", "soak", "chaos", "worker"),
        help="worker: a locust worker for a master on another machine (--master)",
    )
    load.add_argument("--rate", type=float, default=2000, help="offered events/s (step: start)")
    load.add_argument("--duration", type=float, help="seconds (step: per stage; soak: 600)")
    load.add_argument("--users", type=int, default=0, help="locust users (default: from rate)")
    load.add_argument("--batch", type=int, default=200, help="events per batch")
    load.add_argument("--probes", type=int, default=20, help="probe cardinality")
    load.add_argument("--targets", type=int, default=5, help="targets per probe")
    load.add_argument("--degraded", type=float, default=0.2, help="degraded pair fraction")
    load.add_argument("--workers", type=int, default=0, help="distributed: N locust workers")
    load.add_argument(
        "--remote-workers", type=int, default=0, help="distributed: workers started elsewhere"
    )
    load.add_argument(
        "--master-bind", help="the master's address (default 0.0.0.0 with remote workers)"
    )
    load.add_argument("--master-port", type=int, help="default 5557 with remote workers")
    load.add_argument("--master", help="worker: the master's HOST:PORT")
    load.add_argument("--ingest", help="worker: ingest URLs as this machine reaches them")
    load.add_argument("--out", type=Path, help="worker: its outcome folder")
    load.add_argument("--step-factor", type=float, default=1.5, help="step: rate multiplier")
    load.add_argument("--max-rate", type=float, default=50_000, help="step: last rate tried")
    load.add_argument("--fault", default="cut-ingest-nats", help="chaos: the fault to inject")
    load.add_argument("--fault-at", type=float, help="chaos: seconds in (default duration/3)")
    load.add_argument("--fault-for", type=float, default=8.0, help="chaos: fault seconds")
    load.add_argument("--slo", type=Path, help="SLO file (default scenarios/load/slo.toml)")
    for name in (
        "max-error-rate",
        "max-p95-ms",
        "max-p99-ms",
        "min-events-per-s",
        "max-freshness-p95-s",
        "max-convergence-s",
    ):
        load.add_argument(f"--{name}", type=float, help="override the SLO file")
    _stack_options(load)
    bench = sub.add_parser(
        "benchmark", help="measure the stack's capacity; JSON and HTML under reports/out/<run>/"
    )
    bench.add_argument("--replicas", default="1,3", help="stream replica counts to measure")
    bench.add_argument("--start-rate", type=float, default=4000)
    bench.add_argument("--step-factor", type=float, default=1.15)
    bench.add_argument("--max-rate", type=float, default=40_000)
    bench.add_argument("--stage", type=float, default=20, help="seconds per stage")
    bench.add_argument("--batch", type=int, default=500)
    bench.add_argument("--workers", type=int, default=0)
    bench.add_argument("--report-dir", type=Path, default=ROOT / "reports" / "out")
    _backend_options(bench, KEPT_BACKENDS)


def _positive(unit: str) -> Callable[[str], float]:
    """An argparse type: a number > 0 of `unit`. A non-number gets the same message: for a
    ValueError argparse would name the function rather than say what was expected."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not value > 0:  # nan too
            raise argparse.ArgumentTypeError(f"expected a number of {unit} > 0, got {text}")
        return value

    return parse


def _fault_help() -> tuple[list[str], str]:
    """The named faults, and a listing of them for `fault --help`."""
    from harness.nemesis.registry import FAULTS

    width = max(map(len, FAULTS))
    listing = "\n".join(f"  {f.name:{width}}  {f.description}" for f in FAULTS.values())
    return list(FAULTS), listing


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m harness", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True)
    up = sub.add_parser(
        "up", help="bring up a kept stack (qoe-dev, qoe-dev-swarm) for local iteration"
    )
    _backend_options(up, KEPT_BACKENDS)
    down = sub.add_parser("down", help="remove the kept stack and anything killed runs left behind")
    _backend_options(down, KEPT_BACKENDS)
    sub.add_parser(
        "status",
        help="the harness's containers: on the default engine, and on each host made here",
    )
    run = sub.add_parser("run", help="run a suite of scenarios with pytest")
    run.add_argument("suite", choices=sorted(SUITES))
    run.add_argument("pytest_args", nargs=argparse.REMAINDER, help="passed on to pytest")
    report = sub.add_parser("report", help="re-render a run's summary (default: the latest run)")
    report.add_argument("run_dir", nargs="?", type=Path)
    sub.add_parser("build", help="build the reference stack's images")
    names, listing = _fault_help()
    fault = sub.add_parser(
        "fault",
        help="hold a named fault on the kept stack (qoe-dev, qoe-dev-swarm), then heal it",
        description=f"Hold a named fault on the kept stack, then heal it. Faults:\n{listing}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fault.add_argument("name", choices=names, metavar="NAME")
    fault.add_argument(
        "--hold", type=_positive("seconds"), default=10.0, help="seconds (default 10)"
    )
    _backend_options(fault, KEPT_BACKENDS)
    _load_parser(sub)
    hosts_cmd = sub.add_parser(
        "hosts",
        help="kept Docker hosts here (a namespace + dockerd each, a swarm) to try things on",
    )
    hosts_cmd.add_argument("action", choices=("up", "down", "status"))
    hosts_cmd.add_argument("--names", default="h1,h2,h3", help="up: host names, comma-separated")
    hosts_cmd.add_argument(
        "--hosts",
        type=Path,
        help="a hosts file: up joins those machines; down removes every harness firewall rule on them",
    )
    mutate = sub.add_parser(
        "mutate",
        help="mutation testing: cosmic-ray's mutants of the services, the scenarios as the test",
    )
    mutate.add_argument("--sample", type=_mutant_count, default=20, help="mutants (default 20)")
    mutate.add_argument("--seed", type=int, help="which mutants are drawn (default: random)")
    mutate.add_argument(
        "--budget-minutes",
        type=_positive("minutes"),
        default=30.0,
        help="no mutant is started after this (default 30); those left are reported not run",
    )
    mutate.add_argument(
        "--only",
        action="append",
        metavar="ID",
        help="run this mutant (an id from a report's mutation.md) instead of a sample; repeatable",
    )
    check_bench = sub.add_parser(
        "check-bench",
        help="check a synthetic load history of N events; print time and peak memory",
    )
    check_bench.add_argument("--events", type=int, default=1_000_000)
    check_bench.add_argument("--engine", choices=("columnar", "memory", "both"), default="columnar")
    check_bench.add_argument("--batch", type=int, default=200, help="events per batch")
    check_bench.add_argument("--events-per-s", type=float, default=5000, help="sets the span")
    for error in ("lost", "doubled", "moved"):
        check_bench.add_argument(
            f"--{error}", type=int, default=2, help=f"acknowledged events {error} (seeded errors)"
        )
    check_bench.add_argument("--seed", type=int, default=1)
    check_bench.add_argument("--memory-limit", default="1GB", help="DuckDB's memory limit")
    check_bench.add_argument("--keep", type=Path, help="write the history here and keep it")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    handlers = {
        "up": cmd_up,
        "down": cmd_down,
        "status": cmd_status,
        "run": cmd_run,
        "report": cmd_report,
        "build": cmd_build,
        "load": cmd_load,
        "benchmark": cmd_benchmark,
        "fault": cmd_fault,
        "check-bench": cmd_check_bench,
        "mutate": cmd_mutate,
        "hosts": cmd_hosts,
    }
    try:
        return handlers[args.command](args)
    except StackError as error:  # it says what was wrong and what to do
        print(f"stack error: {error}", file=sys.stderr)
        return 1
