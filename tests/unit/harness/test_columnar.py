"""harness.columnar: the same oracle and the same verdicts as the in-memory checker, read from
outcome files by DuckDB; failing cases included (lost, doubled, moved, conflicting, unknown)."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import checker
from harness.checker import Observed, Rules, Verdict, WindowKey, aggregate, expectation, key_of
from harness.columnar import ColumnarHistory, OutcomeSource, _exact, _rounded, _Scale
from harness.history import Event, History, Operation, Outcome, TsForm
from harness.load import read_outcomes
from harness.load.outcomes import completion_line, invocation_line
from harness.workload import batches

W = 60
RULES = Rules()
T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)  # a window boundary
NOW = T0.timestamp() + 3 * W + 17.25


def ev(
    eid: str,
    sec: float = 1.0,
    rtt: float = 10.0,
    jitter: float = 1.0,
    loss: float = 0.0,
    tput: float = 5000.0,
    probe: str = "p1",
    target: str = "t1",
    form: TsForm | None = None,
) -> Event:
    ts = T0 + timedelta(microseconds=round(sec * 1_000_000))
    if form is None:
        return Event(eid, probe, target, ts, rtt, jitter, loss, tput)
    return Event(eid, probe, target, ts, rtt, jitter, loss, tput, ts_form=form)


def op(outcome: Outcome, *events: Event, t: float = 0.0, process: str = "w1.u1") -> Operation:
    status = {Outcome.OK: 202, Outcome.FAIL: 422, Outcome.UNKNOWN: 503}[outcome]
    error = "" if outcome is Outcome.OK else f"HTTP {status}: no"
    return Operation(
        process, "http://ingest/v1/events", t, t + 0.01, outcome, events, status, error
    )


def write_outcomes(folder: Path, ops: Sequence[Operation], in_flight: Iterable[int] = ()) -> Path:
    """The outcome files a locust worker per process would write (the locustfile's format);
    operations whose index is in ``in_flight`` get no completion line."""
    folder.mkdir(parents=True, exist_ok=True)
    stopped = set(in_flight)
    numbers: dict[str, int] = {}
    lines: dict[str, list[str]] = {}
    for n, o in enumerate(ops):
        worker = o.process.split(".")[0]
        numbers[worker] = numbers.get(worker, 0) + 1
        i = numbers[worker]
        body = json.dumps({"events": [e.to_wire() for e in o.events]}, separators=(",", ":"))
        intended = o.invoked_at if o.intended_at is None else o.intended_at
        out = lines.setdefault(worker, [])
        out.append(invocation_line(i, intended, o.invoked_at, o.endpoint, o.process, body))
        if n not in stopped:
            out.append(completion_line(i, o.completed_at, o.outcome.value, o.status, o.error))
    for worker, rows in lines.items():
        (folder / f"outcomes-{worker}.jsonl").write_text("".join(rows))
    return folder


def observe(stored: Iterable[Event]) -> Observed:
    """The views a platform adding floats one at a time shows for these stored events."""
    groups: dict[WindowKey, list[Event]] = {}
    for e in stored:
        groups.setdefault(key_of(e, W), []).append(e)
    aggs = {}
    for k, evs in groups.items():
        sums = [0.0, 0.0, 0.0, 0.0]
        for e in evs:
            for f, x in enumerate((e.rtt_ms, e.jitter_ms, e.loss_pct, e.throughput_kbps)):
                sums[f] += x
        exact = aggregate(evs)
        aggs[k] = replace(
            exact, rtt_sum=sums[0], jitter_sum=sums[1], loss_sum=sums[2], throughput_sum=sums[3]
        )
    diags = {k: d for k, a in aggs.items() if (d := checker.diagnose(a, RULES))}
    return Observed(aggs, diags)


def both(
    folder: Path,
    ops: Sequence[Operation],
    stored: Iterable[Event],
    *,
    in_flight: Iterable[int] = (),
    extra: Sequence[Operation] = (),
    ended_at: float = 100.0,
    realtime: bool = True,
) -> Verdict:
    """The verdict of both checkers on the same files; they must be equal."""
    write_outcomes(folder, ops, in_flight)
    history = History.merge(read_outcomes(folder, ended_at), History(extra))
    in_memory = expectation(history, W, realtime=realtime)
    with ColumnarHistory.read([OutcomeSource(folder, ended_at)], extra) as store:
        columnar = store.expectation(W, realtime=realtime)
        assert store.headers().operations() == tuple(
            o if o in extra else replace(o, events=(), events_omitted=len(o.events))
            for o in history.operations()
        )
    assert_same_oracle(in_memory, columnar)
    obs = observe(stored)
    want = checker.check(in_memory, obs.aggregates, obs.diagnoses, RULES)
    got = checker.check(columnar, obs.aggregates, obs.diagnoses, RULES)
    assert got == want
    assert got.summary() == want.summary()
    return got


def assert_same_oracle(in_memory: checker.Expectation, columnar: checker.Expectation) -> None:
    assert columnar.choices == in_memory.choices
    assert columnar.windows() == in_memory.windows()
    counts = ("acked_events", "unknown_events", "conflicting_events", "probe_ids")
    assert [getattr(columnar, c) for c in counts] == [getattr(in_memory, c) for c in counts]
    assert not columnar.definite and set(columnar.aggregated) == set(in_memory.definite)
    for k in in_memory.windows():
        assert columnar.fixed(k) == in_memory.fixed(k), k


# --- the verdicts, right and wrong --------------------------------------------------------


def healthy() -> tuple[list[Operation], list[Event]]:
    evs = [ev(f"e{i}", sec=i * 7.5, rtt=10.0 + i) for i in range(24)]  # windows 0, 1, 2
    evs.append(ev("edge", sec=W, rtt=2000.0, jitter=90.0))  # exactly on a boundary
    return [op(Outcome.OK, *evs[:10], t=1.0), op(Outcome.OK, *evs[10:], t=2.0)], evs


def test_a_correct_platform_is_valid_in_aggregated_windows(tmp_path: Path) -> None:
    ops, evs = healthy()
    v = both(tmp_path, ops, evs)
    assert v.valid and v.counts["exact"] == 3, v.summary()


def test_lost_doubled_and_moved_events_are_named_alike(tmp_path: Path) -> None:
    ops, evs = healthy()
    lost = both(tmp_path / "lost", ops, evs[1:])
    assert not lost.valid and "acknowledged events lost?" in lost.summary()
    doubled = both(tmp_path / "doubled", ops, [*evs, evs[0]])
    assert "samples expected 8 observed 9 (+1: acknowledged events counted twice?)" in (
        doubled.summary()
    )
    moved = [
        replace(e, ts=e.ts - timedelta(microseconds=1)) if e.event_id == "edge" else e for e in evs
    ]
    shifted = both(tmp_path / "moved", ops, moved)
    assert "in the window before" in shifted.summary() or "window after" in shifted.summary()


def test_a_whole_window_moved_shows_missing_and_unexpected(tmp_path: Path) -> None:
    ops = [op(Outcome.OK, ev("a", sec=10), ev("b", sec=20))]
    v = both(tmp_path, ops, [ev("a", sec=10 + W), ev("b", sec=20 + W)])
    problems = " | ".join(w.problem for w in v.wrong())
    assert "window missing" in problems and "unexpected window" in problems


def test_wrong_values_in_an_aggregated_window(tmp_path: Path) -> None:
    ops, evs = healthy()
    other = [replace(evs[3], rtt_ms=evs[3].rtt_ms + 0.5), *evs[:3], *evs[4:]]
    v = both(tmp_path, ops, other)
    assert "rtt_sum expected" in v.summary() and "rtt_max" not in v.summary()


def test_unknown_ids_count_at_most_once(tmp_path: Path) -> None:
    a, u1, u2 = ev("a"), ev("u1", rtt=20.0), ev("u2", sec=70, rtt=30.0)
    ops = [op(Outcome.OK, a, t=1.0), op(Outcome.UNKNOWN, u1, u2, t=2.0)]
    for n, stored in enumerate(([a], [a, u1], [a, u2], [a, u1, u2])):
        assert both(tmp_path / f"ok{n}", ops, stored).valid
    twice = both(tmp_path / "twice", ops, [a, u1, u1])
    assert not twice.valid and twice.wrong()[0].mode == "choice"


def test_an_unanswered_batch_is_unknown(tmp_path: Path) -> None:
    a, b = ev("a"), ev("b", sec=2.0, rtt=30.0)
    ops = [op(Outcome.OK, a, t=1.0), op(Outcome.OK, b, t=2.0)]
    assert both(tmp_path / "stored", ops, [a, b], in_flight=[1]).valid
    assert both(tmp_path / "not", ops, [a], in_flight=[1]).valid
    assert not both(tmp_path / "twice", ops, [a, b, b], in_flight=[1]).valid


def test_resends_failures_and_conflicting_payloads(tmp_path: Path) -> None:
    x_unknown = ev("x", rtt=200.0, jitter=40.0)
    x_ok = ev("x", sec=65, rtt=20.0)  # another payload, in another window
    f = ev("f", rtt=99.0)
    plain = [ev(f"p{i}", sec=i, rtt=11.0 + i) for i in range(5)]
    ops = [
        op(Outcome.UNKNOWN, x_unknown, *plain[:2], t=1.0),
        op(Outcome.OK, x_ok, *plain[:2], t=2.0),  # the resend, one payload changed
        op(Outcome.FAIL, f, t=3.0),
        op(Outcome.OK, *plain[2:], t=4.0),
    ]
    assert both(tmp_path / "first", ops, [x_unknown, *plain]).valid
    assert both(tmp_path / "second", ops, [x_ok, *plain]).valid
    assert not both(tmp_path / "both", ops, [x_unknown, x_ok, *plain]).valid
    assert not both(tmp_path / "none", ops, plain).valid
    mixed = replace(x_ok, jitter_ms=40.0)
    v = both(tmp_path / "mixed", ops, [mixed, *plain])
    assert not v.valid and "no choice" in v.summary()
    failed = both(tmp_path / "failed", ops, [x_ok, *plain, f])
    assert not failed.valid


def test_a_payload_sent_after_the_ack_cannot_win(tmp_path: Path) -> None:
    first, later = ev("x", rtt=10.0), ev("x", rtt=900.0)
    ops = [op(Outcome.OK, first, t=0.0), op(Outcome.UNKNOWN, later, t=5.0)]
    assert both(tmp_path / "first", ops, [first]).valid
    v = both(tmp_path / "later", ops, [later])
    assert not v.valid and "rtt_sum expected 10 observed 900" in v.summary()
    loose = both(tmp_path / "loose", ops, [later], realtime=False)
    assert loose.valid


def test_repeats_within_and_across_batches(tmp_path: Path) -> None:
    a, b = ev("a"), ev("b", rtt=20.0)
    ops = [op(Outcome.OK, a, b, t=1.0), op(Outcome.OK, a, b, t=2.0), op(Outcome.OK, b, a, b, t=3.0)]
    assert both(tmp_path / "once", ops, [a, b]).valid
    assert not both(tmp_path / "twice", ops, [a, b, b]).valid


def test_other_timestamp_forms_and_odd_values_go_through_python(tmp_path: Path) -> None:
    forms = [TsForm(utc="Z"), TsForm(offset_minutes=120), TsForm(utc="z", separator="t", digits=9)]
    evs = [ev(f"f{i}", sec=10.0 + i, form=form) for i, form in enumerate(forms)]
    evs += [ev("negzero", loss=-0.0), ev("tiny", loss=1e-300), ev("big", tput=1e300)]
    evs += [ev(f"p{i}", sec=30.0 + i, rtt=1.0 + i) for i in range(5)]
    ops = [op(Outcome.OK, *evs, t=1.0)]
    assert both(tmp_path / "ok", ops, evs).valid
    assert not both(tmp_path / "lost", ops, evs[:-1]).valid


def test_operations_in_memory_merge_in_order(tmp_path: Path) -> None:
    ops, evs = healthy()
    sentinel = ev("fresh-1", sec=5.0, probe="fresh", target="freshness")
    extra = [replace(op(Outcome.OK, sentinel, t=1.0), process="freshness")]
    assert both(tmp_path, ops, [*evs, sentinel], extra=extra).valid
    assert not both(tmp_path / "lost", ops, evs, extra=extra).valid


outcomes = st.sampled_from([Outcome.OK, Outcome.OK, Outcome.UNKNOWN, Outcome.FAIL])


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    bl=batches(probe_ids=("p1", "p2"), now=NOW, max_batches=4, max_batch_size=8),
    data=st.data(),
)
def test_same_verdict_as_the_in_memory_checker(
    tmp_path_factory: pytest.TempPathFactory, bl: list[list[Event]], data: st.DataObject
) -> None:
    ops = [op(data.draw(outcomes), *b, t=float(i)) for i, b in enumerate(bl)]
    decide = iter(data.draw(st.lists(st.booleans(), max_size=64)))
    stored: dict[str, Event] = {}
    for o in ops:
        for e in o.events:
            if o.outcome is Outcome.OK or (o.outcome is Outcome.UNKNOWN and next(decide, False)):
                stored.setdefault(e.event_id, e)
    kept = list(stored.values())
    mistake = data.draw(st.sampled_from(["none", "lose", "double", "move"]))
    if kept and mistake == "lose":
        kept = kept[1:]
    elif kept and mistake == "double":
        kept.append(kept[0])
    elif kept and mistake == "move":
        kept[0] = replace(kept[0], ts=kept[0].ts + timedelta(seconds=W))
    folder = tmp_path_factory.mktemp("same")
    v = both(folder, ops, kept)
    if mistake == "none":
        assert v.valid, v.summary()


# --- exact sums ---------------------------------------------------------------------------

finite = st.floats(min_value=0.0, max_value=1e300, allow_nan=False, allow_infinity=False)


@given(st.lists(finite, min_size=1, max_size=60))
def test_exact_sums_round_like_fsum(xs: list[float]) -> None:
    assert _rounded(sum(_exact(x) for x in xs)) == math.fsum(xs)


def test_scale_keeps_forty_binary_orders_and_leaves_the_rest_to_python() -> None:
    s = _Scale.of(0.001, 100_000.0)
    assert s.tiny <= 0.001 and s.huge > 100_000.0
    assert (0.001 * 2.0**s.shift).is_integer() and 100_000.0 * 2.0**s.shift < 2.0**94
    wide = _Scale.of(1e-30, 1e6)
    assert wide.tiny > 1e-30 and wide.huge > 1e6  # the smallest values go to Python


def test_sums_of_many_values_match_fsum(tmp_path: Path) -> None:
    rng = random.Random(7)
    evs = [
        ev(f"e{i}", sec=rng.uniform(0, 59), rtt=rng.uniform(5, 600), jitter=rng.uniform(0.1, 120),
           loss=round(rng.uniform(0, 1.5), 3), tput=rng.uniform(50, 1e5))
        for i in range(3000)
    ]  # fmt: skip
    ops = [op(Outcome.OK, *evs[i : i + 500], t=float(i)) for i in range(0, 3000, 500)]
    write_outcomes(tmp_path, ops)
    with ColumnarHistory.read([OutcomeSource(tmp_path, 10.0)]) as store:
        (window,) = store.expectation(W).aggregated.values()
    assert window == aggregate(evs)


# --- reading the files ----------------------------------------------------------------------


def test_a_truncated_last_line_is_skipped_and_damage_elsewhere_is_an_error(tmp_path: Path) -> None:
    write_outcomes(tmp_path, [op(Outcome.OK, ev("a"), t=1.0)])
    path = tmp_path / "outcomes-w1.jsonl"
    path.write_text(path.read_text() + '{"i": 2, "t": 3.0, "b": {"ev')
    with ColumnarHistory.read([OutcomeSource(tmp_path)]) as store:
        assert len(store.headers()) == 1
    path.write_text('{"i": 2, "t"\n' + path.read_text())
    with pytest.raises(ValueError, match="outcome file is damaged"):
        ColumnarHistory.read([OutcomeSource(tmp_path)])


def test_damaged_events_and_duplicate_numbers_are_errors(tmp_path: Path) -> None:
    path = write_outcomes(tmp_path, [op(Outcome.OK, ev("a"), t=1.0)]) / "outcomes-w1.jsonl"
    text = path.read_text()
    path.write_text(text.replace('"rtt_ms":10.0', '"rtt_ms":"fast"'))
    with (
        pytest.raises(ValueError, match="without rtt_ms"),
        ColumnarHistory.read([OutcomeSource(tmp_path)]) as store,
    ):
        store.expectation(W)
    path.write_text(text + text)
    with pytest.raises(ValueError, match="invocation 1 appears twice"):
        ColumnarHistory.read([OutcomeSource(tmp_path)])
    path.write_text(text.replace('"o": "ok"', '"o": "maybe"'))
    with pytest.raises(ValueError, match="has outcome maybe"):
        ColumnarHistory.read([OutcomeSource(tmp_path)])


def test_a_remote_workers_outcomes_must_have_arrived_whole(tmp_path: Path) -> None:
    write_outcomes(tmp_path, [op(Outcome.OK, ev("a"), t=1.0)])
    marker = tmp_path / "outcomes-w9.shipped.json"
    marker.write_text(json.dumps({"origin": "box2:41", "complete": False, "at": 2.0}))
    with pytest.raises(ValueError, match="worker on box2:41 stopped shipping"):
        ColumnarHistory.read([OutcomeSource(tmp_path)])


def test_headers_hold_counts_and_the_in_memory_checker_refuses_them(tmp_path: Path) -> None:
    ops, _ = healthy()
    write_outcomes(tmp_path, ops)
    with ColumnarHistory.read([OutcomeSource(tmp_path)]) as store:
        headers = store.headers()
        assert store.last_ok_at() == headers.last_ok_at() == ops[-1].completed_at
    assert [o.batch_size for o in headers] == [10, 15] and all(not o.events for o in headers)
    with pytest.raises(ValueError, match="carries only the count of its 10 events"):
        expectation(headers, W)


def test_the_temporary_folder_is_removed(tmp_path: Path) -> None:
    write_outcomes(tmp_path / "run", [op(Outcome.OK, ev("a"), t=1.0)])
    with ColumnarHistory.read([OutcomeSource(tmp_path / "run")], work_dir=tmp_path) as store:
        assert list(tmp_path.glob("qoe-columnar-*"))
        store.expectation(W)
    assert not list(tmp_path.glob("qoe-columnar-*"))
    dropped = ColumnarHistory.read([OutcomeSource(tmp_path / "run")], work_dir=tmp_path)
    del dropped  # never closed: its folder goes with it
    assert not list(tmp_path.glob("qoe-columnar-*"))
    (tmp_path / "run" / "outcomes-w2.jsonl").write_text('{"i": 1, "d": 1.0, "t": null}\n')
    with pytest.raises(ValueError, match='invocation 1 has no time "t"'):
        ColumnarHistory.read([OutcomeSource(tmp_path / "run")], work_dir=tmp_path)
    (tmp_path / "run" / "outcomes-w2.jsonl").write_text('{"i": 1, "t": 1.0}\n')
    with pytest.raises(ValueError, match='invocation 1 has no intended time "d"'):
        ColumnarHistory.read([OutcomeSource(tmp_path / "run")], work_dir=tmp_path)
    assert not list(tmp_path.glob("qoe-columnar-*"))


def test_a_batch_written_with_another_offset_names_the_same_window(tmp_path: Path) -> None:
    e = ev("o", sec=59.999999, form=TsForm(offset_minutes=120))
    v = both(tmp_path, [op(Outcome.OK, e, t=1.0)], [e])
    assert v.valid and v.windows[0].key.window_start == T0


def test_an_engine_failure_says_what_to_do(tmp_path: Path) -> None:
    write_outcomes(tmp_path / "run", [op(Outcome.OK, ev(f"e{i}"), t=float(i)) for i in range(50)])
    with pytest.raises(
        RuntimeError, match=r"(?s)DuckDB could not read the outcome files: .*larger memory_limit"
    ):
        ColumnarHistory.read([OutcomeSource(tmp_path / "run")], memory_limit="1MB")
