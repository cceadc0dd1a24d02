"""The checker benchmark: its synthetic history is a real load history (read by both readers
alike), its platform is right unless errors are seeded, and the seeded errors are found."""

from __future__ import annotations

import pickle
from dataclasses import replace
from pathlib import Path

import pytest

from harness import checker
from harness.checkbench import BenchSpec, generate, main
from harness.checker import Rules
from harness.columnar import ColumnarHistory, OutcomeSource
from harness.load import read_outcomes

SMALL = BenchSpec(
    events=6000, batch=50, events_per_s=100, unknown_rate=0.05, fail_rate=0.02, conflict_rate=0.5
)


def verdicts(folder: Path) -> tuple[checker.Verdict, checker.Verdict]:
    observed = pickle.loads((folder / "observed.pickle").read_bytes())
    in_memory = checker.expectation(read_outcomes(folder), 60)
    with ColumnarHistory.read([OutcomeSource(folder)]) as store:
        columnar = store.expectation(60)
    return tuple(  # type: ignore[return-value]
        checker.check(e, observed.aggregates, observed.diagnoses, Rules())
        for e in (in_memory, columnar)
    )


def test_a_correct_platform_is_valid_and_both_checkers_agree(tmp_path: Path) -> None:
    made = generate(SMALL, tmp_path)
    assert made.batches == 120 and made.windows > 100 and not made.seeded
    in_memory, columnar = verdicts(tmp_path)
    assert in_memory == columnar
    assert columnar.valid, columnar.summary()
    counts = columnar.counts
    assert counts["unknown_events"] > 0 and counts["conflicting_events"] > 0 and counts["choice"]


def test_seeded_errors_are_found_by_both(tmp_path: Path) -> None:
    made = generate(replace(SMALL, lost=1, doubled=1, moved=1), tmp_path)
    assert sorted(s.split()[0] for s in made.seeded) == ["doubled", "lost", "moved"]
    in_memory, columnar = verdicts(tmp_path)
    assert in_memory == columnar and not columnar.valid
    assert 3 <= columnar.counts["wrong_windows"] <= 4  # a move shows in two windows (or one)


def test_main_prints_time_and_memory_and_checks_the_verdict(tmp_path: Path) -> None:
    lines: list[str] = []
    spec = BenchSpec(events=2000, batch=100, lost=1)
    assert main(spec, engines=("columnar", "memory"), keep=tmp_path, say=lines.append) == 0
    figures = [line for line in lines if "peak RSS" in line]
    assert [f.split(":")[0] for f in figures] == ["columnar", "memory"]
    assert all(" s wall" in f and " s CPU" in f and " MB" in f for f in figures)
    again: list[str] = []
    assert main(spec, keep=tmp_path, say=again.append) == 0
    assert "holds this history already" in again[0]


def test_bad_specs_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one batch"):
        BenchSpec(events=10)
    with pytest.raises(ValueError, match="cannot be negative"):
        BenchSpec(events=1000, lost=-1)
