"""The history of a run: every operation the harness attempted and what came of it, and
every fault the nemesis injected.

As in Jepsen, each client operation ends ``ok`` (the platform acknowledged it), ``fail``
(definitely rejected: nothing was stored) or ``unknown`` (it may or may not have been stored);
the nemesis is one more process of the same history, its operations the faults with their
clocks. Checkers, recovery times, pictures and failure explanations are pure functions of a
History; load workers write their own history files and the harness merges them. The Timeline
next to it records what the harness observed rather than did (container events, phases).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = [
    "Event",
    "Fault",
    "History",
    "Mark",
    "Operation",
    "Outcome",
    "Timeline",
    "TsForm",
]


class Outcome(StrEnum):
    """How an operation ended, from the client's point of view."""

    OK = "ok"  # 202: every event of the batch is stored (or was already)
    FAIL = "fail"  # definite rejection: nothing of the batch was stored
    UNKNOWN = "unknown"  # timeout, reset after sending, 503, other 5xx: maybe stored


@dataclass(frozen=True, slots=True)
class TsForm:
    """How an event's ts is written on the wire: RFC 3339 writes one instant in many forms.

    ``offset_minutes`` is the offset written (-1439..1439: at most 23:59 either way);
    ``utc`` how a zero offset is written ("Z", "z", "+00:00" or "-00:00"); ``separator``
    "T" or "t"; ``digits`` the fraction digits (0-9). More digits than asked are written when
    the instant needs them, so the text always means the event's ts; digits past the
    microsecond are 9s, which a reader must truncate (one that rounds moves the event).
    """

    offset_minutes: int = 0
    utc: str = "+00:00"
    separator: str = "T"
    digits: int = 6

    def __post_init__(self) -> None:
        if not -1439 <= self.offset_minutes <= 1439:
            raise ValueError(f"offset {self.offset_minutes} min: RFC 3339 allows -23:59..+23:59")
        if self.utc not in ("Z", "z", "+00:00", "-00:00"):
            raise ValueError(f"zero offset {self.utc!r}: write Z, z, +00:00 or -00:00")
        if self.separator not in ("T", "t") or not 0 <= self.digits <= 9:
            raise ValueError(f"separator {self.separator!r} (T or t), digits {self.digits} (0-9)")

    def render(self, ts: datetime) -> str:
        if self is UTC_MICROSECONDS:
            return ts.astimezone(UTC).isoformat(timespec="microseconds")
        local = ts.astimezone(timezone(timedelta(minutes=self.offset_minutes)))
        micros = f"{local.microsecond:06d}"
        digits = max(self.digits, len(micros.rstrip("0")))
        fraction = (micros + "9" * 3)[:digits]
        text = local.strftime(f"%Y-%m-%d{self.separator}%H:%M:%S")
        return f"{text}.{fraction}{self.suffix()}" if digits else f"{text}{self.suffix()}"

    def suffix(self) -> str:
        if self.offset_minutes == 0:
            return self.utc
        hours, minutes = divmod(abs(self.offset_minutes), 60)
        return f"{'-' if self.offset_minutes < 0 else '+'}{hours:02d}:{minutes:02d}"

    @staticmethod
    def of(text: str) -> TsForm:
        """The form of an RFC 3339 timestamp (its sub-microsecond digits are not kept)."""
        if len(text) == 32 and text[19] == "." and text[10] == "T" and text[26:] == "+00:00":
            return UTC_MICROSECONDS  # what the harness writes by default: no parsing
        end = len(text) - (1 if text[-1] in "Zz" else 6)
        digits = end - 20 if len(text) > 19 and text[19] == "." else 0
        return _form(text[end:], text[10], min(digits, 9))


UTC_MICROSECONDS = TsForm()


@lru_cache(maxsize=4096)
def _form(suffix: str, separator: str, digits: int) -> TsForm:
    if suffix in ("Z", "z", "+00:00", "-00:00"):
        form = TsForm(utc=suffix, separator=separator, digits=digits)
    else:
        minutes = int(suffix[1:3]) * 60 + int(suffix[4:6])
        form = TsForm(-minutes if suffix[0] == "-" else minutes, separator=separator, digits=digits)
    return UTC_MICROSECONDS if form == UTC_MICROSECONDS else form


def parse_ts(text: str) -> datetime:
    """An RFC 3339 timestamp as an aware datetime (fractions past microseconds truncated)."""
    # fromisoformat takes every RFC 3339 form but lower-case t and z, and truncates fractions.
    return datetime.fromisoformat(text.upper())


@dataclass(frozen=True, slots=True)
class Event:
    """One QoE measurement, as sent on the wire (see stack/CONTRACT.md).

    ``ts`` is the instant; ``ts_form`` only says how it is written (equal instants written in
    other forms are the same event, as the platform stores it in UTC).
    """

    event_id: str
    probe_id: str
    target: str
    ts: datetime
    rtt_ms: float
    jitter_ms: float
    loss_pct: float
    throughput_kbps: float
    ts_form: TsForm = field(default=UTC_MICROSECONDS, compare=False)

    def __post_init__(self) -> None:
        if self.ts.tzinfo is None or self.ts.utcoffset() is None:
            raise ValueError(
                f"Event {self.event_id!r}: ts must be timezone-aware, got naive {self.ts!r}; "
                "build it with tzinfo=datetime.UTC"
            )
        # Normalise to UTC so equal instants compare (and hash) equal whatever the offset.
        object.__setattr__(self, "ts", self.ts.astimezone(UTC))

    def to_wire(self) -> dict[str, Any]:
        """The JSON object the ingest API expects (ts in RFC 3339, written in ``ts_form``)."""
        return {
            "event_id": self.event_id,
            "probe_id": self.probe_id,
            "target": self.target,
            "ts": self.ts_form.render(self.ts),
            "rtt_ms": self.rtt_ms,
            "jitter_ms": self.jitter_ms,
            "loss_pct": self.loss_pct,
            "throughput_kbps": self.throughput_kbps,
        }

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Event:
        """Parse the wire form back: any RFC 3339 form, kept as ``ts_form``."""
        text = str(d["ts"])
        return cls(
            event_id=str(d["event_id"]),
            probe_id=str(d["probe_id"]),
            target=str(d["target"]),
            ts=parse_ts(text),
            rtt_ms=float(d["rtt_ms"]),
            jitter_ms=float(d["jitter_ms"]),
            loss_pct=float(d["loss_pct"]),
            throughput_kbps=float(d["throughput_kbps"]),
            ts_form=TsForm.of(text),
        )


@dataclass(frozen=True, slots=True)
class Operation:
    """One attempt to send a batch: who sent it where, when, and how it ended."""

    process: str
    endpoint: str
    invoked_at: float  # time.time()
    completed_at: float  # time.time()
    outcome: Outcome
    events: tuple[Event, ...]
    status: int | None = None  # HTTP status, None when no answer arrived
    error: str = ""
    duplicates: int | None = None  # from a 202: events JetStream reported as duplicates
    # Events of the batch left out of this record: a load run's history keeps them in its
    # outcome files (harness.columnar), the operation only says how many there were.
    events_omitted: int = 0
    # When a load run's schedule meant the batch to go out (invoked_at is when it went);
    # None: the client sent it when it chose to (no schedule).
    intended_at: float | None = None

    @property
    def batch_size(self) -> int:
        """How many events the batch carried, whether or not this record holds them."""
        return len(self.events) + self.events_omitted

    def to_dict(self) -> dict[str, Any]:
        return {
            "process": self.process,
            "endpoint": self.endpoint,
            "invoked_at": self.invoked_at,
            "completed_at": self.completed_at,
            "outcome": self.outcome.value,
            "status": self.status,
            "error": self.error,
            "duplicates": self.duplicates,
            "events": [e.to_wire() for e in self.events],
            "events_omitted": self.events_omitted,
            "intended_at": self.intended_at,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Operation:
        return cls(
            process=str(d["process"]),
            endpoint=str(d["endpoint"]),
            invoked_at=float(d["invoked_at"]),
            completed_at=float(d["completed_at"]),
            outcome=Outcome(d["outcome"]),
            events=tuple(Event.from_wire(e) for e in d["events"]),
            status=None if d.get("status") is None else int(d["status"]),
            error=str(d.get("error", "")),
            duplicates=None if d.get("duplicates") is None else int(d["duplicates"]),
            events_omitted=int(d.get("events_omitted", 0)),
            intended_at=None if d.get("intended_at") is None else float(d["intended_at"]),
        )


@dataclass
class Fault:
    """One operation of the nemesis: a fault from injection to healed, or an instant action (a
    move, a restart) that has no heal. Its clock is filled in as it happens (None until then)."""

    name: str
    detail: str = ""
    started_at: float = 0.0  # time.time() when injection began
    effect_s: float | None = None  # injection start -> the fault observably in effect
    healed_at: float | None = None  # time.time() when healing began; None for an instant
    heal_s: float | None = None  # healing start -> healed (e.g. the service healthy again)
    ended_at: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def duration_s(self) -> float | None:
        return None if self.ended_at is None else self.ended_at - self.started_at

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "detail": self.detail,
            "started_at": self.started_at,
            "effect_s": self.effect_s,
            "healed_at": self.healed_at,
            "heal_s": self.heal_s,
            "ended_at": self.ended_at,
            "duration_s": self.duration_s,
            **({"notes": self.notes} if self.notes else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Fault:
        def maybe(key: str) -> float | None:
            return None if d.get(key) is None else float(d[key])

        return cls(
            name=str(d["name"]),
            detail=str(d.get("detail", "")),
            started_at=float(d["started_at"]),
            effect_s=maybe("effect_s"),
            healed_at=maybe("healed_at"),
            heal_s=maybe("heal_s"),
            ended_at=maybe("ended_at"),
            notes=dict(d.get("notes", {})),
        )


_FAULT_ROW = "fault"  # a history file's row type for the nemesis's operations


def _write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    # Write to a temporary file and rename, so a reader never sees half a history.
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, allow_nan=False, ensure_ascii=False))
            f.write("\n")
    tmp.replace(path)


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{path}:{lineno}: expected one JSON object per line, got {line[:80]!r} "
                    f"({exc.msg}); was the file truncated by a crashed worker?"
                ) from exc


class History:
    """A thread-safe, append-only record of the clients' operations and the nemesis's faults."""

    def __init__(self, operations: Iterable[Operation] = (), faults: Iterable[Fault] = ()) -> None:
        self._lock = threading.Lock()
        self._ops: list[Operation] = list(operations)
        self._faults: list[Fault] = list(faults)

    def append(self, op: Operation) -> None:
        with self._lock:
            self._ops.append(op)

    def extend(self, ops: Iterable[Operation]) -> None:
        ops = list(ops)
        with self._lock:
            self._ops.extend(ops)

    def begin_fault(self, fault: Fault) -> Fault:
        """Record a fault as it starts; the nemesis fills in its clock as it goes."""
        with self._lock:
            self._faults.append(fault)
        return fault

    def operations(self) -> tuple[Operation, ...]:
        """A snapshot of the clients' operations so far, in the order they were appended."""
        with self._lock:
            return tuple(self._ops)

    def faults(self) -> tuple[Fault, ...]:
        """The nemesis's faults so far, in the order they started."""
        with self._lock:
            return tuple(self._faults)

    def __len__(self) -> int:
        with self._lock:
            return len(self._ops)

    def __iter__(self) -> Iterator[Operation]:
        return iter(self.operations())

    def last_ok_at(self) -> float | None:
        """When the last acknowledgement arrived (the start of the convergence clock)."""
        times = [op.completed_at for op in self.operations() if op.outcome is Outcome.OK]
        return max(times, default=None)

    def last_healed_at(self) -> float | None:
        """When healing of the last fault to be healed began (instants have no heal)."""
        return max((f.healed_at for f in self.faults() if f.healed_at is not None), default=None)

    def recovery_s(self, convergence_s: float | None) -> float | None:
        """Seconds from the start of the last heal to the database matching the oracle, which
        the checker saw ``convergence_s`` after the last acknowledgement (None: no fault healed).
        The one place recovery is computed: scenarios, load runs and the report read it here."""
        healed_at = self.last_healed_at()
        if healed_at is None:
            return None
        matched_at = (self.last_ok_at() or time.time()) + (convergence_s or 0.0)
        return round(max(0.0, matched_at - healed_at), 3)

    def rates(self, bucket_s: float = 0.5) -> list[dict[str, float]]:
        """What the clients saw over time, by completion time in buckets of `bucket_s`: events
        acknowledged per second, and the batches completed and not acknowledged (failed or
        unknown) in the bucket."""
        buckets: dict[int, dict[str, float]] = {}
        for op in self.operations():
            n = int(op.completed_at // bucket_s)
            b = buckets.setdefault(n, {"t": n * bucket_s, "acked": 0.0, "batches": 0, "errors": 0})
            b["batches"] += 1
            if op.outcome is Outcome.OK:
                b["acked"] += op.batch_size / bucket_s
            else:
                b["errors"] += 1
        return [buckets[k] for k in sorted(buckets)]

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the history as JSON lines: one operation per line, then one per fault."""
        _write_jsonl(
            Path(path),
            [
                *(op.to_dict() for op in self.operations()),
                *({"type": _FAULT_ROW, **f.to_dict()} for f in self.faults()),
            ],
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> History:
        ops, faults = [], []
        for row in _read_jsonl(Path(path)):
            if row.get("type") == _FAULT_ROW:
                faults.append(Fault.from_dict(row))
            else:
                ops.append(Operation.from_dict(row))
        return cls(ops, faults)

    @classmethod
    def merge(cls, *histories: History) -> History:
        """One history of all operations, ordered by invocation time (stable for ties), and
        all faults, ordered by start."""
        ops = sorted((op for h in histories for op in h.operations()), key=lambda op: op.invoked_at)
        faults = sorted((f for h in histories for f in h.faults()), key=lambda f: f.started_at)
        return cls(ops, faults)

    @classmethod
    def load_merged(cls, paths: Iterable[str | os.PathLike[str]]) -> History:
        """Load several workers' history files and merge them."""
        return cls.merge(*(cls.load(p) for p in paths))


@dataclass(frozen=True, slots=True)
class Mark:
    """Something the harness observed during a run: a container event, a phase, a reading."""

    at: float  # time.time()
    source: str  # "nemesis", "docker", "workload", "checker", ...
    name: str
    detail: str = ""
    duration_s: float | None = None  # None for an instant; bands in the report otherwise

    def to_dict(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "source": self.source,
            "name": self.name,
            "detail": self.detail,
            "duration_s": self.duration_s,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Mark:
        duration = d.get("duration_s")
        return cls(
            at=float(d["at"]),
            source=str(d["source"]),
            name=str(d["name"]),
            detail=str(d.get("detail", "")),
            duration_s=None if duration is None else float(duration),
        )


class Timeline:
    """A thread-safe, append-only list of marks: the run timeline the report draws."""

    def __init__(self, marks: Iterable[Mark] = ()) -> None:
        self._lock = threading.Lock()
        self._marks: list[Mark] = list(marks)

    def append(self, mark: Mark) -> None:
        with self._lock:
            self._marks.append(mark)

    def mark(
        self,
        source: str,
        name: str,
        detail: str = "",
        duration_s: float | None = None,
        at: float | None = None,
    ) -> Mark:
        """Record a mark now (or at ``at``) and return it."""
        m = Mark(
            at=time.time() if at is None else at,
            source=source,
            name=name,
            detail=detail,
            duration_s=duration_s,
        )
        self.append(m)
        return m

    def marks(self) -> tuple[Mark, ...]:
        with self._lock:
            return tuple(self._marks)

    def __len__(self) -> int:
        with self._lock:
            return len(self._marks)

    def __iter__(self) -> Iterator[Mark]:
        return iter(self.marks())

    def save(self, path: str | os.PathLike[str]) -> None:
        _write_jsonl(Path(path), (m.to_dict() for m in self.marks()))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Timeline:
        return cls(Mark.from_dict(row) for row in _read_jsonl(Path(path)))

    @classmethod
    def merge(cls, *timelines: Timeline) -> Timeline:
        marks = [m for t in timelines for m in t.marks()]
        marks.sort(key=lambda m: m.at)
        return cls(marks)
