"""Batch validation: every rule of the ingest contract, and its boundaries."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from qoe import bugs
from qoe.contract import (
    MAX_BODY_BYTES,
    InvalidEvent,
    Rejection,
    ValidBatch,
    canonical_json,
    check_event,
    decode_canonical,
    distinct_by_id,
    format_ts,
    parse_ts,
    validate_batch,
)

from harness.history import Event
from harness.workload import EventGenerator, events

from .conftest import NOW, make_event


def body_of(*events: Any, **top: Any) -> bytes:
    return json.dumps({"events": list(events), **top}).encode()


def one_error(event: dict[str, Any]) -> dict[str, Any]:
    """The single 422 error for a batch holding just this event."""
    result = validate_batch(body_of(event), NOW)
    assert isinstance(result, Rejection), result
    assert result.status == 422, result.body
    [error] = result.body["errors"]
    assert error["index"] == 0
    return error


def test_valid_event_is_accepted_and_ts_converted_to_utc() -> None:
    result = validate_batch(body_of(make_event(ts="2024-05-01T14:00:00.5+02:00")), NOW)
    assert isinstance(result, ValidBatch)
    [event] = result.events
    assert event.ts == datetime(2024, 5, 1, 12, 0, 0, 500000, tzinfo=UTC)
    assert event.throughput_kbps == 12000.0


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b"[NaN]", "not valid JSON"),
        (b'"\\ud800"', "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[]", "exactly one key"),
        (b'{"events": {}}', "must be a JSON array"),
        (b'{"events": null}', "must be a JSON array"),
        (b'{"events": []}', "is empty"),
        (b'{"evts": [1]}', "exactly one key"),
        (b'{"events": [1], "extra": 1}', "exactly one key"),
    ],
)
def test_wrong_shape_is_400(body: bytes, fragment: str) -> None:
    result = validate_batch(body, NOW)
    assert isinstance(result, Rejection)
    assert result.status == 400
    assert fragment in result.body["error"]


def test_1000_events_pass_and_1001_is_413() -> None:
    events = [make_event(event_id=f"e{i}") for i in range(1000)]
    assert isinstance(validate_batch(body_of(*events), NOW), ValidBatch)
    result = validate_batch(body_of(*events, make_event(event_id="e1000")), NOW)
    assert isinstance(result, Rejection)
    assert result.status == 413


def test_body_of_exactly_1_mib_is_allowed_and_one_byte_more_is_413() -> None:
    body = body_of(make_event())
    padded = body[:-1] + b" " * (MAX_BODY_BYTES - len(body)) + b"}"
    assert len(padded) == MAX_BODY_BYTES
    assert isinstance(validate_batch(padded, NOW), ValidBatch)
    result = validate_batch(padded + b" ", NOW)
    assert isinstance(result, Rejection)
    assert result.status == 413


def test_422_lists_every_invalid_event_by_index() -> None:
    events = [make_event(), make_event(rtt_ms=-1), make_event(), make_event(probe_id="")]
    result = validate_batch(body_of(*events), NOW)
    assert isinstance(result, Rejection)
    assert result.status == 422
    assert [(e["index"], e["field"]) for e in result.body["errors"]] == [
        (1, "rtt_ms"),
        (3, "probe_id"),
    ]
    assert all(e["reason"] for e in result.body["errors"])


@pytest.mark.parametrize("field", list(make_event()))
def test_missing_field_is_named(field: str) -> None:
    event = make_event()
    del event[field]
    assert one_error(event)["field"] == field


def test_unknown_field_is_named() -> None:
    assert one_error(make_event(colour="blue"))["field"] == "colour"


@pytest.mark.parametrize("item", [1, "x", None, [], True])
def test_event_that_is_not_an_object_is_422(item: Any) -> None:
    assert one_error(item)["field"] == ""


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("event_id", 5),
        ("probe_id", None),
        ("target", ["a"]),
        ("ts", 1714564800),
        ("rtt_ms", "42"),
        ("jitter_ms", None),
        ("loss_pct", {}),
        ("throughput_kbps", "1e3"),
        ("rtt_ms", True),
        ("loss_pct", False),
    ],
)
def test_wrong_types_are_422(field: str, value: Any) -> None:
    assert one_error(make_event(**{field: value}))["field"] == field


@pytest.mark.parametrize(
    ("field", "good", "bad"),
    [
        ("event_id", "a" * 128, "a" * 129),
        ("event_id", "A-z_0.9:x", "a b"),
        ("event_id", "a", ""),
        ("event_id", "a", "a/b"),
        ("event_id", "a", "abc\n"),
        ("probe_id", "p" * 64, "p" * 65),
        ("probe_id", "P-1_x.y", "p:1"),
        ("probe_id", "p", ""),
        ("target", "t" * 255, "t" * 256),
        ("target", "é" * 255, "é" * 256),
        ("target", "🙂" * 255, "🙂" * 256),
        ("target", "a b", ""),
        ("target", "a", "a\nb"),
        ("target", "a", "a\x00b"),
        ("target", "a", "\x7f"),
        ("rtt_ms", 60000, 60000.001),
        ("rtt_ms", 0, -0.001),
        ("jitter_ms", 60000, 60001),
        ("jitter_ms", 0.0, -1),
        ("loss_pct", 100, 100.0001),
        ("loss_pct", 0, -0.0001),
        ("throughput_kbps", 0, -1),
        ("throughput_kbps", 1e9, 1e9 + 0.001),  # bounded: a window's sum stays finite
        ("throughput_kbps", 1e9, 1e300),
    ],
)
def test_field_limits(field: str, good: Any, bad: Any) -> None:
    assert isinstance(validate_batch(body_of(make_event(**{field: good})), NOW), ValidBatch)
    assert one_error(make_event(**{field: bad}))["field"] == field


@pytest.mark.parametrize("field", ["rtt_ms", "jitter_ms", "loss_pct", "throughput_kbps"])
@pytest.mark.parametrize("literal", ["1e400", "-1e400"])
def test_infinities_from_huge_literals_are_422(field: str, literal: str) -> None:
    body = body_of(make_event(**{field: "__X__"})).replace(b'"__X__"', literal.encode())
    result = validate_batch(body, NOW)
    assert isinstance(result, Rejection)
    assert result.status == 422
    assert result.body["errors"][0]["field"] == field


def test_huge_integer_is_422_not_a_crash() -> None:
    body = body_of(make_event(throughput_kbps="__X__")).replace(b'"__X__"', b"1" + b"0" * 400)
    result = validate_batch(body, NOW)
    assert isinstance(result, Rejection)
    assert result.status == 422


def test_nan_and_inf_rejected_when_they_reach_check_event() -> None:
    for value in (float("nan"), float("inf")):
        with pytest.raises(InvalidEvent) as info:
            check_event(make_event(throughput_kbps=value), NOW)
        assert info.value.field == "throughput_kbps"


@pytest.mark.parametrize(
    ("offset", "ok"),
    [
        (-timedelta(hours=24), True),
        (-timedelta(hours=24, microseconds=1), False),
        (timedelta(minutes=5), True),
        (timedelta(minutes=5, microseconds=1), False),
        (timedelta(0), True),
    ],
)
def test_ts_window_boundaries(offset: timedelta, ok: bool) -> None:
    event = make_event(ts=format_ts(NOW + offset))
    if ok:
        assert isinstance(validate_batch(body_of(event), NOW), ValidBatch)
    else:
        assert one_error(event)["field"] == "ts"


def test_ts_window_respects_offsets() -> None:
    # 12:04 at UTC+01:00 is 11:04Z: inside the window although the wall clock reads "later".
    assert isinstance(
        validate_batch(body_of(make_event(ts="2024-05-01T12:04:00+01:00")), NOW), ValidBatch
    )
    assert one_error(make_event(ts="2024-05-01T11:06:00-01:00"))["field"] == "ts"


def test_offset_sign_bug_reads_negative_offsets_as_positive() -> None:
    text = "2024-05-01T07:00:00-05:00"
    assert parse_ts(text) == datetime(2024, 5, 1, 12, tzinfo=UTC)
    bugs.reset(frozenset({"ingest_offset_sign_ignored"}))
    assert parse_ts(text) == datetime(2024, 5, 1, 2, tzinfo=UTC)
    assert parse_ts("2024-05-01T17:00:00+05:00") == datetime(2024, 5, 1, 12, tzinfo=UTC)
    assert parse_ts("2024-05-01T12:00:00Z") == datetime(2024, 5, 1, 12, tzinfo=UTC)


@pytest.mark.parametrize(
    ("offset", "honest", "whole_minutes_bug"),
    [
        (-timedelta(hours=24), True, True),
        (-timedelta(hours=24, seconds=2), False, True),
        (-timedelta(hours=24, seconds=59, microseconds=999999), False, True),
        (-timedelta(hours=24, minutes=1), False, False),
        (timedelta(minutes=5), True, True),
        (timedelta(minutes=5, seconds=2), False, True),
        (timedelta(minutes=6), False, False),
    ],
)
def test_whole_minutes_bug_loosens_both_ts_bounds_by_up_to_a_minute(
    offset: timedelta, honest: bool, whole_minutes_bug: bool
) -> None:
    event = make_event(ts=format_ts(NOW + offset))
    assert isinstance(validate_batch(body_of(event), NOW), ValidBatch) is honest
    bugs.reset(frozenset({"ingest_ts_bounds_in_whole_minutes"}))
    assert isinstance(validate_batch(body_of(event), NOW), ValidBatch) is whole_minutes_bug


@pytest.mark.parametrize(
    "text",
    [
        "2024-05-01T12:00:00",  # no offset
        "2024-05-01T12:00:00.000000",  # no offset
        "2024-05-01 12:00:00Z",  # space separator
        "2024-05-01T12:00Z",  # no seconds
        "2024-05-01T12:00:00+0200",  # offset without colon
        "2024-05-01T12:00:00+24:00",
        "2024-05-01T12:00:00+02:60",
        "2024-02-30T12:00:00Z",
        "2024-05-01T24:00:00Z",
        "2024-05-01T12:00:60Z",
        "2024-05-01T12:00:00.Z",
        "2024-05-01T12:00:00.1234567890Z",
        "24-05-01T12:00:00Z",
        "2024-05-01T12:00:00Z ",
        "٢٠٢٤-05-01T12:00:00Z",  # non-ASCII digits
        "9999-12-31T23:30:00-01:00",  # overflows datetime once in UTC
        "1714564800",
    ],
)
def test_bad_timestamps_are_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        parse_ts(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-05-01T12:00:00Z", datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ("2024-05-01t12:00:00z", datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ("2024-05-01T12:00:00+00:00", datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ("2024-05-01T12:00:00-00:00", datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ("2024-05-01T00:30:00+05:30", datetime(2024, 4, 30, 19, tzinfo=UTC)),
        ("2024-05-01T12:00:00.1Z", datetime(2024, 5, 1, 12, 0, 0, 100000, tzinfo=UTC)),
        ("2024-05-01T12:00:59.999999999Z", datetime(2024, 5, 1, 12, 0, 59, 999999, tzinfo=UTC)),
    ],
)
def test_good_timestamps_parse_to_utc(text: str, expected: datetime) -> None:
    parsed = parse_ts(text)
    assert parsed == expected
    assert parsed.tzinfo is UTC


def test_canonical_json_round_trips_in_utc() -> None:
    event = check_event(make_event(ts="2024-05-01T14:00:00.25+02:00", rtt_ms=1), NOW)
    payload = canonical_json(event)
    assert json.loads(payload)["ts"] == "2024-05-01T12:00:00.250000Z"
    assert list(json.loads(payload)) == list(make_event())
    assert decode_canonical(payload) == event


def test_decode_canonical_skips_the_ts_window_but_not_other_rules() -> None:
    old = make_event(ts="2000-01-01T00:00:00Z")
    assert decode_canonical(json.dumps(old).encode()).ts.year == 2000
    for payload in (b"garbage", json.dumps(make_event(rtt_ms=-1)).encode()):
        with pytest.raises(InvalidEvent):
            decode_canonical(payload)


def test_distinct_by_id_keeps_first_occurrence() -> None:
    events = [
        check_event(make_event(event_id=eid, rtt_ms=rtt), NOW)
        for eid, rtt in [("a", 1), ("b", 2), ("a", 3), ("c", 4), ("b", 5)]
    ]
    assert [(e.event_id, e.rtt_ms) for e in distinct_by_id(events)] == [
        ("a", 1),
        ("b", 2),
        ("c", 4),
    ]


def test_aware_now_in_another_zone_works() -> None:
    now = NOW.astimezone(timezone(timedelta(hours=-7)))
    assert isinstance(validate_batch(body_of(make_event()), now), ValidBatch)


@pytest.mark.parametrize(
    "body",
    [
        b'{"events":' + b"[" * 200_000 + b"]" * 200_000 + b"}",
        b'{"events":[' + b"[" * 100_000 + b"]" * 100_000 + b"]}",
        b'{"events":[{"event_id":' + b'{"a":' * 50_000 + b"1" + b"}" * 50_001 + b"]}",
    ],
)
def test_hostile_nesting_is_a_clean_rejection(body: bytes) -> None:
    assert len(body) <= MAX_BODY_BYTES
    result = validate_batch(body, NOW)
    assert isinstance(result, Rejection)
    assert result.status in (400, 422)


def test_deeply_nested_stream_payload_is_poison() -> None:
    with pytest.raises(InvalidEvent):
        decode_canonical(b"[" * 200_000 + b"]" * 200_000)


def test_every_event_the_harness_generates_is_valid_for_the_reference_ingest() -> None:
    """The harness's reading of the contract (its generators) and the reference's agree."""
    g = EventGenerator(5, "run", ["p1"], ["t1"], clock=NOW.timestamp)
    batches = [g.batch(1000), g.threshold_batch(), g.time_bound_batch(), *g.form_batches()]
    for batch in batches:
        body = json.dumps({"events": [e.to_wire() for e in batch]}, ensure_ascii=False)
        result = validate_batch(body.encode(), NOW)
        assert isinstance(result, ValidBatch), result
        assert [e.ts for e in result.events] == [e.ts for e in batch]


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(e=events(now=NOW.timestamp()))
def test_every_hypothesis_event_is_valid_for_the_reference_ingest(e: Event) -> None:
    body = json.dumps({"events": [e.to_wire()]}, ensure_ascii=False)
    result = validate_batch(body.encode(), NOW)
    assert isinstance(result, ValidBatch), result
    assert result.events[0].ts == e.ts
