"""The run report renders from a small fixture run, self-contained, and re-renders from JSON."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from harness.checker import Observed, Rules, aggregate_by_window, check, diagnose, expectation
from harness.history import Event, History, Operation, Outcome, Timeline
from harness.report import RunReport, render, suite_of, timeline_svg

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def _verdicts() -> tuple[dict, dict]:
    evs = [
        Event(f"e{i}", "p1", "t1", T0 + timedelta(seconds=7 * i), 10.0 + i, 1.0, 0.0, 5e3)
        for i in range(20)
    ]
    history = History([Operation("w1", "http://i/v1/events", 0, 1, Outcome.OK, tuple(evs), 202)])
    exp = expectation(history, 60)

    def observed(stored: list[Event]) -> Observed:
        aggs = aggregate_by_window(stored, 60)
        return Observed(aggs, {k: d for k, a in aggs.items() if (d := diagnose(a, Rules()))})

    good = observed(evs)
    bad = observed([*evs, evs[0], evs[1]])
    ok = check(exp, good.aggregates, good.diagnoses, Rules())
    wrong = check(exp, bad.aggregates, bad.diagnoses, Rules())
    return {**ok.to_dict(), "convergence_s": 0.4}, wrong.to_dict()


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    ok, wrong = _verdicts()
    report = RunReport(tmp_path / "run-1", "run-1", 1234, {"backend": "compose", "ingest": 3})
    report.add_scenario("scenarios/test_e2e.py::test_happy", "passed", 12.5, ok, {}, {})
    report.add_scenario(
        "scenarios/test_dedup.py::test_redelivery[kill]",
        "failed",
        30.25,
        wrong,
        {
            "longrepr": "AssertionError: INVALID <boom>",
            "explanation": [
                {
                    "window": "probe p1 target t1 window 2024-05-01T12:00:00Z",
                    "difference": 2,
                    "short": "+2 (2 too many): e0 counted twice, acked at 12:00:03.2 by w1",
                    "unidentified": "",
                    "suspects": [
                        {"event_id": "e0", "how": "counted twice", "operations": ["ok by w1"]}
                    ],
                    "overlapping": [
                        {
                            "at": 1.0,
                            "source": "nemesis",
                            "name": "kill aggregator-1",
                            "detail": "",
                            "duration_s": 2.0,
                        }
                    ],
                }
            ],
        },
        {"aggregator-1": "WARNING seeded bug aggregator_no_dedup is ON\n<script>x</script>"},
    )
    report.add_scenario("scenarios/test_bad_input.py::test_413", "skipped", 0.0, None)
    for i in range(30):
        report.add_scenario(f"tests/unit/test_x.py::test_{i}", "passed", 0.01, None)
    timeline = Timeline()
    timeline.mark(
        "nemesis", "kill aggregator-1", "SIGKILL", duration_s=8.0, at=report.started_at + 2
    )
    timeline.mark("docker", "die", "aggregator-1", at=report.started_at + 2.1)
    timeline.mark("checker", "test_happy valid", "$5 convergence", at=report.started_at + 15)
    report.add_timeline(timeline)
    report.write()
    return tmp_path / "run-1"


def test_summary_json_is_data(run_dir: Path) -> None:
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["seed"] == 1234 and s["valid"] is False
    assert s["totals"] == {"total": 33, "passed": 31, "failed": 1, "skipped": 1}
    assert s["convergence"]["median"] == 0.4
    assert "--run-seed 1234" in s["reproduce"]["failed"]
    assert "test_redelivery[kill]" in s["reproduce"]["failed"]
    assert len(s["timeline"]) == 3


def test_page_names_the_wrong_window_and_shows_logs(run_dir: Path) -> None:
    html = (run_dir / "summary.html").read_text()
    assert "FAIL" in html
    assert "probe p1 target t1 window 2024-05-01T12:00:00Z" in html
    assert "samples expected 9 observed 11" in html
    assert "logs: aggregator-1" in html and "<details" in html
    assert "&lt;script&gt;x&lt;/script&gt;" in html  # logs escaped
    assert "--run-seed 1234" in html
    assert "median 0.40s" in html


def test_page_puts_the_failure_first_and_the_unit_tests_in_one_line(run_dir: Path) -> None:
    html = (run_dir / "summary.html").read_text()
    verdict = html.index('id="verdict"')
    failure = html.index('id="scenarios-test_dedup-py-test_redelivery-kill"')
    assert verdict < failure < html.index('id="scenarios"') < html.index('id="timeline"')
    assert "1 failed</strong> of 33." in html[verdict:failure]
    assert "unit and component tests: 30 passed" in html[verdict:failure]
    explained = html.index("e0 counted twice, acked at 12:00:03.2 by w1")
    assert failure < explained < html.index('id="scenarios"')  # open in the failure section
    assert "test_x.py" not in html.split('id="run"')[0]  # no row per unit test
    for suite in ("e2e", "dedup", "bad_input"):
        assert f'id="suite-{suite}"' in html


def test_suites_are_scenario_modules_and_tests_are_one_suite() -> None:
    assert suite_of("scenarios/test_partitions.py::test_cut[x]") == "partitions"
    assert suite_of("scenarios/load/test_load.py::test_chaos") == "load/load"
    assert suite_of("tests/unit/harness/test_report.py::test_a") == "tests"
    assert suite_of("tests/component/test_cleanup.py::test_b") == "tests"


def test_page_is_self_contained(run_dir: Path) -> None:
    html = (run_dir / "summary.html").read_text()
    assert "<svg" in html and "kill aggregator-1" in html
    assert "<script" not in html
    for external in ('src="http', 'href="http', "<link", "@import", "url(http", "<metadata"):
        assert external not in html


def test_render_rebuilds_the_page_from_json(run_dir: Path) -> None:
    before = (run_dir / "summary.html").read_text()
    (run_dir / "summary.html").unlink()
    page = render(run_dir)
    assert page == run_dir / "summary.html"
    after = page.read_text()
    assert (
        after.split("<svg")[0].replace(" ", "")[:500]
        == before.split("<svg")[0].replace(" ", "")[:500]
    )
    assert "samples expected 9 observed 11" in after


def test_render_explains_a_missing_summary(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"summary\.json not found"):
        render(tmp_path)


def test_empty_run_renders(tmp_path: Path) -> None:
    page = RunReport(tmp_path, "empty", None).write()
    html = page.read_text()
    assert "PASS" in html and "no scenario measured convergence" in html


def test_timeline_svg_is_empty_without_marks() -> None:
    assert timeline_svg([]) == ""


def test_fault_scenarios_get_a_recovery_row_and_a_picture(tmp_path: Path) -> None:
    fault = {
        "name": "cut aggregator-nats",
        "detail": "aggregator_nats1",
        "started_at": 100.0,
        "effect_s": 1.2,
        "healed_at": 110.0,
        "heal_s": 0.1,
        "duration_s": 10.0,
    }
    clients = [{"t": 98.0 + i, "acked": 500, "batches": 5, "errors": i % 2} for i in range(20)]
    lag = [(98.0 + i / 2, None if i == 7 else i * 10) for i in range(40)]
    report = RunReport(tmp_path, "run-1", seed=1)
    report.add_scenario(
        "scenarios/test_partitions.py::test_cut",
        "passed",
        30.0,
        None,
        {
            "faults": [fault],
            "recovery_s": 5.5,
            "ready_again_s": 2.0,
            "clients_over_time": clients,
            "consumer_lag": lag,
        },
    )
    row = report.to_dict()["recovery"][0]
    assert row["faults"] == ["cut aggregator-nats (aggregator_nats1)"]
    assert (row["effect_s"], row["held_s"], row["recovery_s"]) == (1.2, 10.0, 5.5)
    page = report.write().read_text()
    assert 'id="recovery">Faults and recovery</h2>' in page and "5.50s" in page
    assert "over time: test_cut" in page and "consumer lag" in page and "lag unreadable" in page
    # The run timeline draws the scenario's faults from its history: a nemesis row, the band.
    assert ">nemesis<" in page and "fault-band-0" in page


def test_a_scenario_is_reproduced_without_the_run_s_selection() -> None:
    from types import SimpleNamespace

    from harness.pytest_plugin import _without

    config = SimpleNamespace(
        args=["tests", "scenarios"],
        invocation_params=SimpleNamespace(
            args=("tests", "scenarios", "-m", "not slow", "--run-seed", "7", "--stack=swarm", "-q")
        ),
    )
    assert _without(config, "--run-seed") == [
        "tests",
        "scenarios",
        "-m",
        "not slow",
        "--stack=swarm",
        "-q",
    ]  # type: ignore[arg-type]
    assert _without(config, "--run-seed", "-m", "-k") == ["--stack=swarm", "-q"]  # type: ignore[arg-type]
