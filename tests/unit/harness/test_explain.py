"""Explanations name the events behind a wrong window, what carried them and what overlapped."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from harness import explain as ex
from harness.checker import Observed, Rules, aggregate_by_window, check, diagnose, expectation
from harness.history import Event, Fault, History, Mark, Operation, Outcome

T0 = datetime(2026, 12, 2, 2, 1, 0, tzinfo=UTC)
AT = T0.timestamp() + 3.2  # when the batch was acknowledged


def events(n: int, start: datetime = T0) -> list[Event]:
    """Events whose values no other set of the same size adds up to (seeded, irregular)."""
    rng = random.Random(7)
    return [
        Event(
            f"e{i}",
            "p1",
            "t1",
            start + timedelta(seconds=i),
            round(rng.uniform(5, 300), 3),
            round(rng.uniform(0, 40), 3),
            round(rng.uniform(0, 5), 3),
            round(rng.uniform(100, 9000), 1),
        )
        for i in range(n)
    ]


def verdict_of(sent: list[Event], stored: list[Event], ops: list[Operation] | None = None):
    history = History(
        ops or [Operation("w1", "http://ingest-2", AT - 0.1, AT, Outcome.OK, tuple(sent), 202)]
    )
    aggs = aggregate_by_window(stored, 60)
    obs = Observed(aggs, {k: d for k, a in aggs.items() if (d := diagnose(a, Rules()))})
    return check(expectation(history, 60), obs.aggregates, obs.diagnoses, Rules()), history


def kill_at(at: float) -> Fault:
    return Fault("kill aggregator-1", "SIGKILL, then start", started_at=at, ended_at=at + 2.2)


def test_a_doubled_event_is_named_with_its_operation_and_the_fault_it_overlapped() -> None:
    sent = events(8)
    verdict, history = verdict_of(sent, [*sent, sent[5]])
    history.begin_fault(kill_at(AT - 0.3))
    history.begin_fault(kill_at(AT + 50))  # long after: no bearing on the batch
    marks = [Mark(AT + 60, "docker", "die", "aggregator-1")]  # nor this container event
    (why,) = ex.explain(verdict, history, marks)
    assert why.difference == 1
    assert [s.event_id for s in why.suspects] == ["e5"]
    assert why.suspects[0].how == "counted twice"
    line = why.short()
    assert (
        "+1 (1 too many): e5 counted twice, acked at 02:01:03.2 by w1 through http://ingest-2"
        in line
    )
    assert "while kill aggregator-1 held (02:01:02.9-02:01:05.1)" in line
    assert line.count("kill aggregator-1 held") == 1  # not the one long after


def test_lost_events_are_named() -> None:
    sent = events(10)
    verdict, history = verdict_of(sent, [e for e in sent if e.event_id not in ("e2", "e7")])
    (why,) = ex.explain(verdict, history, [])
    assert sorted(s.event_id for s in why.suspects) == ["e2", "e7"]
    assert {s.how for s in why.suspects} == {"missing"}
    assert "no fault or container event overlapped" in why.short()


def test_an_event_counted_in_the_window_before_its_own_is_moved() -> None:
    sent = events(3, T0 + timedelta(seconds=58))  # e2 at 02:02:00, the next window's first
    moved = Event("e2", "p1", "t1", T0 + timedelta(seconds=59), *ex._values(sent[2]))
    verdict, history = verdict_of(sent, [sent[0], sent[1], moved])
    by_difference = {w.difference: w for w in ex.explain(verdict, history, [])}
    assert set(by_difference) == {1, -1}
    (into,) = by_difference[1].suspects
    assert into.event_id == "e2" and into.how == "moved in from " + (
        "probe p1 target t1 window 2026-12-02T02:02:00Z"
    )
    assert [s.how for s in by_difference[-1].suspects] == ["missing"]


def test_ambiguous_or_unmatched_differences_say_why_no_ids_are_named() -> None:
    same = [
        Event(f"s{i}", "p1", "t1", T0 + timedelta(seconds=i), 10.0, 1.0, 0.5, 900.0)
        for i in range(4)
    ]
    verdict, history = verdict_of(same, [*same, same[0]])
    (why,) = ex.explain(verdict, history, [])
    assert not why.suspects and "more than one set of 1 events adds up to it" in why.short()
    sent = events(4)
    alien = Event("zz", "p1", "t1", T0, 999.0, 1.0, 0.5, 900.0)
    verdict, history = verdict_of(sent, [*sent, alien])
    (why,) = ex.explain(verdict, history, [])
    assert "no 1 of the" in why.unidentified


def test_retries_show_every_attempt() -> None:
    sent = events(5)
    ops = [
        Operation(
            "w1", "http://ingest-1", AT - 5, AT - 3, Outcome.UNKNOWN, tuple(sent), None, "timeout"
        ),
        Operation("w1", "http://ingest-2", AT - 0.1, AT, Outcome.OK, tuple(sent), 202),
    ]
    verdict, history = verdict_of(sent, [*sent, sent[1]], ops)
    (why,) = ex.explain(verdict, history, [])
    (suspect,) = why.suspects
    assert suspect.event_id == "e1" and len(suspect.carriers) == 2
    assert "after 2 attempts" in why.short()
    assert why.to_dict()["suspects"][0]["operations"][0].startswith("unknown ")


def test_a_valid_verdict_needs_no_explanation() -> None:
    sent = events(5)
    verdict, history = verdict_of(sent, sent)
    assert verdict.valid and ex.explain(verdict, history, []) == ()


def test_a_whole_window_counted_twice_is_named_even_when_the_search_cannot_finish() -> None:
    sent = events(40)  # 40 events over 40 s: one window, doubled by an aggregator without dedup
    verdict, history = verdict_of(sent, [*sent, *sent])
    (why,) = ex.explain(verdict, history, [])
    assert why.difference == 40 and len(why.suspects) == 40
    assert {s.how for s in why.suspects} == {"counted twice"}
