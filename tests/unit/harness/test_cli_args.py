"""`python -m harness`'s arguments: each subcommand's help, bad arguments as usage errors (exit
status 2, saying what is wrong), and the parsed values reaching the function the subcommand
calls. Those functions are replaced here, so nothing starts: no stack, no Docker, no pytest."""

from __future__ import annotations

import signal
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest

import harness.benchmark
import harness.checkbench
import harness.hosts
import harness.load
import harness.load.locust
import harness.report
import harness.stack
from harness import cli
from harness.load import LoadPlan
from harness.nemesis.registry import FAULTS
from harness.stack import RUN_LABEL, Endpoints, StackError, StackOptions, StackSettings

INTERRUPT_ON = cli._interrupt_on  # the real one; the tests' commands get a no-op

SUBCOMMANDS = (
    "up",
    "down",
    "status",
    "run",
    "report",
    "build",
    "fault",
    "load",
    "benchmark",
    "hosts",
    "check-bench",
)


@dataclass
class Calls:
    """What a replaced function was called with, in order."""

    made: list[tuple[Any, ...]] = field(default_factory=list)

    def record(self, *args: Any, returns: int = 0) -> int:
        self.made.append(args)
        return returns

    @property
    def only(self) -> tuple[Any, ...]:
        (call,) = self.made
        return call


@pytest.fixture
def calls() -> Calls:
    return Calls()


@pytest.fixture(autouse=True)
def no_signal_handlers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The long-running commands turn SIGINT and SIGTERM into KeyboardInterrupt; not in the
    test process."""
    monkeypatch.setattr(cli, "_interrupt_on", lambda *signals: None)


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """argparse's message for `argv`, which must be a usage error (exit status 2)."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(list(argv))
    assert exit_.value.code == 2
    return capsys.readouterr().err


def help_text(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli.main([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


# -- help -------------------------------------------------------------------------------------


def test_the_top_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_text(capsys)
    assert text.startswith("usage: python -m harness")
    for name in SUBCOMMANDS:
        assert f"\n    {name} " in text, name


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_subcommand_has_help(capsys: pytest.CaptureFixture[str], name: str) -> None:
    assert help_text(capsys, name).startswith(f"usage: python -m harness {name} ")


def test_fault_help_lists_the_named_faults_with_what_they_do(
    capsys: pytest.CaptureFixture[str],
) -> None:
    lines = help_text(capsys, "fault").splitlines()
    for fault in FAULTS.values():
        assert any(line.split() == [fault.name, *fault.description.split()] for line in lines)


# -- usage errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ((), "the following arguments are required: command"),
        (("deploy",), "argument command: invalid choice: 'deploy'"),
        (("run",), "the following arguments are required: suite"),
        (("run", "nightly"), "argument suite: invalid choice: 'nightly'"),
        (("up", "--stack", "external"), "argument --stack: invalid choice: 'external'"),
        (("down", "--stack", "k8s"), "argument --stack: invalid choice: 'k8s'"),
        (("status", "--all"), "unrecognized arguments: --all"),
        (("report", "a", "b"), "unrecognized arguments: b"),
        (("fault",), "the following arguments are required: NAME"),
        (("fault", "unplug-everything"), "argument NAME: invalid choice: 'unplug-everything'"),
        (("fault", "kill-ingest-1", "--hold", "0"), "expected a number of seconds > 0, got 0"),
        (
            ("fault", "kill-ingest-1", "--hold", "long"),
            "expected a number of seconds > 0, got long",
        ),
        (("load", "burst"), "argument profile: invalid choice: 'burst'"),
        (("load", "steady", "--rate", "fast"), "argument --rate: invalid float value: 'fast'"),
        (("load", "steady", "--stack", "k8s"), "argument --stack: invalid choice: 'k8s'"),
        (("benchmark", "--stack", "external"), "argument --stack: invalid choice: 'external'"),
        (("benchmark", "--batch", "big"), "argument --batch: invalid int value: 'big'"),
        (("hosts", "restart"), "argument action: invalid choice: 'restart'"),
        (("check-bench", "--engine", "gpu"), "argument --engine: invalid choice: 'gpu'"),
        (("check-bench", "--events", "1e6"), "argument --events: invalid int value: '1e6'"),
    ],
)
def test_a_bad_argument_is_a_usage_error_saying_what_is_wrong(
    capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], message: str
) -> None:
    err = usage_error(capsys, *argv)
    assert err.startswith("usage: python -m harness")
    assert message in err


def test_a_load_plan_the_command_rejects_exits_2_before_anything_starts(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, calls: Calls
) -> None:
    monkeypatch.setattr(harness.load, "run_profile", calls.record)
    assert cli.main(["load", "chaos", "--fault", "unplug-everything"]) == 2
    assert "load chaos: unknown fault 'unplug-everything'" in capsys.readouterr().err
    assert calls.made == []


def test_a_load_worker_needs_its_master(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, calls: Calls
) -> None:
    monkeypatch.setattr(harness.load.locust, "run_worker", calls.record)
    assert cli.main(["load", "worker"]) == 2
    assert "load worker needs --master HOST:PORT" in capsys.readouterr().err
    assert calls.made == []


def test_a_check_bench_spec_the_command_rejects_exits_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, calls: Calls
) -> None:
    monkeypatch.setattr(harness.checkbench, "main", calls.record)
    assert cli.main(["check-bench", "--events", "10", "--batch", "200"]) == 2
    assert "check-bench: --events must be at least one batch (200), got 10" in (
        capsys.readouterr().err
    )
    assert calls.made == []


# -- the parsed values reach the function called ----------------------------------------------


@dataclass
class FakeStack:
    """A stack with no capabilities (`Stack` only) that records what it was asked."""

    name: str = "qoe-dev"
    settings: StackSettings = field(default_factory=StackSettings)
    bring_up_s: float | None = None
    asked: list[str] = field(default_factory=list)

    def up(self) -> Endpoints:
        self.asked.append("up")
        return self.endpoints()

    def endpoints(self) -> Endpoints:
        return Endpoints(ingest_urls=(), ingest_token="", database_dsn="")

    def down(self) -> None:
        self.asked.append("down")

    def logs(self, services: list[str] | None = None, tail: int = 200) -> dict[str, str]:
        return {}


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[tuple[StackOptions, FakeStack]]:
    """Every stack the CLI opens: its options and the fake it got."""
    stacks: list[tuple[StackOptions, FakeStack]] = []

    def open_fake(options: StackOptions) -> FakeStack:
        stacks.append((options, FakeStack()))
        return stacks[-1][1]

    monkeypatch.setattr(cli, "open_stack", open_fake)
    return stacks


def test_up_brings_up_the_kept_stack_on_the_backend_asked_for(
    capsys: pytest.CaptureFixture[str], opened: list[tuple[StackOptions, FakeStack]]
) -> None:
    assert cli.main(["up", "--stack", "swarm", "--hosts", "machines.txt"]) == 0
    ((options, stack),) = opened
    assert (options.backend, options.project, options.run_id) == (
        "swarm",
        "qoe-dev-swarm",
        "qoe-dev-swarm",
    )
    assert (options.keep, options.hosts_file) == (True, Path("machines.txt"))
    assert stack.asked == ["up"]
    assert "python -m harness run smoke --reuse-stack --stack swarm" in capsys.readouterr().out


def test_down_removes_the_kept_stack_and_reaps_orphans(
    monkeypatch: pytest.MonkeyPatch, opened: list[tuple[StackOptions, FakeStack]], calls: Calls
) -> None:
    monkeypatch.setattr(cli, "reap_orphans", calls.record)
    assert cli.main(["down"]) == 0
    ((options, stack),) = opened
    assert (options.backend, options.project, options.keep) == ("compose", "qoe-dev", False)
    assert stack.asked == ["down"]
    assert calls.only == ()


def test_a_stack_error_exits_1_with_its_message(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(options: StackOptions) -> FakeStack:
        raise StackError("no Docker engine answers; start dockerd")

    monkeypatch.setattr(cli, "open_stack", refuse)
    assert cli.main(["up"]) == 1
    assert capsys.readouterr().err == "stack error: no Docker engine answers; start dockerd\n"


@pytest.mark.parametrize("suite", sorted(cli.SUITES))
def test_run_starts_pytest_on_the_suite_with_the_rest_of_the_arguments(
    monkeypatch: pytest.MonkeyPatch, calls: Calls, suite: str
) -> None:
    monkeypatch.setattr(
        cli.subprocess, "call", lambda command, cwd: calls.record(command, cwd, returns=5)
    )
    assert cli.main(["run", suite, "-x", "--run-seed", "3", "-k", "dedup"]) == 5
    command, cwd = calls.only
    assert command == [
        sys.executable,
        "-m",
        "pytest",
        *cli.SUITES[suite],
        "-x",
        "--run-seed",
        "3",
        "-k",
        "dedup",
    ]
    assert cwd == cli.ROOT


def test_build_runs_the_stack_build_script(monkeypatch: pytest.MonkeyPatch, calls: Calls) -> None:
    monkeypatch.setattr(cli.subprocess, "call", lambda command: calls.record(command, returns=3))
    assert cli.main(["build"]) == 3
    assert calls.only == ([sys.executable, str(cli.ROOT / "stack" / "build.py")],)


def test_report_renders_the_run_folder_given_or_the_latest(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    calls: Calls,
    tmp_path: Path,
) -> None:
    monkeypatch.setattr(harness.report, "render", lambda run_dir: calls.record(run_dir))
    monkeypatch.setattr(cli, "ROOT", tmp_path)
    runs = tmp_path / "reports" / "out"
    for run_id in ("20261201-090000-aaaa", "20261202-090000-bbbb", "20261130-230000-cccc"):
        (runs / run_id).mkdir(parents=True)
    assert cli.main(["report", str(runs / "20261130-230000-cccc")]) == 0
    assert cli.main(["report"]) == 0
    assert calls.made == [(runs / "20261130-230000-cccc",), (runs / "20261202-090000-bbbb",)]


@dataclass
class FakeContainer:
    name: str
    status: str
    labels: dict[str, str]
    attrs: dict[str, Any]


def test_status_lists_the_harness_containers_by_name_then_the_hosts_made_here(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, calls: Calls
) -> None:
    healthy = {"State": {"Health": {"Status": "healthy"}}}
    containers = [
        FakeContainer("qoe-r1-nats-1", "running", {RUN_LABEL: "r1"}, healthy),
        FakeContainer("qoe-r1-aggregator-1", "exited", {RUN_LABEL: "r1"}, {"State": {}}),
    ]

    class Containers:
        def list(self, **query: Any) -> list[FakeContainer]:
            calls.record(query)
            return containers

    class Client:
        containers = Containers()

    monkeypatch.setattr(harness.stack.docker, "from_env", Client)
    monkeypatch.setattr(harness.hosts, "status_lines", lambda: ["hosts-dev (kept)", "  h1 ..."])
    assert cli.main(["status"]) == 0
    assert calls.only == ({"all": True, "filters": {"label": RUN_LABEL}},)
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert rows == [
        ["r1", "qoe-r1-aggregator-1", "exited", "-"],
        ["r1", "qoe-r1-nats-1", "running", "healthy"],
        ["hosts-dev", "(kept)"],  # then the hosts made here, each with its containers
        ["h1", "..."],
    ]


def test_load_hands_its_plan_and_stack_options_to_run_profile(
    monkeypatch: pytest.MonkeyPatch, calls: Calls, tmp_path: Path
) -> None:
    monkeypatch.setattr(harness.load, "run_profile", calls.record)
    endpoints = tmp_path / "endpoints.json"
    argv = ["load", "step", "--rate", "100", "--step-factor", "2", "--max-rate", "400"]
    argv += ["--duration", "5", "--batch", "50", "--max-p99-ms", "80"]
    argv += ["--stack", "external", "--stack-endpoints", str(endpoints)]
    argv += ["--report-dir", str(tmp_path), "--stream-replicas", "1"]
    assert cli.main(argv) == 0
    plan, options = calls.only
    assert isinstance(plan, LoadPlan)
    assert (plan.profile, plan.step_rates, plan.report_dir) == ("step", (100, 200, 400), tmp_path)
    assert (plan.spec.rate, plan.spec.duration_s, plan.spec.batch_size) == (100, 5, 50)
    assert plan.slo.max_p99_ms == 80
    assert (options.backend, options.endpoints_file) == ("external", endpoints)
    assert options.settings.stream_replicas == 1


def test_load_with_reuse_stack_runs_on_the_kept_stack(
    monkeypatch: pytest.MonkeyPatch, calls: Calls
) -> None:
    monkeypatch.setattr(harness.load, "run_profile", calls.record)
    assert cli.main(["load", "chaos", "--fault", "kill-ingest-1", "--reuse-stack"]) == 0
    plan, options = calls.only
    assert (plan.fault, plan.fault_at_s) == ("kill-ingest-1", 10)  # a third of the 30 s default
    assert (options.project, options.keep) == ("qoe-dev", True)


def test_a_load_worker_gets_its_master_ingest_and_folder(
    monkeypatch: pytest.MonkeyPatch, calls: Calls, tmp_path: Path
) -> None:
    monkeypatch.setattr(harness.load.locust, "run_worker", calls.record)
    argv = ["load", "worker", "--master", "10.0.0.5:5557", "--ingest", "http://i:8080"]
    assert cli.main([*argv, "--out", str(tmp_path)]) == 0
    assert calls.only == ("10.0.0.5:5557", tmp_path, "http://i:8080")


def test_benchmark_gets_its_arguments_and_backend(
    monkeypatch: pytest.MonkeyPatch, calls: Calls
) -> None:
    monkeypatch.setattr(harness.benchmark, "command", calls.record)
    assert cli.main(["benchmark", "--replicas", "3", "--stage", "5", "--stack", "swarm"]) == 0
    args, options = calls.only
    assert (args.replicas, args.stage, args.batch) == ("3", 5.0, 500)
    assert (options.backend, options.hosts_file) == ("swarm", None)


def test_check_bench_gets_its_spec_and_engines(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    received: dict[str, Any] = {}

    def bench(spec: harness.checkbench.BenchSpec, **options: Any) -> int:
        received.update(spec=spec, **options)
        return 0

    monkeypatch.setattr(harness.checkbench, "main", bench)
    argv = ["check-bench", "--events", "1000", "--batch", "100", "--lost", "0", "--seed", "9"]
    argv += ["--engine", "both", "--memory-limit", "2GB", "--keep", str(tmp_path)]
    assert cli.main(argv) == 0
    spec = received.pop("spec")
    assert (spec.events, spec.batch, spec.lost, spec.doubled, spec.seed) == (1000, 100, 0, 2, 9)
    assert received == {"engines": ("columnar", "memory"), "keep": tmp_path, "memory_limit": "2GB"}


@pytest.mark.parametrize(
    ("argv", "called"),
    [
        (["hosts", "up", "--names", "a,b"], ("command_up", ["a", "b"], None)),
        (["hosts", "up", "--hosts", "m.txt"], ("command_up", ["h1", "h2", "h3"], Path("m.txt"))),
        (["hosts", "down", "--hosts", "m.txt"], ("command_down", Path("m.txt"))),
        (["hosts", "status"], ("command_status",)),
    ],
)
def test_hosts_calls_the_action_with_its_arguments(
    monkeypatch: pytest.MonkeyPatch, calls: Calls, argv: list[str], called: tuple[Any, ...]
) -> None:
    for action in ("command_up", "command_down", "command_status"):
        monkeypatch.setattr(harness.hosts, action, partial(calls.record, action))
    assert cli.main(argv) == 0
    assert calls.only == called


def test_fault_names_the_capability_the_kept_stack_lacks(
    capsys: pytest.CaptureFixture[str], opened: list[tuple[StackOptions, FakeStack]]
) -> None:
    assert cli.main(["fault", "kill-ingest-1", "--hold", "0.5"]) == 2
    assert capsys.readouterr().err == (
        "kill-ingest-1 needs ServiceControl, which the compose stack qoe-dev lacks\n"
    )
    ((options, stack),) = opened
    assert (options.project, options.keep) == ("qoe-dev", True)
    assert stack.asked == []  # not brought up for a fault it cannot take


def test_the_long_commands_heal_and_clean_up_on_sigterm_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    handlers: dict[int, Any] = {}
    monkeypatch.setattr(signal, "signal", lambda sig, handler: handlers.__setitem__(sig, handler))
    INTERRUPT_ON(signal.SIGINT, signal.SIGTERM)
    assert set(handlers) == {signal.SIGINT, signal.SIGTERM}
    with pytest.raises(KeyboardInterrupt, match="signal 15"):
        handlers[signal.SIGTERM](signal.SIGTERM, None)
