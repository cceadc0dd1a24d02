"""Workload: the seeded generator, the Hypothesis strategies and the recording client."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from hypothesis import Phase, find, given, settings

from harness.checker import Rules, aggregate, aggregate_by_window, diagnose, window_start
from harness.history import Event, History, Outcome
from harness.workload import (
    CLOCK_STEP_S,
    EDGE_TARGETS,
    THRESHOLD_FIELDS,
    TS_FORMS,
    EventGenerator,
    IngestClient,
    SettleError,
    batches,
    events,
    padded,
    prefixed,
    rekey,
)

NOW = 1_714_564_817.25  # 2024-05-01T12:00:17.25Z
ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
PROBE_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# The harness's reading of RFC 3339 with an offset (CONTRACT.md "ts"), fraction 0-9 digits.
TS_RE = re.compile(r"^\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(\.\d{1,9})?([Zz]|[+-]\d\d:[0-5]\d)$")


def gen(seed: int = 7, **kw: object) -> EventGenerator:
    return EventGenerator(seed, "run42", ["p1", "p2"], ["t1", "t2"], clock=lambda: NOW, **kw)


# --- generator ----------------------------------------------------------------------------


def test_same_seed_same_events() -> None:
    assert gen().batch(200) == gen().batch(200)
    assert gen(1).batch(50) != gen(2).batch(50)


def test_ids_count_up_with_the_run_prefix() -> None:
    g = gen()
    ids = [e.event_id for e in g.batch(3) + g.batch(2)]
    assert ids == ["run42-1", "run42-2", "run42-3", "run42-4", "run42-5"]
    assert all(ID_RE.match(i) for i in ids)


def assert_valid_for_ingest(e: Event, now: datetime, step_s: float = CLOCK_STEP_S) -> None:
    """Every rule of CONTRACT.md's event table, with the time bounds one step inside."""
    wire = e.to_wire()
    assert ID_RE.match(wire["event_id"]) and PROBE_RE.match(wire["probe_id"]), wire
    assert 1 <= len(wire["target"]) <= 255 and wire["target"].isprintable(), wire
    assert TS_RE.match(wire["ts"]) and Event.from_wire(wire).ts == e.ts, wire["ts"]
    step = timedelta(seconds=step_s)
    assert now - timedelta(hours=24) + step <= e.ts <= now + timedelta(minutes=5) - step, wire
    assert 0 <= e.rtt_ms <= 60_000 and 0 <= e.jitter_ms <= 60_000, wire
    assert 0 <= e.loss_pct <= 100 and 0 <= e.throughput_kbps < math.inf, wire


def test_timestamps_stay_inside_what_ingest_accepts() -> None:
    evs = gen(late_fraction=0.3, edge_cases=False).batch(2000)
    now = datetime.fromtimestamp(NOW, UTC)
    lowest = now - timedelta(hours=24) + timedelta(minutes=10)
    assert all(lowest <= e.ts <= now for e in evs)
    starts = Counter(window_start(e.ts, 60) for e in evs)
    current = window_start(now, 60)
    assert {current - timedelta(minutes=k) for k in range(4)} <= set(starts)
    assert any(s < current - timedelta(minutes=30) for s in starts), "expected late events"
    on_boundary = sum(e.ts == window_start(e.ts, 60) for e in evs)
    assert on_boundary > 100, "expected events exactly on window boundaries"


def test_every_event_is_valid_and_the_edges_are_there() -> None:
    g = gen(3)
    evs = g.batch(3000)
    now = datetime.fromtimestamp(NOW, UTC)
    for e in evs:
        assert_valid_for_ingest(e, now)
    assert {e.ts_form for e in evs} == set(TS_FORMS)
    assert {len(e.event_id) for e in evs} >= {128} and {len(p) for p in g.probes} >= {64}
    assert set(EDGE_TARGETS) <= {e.target for e in evs} and len(EDGE_TARGETS[1]) == 255
    values = {x for e in evs for x in (e.rtt_ms, e.jitter_ms, e.loss_pct, e.throughput_kbps)}
    assert {0.0, 5e-324, 60_000.0, math.nextafter(60_000.0, 0), 100.0} <= values
    future = now + timedelta(minutes=5) - timedelta(seconds=CLOCK_STEP_S)
    assert any(abs(e.ts - future) < timedelta(seconds=1) for e in evs)


def test_special_batches_are_valid_and_reproducible() -> None:
    now = datetime.fromtimestamp(NOW, UTC)
    g, again = gen(), gen()
    special = [g.threshold_batch(), *g.form_batches(), g.time_bound_batch()]
    assert special == [again.threshold_batch(), *again.form_batches(), again.time_bound_batch()]
    for e in (e for batch in special for e in batch):
        assert_valid_for_ingest(e, now, step_s=CLOCK_STEP_S - 1e-6)
    ids = [e.event_id for batch in special for e in batch]
    assert len(ids) == len(set(ids))


def test_time_bound_batch_is_one_step_inside_each_bound_in_every_form() -> None:
    now = datetime.fromtimestamp(NOW, UTC)
    batch = gen().time_bound_batch(step_s=2)
    stamps = Counter(e.ts for e in batch)
    step = timedelta(seconds=2)
    assert set(stamps) == {now - timedelta(hours=24) + step, now + timedelta(minutes=5) - step}
    assert {e.ts_form for e in batch} == set(TS_FORMS)


def test_form_batches_put_every_form_on_and_beside_a_boundary() -> None:
    batches_ = gen().form_batches()
    assert [b[0].ts_form for b in batches_] == list(TS_FORMS)
    for b in batches_:
        assert {e.ts_form for e in b} == {b[0].ts_form}
        starts = {window_start(e.ts, 60) for e in b}
        assert len(starts) == 2 and any(e.ts == window_start(e.ts, 60) for e in b)
    nanos = [e.to_wire()["ts"] for b in batches_ for e in b if e.ts_form.digits == 9]
    assert any(":59.999999999" in text for text in nanos), nanos


@pytest.mark.parametrize("kind", list(THRESHOLD_FIELDS))
def test_threshold_windows_average_exactly_on_and_one_step_beside_each_threshold(
    kind: str,
) -> None:
    rules = Rules()
    field, rule = THRESHOLD_FIELDS[kind]
    threshold = getattr(rules, rule)
    windows: dict[str, list[Event]] = {}
    for e in gen().threshold_batch():
        windows.setdefault(e.target, []).append(e)
    assert len({window_start(e.ts, 60) for w in windows.values() for e in w}) == 1
    expected = {
        "below": math.nextafter(threshold, 0),
        "on": threshold,
        "above": math.nextafter(threshold, math.inf),
    }
    bad_side = "below" if kind == "low_throughput" else "above"
    for side, avg in expected.items():
        agg = aggregate(windows[f"{kind} {side} #1"])
        total = sum(getattr(e, field) for e in reversed(windows[f"{kind} {side} #1"]))
        assert getattr(agg, f"{field.split('_')[0]}_sum") / agg.samples == avg
        assert total / agg.samples == avg, "any summation order gives the same average"
        assert (kind in diagnose(agg, rules)) is (side == bad_side)
        assert [k for k in diagnose(agg, rules) if k != kind] == []


def test_padded_and_prefixed_keep_maximum_lengths_and_distinct_ids() -> None:
    a, b = padded("hyp-1", 128), padded("hyp-2", 128)
    assert len(a) == 128 and ID_RE.match(a) and PROBE_RE.match(padded("p", 64))
    assert prefixed("run.", a, 128) != prefixed("run.", b, 128)
    assert len(prefixed("run.", a, 128)) == 128 and prefixed("x.", "hyp-3", 128) == "x.hyp-3"
    with pytest.raises(ValueError):
        prefixed("x" * 130, "hyp-3", 128)
    with pytest.raises(ValueError):
        padded("has_underscore", 64)


def test_values_are_rounded() -> None:
    for e in gen(edge_cases=False).batch(300):
        for x in (e.rtt_ms, e.jitter_ms, e.loss_pct, e.throughput_kbps):
            assert round(x, 3) == x


@pytest.mark.parametrize(
    ("profile", "holds"),
    [
        ("degraded", lambda e: e.rtt_ms > 150 and e.jitter_ms > 30 and e.throughput_kbps < 1000),
        ("lossy", lambda e: e.loss_pct > 2),
        ("healthy", lambda e: e.rtt_ms < 150 and e.loss_pct < 2 and e.throughput_kbps > 1000),
    ],
)
def test_profiles_trigger_their_diagnoses(profile: str, holds: Callable[[Event], bool]) -> None:
    assert all(holds(e) for e in gen(edge_cases=False).batch(200, profile=profile))


def test_mixed_profile_exercises_every_diagnosis() -> None:
    aggs = aggregate_by_window(gen(3).batch(2000), 60)
    kinds = Counter(k for a in aggs.values() for k in diagnose(a, Rules()))
    assert set(kinds) == {"high_latency", "high_jitter", "packet_loss", "low_throughput"}
    assert any(not diagnose(a, Rules()) for a in aggs.values()), "expected healthy windows too"


def test_unknown_profile_is_refused() -> None:
    with pytest.raises(ValueError, match="expected one of healthy"):
        gen().batch(1, profile="sunny")


# --- strategies ---------------------------------------------------------------------------


@settings(max_examples=200)
@given(e=events(now=NOW))
def test_events_are_valid_for_ingest(e: Event) -> None:
    assert_valid_for_ingest(e, datetime.fromtimestamp(NOW, UTC), step_s=0)
    assert e.ts <= datetime.fromtimestamp(NOW, UTC)


def _ids(bl: list[list[Event]]) -> list[str]:
    return [e.event_id for b in bl for e in b]


def test_batches_make_the_awkward_cases() -> None:
    strat = batches(now=NOW)

    def dup_in_batch(bl: list[list[Event]]) -> bool:
        return any(len({e.event_id for e in b}) < len(b) for b in bl)

    def reused_across(bl: list[list[Event]]) -> bool:
        return len(bl) > 1 and bool({e.event_id for e in bl[0]} & {e.event_id for e in bl[1]})

    def conflicting(bl: list[list[Event]]) -> bool:
        seen: dict[str, Event] = {}
        return any(seen.setdefault(e.event_id, e) != e for b in bl for e in b)

    def on_boundary(bl: list[list[Event]]) -> bool:
        return any(e.ts == window_start(e.ts, 60) for b in bl for e in b)

    def out_of_order(bl: list[list[Event]]) -> bool:
        ts = [e.ts for b in bl for e in b]
        return ts != sorted(ts)

    def on_a_threshold(bl: list[list[Event]]) -> bool:
        by_target: dict[str, list[Event]] = {}
        for e in (e for b in bl for e in b):
            by_target.setdefault(e.target, []).append(e)
        rules = Rules()
        return any(
            math.fsum(getattr(e, field) for e in w) / len(w) == getattr(rules, rule)
            for w in by_target.values()
            for field, rule in THRESHOLD_FIELDS.values()
        )

    def offsets(bl: list[list[Event]]) -> bool:
        forms = {e.ts_form for b in bl for e in b}
        return {f.offset_minutes < 0 for f in forms} == {True, False} and any(
            f.digits > 6 for f in forms
        )

    def long_ids(bl: list[list[Event]]) -> bool:
        return any(len(e.event_id) == 128 and len(e.probe_id) == 64 for b in bl for e in b)

    for pred in (
        dup_in_batch,
        reused_across,
        conflicting,
        on_boundary,
        out_of_order,
        on_a_threshold,
        offsets,
        long_ids,
    ):
        find(
            strat, pred, settings=settings(max_examples=500, database=None, phases=[Phase.generate])
        )


def test_rekey_keeps_equal_ids_equal() -> None:
    bl = [[ev := next(iter(gen().batch(1)))], [ev]]
    out = rekey(bl, "x1")
    assert out[0][0].event_id == out[1][0].event_id == f"x1.{ev.event_id}"
    assert out[0][0].rtt_ms == ev.rtt_ms
    long = replace(ev, event_id=padded("hyp-9", 128))
    assert len(rekey([[long]], "x1")[0][0].event_id) == 128


# --- the client ---------------------------------------------------------------------------


def client(
    handler: Callable[[httpx.Request], httpx.Response],
    history: History | None = None,
    urls: tuple[str, ...] = ("http://ingest-1:8080", "http://ingest-2:8080/"),
    **kw: object,
) -> IngestClient:
    return IngestClient(
        list(urls),
        "tok",
        history if history is not None else History(),
        "w1",
        transport=httpx.MockTransport(handler),
        **kw,
    )


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (202, Outcome.OK),
        (400, Outcome.FAIL),
        (401, Outcome.FAIL),
        (413, Outcome.FAIL),
        (415, Outcome.FAIL),
        (422, Outcome.FAIL),
        (503, Outcome.UNKNOWN),
        (500, Outcome.UNKNOWN),
        (502, Outcome.UNKNOWN),
        (404, Outcome.UNKNOWN),  # outside the contract: cannot claim nothing was stored
    ],
)
def test_statuses_are_classified(status: int, outcome: Outcome) -> None:
    h = History()
    with client(lambda r: httpx.Response(status, json={"error": "x"}), h) as c:
        o = c.send(gen().batch(3))
    assert (o.outcome, o.status) == (outcome, status)
    assert h.operations() == (o,)
    assert (o.error == "") == (outcome is Outcome.OK)


@pytest.mark.parametrize(
    ("exc", "outcome"),
    [
        (httpx.ConnectError("refused"), Outcome.FAIL),
        (httpx.ConnectTimeout("slow connect"), Outcome.FAIL),
        (httpx.ReadTimeout("no answer"), Outcome.UNKNOWN),
        (httpx.WriteTimeout("stuck"), Outcome.UNKNOWN),
        (httpx.RemoteProtocolError("reset"), Outcome.UNKNOWN),
        (httpx.ReadError("connection reset by peer"), Outcome.UNKNOWN),
    ],
)
def test_network_errors_are_classified(exc: httpx.HTTPError, outcome: Outcome) -> None:
    def boom(request: httpx.Request) -> httpx.Response:
        raise exc

    with client(boom) as c:
        o = c.send(gen().batch(2))
    assert o.outcome is outcome and o.status is None
    assert type(exc).__name__ in o.error


def test_request_carries_the_batch_and_token_round_robin() -> None:
    seen: list[httpx.Request] = []

    def ok(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(202, json={"accepted": 2, "duplicates": 0})

    batch = gen().batch(2)
    with client(ok) as c:
        ops = [c.send(batch) for _ in range(3)]
    assert [str(r.url) for r in seen] == [
        "http://ingest-1:8080/v1/events",
        "http://ingest-2:8080/v1/events",
        "http://ingest-1:8080/v1/events",
    ]
    assert [o.endpoint for o in ops] == [str(r.url) for r in seen]
    r = seen[0]
    assert r.headers["authorization"] == "Bearer tok"
    assert r.headers["content-type"] == "application/json"
    body = json.loads(r.content)
    assert [Event.from_wire(e) for e in body["events"]] == batch
    assert ops[0].invoked_at <= ops[0].completed_at


def test_send_writes_utf8_or_escapes_and_pads_to_an_exact_size() -> None:
    bodies: list[bytes] = []

    def ok(request: httpx.Request) -> httpx.Response:
        bodies.append(request.content)
        return httpx.Response(202, json={"accepted": 1, "duplicates": 0})

    batch = [replace(gen().batch(1)[0], target=EDGE_TARGETS[1])]
    with client(ok) as c:
        c.send(batch)
        c.send(batch, ascii_only=True, pad_to=4096)
        with pytest.raises(ValueError, match="more than pad_to"):
            c.send(batch, pad_to=10)
    assert EDGE_TARGETS[1].encode() in bodies[0]
    assert bodies[1].isascii() and len(bodies[1]) == 4096
    assert json.loads(bodies[0]) == json.loads(bodies[1])


def test_send_raw_is_not_recorded() -> None:
    h = History()
    got: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        got.append(request)
        return httpx.Response(415, json={"error": "content type"})

    with client(handler, h) as c:
        headers = {**c.default_headers(), "Content-Type": "text/plain"}
        resp = c.send_raw(b"hello", headers, url="http://ingest-9:8080")
    assert resp.status_code == 415 and len(h) == 0
    assert str(got[0].url) == "http://ingest-9:8080/v1/events" and got[0].content == b"hello"


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def test_settle_resends_unknown_batches_until_acknowledged() -> None:
    answers = iter([503, 503, 503, 202, 202])
    bodies: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(request.content)
        return httpx.Response(next(answers), json={})

    clock = FakeClock()
    h = History()
    with client(handler, h, clock=clock, sleep=clock.sleep) as c:
        b1, b2 = gen(1).batch(2), gen(2).batch(3)
        c.send(b1)  # 503
        c.send(b2)  # 503
        assert len(c.unsettled()) == 2
        assert c.settle(10.0) == 2
        assert c.unsettled() == []
    assert bodies[2] == bodies[0] and bodies[3] == bodies[0]  # same ids, same payloads
    outcomes = [o.outcome for o in h.operations()]
    assert outcomes == [Outcome.UNKNOWN] * 3 + [Outcome.OK] * 2


def test_settle_names_what_stays_unknown() -> None:
    clock = FakeClock()
    with client(
        lambda r: httpx.Response(503, json={"error": "jetstream"}), clock=clock, sleep=clock.sleep
    ) as c:
        c.send(gen().batch(4))
        with pytest.raises(SettleError, match=r"1 unknown operations.*run42-1.*HTTP 503") as info:
            c.settle(2.0)
    assert len(info.value.operations) == 1
    assert clock.t == pytest.approx(1002.0, abs=1.1)


def test_settle_stops_on_a_definite_rejection_and_ignores_other_processes() -> None:
    answers = iter([503, 422])
    with client(lambda r: httpx.Response(next(answers), json={})) as c:
        c.send(gen().batch(1))
        c.history.append(replace(c.history.operations()[0], process="someone-else"))
        with pytest.raises(SettleError, match="HTTP 422"):
            c.settle(5.0)  # only w1's own batch is resent


def test_client_needs_a_url() -> None:
    with pytest.raises(ValueError, match="at least one ingest URL"):
        IngestClient([], "t", History(), "w1")


def test_settle_does_not_start_new_batches_after_the_deadline() -> None:
    clock = FakeClock()
    calls: list[int] = []

    def slow_503(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        clock.t += 3.0  # each attempt takes 3 s
        return httpx.Response(503, json={})

    with client(slow_503, clock=clock, sleep=clock.sleep) as c:
        for seed in range(3):
            c.send(gen(seed).batch(1))
        calls.clear()
        with pytest.raises(SettleError, match="3 unknown operations") as info:
            c.settle(2.0)
    assert len(calls) == 1
    assert "not resent" in str(info.value)
