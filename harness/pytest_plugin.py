"""The pytest face of the harness: options, markers, fixtures and hooks over the harness API.

Registered from the root conftest.py and as the `qoe_harness` pytest11 entry point. One
session-scoped fixture owns the stack's lifetime; everything a run produces lands in
reports/out/<run-id>/.
"""

from __future__ import annotations

import contextlib
import random
import re
import shlex
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import httpx
import psycopg
import pytest
from hypothesis import HealthCheck, settings

from harness import checker, ledger
from harness.explain import Explanation, explain
from harness.history import History, Mark, Timeline
from harness.nats_admin import JetStreamAdmin, LagSampler
from harness.nemesis import Nemesis
from harness.report import RunReport
from harness.stack import (
    BACKENDS,
    ROOT,
    Endpoints,
    Reconfigurable,
    ServiceControl,
    Stack,
    StackError,
    StackOptions,
    StackSettings,
    kept_project,
    new_run_id,
    open_stack,
)

if TYPE_CHECKING:
    from typing_extensions import TypeForm
from harness.workload import EventGenerator, IngestClient

MARKERS = {
    "smoke": "fast end-to-end checks that gate every change",
    "e2e": "end-to-end aggregates and diagnoses against the oracle",
    "dedup": "deduplication: every event counted once",
    "partition": "network partitions through toxiproxy or docker networks",
    "restart": "process kills, restarts and pauses",
    "failover": "database failover",
    "load": "locust-driven load with SLO gates",
    "chaos": "faults, generated schedules, chaos under load",
    "slow": "long runs left out of the default CI selection",
    "meta": "seeded-bug meta-tests: the harness must fail a broken stack",
    "component": "one real service in a throwaway container (testcontainers)",
    "multihost": "host faults on a stack spread over Docker hosts (--stack swarm)",
}

# Every profile runs examples against the live stack through function-scoped fixtures (one
# stack, reused by each example on purpose), with no per-example deadline: a network round trip
# is not a slow test. `live` is loaded unless the run names another profile, with or without CI.
settings.register_profile(
    "live", max_examples=8, deadline=None, suppress_health_check=list(HealthCheck)
)
settings.register_profile(
    "thorough", max_examples=100, deadline=None, suppress_health_check=list(HealthCheck)
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("qoe-harness")
    group.addoption(
        "--stack",
        choices=BACKENDS,
        default="compose",
        help="compose: build and run the reference stack; swarm: the same over several Docker "
        "hosts; external: use --stack-endpoints",
    )
    group.addoption(
        "--stack-endpoints",
        type=Path,
        help="JSON file of an already-deployed stack's endpoints (with --stack external)",
    )
    group.addoption(
        "--hosts",
        type=Path,
        help="with --stack swarm: a file listing real machines' Docker engines (default: hosts "
        "made on this machine)",
    )
    group.addoption(
        "--reuse-stack",
        action="store_true",
        help="keep the stack (qoe-dev; qoe-dev-swarm with --stack swarm) up after the run and "
        "reuse it next time",
    )
    group.addoption("--run-seed", type=int, help="seed of every generator (default: random)")
    group.addoption(
        "--report-dir",
        type=Path,
        default=ROOT / "reports" / "out",
        help="where each run's folder goes (default reports/out)",
    )
    group.addoption(
        "--stack-timeout", type=int, default=180, help="seconds for the stack to become healthy"
    )


@dataclass
class Run:
    """One harness run: its identity, seed, folder, timeline and report."""

    run_id: str
    seed: int
    run_dir: Path
    timeline: Timeline = field(default_factory=Timeline)
    report: RunReport | None = None
    stack: Stack | None = None

    def scenario_dir(self, nodeid: str) -> Path:
        path = self.run_dir / "scenarios" / re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid)[-120:]
        path.mkdir(parents=True, exist_ok=True)
        return path


RUN_KEY = pytest.StashKey[Run]()


def _run(config: pytest.Config) -> Run:
    return config.stash[RUN_KEY]


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    # SIGTERM (CI cancelling a job) takes the same path as Ctrl-C, so teardown runs.
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    for name, description in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")
    if not hasattr(config, "workerinput"):
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    seed = config.getoption("--run-seed")
    seed = seed if seed is not None else random.SystemRandom().randrange(2**31)
    run_id = new_run_id()
    run_dir = Path(config.getoption("--report-dir")) / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    run = Run(run_id=run_id, seed=seed, run_dir=run_dir)
    pytest_ = ".venv/bin/python -m pytest"
    run.report = RunReport(
        run_dir=run_dir,
        run_id=run_id,
        seed=seed,
        stack_info={"backend": config.getoption("--stack")},
        command=shlex.join([*pytest_.split(), *_without(config, "--run-seed")]),
        scenario_command=shlex.join(
            [*pytest_.split(), *_without(config, "--run-seed", "-m", "-k")]
        ),
    )
    config.stash[RUN_KEY] = run
    # Reports beside the summary unless the user asked for them elsewhere.
    if getattr(config.option, "htmlpath", None) is None and config.pluginmanager.hasplugin("html"):
        config.option.htmlpath = str(run_dir / "pytest.html")
        config.option.self_contained_html = True
    if getattr(config.option, "xmlpath", None) is None:
        config.option.xmlpath = str(run_dir / "junit.xml")
    if config.getoption("hypothesis_profile", None) is None:
        settings.load_profile("live")


def _without(config: pytest.Config, *options: str) -> list[str]:
    """The run's arguments without `options` (and their values) and, when -m or -k go, without
    the selection's paths too: what a single nodeid can follow."""
    drop_paths = "-m" in options or "-k" in options
    paths = set(config.args) if drop_paths else set()
    kept: list[str] = []
    args = iter(config.invocation_params.args)
    for arg in args:
        name = arg.split("=", 1)[0]
        if name in options:
            if "=" not in arg:
                next(args, None)  # its value
        elif not (len(name) > 2 and name[:2] in options) and arg not in paths:
            kept.append(arg)
    return kept


def pytest_report_header(config: pytest.Config) -> list[str]:
    run = _run(config)
    return [f"qoe-harness run {run.run_id}, seed {run.seed} (reproduce: --run-seed {run.seed})"]


# -- the stack ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def run(request: pytest.FixtureRequest) -> Run:
    return _run(request.config)


def stack_options(config: pytest.Config, run_id: str) -> StackOptions:
    """The run's StackOptions from the command line (the only place pytest options are read)."""
    reuse = config.getoption("--reuse-stack")
    backend = config.getoption("--stack")
    return StackOptions(
        backend=backend,
        run_id=kept_project(backend) if reuse else run_id,
        project=kept_project(backend) if reuse else None,
        keep=reuse,
        timeout_s=config.getoption("--stack-timeout"),
        endpoints_file=config.getoption("--stack-endpoints"),
        hosts_file=config.getoption("--hosts"),
    )


@pytest.fixture(scope="session")
def stack(request: pytest.FixtureRequest, run: Run) -> Iterator[Stack]:
    """The stack under test for the whole session; always torn down (unless --reuse-stack)."""
    options = stack_options(request.config, run.run_id)
    try:
        the_stack = open_stack(options)
    except StackError as error:
        raise pytest.UsageError(str(error)) from error
    run.stack = the_stack
    recorder = None
    try:
        the_stack.up()
        run.timeline.append(
            Mark(time.time(), "stack", "up", the_stack.name, duration_s=the_stack.bring_up_s)
        )
        if options.backend == "compose":  # its containers are all on the default engine
            from harness.docker_events import ContainerEventRecorder

            recorder = ContainerEventRecorder(options.run_id, run.timeline).__enter__()
        yield the_stack
    finally:
        if recorder is not None:
            recorder.__exit__(None, None, None)
        the_stack.down()


Capability = TypeVar("Capability")


def require(stack: Stack, capability: TypeForm[Capability], why: str) -> Capability:
    """The stack as `capability` (ServiceControl, Reconfigurable, Metered: harness.stack);
    the scenario is skipped, saying why, when its stack lacks it."""
    # TypeForm, not type[...]: the capabilities are Protocols, which mypy does not take where
    # a type[...] is expected; they are runtime-checkable, so isinstance works on them.
    protocol = cast(type, capability)
    if not isinstance(stack, protocol):
        pytest.skip(f"{why}: the {stack.name} stack has no {protocol.__name__}")
    return cast(Capability, stack)


@pytest.fixture
def endpoints(stack: Stack) -> Endpoints:
    """Read per test. A fault that restarts a service moves its host ports: a scenario that
    reaches a service directly after one reads `stack.endpoints()` again."""
    return stack.endpoints()


@pytest.fixture
def reconfigured_stack(stack: Stack, request: pytest.FixtureRequest) -> Iterator[Endpoints]:
    """The stack with the settings given by `@pytest.mark.parametrize(..., indirect=True)`,
    restored to the defaults afterwards.

    A seeded configuration may lose, double or move what the stack's own probes send, and
    their ledgers count everything since the stack came up, for later scenarios to check. So
    the probes are stopped, their spools delivered and every stored event acknowledged by the
    aggregators before it goes on, and they generate again only once the defaults are back
    (a scenario may start them under the seeded configuration; they are stopped again first).
    """
    reconfigurable = require(stack, Reconfigurable, "seeded bugs need a reconfigurable stack")
    wanted: StackSettings = request.param
    before = stack.endpoints()
    ledger.stop_and_drain(ledger.probe_urls(before))
    try:
        JetStreamAdmin(before.nats_urls).await_acknowledged(
            "the aggregators acknowledging every stored event before the seeded configuration"
        )
        yield reconfigurable.apply(wanted)
    finally:
        try:
            # A probe out of reach (its host cut or down) cannot send either; the restore
            # must happen all the same, and starting it again below reports it.
            with contextlib.suppress(httpx.HTTPError):
                ledger.stop(ledger.probe_urls(stack.endpoints()))
            reconfigurable.apply(StackSettings())
        finally:
            ledger.start(ledger.probe_urls(stack.endpoints()))


# -- per scenario ---------------------------------------------------------------------------


@pytest.fixture
def scenario_dir(request: pytest.FixtureRequest, run: Run) -> Path:
    return run.scenario_dir(request.node.nodeid)


@pytest.fixture
def history(request: pytest.FixtureRequest, scenario_dir: Path) -> Iterator[History]:
    recorded = History()
    _pictured(request.node).append(recorded)
    yield recorded
    recorded.save(scenario_dir / "history.jsonl")


PICTURED_KEY = pytest.StashKey[list[History]]()  # what the scenario's picture draws


def _pictured(node: pytest.Item) -> list[History]:
    return node.stash.setdefault(PICTURED_KEY, [])


@pytest.fixture
def plot_history(request: pytest.FixtureRequest) -> Callable[[History], None]:
    """Call with a History of the scenario's own (a schedule's examples, a load run's merged
    outcomes) to draw its operations in the scenario's picture beside the `history` fixture's."""
    return _pictured(request.node).append


DETAILS_KEY = pytest.StashKey[dict[str, Any]]()
VERDICT_KEY = pytest.StashKey[checker.Verdict]()
EXPLANATION_KEY = pytest.StashKey[tuple[Explanation, ...]]()
LAG_KEY = pytest.StashKey[LagSampler]()


@pytest.fixture
def scenario_seed(request: pytest.FixtureRequest, run: Run) -> int:
    return random.Random(f"{run.seed}:{request.node.nodeid}").randrange(2**31)


@pytest.fixture
def probe_prefix(request: pytest.FixtureRequest, run: Run) -> str:
    """A probe-id prefix unique to this scenario in this run, so scenarios never share windows."""
    index = (
        request.session.items.index(request.node) if request.node in request.session.items else 0
    )
    return f"h{run.run_id.replace('-', '')[-10:]}t{index}"


@pytest.fixture
def generator(scenario_seed: int, probe_prefix: str, endpoints: Endpoints) -> EventGenerator:
    return EventGenerator(
        seed=scenario_seed,
        run_prefix=probe_prefix,
        probes=[f"{probe_prefix}-p{i}" for i in range(3)],
        targets=["cdn.example.net", "api.example.net", "voip.example.net"],
        window_seconds=endpoints.window_seconds,
    )


@pytest.fixture
def client(
    request: pytest.FixtureRequest, endpoints: Endpoints, history: History
) -> Iterator[IngestClient]:
    with IngestClient(
        endpoints.ingest_urls, endpoints.ingest_token, history, process=request.node.name
    ) as the_client:
        yield the_client


@pytest.fixture
def db(endpoints: Endpoints) -> Iterator[psycopg.Connection]:
    with psycopg.connect(endpoints.database_dsn, autocommit=True, connect_timeout=5) as conn:
        yield conn


@dataclass
class Verifier:
    """Oracle vs observed for one scenario: waits for convergence and fails with the wrong windows."""

    endpoints: Endpoints
    run: Run
    node: pytest.Item
    rules: checker.Rules = field(default_factory=checker.Rules)

    def verify(
        self, history: History, probe_ids: list[str], timeout_s: float = 30.0
    ) -> checker.Verdict:
        verdict = self.observe(history, probe_ids, timeout_s)
        why = "".join(f"\n  why: {e.short()}" for e in self.node.stash.get(EXPLANATION_KEY, ()))
        assert verdict.valid, verdict.summary() + why
        return verdict

    def observe(
        self, history: History, probe_ids: list[str], timeout_s: float = 30.0
    ) -> checker.Verdict:
        """The verdict without asserting (meta-tests assert that it is invalid)."""
        verdict = checker.check_database(
            history,
            self.endpoints.database_dsn,
            probe_ids,
            self.endpoints.window_seconds,
            self.rules,
            timeout_s,
        )
        self.node.stash[VERDICT_KEY] = verdict
        if not verdict.valid:
            self.node.stash[EXPLANATION_KEY] = explain(verdict, history, self.run.timeline.marks())
        self.run.timeline.append(
            Mark(
                time.time(),
                "checker",
                f"{self.node.name} {'valid' if verdict.valid else 'INVALID'}",
                f"convergence {verdict.convergence_s}",
            )
        )
        return verdict


@pytest.fixture
def verifier(request: pytest.FixtureRequest, endpoints: Endpoints, run: Run) -> Verifier:
    return Verifier(endpoints=endpoints, run=run, node=request.node)


# -- reporting ------------------------------------------------------------------------------


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        run = _run(item.config)
        verdict = item.stash.get(VERDICT_KEY, None)
        logs: dict[str, str] = {}
        if report.failed and run.stack is not None:
            try:
                logs = run.stack.logs(tail=150)
            except Exception as error:  # the stack itself may be what failed
                logs = {"harness": f"could not collect logs: {error}"}
        explanations = item.stash.get(EXPLANATION_KEY, ())
        if verdict is not None:  # JUnit XML <properties>: a CI system's test view shows them
            report.user_properties.append(("verdict", verdict.summary().splitlines()[0]))
            report.user_properties.extend(("why", e.short()) for e in explanations)
        assert run.report is not None
        run.report.add_scenario(
            nodeid=item.nodeid,
            outcome=report.outcome,
            duration_s=report.duration,
            verdict=verdict.to_dict() if verdict else None,
            details={
                **_details(item),
                **_over_time(item),
                **({"explanation": [e.to_dict() for e in explanations]} if explanations else {}),
                **({"longrepr": str(report.longrepr)[-4000:]} if report.failed else {}),
            },
            logs=logs,
        )
    return report


def _details(item: pytest.Item) -> dict[str, Any]:
    """What the scenario put in its `scenario_details` (nothing if it used none)."""
    details: dict[str, Any] = item.stash.get(DETAILS_KEY, {})
    return details


def _over_time(item: pytest.Item) -> dict[str, Any]:
    """A fault scenario's clients, faults and consumer lag over time, for its report picture."""
    sampler = item.stash.get(LAG_KEY, None)
    if sampler is None:
        return {}
    merged = History.merge(*item.stash.get(PICTURED_KEY, []))
    return {
        "clients_over_time": merged.rates(),
        "faults": [f.to_dict() for f in merged.faults()],
        "consumer_lag": sampler.samples(),
    }


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    run = session.config.stash.get(RUN_KEY, None)
    if run is None or run.report is None:
        return
    run.timeline.save(run.run_dir / "timeline.jsonl")
    run.report.add_timeline(run.timeline)
    run.report.write()


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    run = config.stash.get(RUN_KEY, None)
    if run is not None:
        terminalreporter.write_line(
            f"qoe-harness report: {run.run_dir / 'summary.html'} (seed {run.seed})"
        )


@pytest.fixture
def nemesis(
    stack: Stack,
    endpoints: Endpoints,
    history: History,
    request: pytest.FixtureRequest,
) -> Iterator[Nemesis]:
    """The faults, recorded in the scenario's history; while a scenario uses them, the
    consumer lag is sampled for its report."""
    require(stack, ServiceControl, "process faults need the containers behind the services")
    sampler = LagSampler(JetStreamAdmin(endpoints.nats_urls)).start()
    request.node.stash[LAG_KEY] = sampler
    try:
        yield Nemesis(stack, endpoints, history)
    finally:
        sampler.stop()


@pytest.fixture
def scenario_details(request: pytest.FixtureRequest) -> dict[str, Any]:
    """A dict a scenario fills (faults, recovery times, what clients saw); it goes into the
    scenario's entry in summary.json."""
    details: dict[str, Any] = {}
    request.node.stash[DETAILS_KEY] = details
    return details


@pytest.fixture
def jetstream(endpoints: Endpoints) -> JetStreamAdmin:
    """The stack's JetStream: stream config, sequences, the aggregator consumer's state."""
    return JetStreamAdmin(endpoints.nats_urls)
