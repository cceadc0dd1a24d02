"""The workload: what the harness sends, and the client that records every attempt.

EventGenerator makes seeded, reproducible batches shaped like a probe's (several windows,
events exactly on window boundaries, late events, profiles that trigger each diagnosis).
The Hypothesis strategies ``events``/``batches`` make adversarial ones (duplicates, reused ids
with other payloads, boundary and out-of-order timestamps). IngestClient sends batches and
records each attempt in a History as ok / fail / unknown, and ``settle`` retries unknown
batches until acknowledged, as a real probe would.
"""

from __future__ import annotations

import itertools
import json
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from types import TracebackType

import httpx
from hypothesis import strategies as st

from harness.history import Event, History, Operation, Outcome

__all__ = [
    "PROFILES",
    "EventGenerator",
    "IngestClient",
    "SettleError",
    "batches",
    "classify_error",
    "classify_status",
    "events",
    "rekey",
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


class EventGenerator:
    """Seeded, reproducible batches of events with ids ``<run_prefix>-<counter>``.

    Timestamps fall mostly in the current and the three previous windows, some exactly on a
    window boundary, some late (hours back), always within [now - 24 h + margin, now].
    In the ``mixed`` profile each (probe, target) pair keeps one profile (so its windows get
    clear diagnoses) with a tenth of its events from another profile.
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
        self.window_seconds = window_seconds
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
        return Event(
            event_id=f"{self.run_prefix}-{self._counter}",
            probe_id=probe,
            target=target,
            ts=_from_micros(self._timestamp_us(now_us)),
            rtt_ms=rtt,
            jitter_ms=jitter,
            loss_pct=loss,
            throughput_kbps=tput,
        )

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


def _values(lo: float, hi: float, special: Sequence[float]) -> st.SearchStrategy[float]:
    plain = st.floats(lo, hi, allow_nan=False, allow_infinity=False).map(lambda x: round(x, 3))
    return st.one_of(st.sampled_from(tuple(special)), plain, plain)


def events(
    probe_ids: Sequence[str] = ("hyp-probe",),
    targets: Sequence[str] = ("target-a", "target-b"),
    now: float | None = None,
    window_seconds: int = 60,
    id_prefix: str = "hyp",
    windows_back: int = 5,
) -> st.SearchStrategy[Event]:
    """Single events with fresh-looking ids, boundary-heavy timestamps and threshold values.

    ``now`` is fixed when the strategy is made, so replayed examples keep their timestamps.
    """
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

    return st.builds(
        Event,
        event_id=st.integers(1, 10**6).map(lambda i: f"{id_prefix}-{i}"),
        probe_id=st.sampled_from(tuple(probe_ids)),
        target=st.sampled_from(tuple(targets)),
        ts=ts(),
        rtt_ms=_values(0.0, 2_000.0, (0.0, 150.0, 150.001, 60_000.0)),
        jitter_ms=_values(0.0, 200.0, (0.0, 30.0, 30.001)),
        loss_pct=_values(0.0, 100.0, (0.0, 2.0, 2.001, 100.0)),
        throughput_kbps=_values(0.0, 200_000.0, (0.0, 999.999, 1000.0)),
    )


def batches(
    probe_ids: Sequence[str] = ("hyp-probe",),
    targets: Sequence[str] = ("target-a", "target-b"),
    now: float | None = None,
    window_seconds: int = 60,
    id_prefix: str = "hyp",
    max_batches: int = 5,
    max_batch_size: int = 20,
) -> st.SearchStrategy[list[list[Event]]]:
    """Sequences of batches: new events, exact duplicates (inside a batch and across batches)
    and ids reused with another payload. Ids are ``<id_prefix>-<n>``, numbered per example;
    use ``rekey`` to make them unique per example against a live stack.
    """
    single = events(probe_ids, targets, now, window_seconds, id_prefix)

    @st.composite
    def build(draw: st.DrawFn) -> list[list[Event]]:
        sent: list[Event] = []
        fresh = itertools.count(1)
        out: list[list[Event]] = []
        for _ in range(draw(st.integers(1, max_batches))):
            batch: list[Event] = []
            for _ in range(draw(st.integers(1, max_batch_size))):
                seen = sent + batch
                kind = draw(st.sampled_from(("new", "new", "new", "repeat", "reuse")))
                if kind == "repeat" and seen:
                    e = draw(st.sampled_from(seen))  # the same payload again
                elif kind == "reuse" and seen:
                    base = draw(st.sampled_from(seen))  # same id, another payload
                    e = replace(draw(single), event_id=base.event_id)
                else:
                    e = replace(draw(single), event_id=f"{id_prefix}-{next(fresh)}")
                batch.append(e)
            sent.extend(batch)
            out.append(batch)
        return out

    return build()


def rekey(batch_list: Sequence[Sequence[Event]], run_prefix: str) -> list[list[Event]]:
    """The same batches with ids prefixed by ``run_prefix`` (unique per live example, since
    the platform remembers ids for 48 h). Equal ids stay equal."""
    return [[replace(e, event_id=f"{run_prefix}.{e.event_id}") for e in b] for b in batch_list]


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

    def send(self, events: Sequence[Event], url: str | None = None) -> Operation:
        """POST one batch and record the attempt; never raises for network trouble."""
        endpoint = self._endpoint(url) if url else self.next_url()
        body = json.dumps({"events": [e.to_wire() for e in events]}, allow_nan=False)
        invoked = self._clock()
        status: int | None = None
        error = ""
        duplicates: int | None = None
        try:
            resp = self._http.post(endpoint, content=body.encode(), headers=self.default_headers())
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
