"""Aggregator service: JetStream events -> per-window aggregates in PostgreSQL, exactly once.

Each fetched batch becomes ONE transaction running AGGREGATE_SQL: remember the batch's event
ids in processed_events, keep only the ids that were new, add those events to their windows.
Messages are acked only after the commit, so a crash anywhere leads to redelivery, and the
processed_events filter makes redelivery harmless. Run with `python -m qoe.aggregator`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec
import nats.errors
import psycopg
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from prometheus_client import Counter, Gauge, Histogram

from qoe import bugs, db, natsutil
from qoe.config import Env, get_int, get_str
from qoe.contract import InvalidEvent, ValidEvent, decode_canonical, distinct_by_id
from qoe.service import (
    Backoff,
    HttpServer,
    RateLimitedLog,
    http_port,
    make_app,
    run,
    sleep_or_stop,
)
from qoe.windows import window_start

log = logging.getLogger("qoe.aggregator")
noisy = RateLimitedLog(log)

CONSUMER = "aggregator"

BATCHES = Counter("qoe_aggregator_batches_total", "Batches committed")
EVENTS = Counter("qoe_aggregator_events_total", "Events by outcome", ["outcome"])
POISON = Counter("qoe_aggregator_poison_total", "Undecodable messages terminated")
BATCH_SIZE = Histogram(
    "qoe_aggregator_batch_messages",
    "Messages per fetched batch",
    buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000),
)
COMMIT_SECONDS = Histogram(
    "qoe_aggregator_commit_seconds",
    "Time to run and commit one batch transaction",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
DB_ERRORS = Counter("qoe_aggregator_db_errors_total", "Failed batch transactions", ["kind"])
LAG = Gauge("qoe_aggregator_consumer_pending", "Messages not yet delivered to the consumer")
ACK_PENDING = Gauge("qoe_aggregator_consumer_ack_pending", "Messages delivered, not yet acked")


# One statement per batch. The batch is one JSON parameter: an array of rows
# [event_id, event_ts, probe_id, target, window_start, rtt, jitter, loss, throughput]
# (see BatchRows.params; psycopg dumping nine Python lists cost more than the statement).
# jsonb, not json: the array is parsed once, where json re-parsed each row for every ->>.
#  - batch:    the rows, numbered in batch order; for an id given twice the first one wins.
#  - inserted: ids claimed now; ids already in processed_events (or claimed by a concurrent
#              transaction that commits) are skipped. Sorted so replicas lock in one order.
#  - fresh:    the batch rows whose id was claimed now.
#  - upserted adds fresh rows to their windows, in key order (again: one lock order), and
#    bumps version so the diagnoser re-judges the window.
# Result: one row per changed window, each carrying the number of events counted now.
_BATCH_CTE = """
WITH numbered AS (
    SELECT r->>0 AS event_id, (r->>1)::timestamptz AS event_ts, r->>2 AS probe_id,
           r->>3 AS target, (r->>4)::timestamptz AS window_start, (r->>5)::float8 AS rtt,
           (r->>6)::float8 AS jitter, (r->>7)::float8 AS loss, (r->>8)::float8 AS throughput,
           ord
    FROM jsonb_array_elements(%(rows)s::jsonb) WITH ORDINALITY AS b(r, ord)
),
batch AS (
    SELECT DISTINCT ON (event_id) * FROM numbered ORDER BY event_id, ord
),
inserted AS (
    INSERT INTO processed_events (event_id, event_ts)
    SELECT event_id, event_ts FROM batch ORDER BY event_id
    ON CONFLICT (event_id) DO NOTHING
    RETURNING event_id
),
"""
_FRESH_DEDUP = "fresh AS (SELECT batch.* FROM batch JOIN inserted USING (event_id)),"
# Seeded bug aggregator_no_dedup: every message counts, seen before or not.
_FRESH_NO_DEDUP = "fresh AS (SELECT * FROM numbered),"
_UPSERT = """
agg AS (
    SELECT probe_id, target, window_start, count(*) AS samples,
           sum(rtt) AS rtt_sum, min(rtt) AS rtt_min, max(rtt) AS rtt_max,
           sum(jitter) AS jitter_sum, max(jitter) AS jitter_max,
           sum(loss) AS loss_sum, max(loss) AS loss_max,
           sum(throughput) AS throughput_sum, min(throughput) AS throughput_min
    FROM fresh
    GROUP BY probe_id, target, window_start
),
upserted AS (
INSERT INTO window_aggregates AS w (
    probe_id, target, window_start, window_seconds, samples,
    rtt_sum, rtt_min, rtt_max, jitter_sum, jitter_max, loss_sum, loss_max,
    throughput_sum, throughput_min, version, diagnosed_version, updated_at)
SELECT probe_id, target, window_start, %(window_seconds)s::integer, samples,
       rtt_sum, rtt_min, rtt_max, jitter_sum, jitter_max, loss_sum, loss_max,
       throughput_sum, throughput_min, 1, 0, now()
FROM agg
ORDER BY probe_id, target, window_start
ON CONFLICT (probe_id, target, window_start, window_seconds) DO UPDATE SET
    samples = w.samples + excluded.samples,
    rtt_sum = w.rtt_sum + excluded.rtt_sum,
    rtt_min = least(w.rtt_min, excluded.rtt_min),
    rtt_max = greatest(w.rtt_max, excluded.rtt_max),
    jitter_sum = w.jitter_sum + excluded.jitter_sum,
    jitter_max = greatest(w.jitter_max, excluded.jitter_max),
    loss_sum = w.loss_sum + excluded.loss_sum,
    loss_max = greatest(w.loss_max, excluded.loss_max),
    throughput_sum = w.throughput_sum + excluded.throughput_sum,
    throughput_min = least(w.throughput_min, excluded.throughput_min),
    version = w.version + 1,
    updated_at = now()
RETURNING probe_id, target, window_start, window_seconds
)
SELECT probe_id, target, window_start, window_seconds, (SELECT count(*) FROM fresh) AS new_events
FROM upserted
"""

AGGREGATE_SQL = _BATCH_CTE + _FRESH_DEDUP + _UPSERT
"""The batch statement; parameters from BatchRows.params(window_seconds)."""
AGGREGATE_SQL_NO_DEDUP = _BATCH_CTE + _FRESH_NO_DEDUP + _UPSERT

PRUNE_SQL = """
DELETE FROM processed_events
WHERE event_id IN (
    SELECT event_id FROM processed_events
    WHERE event_ts < now() - make_interval(hours => %(hours)s)
    LIMIT %(limit)s
)
"""


@dataclass(frozen=True)
class WindowKey:
    probe_id: str
    target: str
    window_start: datetime
    window_seconds: int

    def as_json(self) -> dict[str, Any]:
        return {
            "probe_id": self.probe_id,
            "target": self.target,
            "window_start": self.window_start.isoformat(),
            "window_seconds": self.window_seconds,
        }


_ROWS_JSON = msgspec.json.Encoder()


@dataclass(frozen=True)
class BatchRows:
    """A batch as parallel columns, ready to be unnested by AGGREGATE_SQL."""

    event_id: list[str]
    event_ts: list[datetime]
    probe_id: list[str]
    target: list[str]
    window_start: list[datetime]
    rtt: list[float]
    jitter: list[float]
    loss: list[float]
    throughput: list[float]

    def __len__(self) -> int:
        return len(self.event_id)

    def params(self, window_seconds: int) -> dict[str, Any]:
        """The statement's parameters: the rows as one JSON array (msgspec encodes it in C;
        floats in shortest round-trip form, timestamps in UTC with microseconds, so
        PostgreSQL reads back exactly these values)."""
        rows = zip(
            self.event_id,
            self.event_ts,
            self.probe_id,
            self.target,
            self.window_start,
            self.rtt,
            self.jitter,
            self.loss,
            self.throughput,
            strict=True,
        )
        return {"rows": _ROWS_JSON.encode(list(rows)).decode(), "window_seconds": window_seconds}


def prepare_batch(
    events: Sequence[ValidEvent],
    window_seconds: int,
    *,
    dedup: bool = True,
    off_by_one: bool | None = None,
) -> BatchRows:
    """Columns for AGGREGATE_SQL, with window_start computed here (windows.window_start).

    With dedup, a repeated id keeps its first occurrence in batch order, and rows are sorted
    by event_id (the order processed_events rows are locked in). Without dedup (seeded bug
    aggregator_no_dedup), every event is kept in batch order.
    """
    rows = distinct_by_id(events) if dedup else list(events)
    if dedup:
        rows.sort(key=lambda e: e.event_id)
    return BatchRows(
        event_id=[e.event_id for e in rows],
        event_ts=[e.ts for e in rows],
        probe_id=[e.probe_id for e in rows],
        target=[e.target for e in rows],
        window_start=[window_start(e.ts, window_seconds, off_by_one=off_by_one) for e in rows],
        # float(): psycopg sends a list as one array and refuses to mix int and float.
        rtt=[float(e.rtt_ms) for e in rows],
        jitter=[float(e.jitter_ms) for e in rows],
        loss=[float(e.loss_pct) for e in rows],
        throughput=[float(e.throughput_kbps) for e in rows],
    )


@dataclass(frozen=True)
class BatchResult:
    changed: list[WindowKey]
    new_events: int  # events counted now; the rest of the batch had been counted before


async def apply_batch(
    conn: psycopg.AsyncConnection, rows: BatchRows, window_seconds: int, *, dedup: bool = True
) -> BatchResult:
    """Run the batch statement in its own transaction and commit it.

    The connection must not be in a transaction already. Component tests call this directly.
    """
    sql = AGGREGATE_SQL if dedup else AGGREGATE_SQL_NO_DEDUP
    async with conn.transaction():
        cur = await conn.execute(sql, rows.params(window_seconds))
        result = await cur.fetchall()
    changed = [WindowKey(*row[:4]) for row in result]
    return BatchResult(changed, int(result[0][4]) if result else 0)


def decode_messages(payloads: Sequence[bytes]) -> tuple[list[tuple[int, ValidEvent]], list[int]]:
    """Decode payloads; (index, event) for the good ones and the indexes of poison ones."""
    good: list[tuple[int, ValidEvent]] = []
    poison: list[int] = []
    for index, payload in enumerate(payloads):
        try:
            good.append((index, decode_canonical(payload)))
        except InvalidEvent:
            poison.append(index)
    return good, poison


@dataclass(frozen=True)
class AggregatorSettings:
    database_url: str
    window_seconds: int = 60
    fetch_batch: int = 500
    ack_wait_seconds: int = 10
    retention_hours: int = 48
    prune_every_seconds: int = 600

    @classmethod
    def from_env(cls, env: Env | None = None) -> AggregatorSettings:
        return cls(
            database_url=get_str("DATABASE_URL", None, env),
            window_seconds=get_int("WINDOW_SECONDS", 60, env, minimum=1),
            fetch_batch=get_int("FETCH_BATCH", 500, env, minimum=1, maximum=10_000),
            ack_wait_seconds=get_int("ACK_WAIT_SECONDS", 10, env, minimum=1),
            retention_hours=get_int("DEDUP_RETENTION_HOURS", 48, env, minimum=25),
            prune_every_seconds=get_int("PRUNE_INTERVAL_SECONDS", 600, env, minimum=1),
        )


class Aggregator:
    """The fetch -> transaction -> ack loop, with its database connection and health."""

    def __init__(self, settings: AggregatorSettings, nc: NATS) -> None:
        self.settings = settings
        self.nc = nc
        self.conn: psycopg.AsyncConnection | None = None
        self.db_problem: str | None = None
        self.subscribed = False
        self.dedup = not bugs.enabled("aggregator_no_dedup")
        self.ack_first = bugs.enabled("aggregator_ack_before_commit")

    async def subscribe(self, stream: str, stop: asyncio.Event) -> Any | None:
        """The durable pull subscription, retried until JetStream answers."""
        config = ConsumerConfig(
            durable_name=CONSUMER,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=float(self.settings.ack_wait_seconds),
            max_ack_pending=20_000,
            max_deliver=-1,  # never give up on an event; poison ones are term()ed instead
            deliver_policy=DeliverPolicy.ALL,
            filter_subject=natsutil.EVENTS_SUBJECT,
        )
        backoff = Backoff(base=0.2, cap=5.0)
        js: JetStreamContext = self.nc.jetstream()
        while not stop.is_set():
            try:
                sub = await js.pull_subscribe(
                    natsutil.EVENTS_SUBJECT, durable=CONSUMER, stream=stream, config=config
                )
                self.subscribed = True
                return sub
            except Exception as exc:
                noisy.warning("subscribe", "cannot create consumer yet: %r", exc)
                await sleep_or_stop(stop, backoff.next_delay())
        return None

    async def run(self, sub: Any, stop: asyncio.Event) -> None:
        backoff = Backoff(base=0.1, cap=5.0)
        while not stop.is_set():
            try:
                msgs = await sub.fetch(self.settings.fetch_batch, timeout=1.0)
            except nats.errors.TimeoutError:
                continue  # nothing to do
            except Exception as exc:
                noisy.warning("fetch", "fetch failed: %r", exc)
                await sleep_or_stop(stop, backoff.next_delay())
                continue
            backoff.reset()
            await self.process(msgs, stop)
        await db.close_quietly(self.conn)

    async def process(self, msgs: list[Msg], stop: asyncio.Event) -> None:
        """One batch: terminate poison, commit the rest, then ack (or nack on shutdown)."""
        BATCH_SIZE.observe(len(msgs))
        good, poison = decode_messages([m.data for m in msgs])
        for index in poison:
            log.error("terminating undecodable message", extra={"payload": msgs[index].data[:200]})
            POISON.inc()
            await _quietly(msgs[index].term())
        held = [msgs[i] for i, _ in good]
        if not held:
            return
        if self.ack_first:  # seeded bug aggregator_ack_before_commit
            await _ack_all(held)
        rows = prepare_batch([e for _, e in good], self.settings.window_seconds, dedup=self.dedup)
        keepalive = asyncio.create_task(_keep_in_progress(held, self.settings.ack_wait_seconds / 3))
        try:
            result = await self.commit(rows, stop)
        finally:
            keepalive.cancel()
        if result is None:  # shutting down without a commit: hand the batch back now
            if not self.ack_first:
                await asyncio.gather(*(_quietly(m.nak()) for m in held))
            return
        if not self.ack_first:
            await _ack_all(held)
        BATCHES.inc()
        EVENTS.labels("new").inc(result.new_events)
        EVENTS.labels("duplicate").inc(max(0, len(held) - result.new_events))
        await self.hint(result.changed)

    async def commit(self, rows: BatchRows, stop: asyncio.Event) -> BatchResult | None:
        """Commit the batch, retrying until it works; None if `stop` came first.

        While the database is down the batch stays here (process() keeps its ack_wait from
        expiring), so it is neither acked nor bounced between replicas.
        """
        backoff = Backoff(base=0.1, cap=5.0)
        while True:
            try:
                result = await self._commit_once(rows)
                self.db_problem = None
                return result
            except db.RETRY_NOW as exc:
                DB_ERRORS.labels("conflict").inc()
                log.info("transaction conflict, retrying: %s", exc)
                await asyncio.sleep(0.01 + backoff.next_delay() / 10)
                continue
            except Exception as exc:  # connection lost, server gone, read-only after failover
                DB_ERRORS.labels("unavailable").inc()
                self.db_problem = f"{type(exc).__name__}: {exc}".strip()
                noisy.warning("commit", "batch transaction failed: %s", self.db_problem)
                self.conn = await db.close_quietly(self.conn)
                if self.ack_first:  # already acked: the seeded bug loses the batch
                    log.error(
                        "dropping acked batch after failed commit", extra={"events": len(rows)}
                    )
                    return BatchResult([], 0)
            if await sleep_or_stop(stop, backoff.next_delay()):
                return None

    async def _commit_once(self, rows: BatchRows) -> BatchResult:
        # A fresh connection after any failure: the URL may now lead to another server.
        if self.conn is None or self.conn.closed:
            self.conn = await db.connect(self.settings.database_url)
        started = time.perf_counter()
        result = await apply_batch(self.conn, rows, self.settings.window_seconds, dedup=self.dedup)
        COMMIT_SECONDS.observe(time.perf_counter() - started)
        return result

    async def hint(self, changed: list[WindowKey]) -> None:
        """Tell the diagnoser which windows changed; best effort (it also sweeps on a timer)."""
        if not changed:
            return
        payload = json.dumps({"windows": [k.as_json() for k in changed]}).encode()
        try:
            await self.nc.publish(natsutil.WINDOWS_CHANGED_SUBJECT, payload)
        except Exception as exc:
            noisy.warning("hint", "could not publish window hint: %r", exc)

    async def readiness(self) -> dict[str, str]:
        problems: dict[str, str] = {}
        if not self.nc.is_connected:
            problems["nats"] = "disconnected"
        elif not self.subscribed:
            problems["nats"] = "consumer not created yet"
        if self.db_problem:
            problems["postgres"] = self.db_problem
        return problems


async def _keep_in_progress(msgs: list[Msg], every: float) -> None:
    """Extend ack_wait while a batch is held (slow commit or database down)."""
    while True:
        await asyncio.sleep(every)
        await asyncio.gather(*(_quietly(m.in_progress()) for m in msgs))


async def _ack_all(msgs: list[Msg]) -> None:
    # One after the other: an ack only buffers a publish, and a task per message (gather)
    # cost more than the acks themselves.
    for m in msgs:
        await _quietly(m.ack())


async def _quietly(awaitable: Any) -> None:
    """Acks/naks are best effort: a lost ack means a redelivery, which dedup absorbs."""
    try:
        await awaitable
    except Exception as exc:
        noisy.warning("ack", "ack/nak failed: %r", exc)


async def watch_lag(sub: Any, stop: asyncio.Event, every: float = 5.0) -> None:
    while not await sleep_or_stop(stop, every):
        try:
            info = await sub.consumer_info()
            LAG.set(info.num_pending or 0)
            ACK_PENDING.set(info.num_ack_pending or 0)
        except Exception as exc:
            noisy.warning("lag", "consumer info failed: %r", exc)


async def prune(settings: AggregatorSettings, stop: asyncio.Event, limit: int = 5000) -> None:
    """Forget processed ids long past their event time, in small deletes (short locks)."""
    while not await sleep_or_stop(stop, settings.prune_every_seconds):
        try:
            async with await db.connect(settings.database_url) as conn:
                deleted = limit
                while deleted == limit and not stop.is_set():
                    cur = await conn.execute(
                        PRUNE_SQL, {"hours": settings.retention_hours, "limit": limit}
                    )
                    deleted = cur.rowcount
            log.info("pruned processed_events")
        except Exception as exc:
            noisy.warning("prune", "pruning processed_events failed: %r", exc)


async def main(stop: asyncio.Event) -> None:
    settings = AggregatorSettings.from_env()
    stream = natsutil.StreamSettings.from_env()
    urls = natsutil.nats_urls()
    health = db.DbHealth(settings.database_url)
    state: dict[str, Any] = {"aggregator": None}

    async def readiness() -> dict[str, str]:
        agg: Aggregator | None = state["aggregator"]
        problems = {"nats": "not connected yet"} if agg is None else await agg.readiness()
        return {**health.report(), **problems}

    http = HttpServer(make_app(readiness), http_port())
    await http.start()
    health_task = asyncio.create_task(health.run(stop))
    if not await db.migrate_forever(settings.database_url, stop):
        return await _shutdown(http, health_task, None)
    nc = await natsutil.connect(urls, "qoe-aggregator", stop)
    if nc is None or not await natsutil.ensure_stream_forever(nc.jetstream(), stream, stop):
        return await _shutdown(http, health_task, nc)
    aggregator = Aggregator(settings, nc)
    state["aggregator"] = aggregator
    sub = await aggregator.subscribe(stream.name, stop)
    if sub is not None:
        helpers = [
            asyncio.create_task(watch_lag(sub, stop)),
            asyncio.create_task(prune(settings, stop)),
        ]
        await aggregator.run(sub, stop)  # returns after the in-flight batch is settled
        await asyncio.gather(*helpers, return_exceptions=True)
    await _shutdown(http, health_task, nc)


async def _shutdown(http: HttpServer, health_task: asyncio.Task[None], nc: NATS | None) -> None:
    await health_task
    if nc is not None:
        try:  # drain flushes the last acks; bounded so a dead NATS cannot stall shutdown
            await asyncio.wait_for(nc.drain(), timeout=5)
        except Exception as exc:
            log.warning("NATS drain failed: %r", exc)
    await http.stop()


if __name__ == "__main__":
    run("aggregator", main)
