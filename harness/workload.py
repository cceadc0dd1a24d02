"""The workload: what the harness sends, and the client that records every attempt.

EventGenerator makes seeded, reproducible batches shaped like a probe's (several windows,
events exactly on window boundaries, late events, profiles that trigger each diagnosis) that
span the contract (stack/CONTRACT.md): timestamps in every RFC 3339 form (``TS_FORMS``),
maximum-length and unicode ids and targets, values at their bounds, events just inside the
future bound; and on demand windows whose averages sit exactly on each diagnosis threshold
and one float step either side (``threshold_batch``), timestamps one step inside both time
bounds (``time_bound_batch``) and a batch per timestamp form (``form_batches``).
The Hypothesis strategies ``events``/``batches`` make adversarial ones (duplicates, reused ids
with other payloads, boundary and out-of-order timestamps, any offset and fraction, threshold
windows). IngestClient sends batches and records each attempt in a History as ok / fail /
unknown, and ``settle`` retries unknown batches until acknowledged, as a real probe would.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from types import TracebackType

import httpx
from hypothesis import strategies as st

from harness.checker import Rules
from harness.history import UTC_MICROSECONDS, Event, History, Operation, Outcome, TsForm

__all__ = [
    "CLOCK_STEP_S",
    "EDGE_TARGETS",
    "FUTURE_LIMIT_S",
    "MAX_BODY_BYTES",
    "MAX_EVENTS",
    "MAX_EVENT_ID",
    "MAX_KBPS",
    "MAX_MILLIS",
    "MAX_PERCENT",
    "MAX_PROBE_ID",
    "MAX_TARGET",
    "PAST_LIMIT_S",
    "PROFILES",
    "THRESHOLD_FIELDS",
    "THRESHOLD_SIDES",
    "TS_FORMS",
    "EventGenerator",
    "IngestClient",
    "SettleError",
    "batches",
    "classify_error",
    "classify_status",
    "events",
    "padded",
    "prefixed",
    "rekey",
    "threshold_events",
    "ts_forms",
]

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
DAY_S = 24 * 3600
PROFILES = ("healthy", "degraded", "lossy", "mixed")

# Value ranges per profile: (rtt_ms, jitter_ms, loss_pct, throughput_kbps), each (low, high).
# degraded: rtt > 150, jitter > 30, throughput < 1000; lossy: loss > 2 (see CONTRACT.md rules).
_RANGES: dict[str, tuple[tuple[float, float], ...]] = {
    "healthy": ((5.0, 80.0), (0.1, 8.0), (0.0, 0.5), (5_000.0, 100_000.0)),
    "degraded": ((160.0, 600.0), (31.0, 120.0), (0.0, 1.5), (50.0, 950.0)),
    "lossy": ((20.0, 120.0), (1.0, 20.0), (2.5, 30.0), (1_500.0, 20_000.0)),
}
_BASE_PROFILES = ("healthy", "degraded", "lossy")


def _from_micros(us: int) -> datetime:
    # Integer arithmetic keeps timestamps exact, so boundary events stay on the boundary.
    return EPOCH + timedelta(microseconds=us)


# --- the contract's bounds (stack/CONTRACT.md, "Ingest API"; the harness's own reading) ------

MAX_EVENTS = 1000
MAX_BODY_BYTES = 1024 * 1024
MAX_EVENT_ID = 128  # of A-Za-z0-9._:-
MAX_PROBE_ID = 64  # of A-Za-z0-9._-
MAX_TARGET = 255  # characters (code points) of printable UTF-8
MAX_MILLIS = 60_000.0  # rtt_ms, jitter_ms
MAX_PERCENT = 100.0  # loss_pct
MAX_KBPS = 1e9  # throughput_kbps: a window's sum of them stays finite
PAST_LIMIT_S = 24 * 3600  # ts >= now - 24 h at ingest
FUTURE_LIMIT_S = 5 * 60  # ts <= now + 5 min at ingest
# One step from a time bound. The ingest's clock is read between the request leaving and its
# answer coming back, so a case one step inside (or outside) a bound is decided only when the
# round trip took less than this; callers time it and retry with fresh timestamps otherwise.
CLOCK_STEP_S = 1.0

# Every form RFC 3339 gives one instant that the contract's "RFC 3339 with an offset" allows:
# Z and z, +00:00 and -00:00, T and t, non-zero offsets with and without minutes, the
# extreme offsets +-23:59, and 0 to 9 fraction digits (past 6, truncated to microseconds).
TS_FORMS: tuple[TsForm, ...] = (
    UTC_MICROSECONDS,
    TsForm(utc="Z", digits=0),
    TsForm(utc="z", separator="t", digits=3),
    TsForm(utc="-00:00", digits=9),
    TsForm(330, digits=1),  # +05:30
    TsForm(-570),  # -09:30
    TsForm(-300, digits=9),  # -05:00, nanoseconds
    TsForm(1439, digits=0),  # +23:59
    TsForm(-1439, digits=2),  # -23:59
    TsForm(1, separator="t", digits=7),  # +00:01
    TsForm(-1, utc="z", digits=8),  # -00:01
)

# Padding for maximum-length ids: characters every id alphabet allows, after a "_" so that
# ``prefixed`` knows what it may cut.
_PAD = "_" + "Zz09.-_" * 40
# Targets at the length bounds: one character, and 255 characters of several scripts,
# combining marks and characters outside the BMP (4 bytes in UTF-8, 2 in UTF-16).
EDGE_TARGETS = ("é", ("Ωmega-直播-\U0001f3a5-ñ\u0301-عربى " * 20)[:MAX_TARGET])

# Bound values per field, with one float step inside each bound.
_VALUE_BOUNDS: dict[str, tuple[float, ...]] = {
    "rtt_ms": (0.0, 5e-324, math.nextafter(MAX_MILLIS, 0.0), MAX_MILLIS),
    "jitter_ms": (0.0, 5e-324, math.nextafter(MAX_MILLIS, 0.0), MAX_MILLIS),
    "loss_pct": (0.0, 5e-324, math.nextafter(MAX_PERCENT, 0.0), MAX_PERCENT),
    "throughput_kbps": (0.0, 5e-324, math.nextafter(MAX_KBPS, 0.0), MAX_KBPS),
}

# The value each diagnosis rule averages, and where its threshold is in Rules.
THRESHOLD_FIELDS: dict[str, tuple[str, str]] = {
    "high_latency": ("rtt_ms", "high_latency"),
    "high_jitter": ("jitter_ms", "high_jitter"),
    "packet_loss": ("loss_pct", "packet_loss"),
    "low_throughput": ("throughput_kbps", "low_throughput"),
}
_NEUTRAL = {"rtt_ms": 20.0, "jitter_ms": 2.0, "loss_pct": 0.0, "throughput_kbps": 5000.0}
THRESHOLD_SIDES = ("below", "on", "above")


def padded(stem: str, limit: int) -> str:
    """``stem`` padded to exactly ``limit`` characters that every id alphabet allows."""
    if "_" in stem or len(stem) >= limit:
        raise ValueError(f"cannot pad {stem!r} to {limit} characters (no '_', shorter)")
    return (stem + _PAD)[:limit]


def prefixed(prefix: str, value: str, limit: int) -> str:
    """``prefix + value`` within ``limit`` characters: only a padded value's padding is cut, so
    distinct values stay distinct and a maximum-length one stays maximum-length."""
    text = prefix + value
    if len(text) <= limit:
        return text
    pad = value.find("_")
    if pad < 0 or len(prefix) + pad > limit:
        raise ValueError(f"{text!r} is over {limit} characters and not padding that can be cut")
    return text[:limit]


def _in_precision(us: int, form: TsForm) -> int:
    """``us`` cut to the fraction digits ``form`` writes (earlier, so never a later window)."""
    step = 10 ** max(0, 6 - form.digits)
    return us - us % step


def threshold_events(
    kind: str,
    side: str,
    probe_id: str,
    target: str,
    ts: datetime,
    ids: Callable[[], str],
    rules: Rules,
) -> list[Event]:
    """Events of one window whose ``kind`` average is exactly on the threshold (``on``) or one
    float step below or above it. The other values are far from their thresholds.

    ``on`` spreads four values around the threshold by small powers of two, so the sum is
    exact in any order; ``below``/``above`` repeat one value twice (doubling is exact), so
    the average the platform divides out is exactly that value.
    """
    field, rule = THRESHOLD_FIELDS[kind]
    threshold = float(getattr(rules, rule))
    if threshold < 0.5:
        raise ValueError(f"{rule} threshold {threshold}: the spread needs one of at least 0.5")
    if side == "on":
        values = [threshold - 0.5, threshold + 0.5, threshold - 0.25, threshold + 0.25]
    elif side in ("below", "above"):
        values = [math.nextafter(threshold, -math.inf if side == "below" else math.inf)] * 2
    else:
        raise ValueError(f"side {side!r}: expected one of {', '.join(THRESHOLD_SIDES)}")
    step = timedelta(milliseconds=1)
    return [
        Event(ids(), probe_id, target, ts + i * step, *_measurements(field, value))
        for i, value in enumerate(values)
    ]


def _measurements(field: str, value: float) -> tuple[float, float, float, float]:
    """An event's rtt, jitter, loss and throughput: neutral, but `field` at `value`."""
    measured = {**_NEUTRAL, field: value}
    return (
        measured["rtt_ms"],
        measured["jitter_ms"],
        measured["loss_pct"],
        measured["throughput_kbps"],
    )


class EventGenerator:
    """Seeded, reproducible batches of events with ids ``<run_prefix>-<counter>``.

    Timestamps fall mostly in the current and the three previous windows, some exactly on a
    window boundary, some late (hours back), within [now - 24 h + margin, now], and a few one
    step inside the future bound (now + 5 min - CLOCK_STEP_S, valid however late a resend).
    Each event's ts is written in one of ``forms``. In the ``mixed`` profile each (probe,
    target) pair keeps one profile (so its windows get clear diagnoses) with a tenth of its
    events from another profile.

    With ``edge_cases`` (the default) the probes get one more of exactly 64 characters and the
    targets EDGE_TARGETS (one character; 255 of unicode), and ``edge_fraction`` of the events
    get a 128-character id, one value at or one float step inside a bound, or a
    future-bound timestamp.
    """

    def __init__(
        self,
        seed: int,
        run_prefix: str,
        probes: Sequence[str],
        targets: Sequence[str],
        window_seconds: int = 60,
        clock: Callable[[], float] = time.time,
        *,
        boundary_fraction: float = 0.1,
        late_fraction: float = 0.05,
        margin_s: float = 600.0,
        forms: Sequence[TsForm] = TS_FORMS,
        edge_cases: bool = True,
        edge_fraction: float = 0.04,
        rules: Rules | None = None,
    ) -> None:
        if not probes or not targets:
            raise ValueError(
                f"EventGenerator needs at least one probe and one target, got probes={probes!r} "
                f"targets={targets!r}"
            )
        self.seed = seed
        self.run_prefix = run_prefix
        self.probes = tuple(probes)
        self.targets = tuple(targets)
        if edge_cases:
            self.probes += (padded(f"{run_prefix}-pmax", MAX_PROBE_ID),)
            self.targets += EDGE_TARGETS
        self.window_seconds = window_seconds
        self.forms = tuple(forms) or (UTC_MICROSECONDS,)
        self.rules = rules or Rules()
        self._edge = edge_fraction if edge_cases else 0.0
        self._special_batches = 0
        self._clock = clock
        self._boundary = boundary_fraction
        self._late = late_fraction
        self._margin_us = int(margin_s * 1_000_000)
        self._rng = random.Random(seed)
        self._counter = 0
        self._lock = threading.Lock()
        pairs = [(p, t) for p in self.probes for t in self.targets]
        offset = self._rng.randrange(len(_BASE_PROFILES))
        self.pair_profiles: dict[tuple[str, str], str] = {
            pair: _BASE_PROFILES[(i + offset) % len(_BASE_PROFILES)] for i, pair in enumerate(pairs)
        }

    def batch(self, n: int, profile: str = "mixed") -> list[Event]:
        """``n`` new events (fresh ids) with values from ``profile``."""
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}; expected one of {', '.join(PROFILES)}")
        with self._lock:  # one rng and counter: reproducible only if batches are serialised
            now_us = int(self._clock() * 1_000_000)
            return [self._event(profile, now_us) for _ in range(n)]

    def _event(self, profile: str, now_us: int) -> Event:
        rng = self._rng
        self._counter += 1
        probe = rng.choice(self.probes)
        target = rng.choice(self.targets)
        if profile == "mixed":
            profile = self.pair_profiles[(probe, target)]
            if rng.random() < 0.1:
                profile = rng.choice(_BASE_PROFILES)
        rtt, jitter, loss, tput = (round(rng.uniform(lo, hi), 3) for lo, hi in _RANGES[profile])
        if profile == "healthy" and rng.random() < 0.6:
            loss = 0.0  # healthy links mostly lose nothing
        values = {"rtt_ms": rtt, "jitter_ms": jitter, "loss_pct": loss, "throughput_kbps": tput}
        event_id = f"{self.run_prefix}-{self._counter}"
        form = rng.choice(self.forms)
        us = self._timestamp_us(now_us)
        if rng.random() < self._edge:
            edge = rng.randrange(3)
            if edge == 0:
                event_id = padded(event_id, MAX_EVENT_ID)
            elif edge == 1:
                field = rng.choice(tuple(_VALUE_BOUNDS))
                values[field] = rng.choice(_VALUE_BOUNDS[field])
            else:
                us = now_us + int((FUTURE_LIMIT_S - CLOCK_STEP_S) * 1_000_000)
        return Event(
            event_id=event_id,
            probe_id=probe,
            target=target,
            ts=_from_micros(_in_precision(us, form)),
            ts_form=form,
            **values,
        )

    def _next_id(self) -> str:
        self._counter += 1
        return f"{self.run_prefix}-{self._counter}"

    def _special_target(self, label: str) -> str:
        """A target no other batch uses, so the windows it makes hold only these events."""
        return f"{label} #{self._special_batches}"

    def threshold_batch(self) -> list[Event]:
        """For every diagnosis kind, a window whose average is one float step below, exactly
        on, and one step above its threshold (CONTRACT.md: > and <, so `on` is no diagnosis
        and one step to the bad side is). Each window has a target of its own."""
        with self._lock:
            self._special_batches += 1
            start = int(self._clock()) // self.window_seconds * self.window_seconds
            ts = datetime.fromtimestamp(start, UTC)
            probe = self.probes[-1]
            return [
                e
                for kind in THRESHOLD_FIELDS
                for side in THRESHOLD_SIDES
                for e in threshold_events(
                    kind,
                    side,
                    probe,
                    self._special_target(f"{kind} {side}"),
                    ts,
                    self._next_id,
                    self.rules,
                )
            ]

    def form_batches(self) -> list[list[Event]]:
        """A small batch per timestamp form: events exactly on a window boundary, a
        microsecond either side of it, and inside the window, a few windows back."""
        with self._lock:
            self._special_batches += 1
            width = self.window_seconds * 1_000_000
            boundary = int(self._clock() * 1_000_000) // width * width - 2 * width
            out = []
            for i, form in enumerate(self.forms):
                target = self._special_target(f"form {i}")
                stamps = (boundary, boundary - 1, boundary + 1, boundary + width // 3)
                out.append(
                    [
                        Event(
                            self._next_id(),
                            self.probes[i % len(self.probes)],
                            target,
                            _from_micros(us),
                            10.0 + i,
                            1.0,
                            0.0,
                            5000.0,
                            form,
                        )
                        for us in stamps
                    ]
                )
            return out

    def time_bound_batch(self, step_s: float = CLOCK_STEP_S) -> list[Event]:
        """Events one step inside each time bound (now - 24 h + step, now + 5 min - step),
        one in every form, the clock read now: send it at once and time the round trip."""
        with self._lock:
            self._special_batches += 1
            now_us = int(self._clock() * 1_000_000)
            step_us = int(step_s * 1_000_000)
            stamps = (
                now_us - PAST_LIMIT_S * 1_000_000 + step_us,
                now_us + FUTURE_LIMIT_S * 1_000_000 - step_us,
            )
            target = self._special_target("time bounds")
            return [
                Event(
                    self._next_id(),
                    self.probes[i % len(self.probes)],
                    target,
                    _from_micros(us),
                    30.0,
                    3.0,
                    0.0,
                    4000.0,
                    form,
                )
                for us in stamps
                for i, form in enumerate(self.forms)
            ]

    def _timestamp_us(self, now_us: int) -> int:
        rng = self._rng
        width = self.window_seconds * 1_000_000
        current = now_us // width * width
        lower = now_us - DAY_S * 1_000_000 + self._margin_us
        if rng.random() < self._late and current - 4 * width >= lower:
            # A late event for an older window, hours back but still accepted by ingest.
            back = rng.randint(4, (current - lower) // width)
        else:
            back = rng.choices((0, 1, 2, 3), weights=(50, 25, 15, 10))[0]
        start = current - back * width
        if rng.random() < self._boundary:
            return start  # exactly on the boundary: opens this window
        end = min(start + width, now_us + 1)  # never in the future
        return rng.randrange(start, end)


# --- Hypothesis strategies ------------------------------------------------------------------

_TS_SPECIAL = ("boundary", "after_boundary", "before_boundary", "anywhere", "anywhere")

# Characters every reading of "printable" agrees on: letters, marks, numbers, punctuation,
# symbols and the ASCII space (no controls, format characters, other spaces or surrogates).
_PRINTABLE = st.characters(categories=("L", "M", "N", "P", "S"), include_characters=" ")


def _values(lo: float, hi: float, special: Sequence[float]) -> st.SearchStrategy[float]:
    plain = st.floats(lo, hi, allow_nan=False, allow_infinity=False).map(lambda x: round(x, 3))
    return st.one_of(st.sampled_from(tuple(special)), plain, plain)


def _around(*points: float) -> tuple[float, ...]:
    """Each point and the floats one step either side of it (those inside [0, inf))."""
    out = {p for p in points} | {math.nextafter(p, math.inf) for p in points}
    out |= {math.nextafter(p, -math.inf) for p in points if p > 0}
    return tuple(sorted(out))


def ts_forms() -> st.SearchStrategy[TsForm]:
    """Every way RFC 3339 writes an instant with an offset (the extremes drawn often)."""
    return st.builds(
        TsForm,
        offset_minutes=st.one_of(
            st.sampled_from((0, 1, -1, 330, -570, 1439, -1439)), st.integers(-1439, 1439)
        ),
        utc=st.sampled_from(("Z", "z", "+00:00", "-00:00")),
        separator=st.sampled_from(("T", "t")),
        digits=st.integers(0, 9),
    )


def events(
    probe_ids: Sequence[str] = ("hyp-probe",),
    targets: Sequence[str] = ("target-a", "target-b"),
    now: float | None = None,
    window_seconds: int = 60,
    id_prefix: str = "hyp",
    windows_back: int = 5,
    rules: Rules | None = None,
) -> st.SearchStrategy[Event]:
    """Single events with fresh-looking ids, boundary-heavy timestamps in any RFC 3339 form,
    values at their bounds and on and beside the thresholds (one float step), maximum-length
    ids and probe ids (``prefixed`` keeps them so), EDGE_TARGETS and arbitrary printable
    targets up to 255 characters.

    ``now`` is fixed when the strategy is made, so replayed examples keep their timestamps.
    """
    t = rules or Rules()
    now_us = int((time.time() if now is None else now) * 1_000_000)
    width = window_seconds * 1_000_000
    current = now_us // width * width

    @st.composite
    def ts(draw: st.DrawFn) -> datetime:
        start = current - draw(st.integers(0, windows_back)) * width
        where = draw(st.sampled_from(_TS_SPECIAL))
        if where == "boundary":
            us = start
        elif where == "after_boundary":
            us = start + 1
        elif where == "before_boundary":
            us = start - 1
        else:
            us = draw(st.integers(start, start + width - 1))
        return _from_micros(min(us, now_us))

    ids = st.integers(1, 10**6).map(lambda i: f"{id_prefix}-{i}")
    return st.builds(
        Event,
        event_id=st.one_of(ids, ids, ids.map(lambda i: padded(i, MAX_EVENT_ID))),
        probe_id=st.sampled_from((*probe_ids, *(padded(p, MAX_PROBE_ID) for p in probe_ids[:1]))),
        target=st.one_of(
            st.sampled_from(tuple(targets)),
            st.sampled_from(EDGE_TARGETS),
            st.text(_PRINTABLE, min_size=1, max_size=MAX_TARGET),
        ),
        ts=ts(),
        rtt_ms=_values(0.0, 2_000.0, (*_VALUE_BOUNDS["rtt_ms"], *_around(t.high_latency))),
        jitter_ms=_values(0.0, 200.0, (*_VALUE_BOUNDS["jitter_ms"], *_around(t.high_jitter))),
        loss_pct=_values(0.0, 100.0, (*_VALUE_BOUNDS["loss_pct"], *_around(t.packet_loss))),
        throughput_kbps=_values(
            0.0, 200_000.0, (*_VALUE_BOUNDS["throughput_kbps"], *_around(t.low_throughput))
        ),
        ts_form=ts_forms(),
    )


def batches(
    probe_ids: Sequence[str] = ("hyp-probe",),
    targets: Sequence[str] = ("target-a", "target-b"),
    now: float | None = None,
    window_seconds: int = 60,
    id_prefix: str = "hyp",
    max_batches: int = 5,
    max_batch_size: int = 20,
    rules: Rules | None = None,
) -> st.SearchStrategy[list[list[Event]]]:
    """Sequences of batches: new events, exact duplicates (inside a batch and across batches),
    ids reused with another payload, and windows whose average is on or one float step beside
    a diagnosis threshold (a target of their own each). Ids are ``<id_prefix>-<n>``, numbered
    per example; use ``rekey`` to make them unique per example against a live stack.
    """
    t = rules or Rules()
    single = events(probe_ids, targets, now, window_seconds, id_prefix, rules=t)
    now_s = time.time() if now is None else now
    window = datetime.fromtimestamp(int(now_s) // window_seconds * window_seconds, UTC)

    @st.composite
    def build(draw: st.DrawFn) -> list[list[Event]]:
        sent: list[Event] = []
        fresh = itertools.count(1)
        out: list[list[Event]] = []
        for _ in range(draw(st.integers(1, max_batches))):
            batch: list[Event] = []
            for _ in range(draw(st.integers(1, max_batch_size))):
                seen = sent + batch
                kind = draw(st.sampled_from(("new", "new", "new", "repeat", "reuse", "rule")))
                if kind == "repeat" and seen:
                    batch.append(draw(st.sampled_from(seen)))  # the same payload again
                elif kind == "reuse" and seen:
                    base = draw(st.sampled_from(seen))  # same id, another payload
                    batch.append(replace(draw(single), event_id=base.event_id))
                elif kind == "rule":
                    rule = draw(st.sampled_from(tuple(THRESHOLD_FIELDS)))
                    side = draw(st.sampled_from(THRESHOLD_SIDES))
                    n = next(fresh)
                    batch.extend(
                        threshold_events(
                            rule,
                            side,
                            probe_ids[0],
                            f"{rule} {side} {n}",
                            window,
                            lambda: f"{id_prefix}-{next(fresh)}",
                            t,
                        )
                    )
                else:
                    e = draw(single)
                    event_id = f"{id_prefix}-{next(fresh)}"
                    if len(e.event_id) == MAX_EVENT_ID:
                        event_id = padded(event_id, MAX_EVENT_ID)
                    batch.append(replace(e, event_id=event_id))
            sent.extend(batch)
            out.append(batch)
        return out

    return build()


def rekey(batch_list: Sequence[Sequence[Event]], run_prefix: str) -> list[list[Event]]:
    """The same batches with ids prefixed by ``run_prefix`` (unique per live example, since
    the platform remembers ids for 48 h). Equal ids stay equal; maximum-length ones stay so."""
    return [
        [replace(e, event_id=prefixed(f"{run_prefix}.", e.event_id, MAX_EVENT_ID)) for e in b]
        for b in batch_list
    ]


# --- the recording client -------------------------------------------------------------------

_FAIL_STATUSES = frozenset({400, 401, 413, 415, 422})


def classify_status(status: int) -> Outcome:
    """The outcome a status means under the contract (anything unexpected is unknown)."""
    if status == 202:
        return Outcome.OK
    if status in _FAIL_STATUSES:
        return Outcome.FAIL
    # 503 and other 5xx may have stored some events; statuses outside the contract tell us
    # nothing, so they are treated as unknown too (never as a definite rejection).
    return Outcome.UNKNOWN


def classify_error(exc: httpx.HTTPError) -> Outcome:
    """Connect failures sent nothing (fail); anything after sending may have landed."""
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
        return Outcome.FAIL
    return Outcome.UNKNOWN


def _duplicates_of(resp: httpx.Response) -> int | None:
    """The 202 body's duplicate count; None when the body is not the contract's."""
    try:
        value = resp.json().get("duplicates")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None


class SettleError(RuntimeError):
    """Some unknown operations were never acknowledged before the settle deadline."""

    def __init__(self, message: str, operations: Sequence[Operation]) -> None:
        super().__init__(message)
        self.operations = tuple(operations)


def _describe(op: Operation) -> str:
    first = op.events[0].event_id if op.events else "-"
    when = datetime.fromtimestamp(op.invoked_at, UTC).strftime("%H:%M:%S.%f")[:-3]
    return f"{op.process}@{when} ({len(op.events)} events from {first})"


class IngestClient:
    """Sends batches to the ingest API, round-robin over ``urls``; records every attempt.

    Thread-safe: share one client between threads, or give each worker its own ``process``.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        token: str,
        history: History,
        process: str,
        timeout: float = 5.0,
        *,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        url_list = [urls] if isinstance(urls, str) else list(urls)
        if not url_list:
            raise ValueError("IngestClient needs at least one ingest URL, got none")
        self.urls = tuple(self._endpoint(u) for u in url_list)
        self.token = token
        self.history = history
        self.process = process
        self._http = httpx.Client(timeout=timeout, transport=transport)
        self._lock = threading.Lock()
        self._next = 0
        self._clock = clock
        self._sleep = sleep

    @staticmethod
    def _endpoint(url: str) -> str:
        url = url.rstrip("/")
        return url if url.endswith("/v1/events") else f"{url}/v1/events"

    def next_url(self) -> str:
        with self._lock:
            url = self.urls[self._next % len(self.urls)]
            self._next += 1
            return url

    def default_headers(self) -> dict[str, str]:
        """The headers of a well-formed request (copy and alter them for bad-input tests)."""
        return {"Content-Type": "application/json", "Authorization": f"Bearer {self.token}"}

    def send(
        self,
        events: Sequence[Event],
        url: str | None = None,
        *,
        pad_to: int | None = None,
        ascii_only: bool = False,
    ) -> Operation:
        """POST one batch and record the attempt; never raises for network trouble.

        The body is UTF-8 as a probe writes it (``ascii_only``: non-ASCII as \\u escapes);
        ``pad_to`` pads it with trailing whitespace, which JSON allows, to exactly that many
        bytes (the size bound).
        """
        endpoint = self._endpoint(url) if url else self.next_url()
        wire = {"events": [e.to_wire() for e in events]}
        body = json.dumps(wire, allow_nan=False, ensure_ascii=ascii_only).encode()
        if pad_to is not None:
            if len(body) > pad_to:
                raise ValueError(f"the batch is {len(body)} bytes, more than pad_to={pad_to}")
            body += b" " * (pad_to - len(body))
        invoked = self._clock()
        status: int | None = None
        error = ""
        duplicates: int | None = None
        try:
            resp = self._http.post(endpoint, content=body, headers=self.default_headers())
        except httpx.HTTPError as exc:
            outcome = classify_error(exc)
            error = f"{type(exc).__name__}: {exc}"
        else:
            status = resp.status_code
            outcome = classify_status(status)
            if outcome is not Outcome.OK:
                error = f"HTTP {status}: {resp.text[:300]}"
            else:
                duplicates = _duplicates_of(resp)
        op = Operation(
            process=self.process,
            endpoint=endpoint,
            invoked_at=invoked,
            completed_at=self._clock(),
            outcome=outcome,
            events=tuple(events),
            status=status,
            error=error,
            duplicates=duplicates,
        )
        self.history.append(op)
        return op

    def send_raw(
        self, body: bytes, headers: Mapping[str, str], url: str | None = None
    ) -> httpx.Response:
        """POST exactly these bytes and headers (not recorded: for bad-input scenarios)."""
        endpoint = self._endpoint(url) if url else self.next_url()
        return self._http.post(endpoint, content=body, headers=dict(headers))

    def unsettled(self, all_processes: bool = False) -> list[Operation]:
        """Unknown operations whose exact batch was never acknowledged (one per batch)."""
        ops = self.history.operations()
        acked = {op.events for op in ops if op.outcome is Outcome.OK}
        out: dict[tuple[Event, ...], Operation] = {}
        for op in ops:
            if op.outcome is not Outcome.UNKNOWN or op.events in acked:
                continue
            if all_processes or op.process == self.process:
                out.setdefault(op.events, op)
        return list(out.values())

    def settle(self, deadline_s: float, all_processes: bool = False) -> int:
        """Resend every unknown batch (same ids, same payloads) until acknowledged.

        Returns how many batches were settled. Raises SettleError naming the operations still
        unknown when ``deadline_s`` seconds have passed (or that were definitely rejected).
        """
        end = self._clock() + deadline_s
        settled = 0
        stuck: list[tuple[Operation, str]] = []
        for op in self.unsettled(all_processes):
            if self._clock() >= end:
                stuck.append((op, "not resent: the deadline had passed"))
                continue
            last = self._settle_one(op, end)
            if last.outcome is Outcome.OK:
                settled += 1
            else:
                stuck.append((op, last.error or str(last.outcome)))
        if stuck:
            shown = "; ".join(f"{_describe(op)}: last {err}" for op, err in stuck[:10])
            more = f" and {len(stuck) - 10} more" if len(stuck) > 10 else ""
            raise SettleError(
                f"{len(stuck)} unknown operations not acknowledged within {deadline_s:.1f}s "
                f"(expected every resend to end in 202): {shown}{more}. Check that ingest and "
                "NATS are healthy again (faults healed?) or allow settle() more time.",
                [op for op, _ in stuck],
            )
        return settled

    def _settle_one(self, op: Operation, end: float) -> Operation:
        pause = 0.05
        while True:
            result = self.send(op.events)
            definite_rejection = result.outcome is Outcome.FAIL and result.status is not None
            if result.outcome is Outcome.OK or definite_rejection:
                return result
            now = self._clock()
            if now >= end:
                return result
            # Backoff capped at 1 s: close to the Retry-After the reference stack sends.
            self._sleep(min(pause, end - now))
            pause = min(pause * 2, 1.0)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> IngestClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
