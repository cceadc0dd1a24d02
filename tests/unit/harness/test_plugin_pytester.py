"""The pytest plugin as pytest runs it (pytester): its options and their usage errors, its
markers, selection, where a run's folder and reports go, and that the report is written and
the stack torn down when a fixture fails. Nothing here starts Docker: the stack is a fake put
in place of `open_stack`, or a backend that refuses before anything starts."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

# An in-process run forgets the modules it imported; numpy (under the report's matplotlib
# timeline) cannot be imported twice in a process, so it is imported here, before any run.
import matplotlib.figure  # noqa: F401
import pytest

from harness import pytest_plugin
from harness.stack import Endpoints, StackError, StackOptions, StackSettings

pytest_plugins = ["pytester"]

# As in the root conftest: without the installed entry point the inner runs load it by name.
_INSTALLED = any(ep.value == "harness.pytest_plugin" for ep in entry_points(group="pytest11"))
PLUGIN_ARGS = () if _INSTALLED else ("-p", "harness.pytest_plugin")


@dataclass
class FakeStack:
    """A stack with no capability beyond `Stack`, recording what the plugin asked of it."""

    fail_up: bool = False
    name: str = "fake"
    settings: StackSettings = field(default_factory=StackSettings)
    bring_up_s: float | None = 0.0
    calls: list[str] = field(default_factory=list)

    def up(self) -> Endpoints:
        self.calls.append("up")
        if self.fail_up:
            raise StackError("the fake stack did not come up")
        return self.endpoints()

    def endpoints(self) -> Endpoints:
        return Endpoints(
            ingest_urls=("http://ingest.invalid",),
            ingest_token="token",
            database_dsn="postgresql://db.invalid/qoe",
        )

    def down(self) -> None:
        self.calls.append("down")

    def logs(self, services: list[str] | None = None, tail: int = 200) -> dict[str, str]:
        self.calls.append(f"logs tail={tail}")
        return {"ingest-1": "the fake ingest's last lines"}


@dataclass
class Opened:
    """The fake stack `open_stack` handed out, and the options it was asked for."""

    stack: FakeStack
    options: list[StackOptions] = field(default_factory=list)


@pytest.fixture
def report_dir(pytester: pytest.Pytester) -> Path:
    return pytester.path / "reports"


def run_pytest(pytester: pytest.Pytester, report_dir: Path, *args: str) -> pytest.RunResult:
    """pytest in-process in pytester's folder, the run folders under `report_dir` (never the
    checkout's reports/out). In-process, so a monkeypatched `open_stack` is the one used."""
    return pytester.runpytest_inprocess(*PLUGIN_ARGS, "--report-dir", str(report_dir), *args)


def only_run_dir(report_dir: Path) -> Path:
    (run_dir,) = report_dir.iterdir()
    return run_dir


def summary(report_dir: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((only_run_dir(report_dir) / "summary.json").read_text())
    return document


def fake_stack(monkeypatch: pytest.MonkeyPatch, *, fail_up: bool = False) -> Opened:
    opened = Opened(FakeStack(fail_up=fail_up))

    def open_fake(options: StackOptions) -> FakeStack:
        opened.options.append(options)
        return opened.stack

    monkeypatch.setattr(pytest_plugin, "open_stack", open_fake)
    return opened


# -- options ----------------------------------------------------------------------------------

HARNESS_OPTIONS = (
    "--stack={compose,external,swarm}",
    "--stack-endpoints=STACK_ENDPOINTS",
    "--hosts=HOSTS",
    "--reuse-stack",
    "--run-seed=RUN_SEED",
    "--report-dir=REPORT_DIR",
    "--stack-timeout=STACK_TIMEOUT",
)


def test_the_options_are_in_help_under_the_harness_group(
    pytester: pytest.Pytester, report_dir: Path
) -> None:
    result = run_pytest(pytester, report_dir, "--help")
    assert result.ret == pytest.ExitCode.OK
    help_text = result.stdout.str()
    group = help_text[help_text.index("qoe-harness:") :]
    for option in HARNESS_OPTIONS:
        assert option in group, option


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--stack", "kubernetes"), "argument --stack: invalid choice: 'kubernetes'"),
        (("--run-seed", "lucky"), "argument --run-seed: invalid int value: 'lucky'"),
        (("--stack-timeout", "soon"), "argument --stack-timeout: invalid int value: 'soon'"),
    ],
)
def test_a_bad_option_value_is_a_usage_error_naming_it(
    pytester: pytest.Pytester, report_dir: Path, args: tuple[str, ...], message: str
) -> None:
    result = run_pytest(pytester, report_dir, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()


def test_the_stack_options_come_from_the_command_line(
    pytester: pytest.Pytester, report_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened = fake_stack(monkeypatch)
    pytester.makepyfile("def test_uses_the_stack(stack):\n    assert stack.name == 'fake'\n")
    endpoints, hosts = pytester.path / "endpoints.json", pytester.path / "hosts.txt"
    result = run_pytest(
        pytester,
        report_dir,
        "--stack=external",
        f"--stack-endpoints={endpoints}",
        f"--hosts={hosts}",
        "--stack-timeout=42",
    )
    result.assert_outcomes(passed=1)
    (options,) = opened.options
    assert (options.backend, options.timeout_s, options.keep) == ("external", 42, False)
    assert (options.endpoints_file, options.hosts_file) == (endpoints, hosts)
    assert options.run_id == summary(report_dir)["run_id"]


def test_reuse_stack_asks_for_the_kept_project(
    pytester: pytest.Pytester, report_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened = fake_stack(monkeypatch)
    pytester.makepyfile("def test_uses_the_stack(stack):\n    pass\n")
    run_pytest(pytester, report_dir, "--reuse-stack").assert_outcomes(passed=1)
    run_pytest(pytester, report_dir, "--stack=swarm", "--reuse-stack").assert_outcomes(passed=1)
    compose, swarm = opened.options  # one kept stack per backend: they never share a name
    assert (compose.run_id, compose.project, compose.keep) == ("qoe-dev", "qoe-dev", True)
    assert (swarm.run_id, swarm.project, swarm.keep) == ("qoe-dev-swarm", "qoe-dev-swarm", True)


def test_an_external_stack_without_endpoints_says_what_to_pass(
    pytester: pytest.Pytester, report_dir: Path
) -> None:
    pytester.makepyfile("def test_uses_the_stack(stack):\n    pass\n")
    result = run_pytest(pytester, report_dir, "--stack=external")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*external backend needs*--stack-endpoints FILE*"])


# -- markers and selection --------------------------------------------------------------------


def test_the_harness_markers_pass_strict_markers(
    pytester: pytest.Pytester, report_dir: Path
) -> None:
    pytester.makepyfile(
        "import pytest\n\n"
        + "\n".join(
            f"@pytest.mark.{name}\ndef test_{name}():\n    pass\n" for name in pytest_plugin.MARKERS
        )
    )
    result = run_pytest(pytester, report_dir, "--strict-markers")
    result.assert_outcomes(passed=len(pytest_plugin.MARKERS))


def test_an_unknown_marker_fails_strict_markers(
    pytester: pytest.Pytester, report_dir: Path
) -> None:
    pytester.makepyfile("import pytest\n\n@pytest.mark.smokey\ndef test_typo():\n    pass\n")
    result = run_pytest(pytester, report_dir, "--strict-markers")
    result.stdout.fnmatch_lines(["*'smokey' not found in `markers` configuration option*"])
    assert result.ret == pytest.ExitCode.INTERRUPTED


def test_markers_are_listed_with_their_descriptions(
    pytester: pytest.Pytester, report_dir: Path
) -> None:
    result = run_pytest(pytester, report_dir, "--markers")
    result.stdout.fnmatch_lines(
        [f"@pytest.mark.{name}: {about}" for name, about in pytest_plugin.MARKERS.items()]
    )


def test_a_marker_selects_the_scenarios_and_reproducing_one_drops_the_selection(
    pytester: pytest.Pytester, report_dir: Path
) -> None:
    pytester.makepyfile(
        test_suite=(
            "import pytest\n\n"
            "@pytest.mark.smoke\ndef test_quick():\n    pass\n\n"
            "@pytest.mark.slow\ndef test_long():\n    pass\n"
        )
    )
    result = run_pytest(pytester, report_dir, "-m", "smoke", "--run-seed=7", "test_suite.py")
    result.assert_outcomes(passed=1, deselected=1)
    (scenario,) = summary(report_dir)["scenarios"]
    assert scenario["nodeid"] == "test_suite.py::test_quick"
    pytest_command = ".venv/bin/python -m pytest "
    assert scenario["reproduce"].startswith(pytest_command)
    arguments = scenario["reproduce"].removeprefix(pytest_command).split()
    assert arguments[-3:] == ["test_suite.py::test_quick", "--run-seed", "7"]
    assert "-m" not in arguments
    assert "test_suite.py" not in arguments  # the selection's path: the nodeid replaces it


# -- the run folder and its reports -----------------------------------------------------------


def test_a_run_writes_its_reports_in_its_own_folder(
    pytester: pytest.Pytester, report_dir: Path
) -> None:
    pytester.makepyfile("def test_passes():\n    pass\n")
    result = run_pytest(pytester, report_dir, "--run-seed=7")
    result.assert_outcomes(passed=1)
    run_dir = only_run_dir(report_dir)
    assert {"summary.json", "summary.html", "junit.xml", "timeline.jsonl"} <= {
        p.name for p in run_dir.iterdir()
    }
    document = summary(report_dir)
    assert (document["run_id"], document["seed"]) == (run_dir.name, 7)
    assert document["totals"] == {"total": 1, "passed": 1}
    result.stdout.fnmatch_lines(
        [
            f"qoe-harness run {run_dir.name}, seed 7 (reproduce: --run-seed 7)",
            f"qoe-harness report: {run_dir / 'summary.html'} (seed 7)",
        ]
    )


def test_the_html_report_goes_beside_the_summary_unless_asked_elsewhere(
    pytester: pytest.Pytester, report_dir: Path
) -> None:
    pytester.makepyfile("def test_passes():\n    pass\n")
    elsewhere = pytester.path / "mine.html"
    run_pytest(pytester, report_dir).assert_outcomes(passed=1)
    assert (only_run_dir(report_dir) / "pytest.html").is_file()
    shutil.rmtree(report_dir)
    run_pytest(pytester, report_dir, f"--html={elsewhere}").assert_outcomes(passed=1)
    assert elsewhere.is_file()
    assert not (only_run_dir(report_dir) / "pytest.html").exists()


def test_the_run_seed_fixes_every_scenario_seed(
    pytester: pytest.Pytester, report_dir: Path
) -> None:
    seeds = pytester.path / "seeds.txt"
    pytester.makepyfile(
        f"def test_one(scenario_seed):\n"
        f"    with open({str(seeds)!r}, 'a') as f:\n"
        f"        f.write(f'{{scenario_seed}}\\n')\n"
    )
    for seed in ("7", "7", "8"):
        run_pytest(pytester, report_dir, f"--run-seed={seed}").assert_outcomes(passed=1)
    first, again, other = seeds.read_text().split()
    assert first == again != other


# -- teardown when something fails ------------------------------------------------------------


def test_a_failing_fixture_is_in_the_written_report(
    pytester: pytest.Pytester, report_dir: Path
) -> None:
    pytester.makepyfile(
        "import pytest\n\n"
        "@pytest.fixture\n"
        "def broken():\n"
        "    raise RuntimeError('the fixture broke')\n\n"
        "def test_needs_it(broken):\n"
        "    pass\n"
    )
    result = run_pytest(pytester, report_dir)
    result.assert_outcomes(errors=1)
    (scenario,) = summary(report_dir)["scenarios"]
    assert scenario["outcome"] == "failed"
    assert "RuntimeError: the fixture broke" in scenario["details"]["longrepr"]
    assert (only_run_dir(report_dir) / "summary.html").is_file()


def test_a_failing_scenario_still_saves_its_history(
    pytester: pytest.Pytester, report_dir: Path
) -> None:
    pytester.makepyfile("def test_fails(history):\n    assert False, 'wrong'\n")
    run_pytest(pytester, report_dir).assert_outcomes(failed=1)
    (scenario_dir,) = (only_run_dir(report_dir) / "scenarios").iterdir()
    assert scenario_dir.name.endswith("test_fails")
    assert (scenario_dir / "history.jsonl").is_file()


def test_the_stack_comes_down_when_its_bring_up_fails(
    pytester: pytest.Pytester, report_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened = fake_stack(monkeypatch, fail_up=True)
    pytester.makepyfile("def test_uses_the_stack(stack):\n    pass\n")
    result = run_pytest(pytester, report_dir, "--stack=external")
    result.assert_outcomes(errors=1)
    # Down as the fixture's setup failed, before the report hook asked the stack for logs.
    assert opened.stack.calls[:2] == ["up", "down"]
    (scenario,) = summary(report_dir)["scenarios"]
    assert "the fake stack did not come up" in scenario["details"]["longrepr"]


def test_a_failed_scenario_has_the_stacks_logs_and_the_stack_comes_down(
    pytester: pytest.Pytester, report_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened = fake_stack(monkeypatch)
    pytester.makepyfile(
        "def test_fails(stack):\n    assert False\n\ndef test_passes(stack):\n    pass\n"
    )
    run_pytest(pytester, report_dir, "--stack=external").assert_outcomes(passed=1, failed=1)
    assert opened.stack.calls == ["up", "logs tail=150", "down"]  # one up and down per session
    logs = {s["nodeid"].rsplit("::")[-1]: s["logs"] for s in summary(report_dir)["scenarios"]}
    assert logs == {"test_fails": {"ingest-1": "the fake ingest's last lines"}, "test_passes": {}}


def test_a_scenario_needing_a_capability_the_stack_lacks_is_skipped_saying_why(
    pytester: pytest.Pytester, report_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_stack(monkeypatch)
    pytester.makepyfile("def test_faults(nemesis):\n    pass\n")
    result = run_pytest(pytester, report_dir, "--stack=external", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(
        [
            "*process faults need the containers behind the services: the fake stack has no "
            "ServiceControl*"
        ]
    )
