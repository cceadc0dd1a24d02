"""Workload: the seeded generator, the Hypothesis strategies and the recording client."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from hypothesis import Phase, find, given, settings

from harness.checker import Rules, aggregate_by_window, diagnose, window_start
from harness.history import Event, History, Outcome
from harness.workload import (
    EventGenerator,
    IngestClient,
    SettleError,
    batches,
    events,
    rekey,
)

NOW = 1_714_564_817.25  # 2024-05-01T12:00:17.25Z
ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


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


def test_timestamps_stay_inside_what_ingest_accepts() -> None:
    evs = gen(late_fraction=0.3).batch(2000)
    now = datetime.fromtimestamp(NOW, UTC)
    lowest = now - timedelta(hours=24) + timedelta(minutes=10)
    assert all(lowest <= e.ts <= now for e in evs)
    starts = Counter(window_start(e.ts, 60) for e in evs)
    current = window_start(now, 60)
    assert {current - timedelta(minutes=k) for k in range(4)} <= set(starts)
    assert any(s < current - timedelta(minutes=30) for s in starts), "expected late events"
    on_boundary = sum(e.ts == window_start(e.ts, 60) for e in evs)
    assert on_boundary > 100, "expected events exactly on window boundaries"


def test_values_are_rounded() -> None:
    for e in gen().batch(300):
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
    assert all(holds(e) for e in gen().batch(200, profile=profile))


def test_mixed_profile_exercises_every_diagnosis() -> None:
    aggs = aggregate_by_window(gen(3).batch(2000), 60)
    kinds = Counter(k for a in aggs.values() for k in diagnose(a, Rules()))
    assert set(kinds) == {"high_latency", "high_jitter", "packet_loss", "low_throughput"}
    assert any(not diagnose(a, Rules()) for a in aggs.values()), "expected healthy windows too"


def test_unknown_profile_is_refused() -> None:
    with pytest.raises(ValueError, match="expected one of healthy"):
        gen().batch(1, profile="sunny")


# --- strategies ---------------------------------------------------------------------------


@settings(max_examples=50)
@given(e=events(now=NOW))
def test_events_are_valid_for_ingest(e: Event) -> None:
    assert ID_RE.match(e.event_id)
    assert e.ts <= datetime.fromtimestamp(NOW, UTC)
    assert 0 <= e.rtt_ms <= 60_000 and 0 <= e.loss_pct <= 100 and e.throughput_kbps >= 0


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

    for pred in (dup_in_batch, reused_across, conflicting, on_boundary, out_of_order):
        find(
            strat, pred, settings=settings(max_examples=500, database=None, phases=[Phase.generate])
        )


def test_rekey_keeps_equal_ids_equal() -> None:
    bl = [[ev := next(iter(gen().batch(1)))], [ev]]
    out = rekey(bl, "x1")
    assert out[0][0].event_id == out[1][0].event_id == f"x1.{ev.event_id}"
    assert out[0][0].rtt_ms == ev.rtt_ms


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
