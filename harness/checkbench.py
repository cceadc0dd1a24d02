"""The checker benchmark: a synthetic load history of N events, checked, timed and measured.

``generate`` writes outcome files in the locust workers' format (harness.load.outcomes: an
invocation line before each batch, sent at its intended time, a completion line after it) for users that behave like
the locustfile's: batches of fresh ids, an unknown batch resent with the same ids up to three
times, some batches refused, each worker's last batch still in flight. A few resends change
one payload (an id sent with two payloads). Beside the history it computes what a correct
platform would show (first committed payload wins; an unknown or unanswered batch stored or
not, by the seed), adding floats one at a time as a database does, then the seeded errors:
acknowledged events lost, counted twice, or put in the next window.

``measure`` checks those files in a child process, so the figures are the checker's alone:
the outcome files read (parsing included), the oracle built, the check run; wall and CPU
seconds, and the peak resident set size of that process (getrusage ru_maxrss, the kernel's
high-water mark of its RSS). ``python -m harness check-bench --events N`` runs both.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import pickle
import random
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from harness import checker
from harness.checker import EPOCH, Aggregate, Observed, Rules, WindowKey
from harness.load import outcomes

__all__ = ["BenchSpec", "Generated", "Measured", "generate", "main", "measure"]

PREFIX = "B"
T0_US = 1_795_000_020_000_000  # the first batch's time (2026-11-18), in microseconds
URL = "http://ingest-1:8080/v1/events"
STAMPS = 16  # a batch's timestamps cover the last half second, like the locustfile's
STAMP_STEP_US = 500_000 // STAMPS
RESEND_LIMIT = 3
# Value ranges (rtt_ms, jitter_ms, loss_pct, throughput_kbps) as in the locustfile.
HEALTHY = ((5.0, 80.0), (0.1, 8.0), (0.0, 0.5), (5_000.0, 100_000.0))
DEGRADED = ((160.0, 600.0), (31.0, 120.0), (0.0, 1.5), (50.0, 950.0))


@dataclass(frozen=True)
class BenchSpec:
    """The synthetic history: its size, its shape and the errors seeded in what it shows."""

    events: int
    batch: int = 200
    workers: int = 2
    users: int = 10  # per worker
    probes: int = 20
    targets: int = 5
    events_per_s: float = 5_000.0  # sets the history's span: 18M events are an hour
    window_seconds: int = 60
    unknown_rate: float = 0.002  # batches answered unknown (503 or a timeout)
    fail_rate: float = 0.001  # batches refused (nothing stored)
    conflict_rate: float = 0.05  # resends with one payload changed
    stored_if_unknown: float = 0.5  # chance an unknown or unanswered batch was stored
    lost: int = 0
    doubled: int = 0
    moved: int = 0
    seed: int = 1

    def __post_init__(self) -> None:
        if self.events < self.batch or self.batch <= 0:
            raise ValueError(
                f"--events must be at least one batch ({self.batch}), got {self.events}"
            )
        if min(self.workers, self.users, self.probes, self.targets) <= 0:
            raise ValueError("workers, users, probes and targets must be positive")
        if self.events_per_s <= 0 or self.window_seconds <= 0:
            raise ValueError("events_per_s and window_seconds must be positive")
        if min(self.lost, self.doubled, self.moved) < 0:
            raise ValueError("seeded error counts cannot be negative")

    @property
    def seeded(self) -> int:
        return self.lost + self.doubled + self.moved


@dataclass(frozen=True)
class Generated:
    """What ``generate`` wrote: where, how much, and which errors it seeded."""

    folder: Path
    files: int
    bytes: int
    batches: int
    events: int  # events in first attempts (resends send the same ids again)
    windows: int  # windows the platform shows
    seeded: Sequence[str]  # "lost ...", "doubled ...", "moved ..." with the window named
    seconds: float

    @property
    def observed_path(self) -> Path:
        return self.folder / "observed.pickle"


@dataclass(frozen=True)
class Measured:
    """One check of a generated history, measured in the process that did it."""

    engine: str  # columnar | memory
    read_s: float
    oracle_s: float
    check_s: float
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    valid: bool
    wrong_windows: int
    summary: str

    def line(self) -> str:
        return (
            f"{self.engine}: read {self.read_s:.1f} s, oracle {self.oracle_s:.1f} s, check "
            f"{self.check_s:.1f} s; {self.wall_s:.1f} s wall, {self.cpu_s:.1f} s CPU, peak RSS "
            f"{self.peak_rss_mb:,.0f} MB"
        )


# --- the history and what a platform shows ----------------------------------------------------


class _Platform:
    """Windows as a database adds them up: one float at a time, in arrival order."""

    def __init__(self, spec: BenchSpec, pairs: int, values: np.ndarray, pair_of: np.ndarray):
        self.width_us = spec.window_seconds * 1_000_000
        self.first = (T0_US - 1_000_000) // self.width_us
        span_us = spec.events / spec.events_per_s * 1e6
        self.per_pair = int(span_us // self.width_us) + 4  # room for a window moved forward
        size = pairs * self.per_pair
        self.samples = np.zeros(size, dtype=np.int64)
        self.sums = np.zeros((4, size))
        self.maxima = np.full((3, size), -math.inf)  # rtt, jitter, loss
        self.minima = np.full((2, size), math.inf)  # rtt, throughput
        self.values = values
        self.pair_of = pair_of

    def window_of(self, tails: np.ndarray, stamps_us: np.ndarray) -> np.ndarray:
        return self.pair_of[tails] * self.per_pair + (stamps_us // self.width_us - self.first)

    def store(self, tails: np.ndarray, windows: np.ndarray) -> None:
        v = self.values[tails]
        np.add.at(self.samples, windows, 1)
        for f in range(4):
            np.add.at(self.sums[f], windows, v[:, f])
        for n, f in enumerate((0, 1, 2)):
            np.maximum.at(self.maxima[n], windows, v[:, f])
        for n, f in enumerate((0, 3)):
            np.minimum.at(self.minima[n], windows, v[:, f])

    def observed(self, keys: Callable[[int], WindowKey], rules: Rules) -> Observed:
        aggregates: dict[WindowKey, Aggregate] = {}
        for w in np.flatnonzero(self.samples).tolist():
            aggregates[keys(w)] = Aggregate(
                samples=int(self.samples[w]),
                rtt_sum=float(self.sums[0, w]),
                rtt_min=float(self.minima[0, w]),
                rtt_max=float(self.maxima[0, w]),
                jitter_sum=float(self.sums[1, w]),
                jitter_max=float(self.maxima[1, w]),
                loss_sum=float(self.sums[2, w]),
                loss_max=float(self.maxima[2, w]),
                throughput_sum=float(self.sums[3, w]),
                throughput_min=float(self.minima[1, w]),
            )
        diagnoses = {k: d for k, a in aggregates.items() if (d := checker.diagnose(a, rules))}
        return Observed(aggregates, diagnoses)


def _pool(rng: random.Random, spec: BenchSpec) -> tuple[list[str], np.ndarray, np.ndarray]:
    """4096 payloads without id and ts (JSON fragments), their values and their pair index."""
    pairs = [
        (f"{PREFIX}-p{p}", f"t{t}.example.net")
        for p in range(spec.probes)
        for t in range(spec.targets)
    ]
    degraded = set(rng.sample(range(len(pairs)), round(0.2 * len(pairs))))
    fragments, values, pair_of = [], [], []
    for _ in range(4096):
        pair = rng.randrange(len(pairs))
        (r0, r1), (j0, j1), (l0, l1), (t0, t1) = DEGRADED if pair in degraded else HEALTHY
        row = (
            round(rng.uniform(r0, r1), 3),
            round(rng.uniform(j0, j1), 3),
            round(rng.uniform(l0, l1), 3) if rng.random() < 0.4 else 0.0,
            round(rng.uniform(t0, t1), 3),
        )
        probe, target = pairs[pair]
        wire = {"probe_id": probe, "target": target, "rtt_ms": row[0], "jitter_ms": row[1]}
        wire |= {"loss_pct": row[2], "throughput_kbps": row[3]}
        fragments.append(json.dumps(wire, separators=(",", ":"))[1:-1])
        values.append(row)
        pair_of.append(pair)
    return fragments, np.array(values), np.array(pair_of, dtype=np.int64)


@dataclass
class _User:
    """A locustfile ProbeUser's state: its ids and the batch it may resend."""

    process: str
    sent: int = 0
    body: str | None = None  # an unknown batch still to resend
    tails: np.ndarray | None = None
    stamps_us: np.ndarray | None = None
    stored: bool = False  # whether an attempt of the pending batch was stored
    resends: int = 0


def generate(spec: BenchSpec, folder: Path) -> Generated:
    """Write the outcome files of ``spec`` into ``folder`` and what the platform shows beside
    them (observed.pickle); return what was written."""
    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(spec.seed)
    draws = np.random.default_rng(spec.seed)
    fragments, values, pair_of = _pool(rng, spec)
    platform = _Platform(spec, spec.probes * spec.targets, values, pair_of)
    batches = spec.events // spec.batch
    period_us = spec.batch / spec.events_per_s * 1e6
    # Each error lands on the first event of the first batch from a random one on that is
    # acknowledged at its first attempt (an event the oracle fixes).
    kinds = ["lost"] * spec.lost + ["doubled"] * spec.doubled + ["moved"] * spec.moved
    errors = sorted(zip(rng.sample(range(batches), min(batches, len(kinds))), kinds, strict=False))
    seeded: list[str] = []
    files = [
        (folder / f"outcomes-w{w}.jsonl").open("w", encoding="utf-8") for w in range(spec.workers)
    ]
    users = [[_User(f"w{w}.u{u}") for u in range(spec.users)] for w in range(spec.workers)]
    numbers = [0] * spec.workers
    pairs = [
        (f"{PREFIX}-p{p}", f"t{t}.example.net")
        for p in range(spec.probes)
        for t in range(spec.targets)
    ]

    def key(w: int) -> WindowKey:
        pair, offset = divmod(w, platform.per_pair)
        start_us = (platform.first + offset) * platform.width_us
        probe, target = pairs[pair]
        return WindowKey(
            probe, target, EPOCH + timedelta(microseconds=start_us), spec.window_seconds
        )

    first_attempts = 0
    try:
        for b in range(batches):
            worker = b % spec.workers
            user = users[worker][(b // spec.workers) % spec.users]
            now_us = T0_US + round(b * period_us)
            resend = user.body is not None and user.resends < RESEND_LIMIT
            if resend:
                user.resends += 1
                if rng.random() < spec.conflict_rate:
                    _change_one_payload(user, rng, fragments)
            else:
                user.tails = draws.integers(0, len(fragments), spec.batch)
                user.stamps_us = (
                    now_us
                    - (np.arange(user.sent + 1, user.sent + 1 + spec.batch) % STAMPS)
                    * STAMP_STEP_US
                )
                user.body = _body(user, fragments)
                user.sent += spec.batch
                user.stored, user.resends = False, 0
                first_attempts += spec.batch
            assert user.body is not None and user.tails is not None and user.stamps_us is not None
            numbers[worker] += 1
            n = numbers[worker]
            out = files[worker]
            now = now_us / 1e6  # sent on time: the schedule's intended time
            out.write(outcomes.invocation_line(n, now, now, URL, user.process, user.body))
            last = b >= batches - spec.workers  # each worker's last batch: still in flight
            draw = rng.random()
            if last:
                outcome = "unknown"
            elif draw < spec.fail_rate:
                outcome = "fail"
            elif draw < spec.fail_rate + spec.unknown_rate:
                outcome = "unknown"
            else:
                outcome = "ok"
            if not last:
                status = {"ok": 202, "fail": 422, "unknown": 503}[outcome]
                error = "" if outcome == "ok" else f"HTTP {status}: synthetic"
                out.write(outcomes.completion_line(n, now + 0.02, outcome, status, error))
            stores = outcome == "ok" or (
                outcome == "unknown" and rng.random() < spec.stored_if_unknown
            )
            if stores and not user.stored:
                windows = platform.window_of(user.tails, user.stamps_us)
                seeded_error: str | None = None
                if errors and errors[0][0] <= b and not resend and outcome == "ok":
                    seeded_error = errors.pop(0)[1]
                if seeded_error is not None:
                    seeded.append(
                        f"{seeded_error} {user.process} batch at {now_us / 1e6:.3f}: {key(int(windows[0])).label()}"
                    )
                    platform.store(user.tails[1:], windows[1:])
                    if seeded_error != "lost":
                        moved = windows[0] + (seeded_error == "moved")
                        platform.store(user.tails[:1], np.array([moved]))
                        if seeded_error == "doubled":
                            platform.store(user.tails[:1], windows[:1])
                else:
                    platform.store(user.tails, windows)
                user.stored = True
            if outcome == "ok" or outcome == "fail":
                user.body = None  # answered: the next batch has fresh ids
    finally:
        for f in files:
            f.close()
    observed = platform.observed(key, Rules())
    observed_path = folder / "observed.pickle"
    observed_path.write_bytes(pickle.dumps(observed, protocol=pickle.HIGHEST_PROTOCOL))
    paths = sorted(folder.glob("outcomes-*.jsonl"))
    return Generated(
        folder=folder,
        files=len(paths),
        bytes=sum(p.stat().st_size for p in paths),
        batches=batches,
        events=first_attempts,
        windows=len(observed.aggregates),
        seeded=tuple(seeded),
        seconds=time.perf_counter() - started,
    )


def _body(user: _User, fragments: Sequence[str]) -> str:
    """The batch's JSON body, built as the locustfile builds it (ids, ts, pooled payloads)."""
    assert user.tails is not None and user.stamps_us is not None
    ids = f"{PREFIX}.{user.process}"
    stamps = {
        us: (EPOCH + timedelta(microseconds=us)).isoformat(timespec="microseconds")
        for us in set(user.stamps_us.tolist())
    }
    events = ",".join(
        f'{{"event_id":"{ids}.{n}","ts":"{stamps[us]}",{fragments[t]}}}'
        for n, t, us in zip(
            range(user.sent + 1, user.sent + 1 + len(user.tails)),
            user.tails.tolist(),
            user.stamps_us.tolist(),
            strict=True,
        )
    )
    return f'{{"events":[{events}]}}'


def _change_one_payload(user: _User, rng: random.Random, fragments: Sequence[str]) -> None:
    """A resend in which one event's values changed: an id sent with two payloads."""
    assert user.tails is not None
    tails = user.tails.copy()
    tails[rng.randrange(len(tails))] = rng.randrange(len(fragments))
    user.tails = tails
    user.sent -= len(tails)  # the same ids again
    user.body = _body(user, fragments)
    user.sent += len(tails)


# --- checking it ------------------------------------------------------------------------------


def _check_in_child(folder: Path, window_seconds: int, engine: str, memory_limit: str) -> Measured:
    """Runs in a fresh process: read, build the oracle, check; measure all of it."""
    from harness.columnar import ColumnarHistory, OutcomeSource
    from harness.load import read_outcomes

    observed: Observed = pickle.loads((folder / "observed.pickle").read_bytes())
    cpu0 = _cpu_s()
    t0 = time.perf_counter()
    if engine == "columnar":
        with ColumnarHistory.read([OutcomeSource(folder)], memory_limit=memory_limit) as store:
            t1 = time.perf_counter()
            expected = store.expectation(window_seconds)
    else:
        history = read_outcomes(folder)
        t1 = time.perf_counter()
        expected = checker.expectation(history, window_seconds)
        del history
    t2 = time.perf_counter()
    verdict = checker.check(expected, observed.aggregates, observed.diagnoses, Rules())
    t3 = time.perf_counter()
    return Measured(
        engine=engine,
        read_s=t1 - t0,
        oracle_s=t2 - t1,
        check_s=t3 - t2,
        wall_s=t3 - t0,
        cpu_s=_cpu_s() - cpu0,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        valid=verdict.valid,
        wrong_windows=verdict.counts["wrong_windows"],
        summary=verdict.summary(limit=12),
    )


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _child(queue: Any, args: tuple[Any, ...]) -> None:
    try:
        queue.put(("ok", _check_in_child(*args)))
    except BaseException as exc:  # reported by the parent, with the child's message
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def measure(
    generated: Generated,
    window_seconds: int = 60,
    *,
    engine: str = "columnar",
    memory_limit: str = "1GB",
) -> Measured:
    """Check the generated history in a child process and return its figures."""
    if engine not in ("columnar", "memory"):
        raise ValueError(f"engine is columnar or memory, got {engine!r}")
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    args = (generated.folder, window_seconds, engine, memory_limit)
    child = context.Process(target=_child, args=(queue, args), name=f"check-bench {engine}")
    child.start()
    try:
        status, result = queue.get()
    finally:
        child.join()
    if status != "ok":
        raise RuntimeError(f"the {engine} check failed: {result}")
    return result


# --- the command ------------------------------------------------------------------------------


def _record(spec: BenchSpec, made: Generated) -> dict[str, Any]:
    return {"spec": asdict(spec), "generated": asdict(made) | {"folder": str(made.folder)}}


def _kept(spec: BenchSpec, folder: Path) -> Generated | None:
    """The history a previous run with ``--keep`` left in ``folder`` for this same spec."""
    try:
        record = json.loads((folder / "generated.json").read_text())
    except (OSError, ValueError):
        return None
    if record.get("spec") != asdict(spec) or not (folder / "observed.pickle").exists():
        return None
    made = record["generated"]
    return Generated(**(made | {"folder": folder, "seeded": tuple(made["seeded"])}))


def main(
    spec: BenchSpec,
    *,
    engines: Sequence[str] = ("columnar",),
    keep: Path | None = None,
    memory_limit: str = "1GB",
    say: Callable[[str], None] = print,
) -> int:
    """Generate, check with each engine, print the figures; 0 when every verdict is what the
    seeded errors imply (valid with none, invalid with some), 1 otherwise."""
    folder = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="qoe-check-bench-"))
    try:
        made = _kept(spec, folder) if keep else None
        if made is None:
            say(f"check-bench: generating {spec.events:,} events into {folder}")
            made = generate(spec, folder)
            (folder / "generated.json").write_text(json.dumps(_record(spec, made)))
        else:
            say(f"check-bench: {folder} holds this history already (generated.json)")
        say(
            f"generated {made.batches:,} batches ({made.events:,} events, {made.files} outcome "
            f"files, {made.bytes / 1e9:.2f} GB) showing {made.windows:,} windows in "
            f"{made.seconds:.1f} s; seeded errors: {len(made.seeded)}"
        )
        for line in made.seeded[:10]:
            say(f"  seeded: {line}")
        ok = True
        for engine in engines:
            result = measure(made, spec.window_seconds, engine=engine, memory_limit=memory_limit)
            say(result.line())
            say("  " + result.summary.replace("\n", "\n  "))
            expected_valid = not made.seeded
            if result.valid != expected_valid:
                ok = False
                say(
                    f"  WRONG: the verdict is {'valid' if result.valid else 'invalid'} but "
                    f"{len(made.seeded)} errors were seeded"
                )
        say(json.dumps({"spec": asdict(spec), "ok": ok}))
        return 0 if ok else 1
    finally:
        if keep is None:
            shutil.rmtree(folder, ignore_errors=True)
