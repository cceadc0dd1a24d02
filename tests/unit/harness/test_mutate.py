"""The pure parts of `python -m harness mutate`: which mutants, which images, the verdicts and the
report. The run itself (images, stack, scenarios) is exercised by running the command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness import cli, mutate
from harness.mutate import Mutant, Result

SOURCE = '''"""A module."""

import logging

log = logging.getLogger("m")
COUNT = Counter("m_total", "made")


def window(ts: int | None, *, length: int = 60) -> int:
    log.info("window of %d", ts + 1)
    COUNT.inc(2)
    if ts is None or ts < 0:
        return 0
    return ts // length * length
'''


def test_mutants_are_cosmic_rays_and_each_applies_where_it_says() -> None:
    mutants = mutate.mutants_of("m", SOURCE)
    operators = {m.operator for m in mutants}
    assert "core/ReplaceBinaryOperator_FloorDiv_Mul" in operators
    assert "core/ReplaceComparisonOperator_Lt_LtE" in operators
    assert "core/NumberReplacer" in operators
    source_lines = SOURCE.splitlines()
    for mutant in mutants:
        changed = mutate.mutated(SOURCE, mutant).splitlines()
        differing = [
            i + 1 for i, (a, b) in enumerate(zip(source_lines, changed, strict=True)) if a != b
        ]
        assert differing == [mutant.line], mutant


def test_no_mutants_where_they_cannot_change_the_data() -> None:
    lines = {m.line for m in mutate.mutants_of("m", SOURCE)}
    # not the log line, the metric and its declaration (lines 5 to 7, 10, 11)
    assert lines == {9, 12, 13, 14}, lines
    # in the signature only the default 60, not the annotation's `|` or the bare `*`
    signature = {m.operator for m in mutate.mutants_of("m", SOURCE) if m.line == 9}
    assert signature == {"core/NumberReplacer"}


SEEDED = """from qoe import bugs


def start(micros: int, length: int) -> int:
    off_by_one = bugs.enabled("window_off_by_one")
    start = micros // length * length
    if off_by_one and micros == start:
        start -= length
    if bugs.enabled("other"):
        start += 7
    else:
        start += 0
    return start
"""


def test_no_mutants_in_code_that_runs_only_with_a_seeded_bug_on() -> None:
    assert mutate.seeded_bug_flags(SEEDED) == {"off_by_one"}
    by_line: dict[int, set[str]] = {}
    for m in mutate.mutants_of("w", SEEDED):
        by_line.setdefault(m.line, set()).add(m.operator.removeprefix("core/"))
    assert 8 not in by_line and 10 not in by_line  # the bodies of `if <flag>...`
    # `micros == start` counts only with the flag; `and` -> `or` and `not (...)` change it
    assert by_line[7] == {"ReplaceAndWithOr", "AddNot"}
    assert "NumberReplacer" in by_line[12]  # the else branch is the path the run takes


def test_excluded_positions_keep_cosmic_rays_occurrence_numbers() -> None:
    """Occurrences count every position, excluded ones too, as cosmic-ray's walk does."""
    floor_div = [
        m
        for m in mutate.mutants_of("m", SOURCE)
        if m.operator == "core/ReplaceBinaryOperator_FloorDiv_Add"
    ]
    assert [m.occurrence for m in floor_div] == [0]
    adds = [m for m in mutate.mutants_of("m", SOURCE) if "BinaryOperator_Add_" in m.operator]
    assert adds == []  # `ts + 1` is in the log line
    numbers = [m for m in mutate.mutants_of("m", SOURCE) if m.operator == "core/NumberReplacer"]
    # two each: 60 (line 9), then 1 and 2 (lines 10, 11: excluded), then 0 and 0
    assert [(m.occurrence, m.line) for m in numbers] == [
        (0, 9),
        (1, 9),
        (6, 12),
        (7, 12),
        (8, 13),
        (9, 13),
    ]


def test_sample_is_reproducible_from_its_seed_and_takes_all_when_asked_for_more() -> None:
    mutants = [Mutant("m", "core/NumberReplacer", i, i) for i in range(50)]
    first = mutate.sample(mutants, 10, seed=3)
    assert first == mutate.sample(mutants, 10, seed=3)
    assert len(set(first)) == 10
    assert first != mutate.sample(mutants, 10, seed=4)
    assert sorted(mutate.sample(mutants, 99, seed=3), key=lambda m: m.occurrence) == mutants


def test_only_takes_the_mutants_named_in_that_order_and_names_those_not_found() -> None:
    mutants = mutate.mutants_of("m", SOURCE)
    first, last = mutants[0], mutants[-1]
    assert mutate.chosen_by_id(mutants, [last.id, first.id]) == [last, first]
    with pytest.raises(mutate.UnknownMutant) as error:
        mutate.chosen_by_id(mutants, [first.id, "m-NumberReplacer-99", "x-AddNot-0"])
    message = str(error.value)
    assert "no data-path mutant m-NumberReplacer-99, x-AddNot-0 in the committed sources" in message
    assert first.id not in message


def test_a_mutant_is_built_into_every_service_that_imports_its_module() -> None:
    sources = {
        "contract": "from qoe import bugs\n",
        "windows": "from qoe import bugs\n",
        "aggregator": "from qoe.contract import x\nfrom qoe.windows import window_start\n",
        "ingest": "from qoe import natsutil, openapi\n",
        "openapi": "from qoe.contract import Event\n",
        "diagnoser": "from qoe import db\n",
        "probe": "from qoe.contract import check_event\n",
        "bugs": "",
    }
    assert mutate.services_running("contract", sources) == ("ingest", "aggregator", "probe")
    assert mutate.services_running("windows", sources) == ("aggregator",)
    assert mutate.services_running("diagnoser", sources) == ("diagnoser",)
    assert mutate.services_running("bugs", sources) == ("ingest", "aggregator", "probe")


def test_services_running_follows_the_real_import_graph() -> None:
    qoe = Path(mutate.ROOT / mutate.SERVICES_DIR)
    sources = {p.stem: p.read_text() for p in qoe.glob("*.py")}
    assert mutate.services_running("windows", sources) == ("aggregator",)
    assert set(mutate.services_running("contract", sources)) == {"ingest", "aggregator", "probe"}
    assert mutate.services_running("service", sources) == mutate.SERVICES


def test_the_override_gives_each_replica_its_image(tmp_path: Path) -> None:
    path = tmp_path / "override.json"
    mutate.write_override(path, {"aggregator": "qoe/aggregator:m1", "probe": "qoe/probe:o"})
    services = json.loads(path.read_text())["services"]
    assert services == {
        "aggregator-1": {"image": "qoe/aggregator:m1"},
        "aggregator-2": {"image": "qoe/aggregator:m1"},
        "probe-1": {"image": "qoe/probe:o"},
        "probe-2": {"image": "qoe/probe:o"},
    }


JUNIT = """<?xml version="1.0"?>
<testsuites><testsuite name="pytest">
<testcase classname="scenarios.test_e2e" name="test_ok" time="1.0"/>
<testcase classname="scenarios.test_e2e" name="test_boundary" time="2.0">
<failure message="INVALID: 2 of 9 windows wrong&#10;  probe p window w: samples expected 1 observed 0">trace</failure>
</testcase>
<testcase classname="scenarios.test_dedup" name="test_later" time="1.0">
<error message="never reached"/></testcase>
</testsuite></testsuites>
"""


def test_the_killer_is_the_first_failed_scenario(tmp_path: Path) -> None:
    junit = tmp_path / "junit.xml"
    assert mutate.first_failure(junit) == ("", "")
    junit.write_text(JUNIT)
    name, message = mutate.first_failure(junit)
    assert name == "scenarios.test_e2e::test_boundary"
    assert message.startswith("INVALID: 2 of 9 windows wrong\n  probe p window w")


def _results() -> list[Result]:
    def mutant(n: int) -> Mutant:
        return Mutant("windows", "core/ReplaceComparisonOperator_Eq_NotEq", n, 30)

    diff = (
        "--- a/windows.py\n+++ b/windows.py\n-    if micros == start:\n+    if micros != start:\n"
    )
    return [
        Result(mutant(0), "killed", diff, ("aggregator",), "scenarios.test_e2e::t", "INVALID", 60),
        Result(mutant(1), "killed", diff, ("aggregator",), "bring-up", "not healthy", 30),
        Result(mutant(2), "timeout", diff, ("aggregator",), "", "", 300),
        Result(mutant(3), "survived", diff, ("aggregator",), seconds=90),
        Result(mutant(4), "incompetent", detail="not valid Python", seconds=0),
        Result(mutant(5), "not run"),
    ]


def test_score_counts_timeouts_as_killed_and_leaves_out_incompetent_and_not_run() -> None:
    summary = mutate.score(_results())
    assert summary["counts"] == {
        "killed": 2,
        "timeout": 1,
        "survived": 1,
        "incompetent": 1,
        "not run": 1,
    }
    assert summary["score"] == 0.75
    assert summary["tried"] == 5
    assert summary["seconds_per_mutant"] == 96.0
    assert mutate.score([])["score"] is None


def test_the_report_lists_every_mutant_with_its_diff_and_killer(tmp_path: Path) -> None:
    markdown = mutate.write_report(tmp_path, _results(), {"run_id": "r1", "seed": 5})
    document = json.loads((tmp_path / "mutation.json").read_text())
    assert document["seed"] == 5 and document["score"] == 0.75
    assert [m["outcome"] for m in document["mutants"]] == [
        "killed",
        "killed",
        "timeout",
        "survived",
        "incompetent",
        "not run",
    ]
    assert document["mutants"][0]["id"] == "windows-ReplaceComparisonOperator_Eq_NotEq-0"
    assert document["mutants"][0]["killer"] == "scenarios.test_e2e::t"
    text = markdown.read_text()
    assert "score **75.0%**" in text
    assert "## survived" in text and text.index("## survived") < text.index("## killed")
    assert "+    if micros != start:" in text
    assert "| windows-ReplaceComparisonOperator_Eq_NotEq-1 | windows.py:30 | killed |" in text
    assert "bring-up: not healthy" in text


# -- python -m harness mutate's arguments ------------------------------------------------------


@pytest.fixture
def plans(monkeypatch: pytest.MonkeyPatch) -> list[mutate.MutationPlan]:
    """The plans the command hands to run_mutations (replaced: no images, no stack)."""
    made: list[mutate.MutationPlan] = []
    monkeypatch.setattr(cli, "_interrupt_on", lambda *signals: None)
    monkeypatch.setattr(mutate, "run_mutations", lambda plan: made.append(plan) or 0)
    return made


def test_the_arguments_reach_the_plan(plans: list[mutate.MutationPlan]) -> None:
    assert cli.main(["mutate", "--sample", "12", "--seed", "5", "--budget-minutes", "2.5"]) == 0
    (plan,) = plans
    assert (plan.sample, plan.seed, plan.budget_minutes, plan.only) == (12, 5, 2.5, ())


def test_only_may_be_given_more_than_once(plans: list[mutate.MutationPlan]) -> None:
    ids = ("probe-NumberReplacer-41", "windows-ReplaceBinaryOperator_Add_Sub-0")
    assert cli.main(["mutate", "--only", ids[0], "--only", ids[1]]) == 0
    (plan,) = plans
    assert plan.only == ids


def test_without_a_seed_one_is_drawn_and_kept_in_the_plan(
    plans: list[mutate.MutationPlan],
) -> None:
    assert cli.main(["mutate"]) == 0
    (plan,) = plans
    assert (plan.sample, plan.budget_minutes) == (20, 30.0)
    assert isinstance(plan.seed, int)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--sample", "0"), "expected a whole number of mutants > 0, got 0"),
        (("--sample", "many"), "expected a whole number of mutants > 0, got many"),
        (("--budget-minutes", "-1"), "expected a number of minutes > 0, got -1"),
        (("--budget-minutes", "soon"), "expected a number of minutes > 0, got soon"),
    ],
)
def test_bad_arguments_are_usage_errors_saying_what_was_expected(
    capsys: pytest.CaptureFixture[str],
    plans: list[mutate.MutationPlan],
    argv: tuple[str, ...],
    message: str,
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["mutate", *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert plans == []
