"""The oracle and check(): pure properties, and the mistakes a platform can make."""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.checker import (
    Aggregate,
    Expectation,
    Observed,
    Rules,
    Verdict,
    WindowKey,
    aggregate,
    aggregate_by_window,
    await_convergence,
    check,
    convergence_stats,
    diagnose,
    expectation,
    key_of,
    read_observed,
    stream_observed,
    sum_tolerance,
    window_start,
)
from harness.history import Event, History, Operation, Outcome
from harness.workload import EventGenerator, batches

W = 60
RULES = Rules()
T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)  # a window boundary
NOW = T0.timestamp() + 3 * W + 17.25


# --- helpers: a tiny model of the platform ------------------------------------------------


def ev(
    eid: str,
    sec: float = 1.0,
    rtt: float = 10.0,
    jitter: float = 1.0,
    loss: float = 0.0,
    tput: float = 5000.0,
    probe: str = "p1",
    target: str = "t1",
) -> Event:
    ts = T0 + timedelta(microseconds=round(sec * 1_000_000))
    return Event(eid, probe, target, ts, rtt, jitter, loss, tput)


def op(outcome: Outcome, *events: Event, t: float = 0.0) -> Operation:
    status = {Outcome.OK: 202, Outcome.FAIL: 422, Outcome.UNKNOWN: 503}[outcome]
    return Operation("w1", "http://ingest/v1/events", t, t + 0.01, outcome, events, status)


def naive_aggregate(events: Sequence[Event]) -> Aggregate:
    """What a platform adding floats one at a time (in arrival order) would store."""
    rs = js = ls = ts = 0.0
    for e in events:
        rs += e.rtt_ms
        js += e.jitter_ms
        ls += e.loss_pct
        ts += e.throughput_kbps
    return Aggregate(
        samples=len(events),
        rtt_sum=rs,
        rtt_min=min(e.rtt_ms for e in events),
        rtt_max=max(e.rtt_ms for e in events),
        jitter_sum=js,
        jitter_max=max(e.jitter_ms for e in events),
        loss_sum=ls,
        loss_max=max(e.loss_pct for e in events),
        throughput_sum=ts,
        throughput_min=min(e.throughput_kbps for e in events),
    )


def observe(stored: Iterable[Event], window_seconds: int = W) -> Observed:
    """The two views for a set of stored events, computed the way a platform would."""
    groups: dict[WindowKey, list[Event]] = defaultdict(list)
    for e in stored:
        groups[key_of(e, window_seconds)].append(e)
    aggs = {k: naive_aggregate(v) for k, v in groups.items()}
    diags = {k: d for k, a in aggs.items() if (d := diagnose(a, RULES))}
    return Observed(aggs, diags)


def commit(ops: Sequence[Operation], stores_unknown: Iterable[bool]) -> list[Event]:
    """A correct platform: first committed payload wins; unknown attempts may store events."""
    decide = iter(stores_unknown)
    stored: dict[str, Event] = {}
    for o in ops:
        if o.outcome is Outcome.FAIL:
            continue
        for e in o.events:
            if o.outcome is Outcome.OK or next(decide, False):
                stored.setdefault(e.event_id, e)
    return list(stored.values())


def run_check(ops: Sequence[Operation], stored: Iterable[Event], **kw: int) -> Verdict:
    obs = observe(stored)
    return check(expectation(History(ops), W), obs.aggregates, obs.diagnoses, RULES, **kw)


# --- windowing ----------------------------------------------------------------------------

aware = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)


@given(ts=aware, seconds=st.sampled_from([1, 10, 60, 300, 3600]))
def test_window_start_holds_ts_and_is_epoch_aligned(ts: datetime, seconds: int) -> None:
    start = window_start(ts, seconds)
    assert start <= ts < start + timedelta(seconds=seconds)
    assert (start - datetime(1970, 1, 1, tzinfo=UTC)) % timedelta(seconds=seconds) == timedelta(0)


@given(ts=aware, seconds=st.sampled_from([1, 60, 300]))
def test_boundary_opens_its_window(ts: datetime, seconds: int) -> None:
    start = window_start(ts, seconds)
    assert window_start(start, seconds) == start
    assert window_start(start - timedelta(microseconds=1), seconds) == start - timedelta(
        seconds=seconds
    )


def test_window_start_is_offset_independent() -> None:
    cest = datetime(2024, 5, 1, 14, 0, 30, tzinfo=UTC).astimezone(
        __import__("datetime").timezone(timedelta(hours=2))
    )
    assert window_start(cest, 60) == T0 + timedelta(hours=2)


def test_window_start_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="positive"):
        window_start(T0, 0)


# --- the oracle ---------------------------------------------------------------------------


def test_repeated_ok_operations_count_each_event_once() -> None:
    a, b = ev("a"), ev("b", rtt=20.0)
    ops = [op(Outcome.OK, a, b), op(Outcome.OK, a, b), op(Outcome.OK, b, a, b)]
    exp = expectation(History(ops), W)
    assert exp.choices == ()
    assert exp.definite == {key_of(a, W): (a, b)}
    assert run_check(ops, [a, b]).valid
    assert not run_check(ops, [a, b, b]).valid


def test_fail_only_ids_are_never_expected() -> None:
    a, f = ev("a"), ev("f", rtt=99.0)
    ops = [op(Outcome.OK, a), op(Outcome.FAIL, f)]
    assert expectation(History(ops), W).acked_events == 1
    assert run_check(ops, [a]).valid
    v = run_check(ops, [a, f])
    assert not v.valid and "samples expected 1 observed 2" in v.summary()


def test_unknown_only_ids_are_optional() -> None:
    a, u1, u2 = ev("a"), ev("u1", rtt=20.0), ev("u2", sec=70, rtt=30.0)
    ops = [op(Outcome.OK, a), op(Outcome.UNKNOWN, u1, u2)]
    for stored in ([a], [a, u1], [a, u2], [a, u1, u2]):
        v = run_check(ops, stored)
        assert v.valid, v.summary()
    assert not run_check(ops, [a, u1, u1]).valid  # counted at most once


def test_an_acked_id_may_be_counted_as_the_unknown_variant_that_won() -> None:
    # The unknown attempt may have committed first: "first committed wins".
    x_unknown = ev("x", rtt=200.0, jitter=40.0)
    x_ok = ev("x", sec=65, rtt=20.0)  # another payload, in another window
    ops = [op(Outcome.UNKNOWN, x_unknown), op(Outcome.OK, x_ok)]
    exp = expectation(History(ops), W)
    assert len(exp.choices) == 1 and exp.choices[0].required
    assert run_check(ops, [x_unknown]).valid
    assert run_check(ops, [x_ok]).valid
    assert not run_check(ops, []).valid  # acked: must be counted
    assert not run_check(ops, [x_unknown, x_ok]).valid  # exactly once


def test_a_payload_mixed_from_two_variants_is_rejected() -> None:
    v1, v2 = ev("x", rtt=10.0, jitter=50.0), ev("x", rtt=200.0, jitter=1.0)
    ops = [op(Outcome.OK, v1), op(Outcome.OK, v2)]
    mixed = ev("x", rtt=10.0, jitter=1.0)
    v = run_check(ops, [mixed])
    assert not v.valid
    assert v.wrong()[0].mode == "choice"
    assert run_check(ops, [v2]).valid


def test_counts_describe_the_history() -> None:
    ops = [
        op(Outcome.OK, ev("a"), ev("b")),
        op(Outcome.UNKNOWN, ev("c")),
        op(Outcome.OK, ev("b", rtt=11.0)),
        op(Outcome.FAIL, ev("d")),
    ]
    exp = expectation(History(ops), W)
    assert (exp.acked_events, exp.unknown_events, exp.conflicting_events) == (2, 1, 1)
    assert exp.probe_ids == frozenset({"p1"})


# --- properties against a model platform --------------------------------------------------

outcomes = st.sampled_from([Outcome.OK, Outcome.OK, Outcome.UNKNOWN, Outcome.FAIL])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    bl=batches(probe_ids=("p1", "p2"), now=NOW, max_batches=4, max_batch_size=8),
    data=st.data(),
)
def test_check_accepts_every_correct_platform(bl: list[list[Event]], data: st.DataObject) -> None:
    ops = [op(data.draw(outcomes), *b, t=float(i)) for i, b in enumerate(bl)]
    decisions = data.draw(st.lists(st.booleans(), max_size=64))
    stored = commit(ops, decisions)
    v = run_check(ops, stored)
    assert v.valid, v.summary()


@settings(max_examples=100, deadline=None)
@given(bl=batches(probe_ids=("p1", "p2"), now=NOW, max_batches=4, max_batch_size=8))
def test_check_rejects_a_lost_or_doubled_acked_event(bl: list[list[Event]]) -> None:
    # All acknowledged and no conflicting payloads: every change of the count shows.
    first: dict[str, Event] = {}
    for b in bl:
        for e in b:
            first.setdefault(e.event_id, e)
    ops = [op(Outcome.OK, *first.values())]
    stored = list(first.values())
    assert run_check(ops, stored).valid
    assert not run_check(ops, stored[1:]).valid
    assert not run_check(ops, [*stored, stored[0]]).valid


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), n=st.integers(1, 300))
def test_generator_batches_check_exactly(seed: int, n: int) -> None:
    gen = EventGenerator(seed, "run", ["p1", "p2"], ["t1", "t2", "t3"], clock=lambda: NOW)
    evs = gen.batch(n)
    ops = [op(Outcome.OK, *evs), op(Outcome.OK, *evs)]
    shuffled = evs[:]
    random.Random(seed).shuffle(shuffled)  # another summation order
    v = run_check(ops, shuffled)
    assert v.valid, v.summary()
    assert v.counts["exact"] == v.counts["windows"]


# --- the mistakes, one by one -------------------------------------------------------------


def _healthy_run() -> tuple[list[Operation], list[Event]]:
    evs = [ev(f"e{i}", sec=i * 7.5, rtt=10.0 + i) for i in range(24)]  # windows 0, 1, 2
    evs.append(ev("edge", sec=W, rtt=2000.0, jitter=90.0))  # exactly on a boundary
    return [op(Outcome.OK, *evs)], evs


def test_acked_event_counted_twice_is_named_in_the_summary() -> None:
    ops, evs = _healthy_run()
    v = run_check(ops, [*evs, evs[0]])
    assert not v.valid
    text = v.summary()
    assert "probe p1 target t1 window 2024-05-01T12:00:00Z" in text
    assert "samples expected 8 observed 9 (+1: acknowledged events counted twice?)" in text


def test_missing_acked_event_and_missing_window() -> None:
    ops, evs = _healthy_run()
    assert "acknowledged events lost" in run_check(ops, evs[1:]).summary()
    late = [e for e in evs if e.ts >= T0 + timedelta(seconds=2 * W)]
    v = run_check(ops, [e for e in evs if e not in late])
    assert "window missing: expected" in v.summary()


def test_window_shifted_by_one_is_pointed_out() -> None:
    ops, evs = _healthy_run()
    # The seeded bug: an event exactly on a boundary lands in the window before.
    shifted = [
        replace(e, ts=e.ts - timedelta(microseconds=1)) if e.event_id == "edge" else e for e in evs
    ]
    v = run_check(ops, shifted)
    assert not v.valid
    assert "window before" in v.summary() or "window after" in v.summary()


def test_whole_window_moved_shows_as_missing_plus_unexpected() -> None:
    ops = [op(Outcome.OK, ev("a", sec=10), ev("b", sec=20))]
    moved = [ev("a", sec=10 + W), ev("b", sec=20 + W)]
    v = run_check(ops, moved)
    problems = " | ".join(w.problem for w in v.wrong())
    assert "window missing" in problems and "unexpected window" in problems
    assert "window before" in problems or "window after" in problems


def test_extra_window_for_our_probe_is_an_error() -> None:
    ops, evs = _healthy_run()
    obs = observe(evs)
    stray = ev("zz", probe="p1", target="elsewhere")
    aggs = {**obs.aggregates, key_of(stray, W): aggregate([stray])}
    v = check(expectation(History(ops), W), aggs, obs.diagnoses, RULES)
    assert not v.valid
    assert "target elsewhere" in v.summary() and "unexpected window" in v.summary()


def test_missing_and_extra_diagnoses() -> None:
    ops, evs = _healthy_run()
    obs = observe(evs)
    exp = expectation(History(ops), W)
    k = next(k for k, d in obs.diagnoses.items() if "high_latency" in d)
    without = {kk: d for kk, d in obs.diagnoses.items() if kk != k}
    assert "diagnosis high_latency missing" in check(exp, obs.aggregates, without, RULES).summary()
    k0 = key_of(evs[0], W)
    extra = {**obs.diagnoses, k0: {"packet_loss": (0.0, 2.0)}}
    assert "unexpected diagnosis packet_loss" in check(exp, obs.aggregates, extra, RULES).summary()
    wrong_threshold = {
        **obs.diagnoses,
        k: {"high_latency": (obs.diagnoses[k]["high_latency"][0], 100.0)},
    }
    assert "threshold 100" in check(exp, obs.aggregates, wrong_threshold, RULES).summary()


def test_diagnosis_exactly_at_the_threshold_is_not_raised() -> None:
    a = aggregate([ev("a", rtt=150.0, jitter=30.0, loss=2.0, tput=1000.0)])
    assert diagnose(a, RULES) == {}
    b = aggregate([ev("a", rtt=150.001, jitter=30.001, loss=2.001, tput=999.999)])
    assert set(diagnose(b, RULES)) == {
        "high_latency",
        "high_jitter",
        "packet_loss",
        "low_throughput",
    }


def _one_window(*losses: float) -> tuple[Expectation, Observed]:
    evs = [ev(f"e{i}", sec=i, loss=x) for i, x in enumerate(losses)]
    return expectation(History([op(Outcome.OK, *evs)]), W), observe(evs)


@pytest.mark.parametrize(
    ("losses", "diagnosed"),
    [
        ((2.0, 2.0), False),  # exactly on the threshold: > is false
        ((2.5, 1.5), False),  # spread, the sum still exact
        ((math.nextafter(2.0, 3.0),), True),  # one float step above
        ((math.nextafter(2.0, 0.0),), False),  # one float step below
    ],
)
def test_a_diagnosis_exactly_on_the_threshold_is_judged_exactly(
    losses: tuple[float, ...], diagnosed: bool
) -> None:
    """The oracle used to accept either answer within float error of a threshold, so a
    diagnoser comparing with >= passed; now the rule is applied to the row exactly."""
    exp, obs = _one_window(*losses)
    ((key, row),) = obs.aggregates.items()
    assert ("packet_loss" in obs.diagnoses.get(key, {})) is diagnosed
    assert check(exp, obs.aggregates, obs.diagnoses, RULES).valid
    avg = row.loss_sum / row.samples
    flipped = dict(obs.diagnoses.get(key, {}))
    if diagnosed:
        del flipped["packet_loss"]
        problem = "diagnosis packet_loss missing"
    else:
        flipped["packet_loss"] = (avg, 2.0)
        problem = f"unexpected diagnosis packet_loss (observed {avg!r}, threshold 2) but avg"
    verdict = check(exp, obs.aggregates, {key: flipped}, RULES)
    assert not verdict.valid and problem in verdict.summary(), verdict.summary()


def test_diagnoses_follow_the_row_shown_when_its_sum_rounds_past_the_threshold() -> None:
    """The exact average is on the threshold, the platform's sum one rounding above it: the
    rule holds on the row the platform shows, so its diagnosis is right (and required)."""
    exp, obs = _one_window(2.4, 2.0, 1.9, 1.8, 2.3, 1.9, 1.7)
    ((key, row),) = obs.aggregates.items()
    assert row.loss_sum / row.samples > 2.0 and "packet_loss" in obs.diagnoses[key]
    assert check(exp, obs.aggregates, obs.diagnoses, RULES).valid
    verdict = check(exp, obs.aggregates, {}, RULES)
    assert "diagnosis packet_loss missing" in verdict.summary()


def test_float_sums_within_tolerance_pass_and_beyond_fail() -> None:
    evs = [ev(f"e{i}", sec=i / 10, rtt=0.1 * (i % 7) + 33.333, tput=1234.567) for i in range(500)]
    ops = [op(Outcome.OK, *evs)]
    exp = expectation(History(ops), W)
    obs = observe(reversed(evs))
    assert check(exp, obs.aggregates, obs.diagnoses, RULES).valid
    ((k, a),) = obs.aggregates.items()
    tol = sum_tolerance(a.samples, a.rtt_sum)
    nudged = {k: replace(a, rtt_sum=a.rtt_sum + 0.5 * tol)}
    assert check(exp, nudged, obs.diagnoses, RULES).valid
    off = {k: replace(a, rtt_sum=a.rtt_sum + 1e-6 * a.rtt_sum)}
    v = check(exp, off, obs.diagnoses, RULES)
    assert not v.valid and "rtt_sum expected" in v.summary()


def test_min_max_are_compared_exactly() -> None:
    ops, evs = _healthy_run()
    obs = observe(evs)
    k = key_of(evs[0], W)
    bad = {
        **obs.aggregates,
        k: replace(obs.aggregates[k], rtt_max=obs.aggregates[k].rtt_max + 1e-9),
    }
    v = check(expectation(History(ops), W), bad, obs.diagnoses, RULES)
    assert "rtt_max expected" in v.summary()


def test_summary_is_capped() -> None:
    evs = [ev(f"e{i}", sec=i * W + 1) for i in range(15)]
    v = run_check([op(Outcome.OK, *evs)], [])
    assert not v.valid and v.counts["wrong_windows"] == 15
    assert "... and 5 more wrong windows" in v.summary()
    assert v.summary().count("window missing") == 10


def test_search_budget_falls_back_to_bounds_and_says_so() -> None:
    unknown = [ev(f"u{i}", sec=i, rtt=10.0 + i) for i in range(12)]
    ops = [op(Outcome.OK, ev("a")), op(Outcome.UNKNOWN, *unknown)]
    stored = [ev("a"), *unknown[:5]]
    v = run_check(ops, stored, budget=3)
    assert v.valid and v.counts["bounds"] == 1, v.summary()
    assert "1 bounds" in v.summary()
    too_many = [*stored, *unknown, ev("a")]
    v = run_check(ops, too_many, budget=3)
    assert not v.valid  # the search proves this at once, without the budget
    assert "samples expected 1..13 observed 19" in v.summary()
    rtt_too_high = [ev("a"), *unknown[:4], replace(unknown[4], rtt_ms=1e4)]
    v = run_check(ops, rtt_too_high, budget=3)
    assert not v.valid


def test_verdict_to_dict_is_plain_data() -> None:
    import json

    ops, evs = _healthy_run()
    v = run_check(ops, evs[2:])
    d = v.to_dict()
    assert d["valid"] is False and d["windows"] and "summary" in d
    json.dumps(d)  # serialisable as is
    assert len(v.to_dict(include_ok=True)["windows"]) == v.counts["windows"]


# --- polling ------------------------------------------------------------------------------


class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def test_await_convergence_measures_from_the_last_ack() -> None:
    ops, evs = _healthy_run()
    exp = expectation(History(ops), W)
    views = [observe(evs[:3]), observe(evs[:10]), observe(evs)]
    clock = FakeClock(1000.0)
    reads = iter(views)

    def read() -> Observed:
        return next(reads, views[-1])

    v = await_convergence(exp, read, RULES, 5.0, since=999.5, clock=clock, sleep=clock.sleep)
    assert v.valid and v.polls == 3
    assert v.convergence_s == pytest.approx(0.6)


def test_await_convergence_times_out_with_the_last_verdict() -> None:
    ops, evs = _healthy_run()
    exp = expectation(History(ops), W)
    clock = FakeClock(0.0)
    v = await_convergence(
        exp, lambda: observe(evs[1:]), RULES, 1.0, since=0.0, clock=clock, sleep=clock.sleep
    )
    assert not v.valid and v.convergence_s is None
    assert v.waited_s == pytest.approx(1.0) and v.polls == 21
    assert "still wrong after waiting 1.0s" in v.summary()


def test_await_convergence_retries_read_errors_then_explains() -> None:
    exp = expectation(History([op(Outcome.OK, ev("a"))]), W)
    clock = FakeClock(0.0)

    def broken() -> Observed:
        raise ConnectionRefusedError("db down")

    with pytest.raises(TimeoutError, match="db down"):
        await_convergence(exp, broken, RULES, 0.2, since=0.0, clock=clock, sleep=clock.sleep)


def test_convergence_stats() -> None:
    assert convergence_stats([])["median"] is None
    s = convergence_stats([float(i) for i in range(1, 21)])
    assert s["median"] == 10.5 and s["p95"] == 19.0 and s["count"] == 20


# --- reading the views --------------------------------------------------------------------


class FakeCursor:
    def __init__(self, results: list[list[tuple]]) -> None:
        self.results = results
        self.queries: list[tuple[str, tuple]] = []

    def __enter__(self) -> FakeCursor:
        return self

    def __exit__(self, *a: object) -> None:
        pass

    def execute(self, sql: str, params: tuple) -> None:
        self.queries.append((sql, params))

    def fetchall(self) -> list[tuple]:
        return self.results.pop(0)


class FakeConn:
    def __init__(self, cursor: FakeCursor) -> None:
        self.cur = cursor

    def transaction(self) -> FakeCursor:
        return FakeCursor([])

    def cursor(self) -> FakeCursor:
        return self.cur


def test_read_observed_builds_keys_and_filters_by_probe() -> None:
    cest = __import__("datetime").timezone(timedelta(hours=2))
    start = T0.astimezone(cest)
    agg_row = ("p1", "t1", start, 60, 2, 20.0, 9.0, 11.0, 2.0, 1.0, 0.0, 0.0, 1e4, 5e3)
    diag_row = ("p1", "t1", start, "high_latency", 160.0, 150.0)
    cur = FakeCursor([[agg_row], [diag_row]])
    obs = read_observed(FakeConn(cur), ["p2", "p1"])
    key = WindowKey("p1", "t1", T0, 60)
    assert obs.aggregates[key].samples == 2 and obs.aggregates[key].rtt_min == 9.0
    assert obs.diagnoses[key] == {"high_latency": (160.0, 150.0)}
    assert all(params == (["p1", "p2"],) for _, params in cur.queries)
    assert "qoe_window_aggregates" in cur.queries[0][0] and "qoe_diagnoses" in cur.queries[1][0]


def test_aggregate_by_window_matches_manual() -> None:
    evs = [ev("a", sec=0.0, rtt=5.0), ev("b", sec=59.999999, rtt=7.0), ev("c", sec=60.0, rtt=1.0)]
    aggs = aggregate_by_window(evs, W)
    assert aggs[WindowKey("p1", "t1", T0, W)].samples == 2
    assert aggs[WindowKey("p1", "t1", T0 + timedelta(seconds=W), W)].rtt_sum == 1.0
    with pytest.raises(ValueError, match="at least one event"):
        aggregate([])


def test_cache_gives_the_same_verdict_and_is_reused() -> None:
    unknown = [ev(f"u{i}", sec=i, rtt=10.0 + i) for i in range(12)]
    ops = [op(Outcome.OK, ev("a")), op(Outcome.UNKNOWN, *unknown)]
    obs = observe([ev("a"), *unknown[::2]])
    exp = expectation(History(ops), W)
    cache: dict = {}
    first = check(exp, obs.aggregates, obs.diagnoses, RULES, cache=cache)
    assert len(cache) == 1
    again = check(exp, obs.aggregates, obs.diagnoses, RULES, cache=cache)
    assert first == again == check(exp, obs.aggregates, obs.diagnoses, RULES)
    assert first.valid and first.counts["choice"] == 1


def test_a_payload_sent_after_the_ack_cannot_win() -> None:
    first, later = ev("x", rtt=10.0), ev("x", rtt=900.0)
    ops = [op(Outcome.OK, first, t=0.0), op(Outcome.UNKNOWN, later, t=5.0)]
    assert run_check(ops, [first]).valid
    v = run_check(ops, [later])  # "last write wins": a bug the contract rules out
    assert not v.valid and "rtt_sum expected 10 observed 900" in v.summary()
    loose = expectation(History(ops), W, realtime=False)
    assert len(loose.choices) == 1 and len(loose.choices[0].variants) == 2


@settings(max_examples=60, deadline=None)
@given(
    bl=batches(now=NOW, max_batches=3, max_batch_size=10),
    repeats=st.lists(st.integers(0, 2), min_size=3, max_size=3),
)
def test_definite_events_are_expected_once_however_often_acked(
    bl: list[list[Event]], repeats: list[int]
) -> None:
    first: dict[str, Event] = {}
    for b in bl:
        for e in b:
            first.setdefault(e.event_id, e)
    once = tuple(first.values())
    ops = [op(Outcome.OK, *once, t=0.0)]
    ops += [op(Outcome.OK, *once, t=float(i + 1)) for i, n in enumerate(repeats) for _ in range(n)]
    exp = expectation(History(ops), W)
    assert exp.choices == ()
    assert sorted(e.event_id for evs in exp.definite.values() for e in evs) == sorted(first)


class FakeServerCursor:
    """A psycopg server-side cursor: rows handed over as the caller iterates."""

    def __init__(self, name: str, results: dict[str, list[tuple]]) -> None:
        self.name, self.results, self.itersize = name, results, 100
        self.rows: list[tuple] = []

    def __enter__(self) -> FakeServerCursor:
        return self

    def __exit__(self, *a: object) -> None:
        pass

    def execute(self, sql: str, params: tuple) -> None:
        assert params == (["p1", "p2"],)
        self.rows = self.results["aggregates" if "qoe_window_aggregates" in sql else "diagnoses"]

    def __iter__(self):
        return iter(self.rows)


class FakeServerConn(FakeConn):
    def __init__(self, results: dict[str, list[tuple]]) -> None:
        self.results = results
        self.cursors: list[FakeServerCursor] = []

    def cursor(self, name: str = "") -> FakeServerCursor:  # type: ignore[override]
        assert name, "stream_observed must ask for a server-side (named) cursor"
        cur = FakeServerCursor(name, self.results)
        self.cursors.append(cur)
        return cur


def test_stream_observed_reads_what_read_observed_reads() -> None:
    cest = __import__("datetime").timezone(timedelta(hours=2))
    values = (20.0, 9.0, 11.0, 2.0, 1.0, 0.0, 0.0, 1e4, 5e3)
    rows = {
        "aggregates": [
            ("p1", "t1", (T0 + timedelta(minutes=m)).astimezone(cest), 60, 2, *values)
            for m in range(50)
        ],
        "diagnoses": [("p1", "t1", T0.astimezone(cest), "high_latency", 160.0, 150.0)],
    }
    conn = FakeServerConn(rows)
    streamed = stream_observed(conn, ["p2", "p1"], rows_per_fetch=7)
    assert [c.itersize for c in conn.cursors] == [7, 7]
    fetched = read_observed(
        FakeConn(FakeCursor([rows["aggregates"], rows["diagnoses"]])), ["p1", "p2"]
    )
    assert streamed == fetched and len(streamed.aggregates) == 50
    keys = list(streamed.aggregates)
    assert keys[0].probe_id is keys[1].probe_id  # one string for the probe's many windows


def test_a_window_given_as_its_aggregate_checks_like_its_events() -> None:
    unknown = [ev(f"u{i}", sec=i, rtt=10.0 + i) for i in range(6)]
    evs = [ev(f"e{i}", sec=i * 7.5, rtt=10.0 + i) for i in range(24)]
    ops = [op(Outcome.OK, *evs), op(Outcome.UNKNOWN, *unknown)]
    exp = expectation(History(ops), W)
    folded = replace(
        exp, definite={}, aggregated={k: aggregate(v) for k, v in exp.definite.items()}
    )
    for stored in (
        evs,
        [*evs, *unknown[:3]],
        evs[1:],
        [*evs, evs[0]],
        [*evs, *unknown, unknown[0]],
    ):
        obs = observe(stored)
        for budget in (3, 20_000):  # the bounds and the search both work from the aggregate
            want = check(exp, obs.aggregates, obs.diagnoses, RULES, budget=budget)
            assert check(folded, obs.aggregates, obs.diagnoses, RULES, budget=budget) == want


def test_await_convergence_waits_on_while_the_state_still_converges() -> None:
    """Past the deadline, a state with more samples than before (the aggregators behind) gets
    more time; the first poll that matches ends the wait."""
    ops, evs = _healthy_run()
    exp = expectation(History(ops), W)
    clock = FakeClock(0.0)

    def read() -> Observed:  # one more event every 0.1 s: converges after the 1 s timeout
        return observe(evs[: min(len(evs), 1 + int(clock.t / 0.1))])

    v = await_convergence(exp, read, RULES, 1.0, since=0.0, clock=clock, sleep=clock.sleep)
    assert len(evs) * 0.1 > 1.0, "the state must still be converging at the deadline"
    assert v.valid and v.waited_s is not None and v.waited_s > 1.0


def test_await_convergence_judges_a_state_that_stopped_changing_at_its_deadline() -> None:
    """Lost events never arrive: however the rest converged, the verdict is given once the
    views stop changing, and it is invalid."""
    ops, evs = _healthy_run()
    exp = expectation(History(ops), W)
    clock = FakeClock(0.0)

    def read() -> Observed:  # converging for 1.2 s, then the first event is still missing
        return observe(evs[1 : min(len(evs), 2 + int(clock.t / 0.05))])

    v = await_convergence(exp, read, RULES, 1.0, since=0.0, clock=clock, sleep=clock.sleep)
    assert not v.valid
    assert v.waited_s == pytest.approx(2.0)  # 1 s, 0.5 s more while converging, 0.5 s unchanged
