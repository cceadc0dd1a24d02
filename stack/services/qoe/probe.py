"""Probe agent: generates QoE measurements and delivers them to ingest at least once.

Every generated event is written to a durable sqlite spool BEFORE it is sent, and stays
"pending" until ingest answers 202. Failed or unanswered batches are resent with the SAME
event ids (ingest and the aggregator deduplicate), across restarts too. `GET /ledger` tells the
harness exactly what was generated and what ingest acknowledged. Run with `python -m qoe.probe`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import Counter, Gauge, Histogram
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from qoe import bugs
from qoe.config import (
    ConfigError,
    Env,
    get_choice,
    get_float,
    get_int,
    get_list,
    get_optional_int,
    get_str,
)
from qoe.contract import MAX_EVENTS, InvalidEvent, check_event
from qoe.service import Backoff, HttpServer, http_port, make_app, run, sleep_or_stop

log = logging.getLogger("qoe.probe")

GENERATED = Counter("qoe_probe_generated_total", "Events generated and spooled")
POSTS = Counter("qoe_probe_posts_total", "POSTs to ingest by outcome", ["outcome"])
ACKED = Counter("qoe_probe_acked_total", "Events acknowledged by ingest (202)")
PENDING = Gauge("qoe_probe_pending", "Events spooled and not yet acknowledged")
POST_SECONDS = Histogram(
    "qoe_probe_post_seconds",
    "Time for one POST /v1/events",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)

Range = tuple[float, float]
PROFILES: dict[str, dict[str, Range]] = {
    "healthy": {
        "rtt_ms": (10, 80),
        "jitter_ms": (1, 10),
        "loss_pct": (0, 0.5),
        "throughput_kbps": (5000, 50000),
    },
    "degraded": {
        "rtt_ms": (160, 400),
        "jitter_ms": (35, 90),
        "loss_pct": (0, 0.5),
        "throughput_kbps": (300, 900),
    },
    "lossy": {
        "rtt_ms": (10, 80),
        "jitter_ms": (1, 10),
        "loss_pct": (3, 20),
        "throughput_kbps": (5000, 50000),
    },
}

# --------------------------------------------------------------------------- spool

PENDING_STATE, ACKED_STATE, REJECTED_STATE = "pending", "acked", "rejected"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    body TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    -- 1 only under the seeded bug probe_drop_after_503: no longer sent, still 'pending',
    -- until the process restarts (the bug forgets in memory; the spool still has them).
    abandoned INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS events_to_send ON events (seq) WHERE state = 'pending' AND abandoned = 0;
"""


@dataclass(frozen=True)
class Spooled:
    seq: int
    event_id: str
    body: str  # the event's wire JSON, sent byte for byte on every attempt


class Spool:
    """The probe's durable memory: every event it generated, and what became of it.

    Each open starts a new boot number, persisted before any id is handed out, so
    `<probe_id>:<boot>:<n>` never repeats across restarts.
    """

    def __init__(self, path: Path, probe_id: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves. One connection shared by the
        # loop's tasks (and the test client's thread), never used concurrently.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a spooled event survives a crash
        self._db.executescript(_SCHEMA)
        # What the seeded bug forgot, a new process sends: restoring the stack's defaults
        # restarts the probe, and its ledger is whole again for the scenarios after.
        self._db.execute("UPDATE events SET abandoned = 0 WHERE abandoned = 1")
        self.probe_id = probe_id
        self.boot = self._next_boot()
        self._counter = 0

    def _next_boot(self) -> int:
        with _Transaction(self._db):
            row = self._db.execute("SELECT value FROM meta WHERE key = 'boot'").fetchone()
            boot = int(row[0]) + 1 if row else 1
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('boot', ?)", (str(boot),))
        return boot

    def new_event_id(self) -> str:
        self._counter += 1
        return f"{self.probe_id}:{self.boot}:{self._counter}"

    def add(self, events: Sequence[dict[str, Any]]) -> None:
        """Spool events (state pending) in one durable transaction."""
        rows = [(e["event_id"], json.dumps(e, separators=(",", ":"))) for e in events]
        with _Transaction(self._db):
            self._db.executemany("INSERT INTO events (event_id, body) VALUES (?, ?)", rows)

    def to_send(self, limit: int) -> list[Spooled]:
        """The oldest pending events not abandoned, oldest first."""
        cur = self._db.execute(
            "SELECT seq, event_id, body FROM events"
            " WHERE state = 'pending' AND abandoned = 0 ORDER BY seq LIMIT ?",
            (limit,),
        )
        return [Spooled(*row) for row in cur.fetchall()]

    def record_attempt(self, batch: Sequence[Spooled]) -> None:
        self._update("UPDATE events SET attempts = attempts + 1 WHERE seq = ?", batch)

    def mark(self, batch: Sequence[Spooled], state: str) -> None:
        self._update("UPDATE events SET state = ? WHERE seq = ?", batch, _checked_state(state))

    def abandon(self, batch: Sequence[Spooled]) -> None:
        """Seeded bug probe_drop_after_503: stop sending these; the ledger still says pending."""
        self._update("UPDATE events SET abandoned = 1 WHERE seq = ?", batch)

    def _update(self, sql: str, batch: Sequence[Spooled], *leading: object) -> None:
        with _Transaction(self._db):
            self._db.executemany(sql, [(*leading, s.seq) for s in batch])

    def counts(self) -> dict[str, int]:
        cur = self._db.execute("SELECT state, count(*) FROM events GROUP BY state")
        by_state = dict(cur.fetchall())
        return {
            "generated": sum(by_state.values()),
            "acked": by_state.get(ACKED_STATE, 0),
            "pending": by_state.get(PENDING_STATE, 0),
            "rejected": by_state.get(REJECTED_STATE, 0),
        }

    def has_sendable(self) -> bool:
        return bool(self.to_send(1))

    def ledger_page(self, after_seq: int, limit: int = 1000) -> list[tuple[int, str]]:
        """(seq, NDJSON line) for up to `limit` events after `after_seq`."""
        cur = self._db.execute(
            "SELECT seq, body, state, attempts FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
            (after_seq, limit),
        )
        return [(seq, ledger_line(body, state, attempts)) for seq, body, state, attempts in cur]

    @property
    def stopped(self) -> bool:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'stopped'").fetchone()
        return bool(row and row[0] == "1")

    def set_stopped(self, stopped: bool = True) -> None:
        """Persisted, so a probe restarted after /stop does not start generating again."""
        with _Transaction(self._db):
            self._db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('stopped', ?)", ("1" if stopped else "0",)
            )

    def close(self) -> None:
        self._db.close()


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")


def _checked_state(state: str) -> str:
    if state not in (PENDING_STATE, ACKED_STATE, REJECTED_STATE):
        raise ValueError(f"unknown spool state {state!r}")
    return state


def ledger_line(body: str, state: str, attempts: int) -> str:
    # The stored body is already JSON: splice it in rather than re-encoding every event.
    return f'{{"event":{body},"state":"{state}","attempts":{attempts}}}\n'


# --------------------------------------------------------------------------- generation


def make_measurement(
    rng: random.Random, profile: str, event_id: str, probe_id: str, target: str, now: datetime
) -> dict[str, Any]:
    """One wire event with values drawn uniformly from the profile's ranges."""
    ranges = PROFILES[profile]
    event: dict[str, Any] = {
        "event_id": event_id,
        "probe_id": probe_id,
        "target": target,
        "ts": now.astimezone(UTC).isoformat(timespec="microseconds"),
    }
    for name, (low, high) in ranges.items():
        event[name] = round(rng.uniform(low, high), 3)
    return event


def events_due(elapsed: float, rate: float, produced: int) -> int:
    """How many events to generate now so that `rate` per second holds since the start."""
    return max(0, int(elapsed * rate) - produced)


# --------------------------------------------------------------------------- delivery


def batch_body(batch: Sequence[Spooled]) -> bytes:
    return ('{"events":[' + ",".join(s.body for s in batch) + "]}").encode()


def events_endpoint(url: str) -> str:
    """INGEST_URLS may be base URLs (http://host:port) or full /v1/events URLs."""
    url = url.rstrip("/")
    return url if url.endswith("/v1/events") else url + "/v1/events"


def classify(status: int) -> str:
    """What a POST's status means for the batch: acked, retry or rejected."""
    if status == 202:
        return "acked"
    if status == 429 or status >= 500:
        return "retry"
    if 400 <= status < 500:
        return "rejected"
    return "retry"  # 1xx/3xx/other 2xx: not an acknowledgement, so try again


@dataclass(frozen=True)
class ProbeSettings:
    ingest_urls: list[str]
    probe_id: str
    token: str
    targets: list[str]
    rate: float = 20.0
    profile: str = "healthy"
    batch_size: int = 50
    batch_interval: float = 1.0
    spool_dir: Path = Path("/var/lib/probe")
    seed: int | None = None

    @classmethod
    def from_env(cls, env: Env | None = None) -> ProbeSettings:
        settings = cls(
            ingest_urls=get_list("INGEST_URLS", None, env),
            probe_id=get_str("PROBE_ID", None, env),
            token=get_str("PROBE_TOKEN", None, env),
            targets=get_list("TARGETS", None, env),
            rate=get_float("RATE", 20.0, env, minimum=0, maximum=100_000),
            profile=get_choice("PROFILE", "healthy", tuple(PROFILES), env),
            batch_size=get_int("BATCH_SIZE", 50, env, minimum=1, maximum=MAX_EVENTS),
            batch_interval=get_float("BATCH_INTERVAL_SECONDS", 1.0, env, minimum=0.01),
            spool_dir=Path(get_str("SPOOL_DIR", "/var/lib/probe", env)),
            seed=get_optional_int("SEED", env),
        )
        settings.check_ids()
        return settings

    def check_ids(self) -> None:
        """PROBE_ID and TARGETS must pass ingest's own rules, or every event would be 422."""
        for target in self.targets:
            sample = make_measurement(
                random.Random(0), self.profile, "x:1:1", self.probe_id, target, datetime.now(UTC)
            )
            try:
                check_event(sample, None)
            except InvalidEvent as exc:
                variable = "PROBE_ID" if exc.field == "probe_id" else "TARGETS"
                raise ConfigError(f"{variable} is not valid for ingest: {exc}") from None


class Probe:
    """Generation and delivery over one spool; the HTTP app reads its state."""

    def __init__(
        self,
        settings: ProbeSettings,
        spool: Spool,
        client: httpx.AsyncClient,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.client = client
        self.clock = clock
        self.rng = random.Random(settings.seed)
        self.drop_after_503 = bugs.enabled("probe_drop_after_503")
        self._url_index = 0
        self._target_index = 0
        self.last_contact: float | None = None  # monotonic time of the last HTTP answer

    # generation -------------------------------------------------------------

    def generate(self, count: int) -> list[dict[str, Any]]:
        """Create and spool `count` events, round-robin over the targets."""
        now = self.clock()
        events = []
        for _ in range(count):
            target = self.settings.targets[self._target_index % len(self.settings.targets)]
            self._target_index += 1
            events.append(
                make_measurement(
                    self.rng,
                    self.settings.profile,
                    self.spool.new_event_id(),
                    self.settings.probe_id,
                    target,
                    now,
                )
            )
        if events:
            self.spool.add(events)  # durable before anyone can send them
            GENERATED.inc(len(events))
        return events

    async def generate_forever(self, stop: asyncio.Event, tick: float = 0.05) -> None:
        """Generate at the configured rate except while stopped (/stop until /start)."""
        started, produced = time.monotonic(), 0
        while not stop.is_set():
            if self.spool.stopped:
                # The rate restarts from zero on /start rather than catching up the pause.
                started, produced = time.monotonic(), 0
            else:
                due = events_due(time.monotonic() - started, self.settings.rate, produced)
                produced += len(self.generate(due))
            await sleep_or_stop(stop, tick)

    # delivery ---------------------------------------------------------------

    async def deliver_once(self) -> str:
        """POST the oldest pending batch once: idle, acked, rejected, dropped or retry."""
        batch = self.spool.to_send(self.settings.batch_size)
        if not batch:
            return "idle"
        url = events_endpoint(self.settings.ingest_urls[self._url_index])
        # Round-robin on success, fail-over on error: the next attempt goes to the next URL.
        self._url_index = (self._url_index + 1) % len(self.settings.ingest_urls)
        self.spool.record_attempt(batch)
        started = time.perf_counter()
        try:
            response = await self.client.post(
                url,
                content=batch_body(batch),
                headers={
                    "Authorization": f"Bearer {self.settings.token}",
                    "Content-Type": "application/json",
                },
            )
        except httpx.HTTPError as exc:  # connection refused/reset, timeouts: outcome unknown
            log.warning("POST failed, will resend", extra={"url": url, "error": repr(exc)})
            POSTS.labels("error").inc()
            return "retry"
        POST_SECONDS.observe(time.perf_counter() - started)
        self.last_contact = time.monotonic()
        return self._settle(batch, response, url)

    def _settle(self, batch: list[Spooled], response: httpx.Response, url: str) -> str:
        outcome = classify(response.status_code)
        if outcome == "retry" and response.status_code == 503 and self.drop_after_503:
            self.spool.abandon(batch)  # seeded bug: forget the batch, never acked
            outcome = "dropped"
        elif outcome == "acked":
            self.spool.mark(batch, ACKED_STATE)
            ACKED.inc(len(batch))
        elif outcome == "rejected":
            self.spool.mark(batch, REJECTED_STATE)
            log.error(
                "ingest rejected a batch",
                extra={"status": response.status_code, "body": response.text[:2000], "url": url},
            )
        else:
            log.warning("ingest asked for a retry", extra={"status": response.status_code})
        POSTS.labels(outcome).inc()
        return outcome

    async def deliver_forever(self, stop: asyncio.Event) -> None:
        backoff = Backoff(base=0.1, cap=5.0, rng=random.Random())
        while not stop.is_set():
            PENDING.set(self.spool.counts()["pending"])
            outcome = await self.deliver_once()
            if outcome == "retry":
                await sleep_or_stop(stop, backoff.next_delay())
                continue
            backoff.reset()
            if outcome == "idle":
                await self._wait_for_work(stop)
            elif len(self.spool.to_send(self.settings.batch_size)) < self.settings.batch_size:
                await sleep_or_stop(stop, self.settings.batch_interval)  # no backlog: pace
            # else: a backlog; send the next full batch at once

    async def _wait_for_work(self, stop: asyncio.Event) -> None:
        """Sleep a batch interval; ping ingest when idle so /readyz stays truthful."""
        await sleep_or_stop(stop, self.settings.batch_interval)
        if not self.spool.has_sendable() and not self._contact_within(5.0):
            await self.ping()

    async def ping(self) -> None:
        base = events_endpoint(self.settings.ingest_urls[self._url_index])[: -len("/v1/events")]
        try:
            await self.client.get(base + "/healthz")
            self.last_contact = time.monotonic()
        except httpx.HTTPError:
            self._url_index = (self._url_index + 1) % len(self.settings.ingest_urls)

    def _contact_within(self, seconds: float) -> bool:
        return self.last_contact is not None and time.monotonic() - self.last_contact < seconds

    async def readiness(self) -> dict[str, str]:
        if self._contact_within(15.0):
            return {}
        return {"ingest": "no answer from any ingest URL in the last 15 s"}

    def status(self) -> dict[str, Any]:
        return {**self.spool.counts(), "stopped": self.spool.stopped}


def create_app(probe: Probe) -> Starlette:
    async def ledger(_: Request) -> Response:
        return StreamingResponse(_ledger_lines(probe.spool), media_type="application/x-ndjson")

    async def stop(_: Request) -> Response:
        probe.spool.set_stopped()
        log.info("stop requested: no more events will be generated")
        return JSONResponse(probe.status())

    async def start(_: Request) -> Response:
        probe.spool.set_stopped(False)
        log.info("start requested: generating again")
        return JSONResponse(probe.status())

    async def status(_: Request) -> Response:
        return JSONResponse(probe.status())

    return make_app(
        probe.readiness,
        [
            Route("/ledger", ledger, methods=["GET"]),
            Route("/stop", stop, methods=["POST"]),
            Route("/start", start, methods=["POST"]),
            Route("/status", status, methods=["GET"]),
        ],
    )


async def _ledger_lines(spool: Spool) -> AsyncIterator[str]:
    """The ledger in pages, yielding between pages so generation and delivery keep going."""
    after = 0
    while True:
        page = spool.ledger_page(after)
        if not page:
            return
        after = page[-1][0]
        yield "".join(line for _, line in page)
        await asyncio.sleep(0)


async def main(stop: asyncio.Event) -> None:
    settings = ProbeSettings.from_env()
    spool = Spool(settings.spool_dir / "spool.sqlite3", settings.probe_id)
    log.info(
        "probe starting",
        extra={"probe_id": settings.probe_id, "boot": spool.boot, **spool.counts()},
    )
    timeout = httpx.Timeout(5.0, connect=2.0)
    async with httpx.AsyncClient(timeout=timeout) as client:
        probe = Probe(settings, spool, client)
        http = HttpServer(create_app(probe), http_port())
        await http.start()
        workers = [
            asyncio.create_task(probe.generate_forever(stop)),
            asyncio.create_task(probe.deliver_forever(stop)),
        ]
        await stop.wait()
        # Whatever is in flight stays pending in the spool and is resent after a restart.
        _, slow = await asyncio.wait(workers, timeout=3)
        for task in slow:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        await http.stop()
    spool.close()


if __name__ == "__main__":
    run("probe", main)
