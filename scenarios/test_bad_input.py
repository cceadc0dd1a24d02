"""Bad input: every rule of the contract's error tables at its bound and one step past it, and
requests that break several rules at once. Each is sent between good batches, must get the
status (and for a 422 the index and field of each error) stack/CONTRACT.md gives, and must
change nothing: the aggregates still match the oracle of the good batches.

Bad requests go out unrecorded (``send_raw``): anything ingest publishes from them shows up as
a window no recorded event explains. Their events are fresh and of this scenario's probes. The
one exception is a timestamp one step past now + 5 min: ingest may read its clock up to a
round trip later, when the step has passed, so that case is recorded and judged only when the
round trip took less than the step.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import pytest

from harness.history import Event, Outcome
from harness.workload import (
    CLOCK_STEP_S,
    EDGE_TARGETS,
    FUTURE_LIMIT_S,
    MAX_BODY_BYTES,
    MAX_EVENT_ID,
    MAX_EVENTS,
    MAX_KBPS,
    MAX_MILLIS,
    MAX_PERCENT,
    MAX_PROBE_ID,
    PAST_LIMIT_S,
    EventGenerator,
    IngestClient,
    padded,
)

pytestmark = [pytest.mark.e2e, pytest.mark.smoke]

BEYOND_ZERO = -5e-324  # one float step below 0


@dataclass(frozen=True)
class Case:
    """A request that breaks the contract and the answer it must get."""

    name: str
    body: bytes
    status: int
    headers: Mapping[str, str] = field(default_factory=dict)  # over the good headers; "" drops
    errors: tuple[tuple[int, frozenset[str]], ...] = ()  # 422: (index, fields it may name)


def wire(events: list[Event]) -> list[dict[str, Any]]:
    return [e.to_wire() for e in events]


def body(events: list[Any], **top: Any) -> bytes:
    return json.dumps({"events": events, **top}, ensure_ascii=False).encode()


def padded_body(events: list[Any], size: int) -> bytes:
    raw = body(events)
    assert len(raw) <= size, f"{len(raw)} bytes of events, more than {size}"
    return raw + b" " * (size - len(raw))


def bad_cases(generator: EventGenerator, token: str, now: float) -> list[Case]:
    """Every rule one step past its bound, and requests breaking several rules at once."""

    def good(n: int = 3) -> list[dict[str, Any]]:
        return wire(generator.batch(n))

    def with_field(name: str, value: Any, index: int = 1) -> Case:
        events = good()
        events[index] = {**events[index], name: value}
        return Case(
            f"{name}={value!r:.40}", body(events), 422, errors=((index, frozenset({name})),)
        )

    def with_literal(name: str, literal: bytes) -> bytes:
        """A body whose event 1 has ``name`` written as a JSON literal json cannot write."""
        marker = "@LITERAL@"
        return with_field(name, marker).body.replace(f'"{marker}"'.encode(), literal)

    def ts_at(offset_s: float) -> str:
        return datetime.fromtimestamp(now + offset_s, UTC).isoformat(timespec="microseconds")

    no_auth = {"Authorization": ""}
    text = {"Content-Type": "text/plain"}
    return [
        # batch: 1-1000 events, at most 1 MiB (the bounds themselves are good_cases)
        Case("0 events", body([]), 400),
        Case(f"{MAX_EVENTS + 1} events", body(good(MAX_EVENTS + 1)), 413),
        Case("1 MiB + 1 byte", padded_body(good(MAX_EVENTS), MAX_BODY_BYTES + 1), 413),
        # token
        Case("no token", body(good()), 401, no_auth),
        Case("wrong token", body(good()), 401, {"Authorization": "Bearer nope"}),
        Case("token and one more char", body(good()), 401, {"Authorization": f"Bearer {token}x"}),
        Case(
            "token less its last char", body(good()), 401, {"Authorization": f"Bearer {token[:-1]}"}
        ),
        Case("no scheme", body(good()), 401, {"Authorization": token}),
        Case("Basic scheme", body(good()), 401, {"Authorization": f"Basic {token}"}),
        # content type
        Case("no content type", body(good()), 415, {"Content-Type": ""}),
        Case("text/plain", body(good()), 415, text),
        Case("application/jsonl", body(good()), 415, {"Content-Type": "application/jsonl"}),
        # the body's shape
        Case("not JSON", b'{"events": [', 400),
        Case("NaN literal", with_literal("loss_pct", b"NaN"), 400),
        Case("top level array", json.dumps(good()).encode(), 400),
        Case("a second top-level key", body(good(), extra=1), 400),
        Case("events an object", json.dumps({"events": good(1)[0]}).encode(), 400),
        Case("event not an object", body([*good(2), 5]), 422, errors=((2, frozenset({""})),)),
        # each field one step past each bound
        with_field("event_id", ""),
        with_field("event_id", padded("x", MAX_EVENT_ID + 1)),
        with_field("event_id", "has space"),
        with_field("event_id", "é"),
        with_field("event_id", "a/b"),
        with_field("probe_id", ""),
        with_field("probe_id", padded(generator.probes[0], MAX_PROBE_ID + 1)),
        with_field("probe_id", f"{generator.probes[0]}:1"),  # ':' is only for event ids
        with_field("target", ""),
        with_field("target", EDGE_TARGETS[1] + "x"),
        with_field("target", "line\nbreak"),
        with_field("target", "tab\there"),
        with_field("ts", ts_at(0).removesuffix("+00:00")),
        with_field("ts", ts_at(0).replace("+00:00", "+24:00")),
        with_field("ts", ts_at(0).replace("+00:00", "+23:60")),
        with_field("ts", "2026-02-30T12:00:00Z"),
        with_field("ts", now),
        with_field("rtt_ms", math.nextafter(MAX_MILLIS, math.inf)),
        with_field("rtt_ms", BEYOND_ZERO),
        with_field("jitter_ms", math.nextafter(MAX_MILLIS, math.inf)),
        with_field("jitter_ms", BEYOND_ZERO),
        with_field("loss_pct", math.nextafter(MAX_PERCENT, math.inf)),
        with_field("loss_pct", BEYOND_ZERO),
        with_field("throughput_kbps", math.nextafter(MAX_KBPS, math.inf)),
        with_field("throughput_kbps", BEYOND_ZERO),
        Case(
            "throughput 1e999 (infinite)",
            with_literal("throughput_kbps", b"1e999"),
            422,
            errors=((1, frozenset({"throughput_kbps"})),),
        ),
        with_field("jitter_ms", "5"),
        with_field("rtt_ms", True),
        with_field("loss_pct", None),
        with_field("unknown", 1),
        Case(
            "missing field",
            body([*good(2), {k: v for k, v in good(1)[0].items() if k != "target"}]),
            422,
            errors=((2, frozenset({"target"})),),
        ),
        # several rules at once: the first check in the contract's order answers
        Case(
            "no token, text/plain, 1001 events",
            body(good(MAX_EVENTS + 1)),
            401,
            {**no_auth, **text},
        ),
        Case(
            "text/plain, over 1 MiB", padded_body(good(MAX_EVENTS), MAX_BODY_BYTES + 1), 415, text
        ),
        Case(
            "over 1 MiB of 1001 invalid events",
            padded_body([{"x": 1}] * (MAX_EVENTS + 1), MAX_BODY_BYTES + 1),
            413,
        ),
        Case("1001 invalid events", body([{"x": 1}] * (MAX_EVENTS + 1)), 413),
        Case("not JSON over 1 MiB", b"{" * (MAX_BODY_BYTES + 1), 413),
        several_rules_in_one_event(good(), ts_at(-PAST_LIMIT_S - 3600)),
        invalid_events_among_valid_ones(good(6), ts_at(FUTURE_LIMIT_S + 3600)),
    ]


def several_rules_in_one_event(events: list[dict[str, Any]], too_old: str) -> Case:
    """One event breaking four rules: one error for it, naming one of them."""
    broken = {"event_id": "has space", "rtt_ms": -1, "ts": too_old, "target": ""}
    events[0] = {**events[0], **broken}
    return Case("one event, four rules", body(events), 422, errors=((0, frozenset(broken)),))


def invalid_events_among_valid_ones(events: list[dict[str, Any]], too_new: str) -> Case:
    """Events 1, 3 and 4 of 6 invalid: one error each, by index."""
    events[1] = {**events[1], "loss_pct": 101}
    events[3] = {**events[3], "ts": too_new}
    events[4] = {**events[4], "probe_id": "bad probe"}
    errors = ((1, frozenset({"loss_pct"})), (3, frozenset({"ts"})), (4, frozenset({"probe_id"})))
    return Case("three invalid of six", body(events), 422, errors=errors)


def good_cases(generator: EventGenerator) -> list[tuple[str, Callable[[IngestClient], Any]]]:
    """Requests exactly at each bound: every one must be a 202 (they are recorded)."""

    def at_bounds() -> list[Event]:
        """One event per field bound: ids and targets at both lengths, values at both ends."""
        longest = generator.probes[-1]
        assert len(longest) == MAX_PROBE_ID, "the generator adds a 64-character probe id"
        template = generator.batch(6, profile="healthy")
        stem = template[0].event_id.partition("_")[0]  # unpadded, if the generator padded it
        changes: list[dict[str, Any]] = [
            {"event_id": padded(stem, MAX_EVENT_ID), "probe_id": longest},
            {"target": EDGE_TARGETS[0]},
            {"target": EDGE_TARGETS[1]},
            {"rtt_ms": 0.0, "jitter_ms": 0.0, "loss_pct": 0.0, "throughput_kbps": 0.0},
            {"rtt_ms": MAX_MILLIS, "jitter_ms": MAX_MILLIS, "loss_pct": MAX_PERCENT},
            {"rtt_ms": 5e-324, "throughput_kbps": 5e-324},
        ]
        return [replace(e, **change) for e, change in zip(template, changes, strict=True)]

    return [
        ("1 event", lambda c: c.send(generator.batch(1))),
        (f"{MAX_EVENTS} events", lambda c: c.send(generator.batch(MAX_EVENTS))),
        ("exactly 1 MiB", lambda c: c.send(generator.batch(MAX_EVENTS), pad_to=MAX_BODY_BYTES)),
        ("unicode as \\u escapes", lambda c: c.send(generator.batch(50), ascii_only=True)),
        ("every field at a bound", lambda c: c.send(at_bounds())),
    ]


def send_case(client: IngestClient, case: Case) -> str | None:
    """Send one bad request; what was wrong with the answer, or None."""
    headers = {**client.default_headers(), **case.headers}
    response = client.send_raw(case.body, {k: v for k, v in headers.items() if v})
    try:
        answer = response.json()
    except ValueError:
        answer = None
    got = f"got {response.status_code} {response.text[:300]}"
    if response.status_code != case.status or not isinstance(answer, dict):
        return f"{case.name}: expected {case.status} with a JSON error, {got}"
    if not isinstance(answer.get("error"), str) or not answer["error"]:
        return f"{case.name}: expected an 'error' saying what was wrong, {got}"
    if case.status == 422:
        errors = answer.get("errors")
        found = [(e.get("index"), e.get("field"), e.get("reason")) for e in errors or []]
        wanted = [index for index, _ in case.errors]
        if [index for index, _, _ in found] != wanted or not all(
            name in fields and reason
            for (_, name, reason), (_, fields) in zip(found, case.errors, strict=True)
        ):
            return f"{case.name}: expected errors at {case.errors} with reasons, {got}"
    return None


PAST_CASE_EVENTS = 3  # the past case's batch: its second event is the one a day old


def one_step_past_the_time_bounds(client: IngestClient, generator: EventGenerator) -> list[str]:
    """A ts one step before now - 24 h and one step after now + 5 min must each be a 422.

    The past case needs no timing: ingest's clock can only be later, the event only older.
    The future case is judged when the round trip was shorter than the step, and recorded,
    since a slower answer may rightly accept it.
    """
    old = wire(generator.batch(PAST_CASE_EVENTS))
    stamp = time.time() - PAST_LIMIT_S - CLOCK_STEP_S
    old[1]["ts"] = datetime.fromtimestamp(stamp, UTC).isoformat(timespec="microseconds")
    past = Case("ts one step before now - 24 h", body(old), 422, errors=((1, frozenset({"ts"})),))
    problems = [p for p in [send_case(client, past)] if p]
    trips = []
    for _ in range(5):
        started = time.time()
        events = generator.batch(3)
        too_new = datetime.fromtimestamp(started + FUTURE_LIMIT_S + CLOCK_STEP_S, UTC)
        events[1] = replace(events[1], ts=too_new)
        op = client.send(events)
        trip = op.completed_at - started
        if trip >= CLOCK_STEP_S:
            trips.append(round(trip, 3))
            continue
        if op.status != 422 or '"ts"' not in op.error:
            problems.append(
                f"ts one step after now + 5 min: expected 422 naming ts, {op.status} {op.error}"
            )
        return problems
    problems.append(
        f"ts one step after now + 5 min: no round trip under {CLOCK_STEP_S} s to judge ({trips})"
    )
    return problems


def send_bad_input_at_the_bounds(
    client: IngestClient, generator: EventGenerator, token: str
) -> list[str]:
    """Every case between good batches; what was wrong with the answers."""
    failures = []

    def good_batch(before: str) -> None:
        op = client.send(generator.batch(10))
        assert op.outcome is Outcome.OK, f"good batch before {before!r}: {op.status} {op.error}"

    for name, send in good_cases(generator):
        good_batch(name)
        op = send(client)
        if op.outcome is not Outcome.OK:
            failures.append(f"{name}: expected 202, got {op.status} {op.error}")
    for case in bad_cases(generator, token, time.time()):
        good_batch(case.name)
        if (problem := send_case(client, case)) is not None:
            failures.append(problem)
    good_batch("the time bounds")
    failures += one_step_past_the_time_bounds(client, generator)
    good_batch("the verdict")
    return failures


def test_every_rule_at_its_bound_and_one_step_past(
    client: IngestClient, endpoints, generator, verifier, history
):
    failures = send_bad_input_at_the_bounds(client, generator, endpoints.ingest_token)
    assert not failures, "ingest answered input at the bounds wrongly:\n" + "\n".join(failures)
    verifier.verify(history, list(generator.probes))
