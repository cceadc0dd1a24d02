"""The ingest event schema and batch validation (stack/CONTRACT.md, "Ingest API").

Pure: `validate_batch(body, now)` returns either a ValidBatch or a Rejection carrying the HTTP
status and JSON body the ingest service answers with. The same Event struct decodes the
canonical payloads the aggregator reads back from the stream.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from qoe import bugs

MAX_BODY_BYTES = 1024 * 1024
MAX_EVENTS = 1000
PAST_LIMIT = timedelta(hours=24)
FUTURE_LIMIT = timedelta(minutes=5)

EventId = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+\Z")]
ProbeId = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+\Z")]
# Long enough for nanosecond fractions and an offset; the exact syntax is checked by parse_ts.
# The description and format are what the published schema (qoe.openapi) says of the rules
# a JSON Schema cannot state.
Timestamp = Annotated[
    str,
    Meta(
        min_length=20,
        max_length=40,
        description="RFC 3339 date-time with an offset ('Z' or +hh:mm), fraction up to 9 "
        "digits (truncated to microseconds); at ingest within [now - 24 h, now + 5 min]",
        extra_json_schema={"format": "date-time"},
    ),
]
Target = Annotated[
    str, Meta(min_length=1, max_length=255, description="printable UTF-8, no control characters")
]
Millis = Annotated[float, Meta(ge=0, le=60000)]
Percent = Annotated[float, Meta(ge=0, le=100)]
# Bounded so that a window's sum stays finite: an unbounded (merely finite) value let two
# events overflow the aggregate's double precision sum, a poison message for the aggregators.
Kbps = Annotated[float, Meta(ge=0, le=1e9)]

FLOAT_FIELDS = ("rtt_ms", "jitter_ms", "loss_pct", "throughput_kbps")


class Event(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One measurement exactly as it travels on the wire (ts still a string)."""

    event_id: EventId
    probe_id: ProbeId
    target: Target
    ts: Timestamp
    rtt_ms: Millis
    jitter_ms: Millis
    loss_pct: Percent
    throughput_kbps: Kbps


@dataclass(frozen=True)
class ValidEvent:
    """A validated event with its timestamp parsed and converted to UTC."""

    event_id: str
    probe_id: str
    target: str
    ts: datetime
    rtt_ms: float
    jitter_ms: float
    loss_pct: float
    throughput_kbps: float


@dataclass(frozen=True)
class FieldError:
    index: int
    field: str
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "field": self.field, "reason": self.reason}


@dataclass(frozen=True)
class ValidBatch:
    events: tuple[ValidEvent, ...]


@dataclass(frozen=True)
class Rejection:
    status: int
    body: dict[str, Any] = field(default_factory=dict)


class InvalidEvent(ValueError):
    """An event breaks a rule; `field` names the offending field ('' for the whole event)."""

    def __init__(self, field_name: str, reason: str) -> None:
        super().__init__(f"{field_name or 'event'}: {reason}")
        self.field = field_name
        self.reason = reason


# RFC 3339 date-time: 'T' separator, optional fraction, mandatory offset ('Z' or +hh:mm).
_TS_RE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:\d{2})",
    re.ASCII,  # \d must not match other scripts' digits
)

# float_hook=float makes a huge literal like 1e400 decode to inf (so the event is rejected as
# non-finite with a 422) instead of failing the whole body.
_JSON = msgspec.json.Decoder(float_hook=float)
_ENCODER = msgspec.json.Encoder()


_CANONICAL_TS = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z", re.ASCII)


def parse_ts(text: str) -> datetime:
    """Parse an RFC 3339 timestamp WITH an offset into an aware UTC datetime.

    Fractions beyond microseconds are truncated, never rounded, so a timestamp just before a
    window boundary stays in its window.
    """
    if len(text) == 27 and _CANONICAL_TS.fullmatch(text):
        # The canonical form on the stream (format_ts), parsed in C; anything odd falls
        # through to the general parser below, which names the problem.
        try:
            return datetime.fromisoformat(text)
        except ValueError:
            pass
    match = _TS_RE.fullmatch(text)
    if match is None:
        raise ValueError("expected RFC 3339 like 2024-05-01T12:00:00.123Z or ...+02:00")
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    fraction, offset = match.group(7) or "", match.group(8)
    micros = int((fraction + "000000")[:6])
    try:
        local = datetime(year, month, day, hour, minute, second, micros, tzinfo=_offset(offset))
        return local.astimezone(UTC)
    except (ValueError, OverflowError) as exc:  # Feb 30th, hour 24, leap second, year 9999+1h
        raise ValueError(f"not a valid date-time: {exc}") from None


def _offset(text: str) -> timezone:
    if text in ("Z", "z"):
        return UTC
    hours, minutes = int(text[1:3]), int(text[4:6])
    if hours > 23 or minutes > 59:
        raise ValueError(f"offset {text} out of range")
    delta = timedelta(hours=hours, minutes=minutes)
    # Seeded bug ingest_offset_sign_ignored: "-05:00" read as "+05:00".
    negative = text[0] == "-" and not bugs.enabled("ingest_offset_sign_ignored")
    return timezone(-delta if negative else delta)


def format_ts(ts: datetime) -> str:
    """UTC RFC 3339 with microseconds and 'Z': the canonical form on the stream."""
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def check_event(raw: Any, now: datetime | None) -> ValidEvent:
    """Validate one decoded JSON value; `now` None skips the ingest-time ts window check.

    Raises InvalidEvent naming the first problem found.
    """
    try:
        event = raw if isinstance(raw, Event) else msgspec.convert(raw, Event)
    except msgspec.ValidationError as exc:
        raise InvalidEvent(*_describe(str(exc))) from None
    except RecursionError:
        raise InvalidEvent("", "nested too deeply") from None
    for name in FLOAT_FIELDS:
        if not math.isfinite(getattr(event, name)):
            raise InvalidEvent(name, "must be a finite number (NaN and infinities are rejected)")
    if not event.target.isprintable():
        raise InvalidEvent("target", "must be printable UTF-8 (no control characters)")
    try:
        ts = parse_ts(event.ts)
    except ValueError as exc:
        raise InvalidEvent("ts", str(exc)) from None
    if now is not None:
        _check_ts_window(ts, now)
    return ValidEvent(
        event_id=event.event_id,
        probe_id=event.probe_id,
        target=event.target,
        ts=ts,
        rtt_ms=event.rtt_ms,
        jitter_ms=event.jitter_ms,
        loss_pct=event.loss_pct,
        throughput_kbps=event.throughput_kbps,
    )


def _check_ts_window(ts: datetime, now: datetime) -> None:
    if bugs.enabled("ingest_ts_bounds_in_whole_minutes"):
        # Seeded bug: distances counted in whole minutes, so each bound lets up to 59.999 s
        # more through (24 h 0 min 59 s in the past, 5 min 59 s in the future).
        minute = timedelta(minutes=1)
        too_old = (now - ts) // minute > PAST_LIMIT // minute
        too_new = (ts - now) // minute > FUTURE_LIMIT // minute
    else:
        too_old, too_new = ts < now - PAST_LIMIT, ts > now + FUTURE_LIMIT
    if too_old:
        raise InvalidEvent("ts", "more than 24 h in the past")
    if too_new:
        raise InvalidEvent("ts", "more than 5 min in the future")


_AT_FIELD = re.compile(r" - at `\$\.(\w+)")
_NAMED_FIELD = re.compile(r"field `([^`]*)`")


def _describe(message: str) -> tuple[str, str]:
    """(field, reason) from a msgspec message such as "Expected `str` - at `$.target`"."""
    at = _AT_FIELD.search(message)
    if at:
        return at.group(1), message[: at.start()]
    named = _NAMED_FIELD.search(message)  # "Object contains unknown field `x`" / "missing"
    if named:
        return named.group(1), message
    return "", message


def validate_batch(body: bytes, now: datetime) -> ValidBatch | Rejection:
    """Check a whole request body against the contract; see the module docstring."""
    if len(body) > MAX_BODY_BYTES:
        return _error(413, f"body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}")
    try:
        doc = _JSON.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return _error(400, f"body is not valid JSON: {exc}")
    except RecursionError:  # e.g. 500k nested arrays: valid JSON, hostile shape
        return _error(400, "body is nested too deeply")
    items = _events_list(doc)
    if isinstance(items, Rejection):
        return items
    valid: list[ValidEvent] = []
    errors: list[FieldError] = []
    for index, raw in enumerate(items):
        try:
            valid.append(check_event(raw, now))
        except InvalidEvent as exc:
            errors.append(FieldError(index, exc.field, exc.reason))
    if errors:
        return Rejection(
            422,
            {
                "error": f"{len(errors)} of {len(items)} events are invalid",
                "errors": [e.as_dict() for e in errors],
            },
        )
    return ValidBatch(tuple(valid))


def _events_list(doc: Any) -> list[Any] | Rejection:
    if not isinstance(doc, dict) or set(doc) != {"events"}:
        return _error(400, 'body must be a JSON object with exactly one key, "events"')
    items = doc["events"]
    if not isinstance(items, list):
        return _error(400, '"events" must be a JSON array')
    if not items:
        return _error(400, '"events" is empty; send 1 to 1000 events')
    if len(items) > MAX_EVENTS:
        return _error(413, f"{len(items)} events; the limit is {MAX_EVENTS} per batch")
    return items


def _error(status: int, message: str) -> Rejection:
    return Rejection(status, {"error": message})


def distinct_by_id(events: tuple[ValidEvent, ...] | list[ValidEvent]) -> list[ValidEvent]:
    """Events with repeated ids dropped; the first occurrence of each id wins."""
    seen: set[str] = set()
    out: list[ValidEvent] = []
    for event in events:
        if event.event_id not in seen:
            seen.add(event.event_id)
            out.append(event)
    return out


def canonical_json(event: ValidEvent) -> bytes:
    """The event as published to the stream: wire field order, ts in UTC with 'Z'."""
    return _ENCODER.encode(
        {
            "event_id": event.event_id,
            "probe_id": event.probe_id,
            "target": event.target,
            "ts": format_ts(event.ts),
            "rtt_ms": event.rtt_ms,
            "jitter_ms": event.jitter_ms,
            "loss_pct": event.loss_pct,
            "throughput_kbps": event.throughput_kbps,
        }
    )


_EVENT_JSON = msgspec.json.Decoder(Event)


def decode_canonical(payload: bytes) -> ValidEvent:
    """Decode a stream payload, applying every rule except the ingest-time ts window.

    Raises InvalidEvent for anything that does not decode (the aggregator terminates those).
    Payloads decode straight into the Event struct (msgspec, in C); only one that fails that
    takes the generic path, which names the problem.
    """
    try:
        return check_event(_EVENT_JSON.decode(payload), None)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, InvalidEvent):
        pass
    try:
        raw = _JSON.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        raise InvalidEvent("", f"payload is not JSON: {exc!r}") from None
    return check_event(raw, None)
