"""Why a window is wrong: the events behind the difference, the operations that carried them,
and the faults and container events that overlapped those operations.

The read contract shows aggregates, not ids, so the events are found the way a person would:
a window that counts k events too many (or too few) differs from the oracle by the values of k
events, and among the acknowledged events of that window (or, for events counted in the wrong
window, of its neighbours) the k whose four sums make up the difference are the suspects. A
search over subsets, bounded in work; when no subset or more than one fits, the explanation
says so instead of naming ids. Pure functions of the verdict, the history (the clients'
operations and the nemesis's faults) and the timeline (container events).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from harness.checker import Aggregate, Verdict, WindowKey, WindowVerdict, key_of
from harness.history import Event, Fault, History, Mark, Operation, Outcome

__all__ = ["Carrier", "Explanation", "Suspect", "explain"]

# Faults up to this long after an operation completed still bear on its events: the aggregator
# acks (or fails to) within the consumer's ack wait, 10 s by default.
AFTER_COMPLETION_S = 10.0
SEARCH_BUDGET = 200_000  # subsets tried per window before giving up on naming ids


@dataclass(frozen=True)
class Carrier:
    """One operation that carried a suspect event."""

    process: str
    endpoint: str
    invoked_at: float
    completed_at: float
    outcome: str
    status: int | None

    def describe(self) -> str:
        return (
            f"{self.outcome} {_clock(self.invoked_at)}-{_clock(self.completed_at)} "
            f"by {self.process} through {self.endpoint}"
            + (f" (HTTP {self.status})" if self.status is not None else "")
        )


@dataclass(frozen=True)
class Suspect:
    """An event whose counting explains (part of) a window's difference."""

    event_id: str
    how: str  # "counted twice" | "missing" | "moved in from <window>"
    carriers: tuple[Carrier, ...]

    @property
    def acked_at(self) -> float | None:
        return min((c.completed_at for c in self.carriers if c.outcome == "ok"), default=None)


@dataclass(frozen=True)
class Explanation:
    window: str
    difference: int  # observed samples - expected samples
    suspects: tuple[Suspect, ...]  # empty when the ids could not be named
    unidentified: str  # why no ids were named ("" when they were)
    overlapping: tuple[Mark, ...]  # faults and container events during the carriers' span
    caveat: str = ""  # on the suspects named, e.g. the search stopped before proving them

    def short(self) -> str:
        """One line, e.g. `+1 acknowledged event counted twice: e7 acked at 02:01:03.2 by w1
        through http://ingest-2 while kill aggregator-1 held (02:01:02.9-02:01:05.1)`."""
        verb = {True: "too many", False: "too few"}[self.difference > 0]
        head = f"{self.window}: {self.difference:+d} ({abs(self.difference)} {verb})"
        if not self.suspects:
            return f"{head}; events not named: {self.unidentified}{self._during()}"
        named = "; ".join(_suspect_line(s) for s in self.suspects[:3])
        more = f" and {len(self.suspects) - 3} more" if len(self.suspects) > 3 else ""
        return f"{head}: {named}{more}{self.caveat}{self._during()}"

    def _during(self) -> str:
        faults = [m for m in self.overlapping if m.source == "nemesis"]
        others = [m for m in self.overlapping if m.source != "nemesis"]
        parts = [f"{m.name} held ({_span(m)})" for m in faults[:3]]
        parts += [f"{m.source} {m.name} {m.detail} at {_clock(m.at)}".strip() for m in others[:3]]
        return f" while {', '.join(parts)}" if parts else "; no fault or container event overlapped"

    def to_dict(self) -> dict[str, Any]:
        return {
            "window": self.window,
            "difference": self.difference,
            "short": self.short(),
            "unidentified": self.unidentified,
            "suspects": [
                {
                    "event_id": s.event_id,
                    "how": s.how,
                    "operations": [c.describe() for c in s.carriers],
                }
                for s in self.suspects
            ],
            "overlapping": [m.to_dict() for m in self.overlapping],
        }


def explain(
    verdict: Verdict, history: History, marks: Iterable[Mark], *, limit: int = 10
) -> tuple[Explanation, ...]:
    """An explanation for each of the first `limit` wrong windows whose sample count differs."""
    window_s = _window_seconds(verdict)
    if window_s is None:
        return ()
    index = _Index(history, window_s)
    faults = _faults_and_events(history.faults(), marks)
    found = []
    for w in verdict.wrong():
        difference = (w.observed.samples if w.observed else 0) - _expected_samples(w)
        if difference == 0:
            continue  # right count, wrong values: a payload question, not missing ids
        suspects, why, caveat = _suspects(w, difference, index)
        found.append(
            Explanation(
                window=w.key.label(),
                difference=difference,
                suspects=suspects,
                unidentified=why,
                caveat=caveat,
                overlapping=_overlapping(faults, suspects),
            )
        )
        if len(found) == limit:
            break
    return tuple(found)


# --- the events behind a difference ------------------------------------------------------------


class _Index:
    """Each acknowledged event by window, and the operations that carried each id."""

    def __init__(self, history: History, window_s: int) -> None:
        self.window_s = window_s
        self.by_window: dict[WindowKey, dict[str, Event]] = defaultdict(dict)
        self.carriers: dict[str, list[Operation]] = defaultdict(list)
        for op in history.operations():
            for e in op.events:
                self.carriers[e.event_id].append(op)
                if op.outcome is Outcome.OK:
                    self.by_window[key_of(e, window_s)].setdefault(e.event_id, e)

    def neighbours(self, key: WindowKey) -> Iterator[tuple[WindowKey, Event]]:
        step = timedelta(seconds=self.window_s)
        for start in (key.window_start - step, key.window_start + step):
            near = WindowKey(key.probe_id, key.target, start, key.window_seconds)
            for e in self.by_window.get(near, {}).values():
                yield near, e

    def carried(self, event_id: str) -> tuple[Carrier, ...]:
        return tuple(
            Carrier(
                op.process, op.endpoint, op.invoked_at, op.completed_at, op.outcome.value, op.status
            )
            for op in self.carriers.get(event_id, [])
        )


def _suspects(
    w: WindowVerdict, difference: int, index: _Index
) -> tuple[tuple[Suspect, ...], str, str]:
    """The suspects, why none are named ("" when they are), and a caveat on them."""
    own = list(index.by_window.get(w.key, {}).values())
    if difference < 0:  # too few: which of the window's own events are not counted
        wanted = _sums(w.expected) - _sums(w.observed)
        pool = [(e, "missing") for e in own]
    else:  # too many: its own events counted again, or its neighbours' counted here
        wanted = _sums(w.observed) - _sums(w.expected)
        pool = [(e, "counted twice") for e in own] + [
            (e, f"moved in from {near.label()}") for near, e in index.neighbours(w.key)
        ]
    k = abs(difference)
    fits, complete = _subsets_summing_to([e for e, _ in pool], k, wanted)
    if not fits:
        if not complete:
            return (), f"more than {SEARCH_BUDGET:,} subsets of {len(pool)} events to try", ""
        return (), f"no {k} of the {len(pool)} acknowledged events add up to it", ""
    if len(fits) > 1:
        return (), f"more than one set of {k} events adds up to it", ""
    how = {id(e): h for e, h in pool}
    caveat = (
        ""
        if complete
        else f" (the first set that fits: the search stopped after {SEARCH_BUDGET:,} subsets)"
    )
    suspects = tuple(Suspect(e.event_id, how[id(e)], index.carried(e.event_id)) for e in fits[0])
    return suspects, "", caveat


class _Vector(tuple[float, float, float, float]):
    """The four sums of an aggregate (rtt, jitter, loss, throughput)."""

    def __sub__(self, other: _Vector) -> _Vector:
        return _Vector(a - b for a, b in zip(self, other, strict=True))


def _sums(a: Aggregate | None) -> _Vector:
    if a is None:
        return _Vector((0.0, 0.0, 0.0, 0.0))
    return _Vector((a.rtt_sum, a.jitter_sum, a.loss_sum, a.throughput_sum))


def _values(e: Event) -> tuple[float, float, float, float]:
    return (e.rtt_ms, e.jitter_ms, e.loss_pct, e.throughput_kbps)


def _subsets_summing_to(
    events: Sequence[Event], k: int, wanted: Sequence[float]
) -> tuple[list[list[Event]], bool]:
    """Sets of k events whose values add up to `wanted` (at most two are collected: one is an
    answer, two is ambiguity), and whether the search was complete within its budget."""
    tolerance = [1e-6 * max(1.0, abs(x)) for x in wanted]
    values = [_values(e) for e in events]
    found: list[list[Event]] = []
    tried = 0

    def fits(total: Sequence[float]) -> bool:
        return all(abs(t - x) <= tol for t, x, tol in zip(total, wanted, tolerance, strict=True))

    def search(start: int, chosen: list[int], total: tuple[float, ...]) -> bool:
        nonlocal tried
        if len(chosen) == k:
            if fits(total):
                found.append([events[i] for i in chosen])
            return len(found) < 2
        for i in range(start, len(events) - (k - len(chosen)) + 1):
            tried += 1
            if tried > SEARCH_BUDGET:
                return False
            step = tuple(t + v for t, v in zip(total, values[i], strict=True))
            if any(t > x + tol for t, x, tol in zip(step, wanted, tolerance, strict=True)):
                continue  # values are never negative (the contract): this set only grows
            if not search(i + 1, [*chosen, i], step):
                return False
        return True

    complete = search(0, [], (0.0, 0.0, 0.0, 0.0)) or len(found) > 1
    return found, complete


def _expected_samples(w: WindowVerdict) -> int:
    if w.expected is not None:
        return w.expected.samples
    return w.expected_samples[0] if w.expected_samples else 0


def _window_seconds(verdict: Verdict) -> int | None:
    return next((w.key.window_seconds for w in verdict.windows), None)


# --- what overlapped -------------------------------------------------------------------------


def _faults_and_events(faults: Iterable[Fault], marks: Iterable[Mark]) -> list[Mark]:
    """The history's faults as bands (one still held lasts until now), and container events."""
    now = time.time()
    bands = [
        Mark(f.started_at, "nemesis", f.name, f.detail, (f.ended_at or now) - f.started_at)
        for f in faults
    ]
    return bands + [m for m in marks if m.source == "docker"]


def _overlapping(marks: Sequence[Mark], suspects: Sequence[Suspect]) -> tuple[Mark, ...]:
    carriers = [c for s in suspects for c in s.carriers]
    if not carriers:
        return ()
    begin = min(c.invoked_at for c in carriers)
    end = max(c.completed_at for c in carriers) + AFTER_COMPLETION_S
    return tuple(m for m in marks if m.at <= end and m.at + (m.duration_s or 0.0) >= begin)


# --- wording ------------------------------------------------------------------------------------


def _clock(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%H:%M:%S.%f")[:10]


def _span(m: Mark) -> str:
    return f"{_clock(m.at)}-{_clock(m.at + (m.duration_s or 0.0))}"


def _suspect_line(s: Suspect) -> str:
    acked = s.acked_at
    ok = [c for c in s.carriers if c.outcome == "ok"]
    via = f" by {ok[0].process} through {ok[0].endpoint}" if ok else ""
    attempts = f" after {len(s.carriers)} attempts" if len(s.carriers) > 1 else ""
    when = f" acked at {_clock(acked)}" if acked is not None else " never acked"
    return f"{s.event_id} {s.how},{when}{via}{attempts}"
