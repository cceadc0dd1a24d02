"""Measurements over a load history (response and service time percentiles, late and dropped
sends, rates, errors) and the SLO gates.

Percentiles are exact (nearest rank), over the merged history of every worker's batches: the
outcome files are the source of truth and the harness merges them anyway (harness.columnar),
keeping one header per batch, so a mergeable summary such as an HdrHistogram would add a
dependency and an approximation and save nothing (an hour at 20,000 events/s in 500-event
batches is 144,000 headers)."""

from __future__ import annotations

import math
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from harness.history import History, Operation, Outcome
from harness.load.freshness import FreshnessSample
from harness.load.outcomes import LATE_AFTER_S, Dropped
from harness.stack import ROOT

DEFAULT_SLO_FILE = ROOT / "scenarios" / "load" / "slo.toml"

# --- measurements -----------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of the values; None when there are none."""
    xs = sorted(values)
    if not xs:
        return None
    rank = max(1, math.ceil(q / 100 * len(xs)))
    return xs[min(rank, len(xs)) - 1]


def intended_at(op: Operation) -> float:
    """When the batch was meant to go out (a client without a schedule: when it went)."""
    return op.invoked_at if op.intended_at is None else op.intended_at


@dataclass(frozen=True)
class LoadStats:
    """What one phase of a load run measured (batches intended within [start, end)).

    Latency is the response time, from when the schedule meant a batch to go out to its end,
    so a stall that kept batches waiting, to be sent or answered, is in it (no coordinated
    omission); the service time is from when it went. Both over every batch, answered or not:
    one that timed out counts with at least its timeout, one still in flight when the load
    stopped with the time until then."""

    start: float
    end: float
    batches: int
    ok: int
    failed: int
    unknown: int
    unanswered: int  # no answer at all: refused, timed out, cut, in flight at the end
    late: int  # sent more than LATE_AFTER_S after their intended time
    dropped: int  # intended in the phase, never sent (the load stopped first)
    events_acked: int
    events_per_s: float
    error_rate: float  # batches not ok / batches
    latency_ms: Mapping[str, float | None]  # response time: p50, p95, p99, max
    service_ms: Mapping[str, float | None]  # service time: p50, p95, p99, max
    lateness_ms: Mapping[str, float | None]  # sent - intended: p99, max
    freshness_s: Mapping[str, float | None]  # p50, p95, max
    freshness_samples: int
    freshness_missing: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _spread(values: Sequence[float]) -> dict[str, float | None]:
    return {
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "max": max(values, default=None),
    }


def stats_of(
    history: History | Iterable[Operation],
    start: float,
    end: float,
    freshness: Sequence[FreshnessSample] = (),
    *,
    dropped: Sequence[Dropped] = (),
    exclude_process: str = "freshness",
    freshness_missing: int = 0,
    overlapping: bool = False,
) -> LoadStats:
    """Stats of the load's batches (not the sentinels) intended and ended inside [start, end],
    or, with `overlapping`, that were pending at any moment of it: a batch meant to go out
    just before a fault and held up by it belongs to the fault window, not to the phase
    before.

    Throughput counts the events acknowledged inside the window, whenever their batch began:
    batches still in flight at `end` are answered in the next window and counted there, so a
    phase's rate does not read low by the batches its end cut off."""

    def selected(op: Operation) -> bool:
        if overlapping:
            return intended_at(op) < end and op.completed_at >= start
        return start <= intended_at(op) and op.completed_at <= end

    def acked_inside(op: Operation) -> bool:
        if overlapping:
            return selected(op)
        return start <= op.completed_at <= end

    load = [
        op
        for op in (history.operations() if isinstance(history, History) else history)
        if op.process != exclude_process
    ]
    ops = [op for op in load if selected(op)]
    ok = [op for op in ops if op.outcome is Outcome.OK]
    lateness_ms = [(op.invoked_at - intended_at(op)) * 1000 for op in ops]
    fresh = [s.lag_s for s in freshness if start <= s.sent_at < end]
    acked = sum(op.batch_size for op in load if op.outcome is Outcome.OK and acked_inside(op))
    span = max(end - start, 1e-9)
    return LoadStats(
        start=start,
        end=end,
        batches=len(ops),
        ok=len(ok),
        failed=sum(op.outcome is Outcome.FAIL for op in ops),
        unknown=sum(op.outcome is Outcome.UNKNOWN for op in ops),
        unanswered=sum(op.status is None for op in ops),
        late=sum(x > LATE_AFTER_S * 1000 for x in lateness_ms),
        dropped=sum(d.count for d in dropped if start <= d.first_intended < end),
        events_acked=acked,
        events_per_s=acked / span,
        error_rate=(len(ops) - len(ok)) / len(ops) if ops else 0.0,
        latency_ms=_spread([(op.completed_at - intended_at(op)) * 1000 for op in ops]),
        service_ms=_spread([(op.completed_at - op.invoked_at) * 1000 for op in ops]),
        lateness_ms={"p99": percentile(lateness_ms, 99), "max": max(lateness_ms, default=None)},
        freshness_s={
            "p50": percentile(fresh, 50),
            "p95": percentile(fresh, 95),
            "max": max(fresh, default=None),
        },
        freshness_samples=len(fresh),
        freshness_missing=freshness_missing,
    )


# --- SLO gates --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slo:
    """Thresholds a load run must meet; None switches a threshold off."""

    max_error_rate: float | None = 0.01
    # Response time (from the intended send time), as LoadStats.latency_ms.
    max_p95_ms: float | None = None
    max_p99_ms: float | None = None
    min_events_per_s: float | None = None
    min_rate_fraction: float | None = 0.9  # events/s >= fraction x offered rate
    max_freshness_p95_s: float | None = None
    max_convergence_s: float | None = None
    max_late_fraction: float | None = 0.01  # sends later than LATE_AFTER_S / batches
    max_dropped: float | None = 0  # sends never made
    recovery_grace_s: float = 5.0  # chaos: the after-fault phase starts this long after healing
    # Chaos: the load goes on at least this long after the grace, however late the fault
    # healed (a killed service's restart counts), so the after-recovery phase is measured.
    after_recovery_s: float = 10.0
    # The first seconds are not gated: every user opens its connections at once (in CI the
    # batches of the first 0.6 s took 0.4-0.9 s, none after).
    warmup_s: float = 0.0

    def overridden(self, **values: float | None) -> Slo:
        """A copy with the given thresholds replaced (None values are ignored)."""
        return replace(self, **{k: v for k, v in values.items() if v is not None})


_SLO_KEYS = frozenset(f.name for f in fields(Slo))


def load_slo(path: Path | None = None, profile: str = "steady") -> Slo:
    """The SLO of a profile from a TOML file: [default] overlaid with [<profile>].

    Profiles may nest, e.g. ``chaos.fault`` (chaos under load, during the fault window):
    [default], then [chaos], then [chaos.fault]. Unknown keys are an error.
    """
    path = path or DEFAULT_SLO_FILE
    try:
        doc = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"cannot read the SLO file {path}: {exc}") from exc
    merged: dict[str, Any] = {}
    sections = [doc.get("default", {})]
    node: Mapping[str, Any] = doc
    for part in profile.split("."):
        node = node.get(part, {}) if isinstance(node, Mapping) else {}
        sections.append(node)
    for section in sections:
        for key, value in section.items():
            if isinstance(value, Mapping):
                continue  # a nested profile, not a threshold
            if key not in _SLO_KEYS:
                raise ValueError(
                    f"{path}: unknown SLO key {key!r} in a [{profile}] section; "
                    f"known keys are {sorted(_SLO_KEYS)}"
                )
            merged[key] = value
    return Slo(**merged)


@dataclass(frozen=True)
class Breach:
    """One SLO threshold a phase did not meet."""

    threshold: str
    limit: float
    measured: float | None
    phase: str = "run"
    unit: str = ""

    def message(self) -> str:
        seen = "nothing measured" if self.measured is None else f"{self.measured:.6g}{self.unit}"
        op = ">=" if self.threshold.startswith("min_") else "<="
        return (
            f"SLO breached ({self.phase}): {self.threshold} measured {seen}, "
            f"limit {op} {self.limit:g}{self.unit}"
        )


def evaluate(
    slo: Slo,
    stats: LoadStats,
    *,
    offered_rate: float,
    convergence_s: float | None = None,
    phase: str = "run",
) -> list[Breach]:
    """Every threshold of ``slo`` that ``stats`` breaks (empty when all hold)."""
    out: list[Breach] = []

    def above(name: str, limit: float | None, value: float | None, unit: str = "") -> None:
        if limit is not None and (value is None or value > limit):
            out.append(Breach(name, limit, value, phase, unit))

    def below(name: str, limit: float | None, value: float | None, unit: str = "") -> None:
        if limit is not None and (value is None or value < limit):
            out.append(Breach(name, limit, value, phase, unit))

    above("max_error_rate", slo.max_error_rate, stats.error_rate if stats.batches else None)
    above("max_p95_ms", slo.max_p95_ms, stats.latency_ms.get("p95"), " ms")
    above("max_p99_ms", slo.max_p99_ms, stats.latency_ms.get("p99"), " ms")
    late = stats.late / stats.batches if stats.batches else None
    above("max_late_fraction", slo.max_late_fraction, late)
    above("max_dropped", slo.max_dropped, stats.dropped, " sends")
    below("min_events_per_s", slo.min_events_per_s, stats.events_per_s, " events/s")
    if slo.min_rate_fraction is not None and offered_rate > 0:
        below(
            "min_events_per_s",
            slo.min_rate_fraction * offered_rate,
            stats.events_per_s,
            f" events/s ({slo.min_rate_fraction:g} x offered {offered_rate:g})",
        )
    if slo.max_freshness_p95_s is not None:
        p95 = stats.freshness_s.get("p95")
        if stats.freshness_missing:
            p95 = math.inf  # an acknowledged sentinel that never showed up
        above("max_freshness_p95_s", slo.max_freshness_p95_s, p95, " s")
    if convergence_s is not None or slo.max_convergence_s is None:
        above("max_convergence_s", slo.max_convergence_s, convergence_s, " s")
    else:
        out.append(Breach("max_convergence_s", slo.max_convergence_s, None, phase, " s"))
    return out
