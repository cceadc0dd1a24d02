"""Freshness: one sentinel event at a time, polled until visible in qoe_window_aggregates."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from harness.history import Event, History, Outcome
from harness.polling import wait_until
from harness.stack import Endpoints

SENTINEL_TARGET = "freshness"

# --- freshness: event time -> visible in qoe_window_aggregates --------------------------------


@dataclass(frozen=True)
class FreshnessSample:
    sent_at: float  # the event's ts
    lag_s: float  # until a poll first saw it in qoe_window_aggregates


class FreshnessMonitor:
    """Measures end-to-end freshness while load runs.

    One sentinel event at a time (probe ``probe_id``, a target of its own per sentinel, ts =
    now) goes through ingest; a second thread polls qoe_window_aggregates for the sentinels'
    targets and records, for each, the time from its ts to the first poll that shows it. Every
    sentinel is recorded in ``history`` like any other operation, so the check covers them.
    """

    def __init__(
        self,
        endpoints: Endpoints,
        probe_id: str,
        *,
        interval_s: float = 0.5,
        poll_s: float = 0.05,
    ) -> None:
        self.endpoints = endpoints
        self.probe_id = probe_id
        self.interval_s = interval_s
        self.poll_s = poll_s
        self.history = History()
        self.samples: list[FreshnessSample] = []
        self._sent: dict[str, float] = {}  # target -> ts of sentinels that may be stored
        self._acked: set[str] = set()
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self._stop_sending = threading.Event()
        self._stop_polling = threading.Event()
        self._threads: list[threading.Thread] = []
        self.errors: list[str] = []

    def start(self) -> FreshnessMonitor:
        for target, name in ((self._send_loop, "fresh-send"), (self._poll_loop, "fresh-poll")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _send_loop(self) -> None:
        from harness.workload import IngestClient

        k = 0
        with IngestClient(
            self.endpoints.ingest_urls,
            self.endpoints.ingest_token,
            self.history,
            process="freshness",
            timeout=5.0,
        ) as client:
            while not self._stop_sending.is_set():
                k += 1
                target = f"{SENTINEL_TARGET}-{k}"
                now = time.time()
                event = Event(
                    event_id=f"{self.probe_id}.{k}",
                    probe_id=self.probe_id,
                    target=target,
                    ts=datetime.fromtimestamp(now, UTC),
                    rtt_ms=20.0,
                    jitter_ms=1.0,
                    loss_pct=0.0,
                    throughput_kbps=50_000.0,
                )
                with self._lock:  # before sending: it may be visible before the 202 arrives
                    self._sent[target] = now
                op = client.send([event])
                with self._lock:
                    if op.outcome is Outcome.FAIL:
                        del self._sent[target]  # definitely not stored
                    elif op.outcome is Outcome.OK:
                        self._acked.add(target)
                self._stop_sending.wait(max(0.0, self.interval_s - (time.time() - now)))

    def _poll_loop(self) -> None:
        import psycopg

        conn = None
        while not self._stop_polling.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(
                        self.endpoints.database_dsn, autocommit=True, connect_timeout=3
                    )
                rows = conn.execute(
                    "SELECT target FROM qoe_window_aggregates WHERE probe_id = %s",
                    (self.probe_id,),
                ).fetchall()
                now = time.time()
                with self._lock:
                    for (target,) in rows:
                        if target not in self._seen and target in self._sent:
                            self._seen.add(target)
                            self.samples.append(
                                FreshnessSample(self._sent[target], now - self._sent[target])
                            )
            except Exception as exc:  # the database may be the fault under test
                self.errors.append(f"{type(exc).__name__}: {exc}")
                if conn is not None:
                    conn.close()
                conn = None
            self._stop_polling.wait(self.poll_s)
        if conn is not None:
            conn.close()

    def visible(self) -> int:
        with self._lock:
            return len(self.samples)

    def stop(self, drain_timeout_s: float = 30.0) -> list[FreshnessSample]:
        """Stop sending; wait (up to the timeout) until every acknowledged sentinel is seen."""
        self._stop_sending.set()
        self._threads[0].join(timeout=10)

        def drained() -> bool:
            with self._lock:
                return self._acked <= self._seen

        with contextlib.suppress(AssertionError):  # the missing ones show up in `missing()`
            wait_until(drained, timeout_s=drain_timeout_s, what="acknowledged sentinels visible")
        self._stop_polling.set()
        self._threads[1].join(timeout=10)
        return self.result()

    def result(self) -> list[FreshnessSample]:
        with self._lock:
            return sorted(self.samples, key=lambda s: s.sent_at)

    def missing(self) -> int:
        """Acknowledged sentinels never seen (lag beyond the drain timeout)."""
        with self._lock:
            return len(self._acked - self._seen)

    def __enter__(self) -> FreshnessMonitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if not self._stop_polling.is_set():
            self.stop(drain_timeout_s=0)
