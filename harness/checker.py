"""The checker: what the platform should show (the oracle) against what it shows.

The oracle is built from the history alone: an event id with any ``ok`` operation must be
counted exactly once as one of the payloads it was sent with (first committed wins, and an
``unknown`` attempt may have committed first); an id seen only in ``unknown`` operations is
counted at most once; ``fail``-only ids never. ``check`` is a pure function of that expectation
and the observed SQL views and returns a Verdict (data); ``await_convergence`` polls until the
views match or a deadline passes. Windowing and diagnosis rules follow stack/CONTRACT.md.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from harness.history import Event, History, Operation, Outcome

__all__ = [
    "KINDS",
    "Aggregate",
    "Choice",
    "Expectation",
    "Observed",
    "Rules",
    "Verdict",
    "WindowKey",
    "WindowVerdict",
    "aggregate",
    "aggregate_by_window",
    "await_convergence",
    "check",
    "check_database",
    "converge_on_database",
    "diagnose",
    "expectation",
    "read_observed",
    "stream_observed",
    "sum_tolerance",
    "window_start",
]

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICRO = timedelta(microseconds=1)

# Float sums may be added up in any order by the platform; the error of a naive sum of n terms
# is below (n - 1) * 2**-53 * sum(|x|). Four times the unit roundoff per term is generous.
_REL_PER_TERM = 4 * 2.0**-52
_ABS_TOL = 1e-9

# Work allowed to the choice search per group of coupled windows before bounds checks are used
# (a node costs a few microseconds: 20 000 keep a poll of many windows well under a second).
DEFAULT_SEARCH_BUDGET = 20_000

# Search results by (windows, observed rows, budget); only valid for one Expectation.
SearchCache = dict[tuple[Any, ...], tuple[str, Any]]

SUM_FIELDS = ("rtt_sum", "jitter_sum", "loss_sum", "throughput_sum")
MAX_FIELDS = ("rtt_max", "jitter_max", "loss_max")
MIN_FIELDS = ("rtt_min", "throughput_min")
# Which event value feeds each aggregate field.
_SOURCE = {
    "rtt_sum": "rtt_ms",
    "rtt_min": "rtt_ms",
    "rtt_max": "rtt_ms",
    "jitter_sum": "jitter_ms",
    "jitter_max": "jitter_ms",
    "loss_sum": "loss_pct",
    "loss_max": "loss_pct",
    "throughput_sum": "throughput_kbps",
    "throughput_min": "throughput_kbps",
}


# --- windows and aggregates ---------------------------------------------------------------


def window_start(ts: datetime, seconds: int) -> datetime:
    """The start of the epoch-aligned UTC window holding ``ts`` (a boundary opens its window).

    Computed in integer microseconds, so it is exact for every timestamp the wire can carry.
    """
    if seconds <= 0:
        raise ValueError(f"window length must be a positive number of seconds, got {seconds}")
    if ts.tzinfo is None:
        raise ValueError(f"expected a timezone-aware timestamp, got naive {ts!r}")
    width = seconds * 1_000_000
    micros = (ts - EPOCH) // _MICRO
    return EPOCH + timedelta(microseconds=micros // width * width)


@dataclass(frozen=True, slots=True, order=True)
class WindowKey:
    probe_id: str
    target: str
    window_start: datetime
    window_seconds: int

    def label(self) -> str:
        start = self.window_start.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return f"probe {self.probe_id} target {self.target} window {start}"

    def shifted(self, windows: int) -> WindowKey:
        step = timedelta(seconds=self.window_seconds * windows)
        return replace(self, window_start=self.window_start + step)

    def to_dict(self) -> dict[str, Any]:
        return {
            "probe_id": self.probe_id,
            "target": self.target,
            "window_start": self.window_start.isoformat(),
            "window_seconds": self.window_seconds,
        }


@functools.lru_cache(maxsize=1 << 17)
def key_of(event: Event, window_seconds: int) -> WindowKey:
    """The window an event counts in (memoised: every poll asks again for the same events)."""
    return WindowKey(
        event.probe_id, event.target, window_start(event.ts, window_seconds), window_seconds
    )


@dataclass(frozen=True, slots=True)
class Aggregate:
    """One row of qoe_window_aggregates, without its key."""

    samples: int
    rtt_sum: float
    rtt_min: float
    rtt_max: float
    jitter_sum: float
    jitter_max: float
    loss_sum: float
    loss_max: float
    throughput_sum: float
    throughput_min: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def aggregate(events: Iterable[Event]) -> Aggregate:
    """The exact aggregate of some events (sums correctly rounded with math.fsum)."""
    evs = list(events)
    if not evs:
        raise ValueError("aggregate() needs at least one event; an empty window has no row")
    rtt = [e.rtt_ms for e in evs]
    jitter = [e.jitter_ms for e in evs]
    loss = [e.loss_pct for e in evs]
    tput = [e.throughput_kbps for e in evs]
    return Aggregate(
        samples=len(evs),
        rtt_sum=math.fsum(rtt),
        rtt_min=min(rtt),
        rtt_max=max(rtt),
        jitter_sum=math.fsum(jitter),
        jitter_max=max(jitter),
        loss_sum=math.fsum(loss),
        loss_max=max(loss),
        throughput_sum=math.fsum(tput),
        throughput_min=min(tput),
    )


def aggregate_by_window(events: Iterable[Event], window_seconds: int) -> dict[WindowKey, Aggregate]:
    """Aggregate events per window (what the platform shows if exactly these were counted)."""
    groups: dict[WindowKey, list[Event]] = defaultdict(list)
    for e in events:
        groups[key_of(e, window_seconds)].append(e)
    return {k: aggregate(v) for k, v in groups.items()}


def sum_tolerance(terms: int, magnitude: float) -> float:
    """How far a float sum of ``terms`` non-negative values may be from the exact sum."""
    return _REL_PER_TERM * max(terms, 1) * abs(magnitude) + _ABS_TOL


# --- diagnoses ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rules:
    """Diagnosis thresholds; must match the diagnoser's configuration."""

    high_latency: float = 150.0
    high_jitter: float = 30.0
    packet_loss: float = 2.0
    low_throughput: float = 1000.0


# kind -> (sum field, rule threshold attribute, True when "above" is bad)
KINDS: dict[str, tuple[str, str, bool]] = {
    "high_latency": ("rtt_sum", "high_latency", True),
    "high_jitter": ("jitter_sum", "high_jitter", True),
    "packet_loss": ("loss_sum", "packet_loss", True),
    "low_throughput": ("throughput_sum", "low_throughput", False),
}

Diagnoses = dict[str, tuple[float, float]]


def diagnose(agg: Aggregate, rules: Rules) -> Diagnoses:
    """The diagnoses CONTRACT.md requires for a window: kind -> (observed avg, threshold)."""
    out: Diagnoses = {}
    if agg.samples <= 0:
        return out
    for kind, (sum_field, rule, above) in KINDS.items():
        avg = getattr(agg, sum_field) / agg.samples
        threshold = getattr(rules, rule)
        if (avg > threshold) if above else (avg < threshold):
            out[kind] = (avg, threshold)
    return out


def _diagnosis_problems(
    row: Aggregate, observed: Mapping[str, tuple[float, float]], rules: Rules
) -> list[str]:
    """Compare observed diagnoses with the rules applied to the window's row as it is shown.

    The contract applies each rule to the window's averages, the row's sum / samples, so the
    answer is exact: an average exactly on a threshold is no diagnosis, one a float step past
    it is. (Judging the oracle's own sums instead needs a float slack, and a slack accepts
    either answer just where a wrong comparison shows.) Whether the row itself is right is
    the aggregate check's business.
    """
    expected = diagnose(row, rules)
    problems: list[str] = []
    for kind, (sum_field, rule, above) in KINDS.items():
        avg = getattr(row, sum_field) / row.samples if row.samples > 0 else math.nan
        threshold = getattr(rules, rule)
        op = ">" if above else "<"
        got = observed.get(kind)
        if got is None:
            if kind in expected:
                problems.append(f"diagnosis {kind} missing (avg {avg!r} {op} {threshold:g})")
            continue
        seen_avg, seen_threshold = got
        if kind not in expected:
            problems.append(
                f"unexpected diagnosis {kind} (observed {seen_avg!r}, threshold "
                f"{seen_threshold:g}) but avg {avg!r} is not {op} {threshold:g}"
            )
            continue
        if abs(seen_avg - avg) > _ABS_TOL * max(1.0, abs(avg)):
            problems.append(f"diagnosis {kind} observed value {seen_avg!r}, expected avg {avg!r}")
        if abs(seen_threshold - threshold) > _ABS_TOL * max(1.0, abs(threshold)):
            problems.append(
                f"diagnosis {kind} threshold {seen_threshold:g}, expected {threshold:g} "
                "(do Rules match the diagnoser's configuration?)"
            )
    problems.extend(
        f"unknown diagnosis kind {kind!r} (contract kinds: {', '.join(KINDS)})"
        for kind in sorted(set(observed) - set(KINDS))
    )
    return problems


# --- the oracle -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Choice:
    """An event id whose contribution is not fixed by the history.

    ``required``: it was acknowledged, so exactly one variant counts; otherwise at most one.
    """

    event_id: str
    variants: tuple[Event, ...]
    required: bool


@dataclass(frozen=True)
class Expectation:
    """What the views must show for one history: fixed events per window and open choices.

    ``aggregated``: windows whose fixed events are given only as their exact aggregate (a large
    history read by harness.columnar), not in ``definite``; the check needs no more of them.
    ``expectation()`` leaves it empty.
    """

    window_seconds: int
    definite: Mapping[WindowKey, tuple[Event, ...]]
    choices: tuple[Choice, ...]
    acked_events: int  # ids with at least one ok operation
    unknown_events: int  # ids seen only in unknown operations
    conflicting_events: int  # ids sent with more than one payload (ok or unknown)
    probe_ids: frozenset[str]
    aggregated: Mapping[WindowKey, Aggregate] = field(default_factory=dict)
    _fixed: dict[WindowKey, Aggregate | None] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def windows(self) -> set[WindowKey]:
        """Every window that may hold an event of this history."""
        keys = set(self.definite) | set(self.aggregated)
        for c in self.choices:
            keys.update(key_of(v, self.window_seconds) for v in c.variants)
        return keys

    def fixed(self, key: WindowKey) -> Aggregate | None:
        """The exact aggregate of a window's fixed events, None when it has none (remembered:
        every poll asks again)."""
        if key not in self._fixed:
            given = self.aggregated.get(key)
            events = self.definite.get(key)
            self._fixed[key] = given if given is not None or not events else aggregate(events)
        return self._fixed[key]


def expectation(
    history: History | Iterable[Operation], window_seconds: int = 60, *, realtime: bool = True
) -> Expectation:
    """Build the oracle from a history (see the module docstring for the rules).

    ``realtime``: a payload sent in an operation invoked after the id was first acknowledged
    cannot be the first committed one, so it is not a candidate for that id. This needs the
    operations' clocks to agree (one host, or synchronised hosts); pass False otherwise.
    """
    ops = history.operations() if isinstance(history, History) else tuple(history)
    summarised = next((op for op in ops if op.events_omitted), None)
    if summarised is not None:
        raise ValueError(
            f"an operation of {summarised.process} invoked at {summarised.invoked_at} carries "
            f"only the count of its {summarised.events_omitted} events (a load run's history, "
            "whose events stay in the outcome files); build the oracle from those files with "
            "harness.columnar.ColumnarHistory"
        )
    first_ack: dict[str, float] = {}
    for op in ops:
        if op.outcome is Outcome.OK:
            for e in op.events:
                first_ack[e.event_id] = min(first_ack.get(e.event_id, math.inf), op.completed_at)
    variants: dict[str, dict[Event, None]] = {}  # dict as an ordered set
    probes: set[str] = set()
    for op in ops:
        if op.outcome is Outcome.FAIL:
            continue  # definitely not stored: contributes nothing
        for e in op.events:
            probes.add(e.probe_id)
            if realtime and op.invoked_at > first_ack.get(e.event_id, math.inf):
                continue  # sent after the id was already stored: a duplicate, ignored
            variants.setdefault(e.event_id, {})[e] = None
    definite: dict[WindowKey, list[Event]] = defaultdict(list)
    choices: list[Choice] = []
    conflicting = 0
    for event_id, vs in variants.items():
        payloads = tuple(vs)
        acked = event_id in first_ack
        conflicting += len(payloads) > 1
        if acked and len(payloads) == 1:
            definite[key_of(payloads[0], window_seconds)].append(payloads[0])
        else:
            choices.append(Choice(event_id, payloads, required=acked))
    return Expectation(
        window_seconds=window_seconds,
        definite={k: tuple(v) for k, v in definite.items()},
        choices=tuple(choices),
        acked_events=len(first_ack),
        unknown_events=len(variants) - len(first_ack),
        conflicting_events=conflicting,
        probe_ids=frozenset(probes),
    )


# --- verdicts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class WindowVerdict:
    key: WindowKey
    expected: Aggregate | None  # exact: the oracle; choice: the matching assignment
    observed: Aggregate | None
    ok: bool
    problem: str = ""
    mode: str = "exact"  # exact | choice | bounds
    optional: int = 0  # events that may or may not count in this window
    expected_samples: tuple[int, int] | None = None  # (min, max) when choices are involved
    expected_diagnoses: Mapping[str, tuple[float, float]] | None = None
    observed_diagnoses: Mapping[str, tuple[float, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key.to_dict(),
            "label": self.key.label(),
            "ok": self.ok,
            "mode": self.mode,
            "problem": self.problem,
            "optional": self.optional,
            "expected_samples": list(self.expected_samples) if self.expected_samples else None,
            "expected": self.expected.to_dict() if self.expected else None,
            "observed": self.observed.to_dict() if self.observed else None,
            "expected_diagnoses": (
                {k: list(v) for k, v in self.expected_diagnoses.items()}
                if self.expected_diagnoses is not None
                else None
            ),
            "observed_diagnoses": {k: list(v) for k, v in self.observed_diagnoses.items()},
        }


@dataclass(frozen=True)
class Verdict:
    valid: bool
    windows: tuple[WindowVerdict, ...]
    counts: Mapping[str, int]
    convergence_s: float | None = None  # last acknowledgement -> first valid poll
    polls: int = 0
    waited_s: float | None = None  # how long await_convergence polled

    def wrong(self) -> tuple[WindowVerdict, ...]:
        return tuple(w for w in self.windows if not w.ok)

    def to_dict(self, include_ok: bool = False) -> dict[str, Any]:
        shown = self.windows if include_ok else self.wrong()
        return {
            "valid": self.valid,
            "counts": dict(self.counts),
            "convergence_s": self.convergence_s,
            "polls": self.polls,
            "waited_s": self.waited_s,
            "summary": self.summary(),
            "windows": [w.to_dict() for w in shown],
        }

    def summary(self, limit: int = 10) -> str:
        """A message naming the wrong windows with expected vs observed."""
        c = self.counts
        tally = (
            f"{c.get('acked_events', 0)} acknowledged events, {c.get('unknown_events', 0)} "
            f"unknown, {c.get('conflicting_events', 0)} sent with conflicting payloads"
        )
        modes = ", ".join(f"{c.get(m, 0)} {m}" for m in ("exact", "choice", "bounds"))
        timing = ""
        if self.convergence_s is not None:
            timing = (
                f"; converged {self.convergence_s:.2f}s after the last ack ({self.polls} polls)"
            )
        elif self.waited_s is not None:
            timing = f"; still wrong after waiting {self.waited_s:.1f}s ({self.polls} polls)"
        wrong = self.wrong()
        if self.valid:
            return f"valid: {len(self.windows)} windows match ({modes}); {tally}{timing}"
        lines = [
            f"INVALID: {len(wrong)} of {len(self.windows)} windows wrong ({modes}); {tally}{timing}"
        ]
        lines.extend(f"  {w.key.label()} [{w.mode}]: {w.problem}" for w in wrong[:limit])
        if len(wrong) > limit:
            lines.append(f"  ... and {len(wrong) - limit} more wrong windows (see the report)")
        return "\n".join(lines)


# --- comparing one window ---------------------------------------------------------------------


def _num(x: float) -> str:
    return f"{x:.10g}"


def _aggregate_problems(expected: Aggregate, observed: Aggregate) -> list[str]:
    """Differences between an exactly known aggregate and the observed one."""
    diff = observed.samples - expected.samples
    if diff > 0:
        return [
            f"samples expected {expected.samples} observed {observed.samples} "
            f"({diff:+d}: acknowledged events counted twice?)"
        ]
    if diff < 0:
        return [
            f"samples expected {expected.samples} observed {observed.samples} "
            f"({diff:+d}: acknowledged events lost?)"
        ]
    problems: list[str] = []
    for f in SUM_FIELDS:
        e, o = getattr(expected, f), getattr(observed, f)
        tol = sum_tolerance(expected.samples, max(abs(e), abs(o)))
        if abs(e - o) > tol:
            problems.append(
                f"{f} expected {_num(e)} observed {_num(o)} "
                f"(off by {o - e:+.3g}, tolerance {tol:.2g})"
            )
    for f in (*MAX_FIELDS, *MIN_FIELDS):
        e, o = getattr(expected, f), getattr(observed, f)
        if e != o:
            problems.append(f"{f} expected {_num(e)} observed {_num(o)}")
    if problems:
        problems.append("(same count, other values: a wrong payload or one mixed from two?)")
    return problems


def _check_exact(
    key: WindowKey,
    expected: Aggregate,
    observed: Aggregate | None,
    observed_diag: Mapping[str, tuple[float, float]],
    rules: Rules,
) -> WindowVerdict:
    if observed is None:
        problem = (
            f"window missing: expected {expected.samples} samples, observed none "
            "(acknowledged events lost, or put in another window?)"
        )
        return WindowVerdict(
            key,
            expected,
            None,
            False,
            problem,
            expected_diagnoses=diagnose(expected, rules),
            observed_diagnoses=observed_diag,
        )
    problems = _aggregate_problems(expected, observed)
    problems += _diagnosis_problems(observed, observed_diag, rules)
    return WindowVerdict(
        key,
        expected,
        observed,
        not problems,
        "; ".join(problems),
        expected_diagnoses=diagnose(observed, rules),
        observed_diagnoses=observed_diag,
    )


def _check_extra(
    key: WindowKey,
    observed: Aggregate | None,
    observed_diag: Mapping[str, tuple[float, float]],
) -> WindowVerdict:
    if observed is not None:
        problem = (
            f"unexpected window with {observed.samples} samples: no event of this history "
            "can be in it (events put in the wrong window, or never acknowledged?)"
        )
    else:
        problem = (
            f"diagnoses {sorted(observed_diag)} for a window with no aggregate row "
            "(stale diagnoses, or diagnoser reading another window?)"
        )
    return WindowVerdict(key, None, observed, False, problem, observed_diagnoses=observed_diag)


# --- windows with choices: search, then bounds ----------------------------------------------

# Per-window search state: (samples, 4 sums, 3 maxima, 2 minima) as an immutable tuple, so that
# backtracking restores it exactly instead of subtracting floats.
_State = tuple[int, float, float, float, float, float, float, float, float, float]
_EMPTY: _State = (0, 0.0, 0.0, 0.0, 0.0, -math.inf, -math.inf, -math.inf, math.inf, math.inf)


def _values(e: Event) -> tuple[float, float, float, float]:
    return (e.rtt_ms, e.jitter_ms, e.loss_pct, e.throughput_kbps)


def _add(state: _State, e: Event) -> _State:
    n, rs, js, ls, ts, rmax, jmax, lmax, rmin, tmin = state
    r, j, lo, t = _values(e)
    return (
        n + 1,
        rs + r,
        js + j,
        ls + lo,
        ts + t,
        max(rmax, r),
        max(jmax, j),
        max(lmax, lo),
        min(rmin, r),
        min(tmin, t),
    )


def _present(agg: Aggregate | None) -> Aggregate:
    assert agg is not None, "a window without a choice has fixed events"
    return agg


def _state_of(a: Aggregate | None) -> _State:
    # The starting point: the fixed events, summed exactly.
    if a is None:
        return _EMPTY
    return (
        a.samples,
        a.rtt_sum,
        a.jitter_sum,
        a.loss_sum,
        a.throughput_sum,
        a.rtt_max,
        a.jitter_max,
        a.loss_max,
        a.rtt_min,
        a.throughput_min,
    )


def _aggregate_of_state(s: _State) -> Aggregate | None:
    if s[0] == 0:
        return None
    return Aggregate(s[0], s[1], s[8], s[5], s[2], s[6], s[3], s[7], s[4], s[9])


def _obs_tuple(o: Aggregate | None) -> _State:
    if o is None:
        return _EMPTY
    return (
        o.samples,
        o.rtt_sum,
        o.jitter_sum,
        o.loss_sum,
        o.throughput_sum,
        o.rtt_max,
        o.jitter_max,
        o.loss_max,
        o.rtt_min,
        o.throughput_min,
    )


def _fits(e: Event, obs: Aggregate | None) -> bool:
    """Can this payload be among the events of an observed window at all (min/max wise)?"""
    if obs is None:
        return False
    return (
        obs.rtt_min <= e.rtt_ms <= obs.rtt_max
        and e.jitter_ms <= obs.jitter_max
        and e.loss_pct <= obs.loss_max
        and e.throughput_kbps >= obs.throughput_min
    )


@dataclass
class _Component:
    """Windows coupled by choices whose variants land in them."""

    windows: list[WindowKey]
    choices: list[Choice]


def _components(exp: Expectation) -> tuple[list[_Component], set[WindowKey]]:
    """Group windows by shared choices (union-find); return also the windows with no choice."""
    parent: dict[WindowKey, WindowKey] = {}

    def find(k: WindowKey) -> WindowKey:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for k in exp.windows():
        parent[k] = k
    choice_keys: list[list[WindowKey]] = []
    for c in exp.choices:
        keys = sorted({key_of(v, exp.window_seconds) for v in c.variants})
        choice_keys.append(keys)
        for k in keys[1:]:
            ra, rb = find(keys[0]), find(k)
            if ra != rb:
                parent[rb] = ra
    groups: dict[WindowKey, _Component] = {}
    for c, keys in zip(exp.choices, choice_keys, strict=True):
        comp = groups.setdefault(find(keys[0]), _Component([], []))
        comp.choices.append(c)
    touched = {k for keys in choice_keys for k in keys}
    for k in sorted(touched):
        groups[find(k)].windows.append(k)
    return list(groups.values()), set(parent) - touched


class _BudgetExceeded(Exception):
    pass


def _search(
    comp: _Component,
    exp: Expectation,
    observed: Mapping[WindowKey, Aggregate],
    budget: int,
) -> dict[WindowKey, _State] | None:
    """Find a choice assignment reproducing every observed window of the component.

    Depth-first over the choices with pruning on sample counts and (non-negative) sums.
    Returns the per-window states of a match, None if none exists; raises _BudgetExceeded.
    """
    w_index = {k: i for i, k in enumerate(comp.windows)}
    obs = [_obs_tuple(observed.get(k)) for k in comp.windows]
    present = [k in observed for k in comp.windows]
    # Options per choice: (window index, event) or None for "not counted". Payloads that cannot
    # be in their window (absent, or outside its min/max) are dropped up front.
    options: list[list[tuple[int, Event] | None]] = []
    for c in comp.choices:
        opts: list[tuple[int, Event] | None] = []
        seen: set[tuple[int, tuple[float, ...]]] = set()
        for v in c.variants:
            wi = w_index[key_of(v, exp.window_seconds)]
            sig = (wi, _values(v))
            if sig in seen or not _fits(v, observed.get(comp.windows[wi])):
                continue  # same contribution as another variant, or impossible here
            seen.add(sig)
            opts.append((wi, v))
        if not c.required:
            # Tried last: after a timeout or a 503 the events were usually stored after all.
            opts.append(None)
        if not opts:
            return None  # an acknowledged id none of whose payloads can be where it must be
        options.append(opts)
    # Visit choices grouped by window so windows are closed (and fully checked) early.
    order = sorted(
        range(len(options)),
        key=lambda i: min((o[0] for o in options[i] if o is not None), default=len(comp.windows)),
    )
    options = [options[i] for i in order]
    n = len(options)
    touch = [sorted({o[0] for o in opts if o is not None}) for opts in options]
    # For each window, the choices that can add to it, and suffix sums over them: how many
    # more samples / how much more of each sum could still arrive after a given choice.
    nw = len(comp.windows)
    touching: list[list[int]] = [[] for _ in range(nw)]
    best: list[dict[int, tuple[float, float, float, float]]] = []
    for i, opts in enumerate(options):
        top: dict[int, list[float]] = {}
        for o in opts:
            if o is not None:
                cur = top.setdefault(o[0], [0.0, 0.0, 0.0, 0.0])
                for f, x in enumerate(_values(o[1])):
                    cur[f] = max(cur[f], x)
        best.append({w: (v[0], v[1], v[2], v[3]) for w, v in top.items()})
        for w in touch[i]:
            touching[w].append(i)
    suffix_count = [[len(ids) - p for p in range(len(ids) + 1)] for ids in touching]
    suffix_sum: list[list[list[float]]] = []
    for w, ids in enumerate(touching):
        rows = [[0.0] * 4 for _ in range(len(ids) + 1)]
        for p in range(len(ids) - 1, -1, -1):
            rows[p] = [rows[p + 1][f] + best[ids[p]][w][f] for f in range(4)]
        suffix_sum.append(rows)
    after: list[dict[int, int]] = [{} for _ in range(n)]
    for w, ids in enumerate(touching):
        for p, i in enumerate(ids):
            after[i][w] = p + 1
    last = [ids[-1] if ids else -1 for ids in touching]
    state = [_state_of(exp.fixed(k)) for k in comp.windows]
    tol = [
        [
            sum_tolerance(max(obs[w][0], state[w][0] + suffix_count[w][0]), obs[w][1 + f])
            for f in range(4)
        ]
        for w in range(nw)
    ]

    def closed_ok(w: int) -> bool:
        s, o = state[w], obs[w]
        if s[0] == 0:
            return not present[w]
        return (
            present[w]
            and s[0] == o[0]
            and s[5:] == o[5:]
            and all(abs(s[1 + f] - o[1 + f]) <= tol[w][f] for f in range(4))
        )

    def feasible(i: int, windows: Iterable[int]) -> bool:
        for w in windows:
            s, o, p = state[w], obs[w], after[i][w]
            if s[0] > o[0] or s[0] + suffix_count[w][p] < o[0]:
                return False
            for f in range(4):
                if s[1 + f] > o[1 + f] + tol[w][f]:
                    return False
                if s[1 + f] + suffix_sum[w][p][f] < o[1 + f] - tol[w][f]:
                    return False
            if last[w] == i and not closed_ok(w):
                return False
        return True

    # Windows no choice can change must already match.
    if not all(closed_ok(w) for w in range(nw) if last[w] < 0):
        return None
    if n == 0:
        return {k: state[w] for w, k in enumerate(comp.windows)}
    pick = [-1] * n
    saved: list[tuple[int, _State] | None] = [None] * n
    nodes = 0
    i = 0
    while 0 <= i < n:
        undo = saved[i]
        if undo is not None:
            state[undo[0]] = undo[1]
            saved[i] = None
        pick[i] += 1
        if pick[i] >= len(options[i]):
            pick[i] = -1
            i -= 1
            continue
        nodes += 1
        if nodes > budget:
            raise _BudgetExceeded
        opt = options[i][pick[i]]
        if opt is not None:
            w, ev = opt
            saved[i] = (w, state[w])
            state[w] = _add(state[w], ev)
        if feasible(i, touch[i]):
            i += 1
    if i < 0:
        return None
    return {k: state[w] for w, k in enumerate(comp.windows)}


def _bounds_problems(
    key: WindowKey,
    fixed: Aggregate | None,
    candidates: Sequence[tuple[Choice, list[Event]]],
    observed: Aggregate | None,
) -> tuple[list[str], tuple[int, int]]:
    """Necessary conditions for one window when the exact choice is not searched."""
    count = fixed.samples if fixed is not None else 0
    lo = count + sum(1 for c, vs in candidates if c.required and len(vs) == len(c.variants))
    hi = count + len(candidates)
    if observed is None:
        if lo > 0:
            return [f"window missing: expected at least {lo} samples, observed none"], (lo, hi)
        return [], (lo, hi)
    problems: list[str] = []
    if not lo <= observed.samples <= hi:
        extra = "counted twice?" if observed.samples > hi else "lost?"
        problems.append(
            f"samples expected {lo}..{hi} observed {observed.samples} (acknowledged events {extra})"
        )
        return problems, (lo, hi)
    for f, src in zip(
        SUM_FIELDS, ("rtt_ms", "jitter_ms", "loss_pct", "throughput_kbps"), strict=True
    ):
        base = getattr(fixed, f) if fixed is not None else 0.0
        low = base + math.fsum(
            min(getattr(v, src) for v in vs)
            for c, vs in candidates
            if c.required and len(vs) == len(c.variants)
        )
        high = base + math.fsum(max(getattr(v, src) for v in vs) for _, vs in candidates)
        o = getattr(observed, f)
        tol = sum_tolerance(hi, max(high, o))
        if not low - tol <= o <= high + tol:
            problems.append(f"{f} expected {_num(low)}..{_num(high)} observed {_num(o)}")
    for f in (*MAX_FIELDS, *MIN_FIELDS):
        src = _SOURCE[f]
        possible = {getattr(v, src) for _, vs in candidates for v in vs}
        o = getattr(observed, f)
        is_max = f in MAX_FIELDS
        # The fixed events' extreme bounds the row; past it, only that extreme itself or a
        # candidate's value can be the row's (every other fixed value is on the near side).
        extreme = getattr(fixed, f) if fixed is not None else None
        beyond = extreme is not None and (o < extreme if is_max else o > extreme)
        if beyond or not (o == extreme or o in possible):
            problems.append(f"{f} observed {_num(o)} is no value any counted event can give")
    return problems, (lo, hi)


def _cached_search(
    comp: _Component,
    exp: Expectation,
    observed: Mapping[WindowKey, Aggregate],
    budget: int,
    cache: SearchCache | None,
) -> tuple[str, dict[WindowKey, _State] | None]:
    """("choice", match or None) or ("bounds", None) when the budget ran out.

    Polls mostly see the same rows again, so results are remembered per observed rows.
    """
    key = (tuple(comp.windows), tuple(observed.get(k) for k in comp.windows), budget)
    if cache is not None and key in cache:
        return cache[key]
    try:
        result: tuple[str, dict[WindowKey, _State] | None] = (
            "choice",
            _search(comp, exp, observed, budget),
        )
    except _BudgetExceeded:
        result = ("bounds", None)
    if cache is not None:
        cache[key] = result
    return result


def _component_problem(
    comp: _Component,
    exp: Expectation,
    observed: Mapping[WindowKey, Aggregate],
    candidates: Mapping[WindowKey, Sequence[tuple[Choice, list[Event]]]],
) -> str:
    """Why a group of coupled windows has no matching choice, when no single window shows it."""
    definite = sum(a.samples for k in comp.windows if (a := exp.fixed(k)) is not None)
    required = sum(c.required for c in comp.choices)
    lo, hi = definite + required, definite + len(comp.choices)
    seen = sum(observed[k].samples for k in comp.windows if k in observed)
    where = ", ".join(k.label() for k in comp.windows[:4])
    ids = ", ".join(c.event_id for c in comp.choices[:5])
    if seen < lo or seen > hi:
        hint = "acknowledged events lost?" if seen < lo else "events counted twice?"
        return (
            f"samples across the coupled windows ({where}) expected {lo}..{hi} observed {seen} "
            f"({hint}); open ids: {ids}"
        )
    return (
        f"samples {seen} within {lo}..{hi} across the coupled windows, but no choice among "
        f"{len(comp.choices)} unacknowledged or conflicting ids ({ids}) reproduces the values "
        "(a payload mixed from two variants, or an id counted in two windows?)"
    )


def _check_component(
    comp: _Component,
    exp: Expectation,
    observed: Mapping[WindowKey, Aggregate],
    observed_diag: Mapping[WindowKey, Mapping[str, tuple[float, float]]],
    rules: Rules,
    budget: int,
    cache: SearchCache | None,
) -> list[WindowVerdict]:
    candidates: dict[WindowKey, list[tuple[Choice, list[Event]]]] = defaultdict(list)
    for c in comp.choices:
        per_window: dict[WindowKey, list[Event]] = defaultdict(list)
        for v in c.variants:
            per_window[key_of(v, exp.window_seconds)].append(v)
        for k, vs in per_window.items():
            candidates[k].append((c, vs))
    mode, found = _cached_search(comp, exp, observed, budget, cache)
    component_problem = _component_problem(comp, exp, observed, candidates)
    verdicts: list[WindowVerdict] = []
    for k in comp.windows:
        fixed = exp.fixed(k)
        obs = observed.get(k)
        diag = observed_diag.get(k, {})
        problems, span = _bounds_problems(k, fixed, candidates[k], obs)
        if found is not None:
            problems = []  # the search reproduced every window of the component exactly
            expected = _aggregate_of_state(found[k])
        else:
            expected = fixed
        if mode == "choice" and found is None and not problems:
            problems.append(component_problem)
        if not problems and obs is not None:
            # Accepted: the diagnoses must follow the rules applied to what is shown.
            problems += _diagnosis_problems(obs, diag, rules)
        elif not problems and diag:
            problems.append(f"diagnoses {sorted(diag)} for a window with no aggregate row")
        verdicts.append(
            WindowVerdict(
                k,
                expected,
                obs,
                not problems,
                "; ".join(problems),
                mode=mode,
                optional=len(candidates[k]),
                expected_samples=span,
                expected_diagnoses=diagnose(obs, rules) if obs is not None else None,
                observed_diagnoses=diag,
            )
        )
    return verdicts


def _hint_shifts(verdicts: list[WindowVerdict]) -> list[WindowVerdict]:
    """Point out a surplus next to an equal deficit: events landing one window off."""
    delta: dict[WindowKey, int] = {}
    for v in verdicts:
        if v.ok or v.mode != "exact":
            continue
        e = v.expected.samples if v.expected else 0
        o = v.observed.samples if v.observed else 0
        if e != o:
            delta[v.key] = o - e
    out: list[WindowVerdict] = []
    for v in verdicts:
        d = delta.get(v.key)
        hint = ""
        if d:
            for step, where in ((-1, "before"), (1, "after")):
                if delta.get(v.key.shifted(step)) == -d:
                    hint = (
                        f" [matches {-d:+d} in the window {where}: events near a window "
                        "boundary put in the wrong window?]"
                    )
                    break
        out.append(replace(v, problem=v.problem + hint) if hint else v)
    return out


def check(
    exp: Expectation,
    observed_aggregates: Mapping[WindowKey, Aggregate],
    observed_diagnoses: Mapping[WindowKey, Mapping[str, tuple[float, float]]],
    rules: Rules,
    *,
    budget: int = DEFAULT_SEARCH_BUDGET,
    cache: SearchCache | None = None,
) -> Verdict:
    """Compare the oracle with the observed views; pure, returns a Verdict.

    ``cache`` (optional) remembers choice searches between calls with the same expectation.
    """
    components, plain = _components(exp)
    verdicts: list[WindowVerdict] = [
        _check_exact(
            k,
            _present(exp.fixed(k)),
            observed_aggregates.get(k),
            observed_diagnoses.get(k, {}),
            rules,
        )
        for k in plain
    ]
    for comp in components:
        verdicts += _check_component(
            comp, exp, observed_aggregates, observed_diagnoses, rules, budget, cache
        )
    known = exp.windows()
    for k in sorted((set(observed_aggregates) | set(observed_diagnoses)) - known):
        verdicts.append(_check_extra(k, observed_aggregates.get(k), observed_diagnoses.get(k, {})))
    verdicts = _hint_shifts(sorted(verdicts, key=lambda v: v.key))
    counts = {
        "acked_events": exp.acked_events,
        "unknown_events": exp.unknown_events,
        "conflicting_events": exp.conflicting_events,
        "windows": len(verdicts),
        "wrong_windows": sum(not v.ok for v in verdicts),
        "exact": sum(v.mode == "exact" for v in verdicts),
        "choice": sum(v.mode == "choice" for v in verdicts),
        "bounds": sum(v.mode == "bounds" for v in verdicts),
    }
    return Verdict(valid=counts["wrong_windows"] == 0, windows=tuple(verdicts), counts=counts)


# --- reading the platform and waiting for it -------------------------------------------------


@dataclass(frozen=True)
class Observed:
    aggregates: Mapping[WindowKey, Aggregate]
    diagnoses: Mapping[WindowKey, Mapping[str, tuple[float, float]]]


_AGG_SQL = """
SELECT probe_id, target, window_start, window_seconds, samples,
       rtt_sum, rtt_min, rtt_max, jitter_sum, jitter_max,
       loss_sum, loss_max, throughput_sum, throughput_min
FROM qoe_window_aggregates WHERE probe_id = ANY(%s)
"""
_DIAG_SQL = """
SELECT probe_id, target, window_start, kind, observed, threshold
FROM qoe_diagnoses WHERE probe_id = ANY(%s)
"""


def read_observed(conn: Any, probe_ids: Iterable[str], window_seconds: int = 60) -> Observed:
    """Read both contract views for these probe ids with a psycopg (v3) connection.

    ``window_seconds`` keys the diagnoses (that view has no window length) unless an aggregate
    row names the window. Aggregate rows of any length are kept so a wrong length shows up.
    """
    ids = sorted(set(probe_ids))
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(_AGG_SQL, (ids,))
        agg_rows = cur.fetchall()
        cur.execute(_DIAG_SQL, (ids,))
        diag_rows = cur.fetchall()
    return _observed_of(agg_rows, diag_rows, window_seconds)


def stream_observed(
    conn: Any, probe_ids: Iterable[str], window_seconds: int = 60, *, rows_per_fetch: int = 10_000
) -> Observed:
    """``read_observed`` for views too large to fetch at once (a load run's windows).

    Server-side cursors hand the rows over ``rows_per_fetch`` at a time, each turned into its
    window at once, so neither the client library nor Python holds the result twice.
    """
    ids = sorted(set(probe_ids))
    with conn.transaction():
        with conn.cursor(name="qoe_aggregates") as cur:
            cur.itersize = rows_per_fetch
            cur.execute(_AGG_SQL, (ids,))
            builder = _ObservedBuilder(window_seconds)
            for row in cur:
                builder.add_aggregate(row)
        with conn.cursor(name="qoe_diagnoses") as cur:
            cur.itersize = rows_per_fetch
            cur.execute(_DIAG_SQL, (ids,))
            for row in cur:
                builder.add_diagnosis(row)
    return builder.observed()


def _observed_of(
    agg_rows: Iterable[Sequence[Any]], diag_rows: Iterable[Sequence[Any]], window_seconds: int
) -> Observed:
    builder = _ObservedBuilder(window_seconds)
    for row in agg_rows:
        builder.add_aggregate(row)
    for row in diag_rows:
        builder.add_diagnosis(row)
    return builder.observed()


class _ObservedBuilder:
    """Rows of the two views into windows; probe ids, targets and starts are shared between
    rows (many windows of one probe), so a large result costs one key and one row each."""

    def __init__(self, window_seconds: int) -> None:
        self.window_seconds = window_seconds
        self.aggregates: dict[WindowKey, Aggregate] = {}
        self.lengths: dict[tuple[str, str, datetime], int] = {}
        self.diagnoses: dict[WindowKey, dict[str, tuple[float, float]]] = defaultdict(dict)
        self._shared: dict[Any, Any] = {}

    def _one(self, value: Any) -> Any:
        return self._shared.setdefault(value, value)

    def add_aggregate(self, row: Sequence[Any]) -> None:
        probe, target, start, seconds, samples, *vals = row
        probe, target = self._one(probe), self._one(target)
        start = self._one(start.astimezone(UTC))
        key = WindowKey(probe, target, start, int(seconds))
        self.aggregates[key] = Aggregate(int(samples), *(float(v) for v in vals))
        self.lengths[(probe, target, start)] = int(seconds)

    def add_diagnosis(self, row: Sequence[Any]) -> None:
        probe, target, start, kind, value, threshold = row
        start = start.astimezone(UTC)
        seconds = self.lengths.get((probe, target, start), self.window_seconds)
        key = WindowKey(probe, target, start, seconds)
        self.diagnoses[key][kind] = (float(value), float(threshold))

    def observed(self) -> Observed:
        return Observed(self.aggregates, dict(self.diagnoses))


def _default_retry() -> tuple[type[BaseException], ...]:
    try:
        import psycopg
    except ImportError:  # pragma: no cover - psycopg is a dependency
        return (OSError,)
    return (psycopg.OperationalError, OSError)


PATIENCE = 3.0  # a state still converging at its deadline waits at most this many timeouts


def await_convergence(
    exp: Expectation,
    read: Callable[[], Observed],
    rules: Rules,
    timeout_s: float,
    since: float,
    *,
    interval_s: float = 0.05,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
    retry_on: tuple[type[BaseException], ...] | None = None,
) -> Verdict:
    """Poll ``read()`` until ``check`` is valid or ``timeout_s`` passes.

    A state still converging when the deadline comes (more samples in the views than at the
    last deadline or the first poll: the aggregators are behind, on a slow or busy machine)
    gets half the timeout more, up to PATIENCE times the timeout in all; one that stopped
    changing is judged then. Lost or doubled events never converge, so this waits longer only
    for a verdict that would still change, and never accepts one that is not valid.

    ``since`` is when the last acknowledgement arrived (time.time()); the convergence time is
    from then to the first valid poll. On timeout the last invalid verdict is returned with
    ``waited_s`` set. Connection errors while reading are retried until the deadline.
    """
    retry = _default_retry() if retry_on is None else retry_on
    started = clock()
    deadline, limit = started + timeout_s, started + timeout_s * PATIENCE
    polls = 0
    cache: SearchCache = {}
    last: Verdict | None = None
    samples_before: int | None = (
        None  # samples in the views at the first poll, then at each deadline
    )
    samples = 0
    last_error: BaseException | None = None
    while True:
        polls += 1
        try:
            obs = read()
        except retry as exc:
            last_error = exc
        else:
            last = check(exp, obs.aggregates, obs.diagnoses, rules, cache=cache)
            now = clock()
            if last.valid:
                return replace(
                    last, convergence_s=max(0.0, now - since), polls=polls, waited_s=now - started
                )
            samples = sum(a.samples for a in obs.aggregates.values())
            if samples_before is None:
                samples_before = samples
        now = clock()
        if now >= deadline:
            if samples_before is None or samples <= samples_before or now >= limit:
                break
            samples_before, deadline = samples, min(limit, now + timeout_s / 2)
        sleep(min(interval_s, max(0.0, deadline - now)))
    if last is None:
        raise TimeoutError(
            f"could not read the views for {timeout_s:.1f}s ({polls} attempts); last error: "
            f"{last_error!r}. Is the database up and DATABASE_URL right?"
        )
    return replace(last, polls=polls, waited_s=clock() - started)


def convergence_stats(times: Iterable[float]) -> dict[str, float | None]:
    """Median and p95 (nearest rank) of convergence times, for reports."""
    xs = sorted(times)
    if not xs:
        return {"count": 0, "median": None, "p95": None, "max": None}
    p95 = xs[min(len(xs) - 1, math.ceil(0.95 * len(xs)) - 1)]
    return {"count": len(xs), "median": statistics.median(xs), "p95": p95, "max": xs[-1]}


def check_database(
    history: History,
    database_dsn: str,
    probe_ids: Sequence[str],
    window_seconds: int,
    rules: Rules,
    timeout_s: float,
    *,
    interval_s: float = 0.05,
) -> Verdict:
    """The oracle of `history` against a stack's read views, polled until they agree or the
    deadline passes; convergence is timed from the history's last acknowledgement."""
    return converge_on_database(
        expectation(history, window_seconds),
        history.last_ok_at() or time.time(),
        database_dsn,
        probe_ids,
        rules,
        timeout_s,
        interval_s=interval_s,
    )


def converge_on_database(
    expected: Expectation,
    since: float,
    database_dsn: str,
    probe_ids: Sequence[str],
    rules: Rules,
    timeout_s: float,
    *,
    interval_s: float = 0.05,
    read: Callable[[Any, Iterable[str], int], Observed] = read_observed,
) -> Verdict:
    """An oracle against a stack's read views, polled until they agree or the deadline passes;
    convergence is timed from ``since`` (the last acknowledgement). ``read``: how the views are
    read (``stream_observed`` for a load run's many windows)."""
    import psycopg

    with psycopg.connect(database_dsn, autocommit=True, connect_timeout=5) as conn:
        return await_convergence(
            expected,
            lambda: read(conn, probe_ids, expected.window_seconds),
            rules,
            timeout_s=timeout_s,
            since=since,
            interval_s=interval_s,
        )
