"""Diagnoser service: keeps `diagnoses` equal to the rules applied to the current aggregates.

A sweep claims windows whose version moved past diagnosed_version, replaces their diagnoses
and records the version it judged, all in one transaction. Sweeps run on each
`qoe.windows.changed` hint and on a timer, so a lost hint or an outage only delays
convergence. Run with `python -m qoe.diagnoser`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from nats.aio.client import Client as NATS
from prometheus_client import Counter, Histogram
from psycopg.types.json import Jsonb

from qoe import bugs, db, natsutil
from qoe.config import Env, get_float, get_str
from qoe.service import Backoff, HttpServer, RateLimitedLog, http_port, make_app, run, sleep_or_stop

log = logging.getLogger("qoe.diagnoser")
noisy = RateLimitedLog(log)

SWEEPS = Counter("qoe_diagnoser_sweeps_total", "Sweep transactions committed")
WINDOWS = Counter("qoe_diagnoser_windows_total", "Windows (re)diagnosed")
DIAGNOSES = Counter("qoe_diagnoser_diagnoses_total", "Diagnosis rows written", ["kind"])
DB_ERRORS = Counter("qoe_diagnoser_db_errors_total", "Failed sweeps")
SWEEP_SECONDS = Histogram("qoe_diagnoser_sweep_seconds", "Time per sweep transaction")

KINDS = ("high_latency", "high_jitter", "packet_loss", "low_throughput")


@dataclass(frozen=True)
class Thresholds:
    high_latency_ms: float = 150.0
    high_jitter_ms: float = 30.0
    packet_loss_pct: float = 2.0
    low_throughput_kbps: float = 1000.0

    @classmethod
    def from_env(cls, env: Env | None = None) -> Thresholds:
        return cls(
            high_latency_ms=get_float("HIGH_LATENCY_MS", 150.0, env, minimum=0),
            high_jitter_ms=get_float("HIGH_JITTER_MS", 30.0, env, minimum=0),
            packet_loss_pct=get_float("PACKET_LOSS_PCT", 2.0, env, minimum=0),
            low_throughput_kbps=get_float("LOW_THROUGHPUT_KBPS", 1000.0, env, minimum=0),
        )


@dataclass(frozen=True)
class WindowSums:
    """The columns of one window_aggregates row that the rules need."""

    probe_id: str
    target: str
    window_start: datetime
    window_seconds: int
    samples: int
    rtt_sum: float
    jitter_sum: float
    loss_sum: float
    throughput_sum: float
    version: int


@dataclass(frozen=True)
class Diagnosis:
    kind: str
    observed: float
    threshold: float


def diagnose(window: WindowSums, t: Thresholds) -> list[Diagnosis]:
    """The CONTRACT.md rules on the window's averages (strict comparisons)."""
    if window.samples <= 0:
        return []
    n = window.samples
    checks = (
        ("high_latency", window.rtt_sum / n, t.high_latency_ms, True),
        ("high_jitter", window.jitter_sum / n, t.high_jitter_ms, True),
        ("packet_loss", window.loss_sum / n, t.packet_loss_pct, True),
        ("low_throughput", window.throughput_sum / n, t.low_throughput_kbps, False),
    )
    on_threshold_holds = bugs.enabled("diagnoser_threshold_inclusive")
    return [
        Diagnosis(kind, float(observed), float(threshold))  # floats: one array type in SQL
        for kind, observed, threshold, above in checks
        if _rule_holds(observed, threshold, above, on_threshold_holds)
    ]


def _rule_holds(observed: float, threshold: float, above: bool, on_threshold_holds: bool) -> bool:
    if observed == threshold:
        # True only with the seeded bug diagnoser_threshold_inclusive (>= and <=).
        return on_threshold_holds
    return observed > threshold if above else observed < threshold


CLAIM_SQL = """
SELECT probe_id, target, window_start, window_seconds, samples,
       rtt_sum, jitter_sum, loss_sum, throughput_sum, version
FROM window_aggregates
WHERE version > diagnosed_version
ORDER BY probe_id, target, window_start, window_seconds
LIMIT %(limit)s
FOR UPDATE SKIP LOCKED
"""

# The claimed windows' old diagnoses go, the new ones come, and each window records the
# version judged: three statements in the sweep's transaction (one statement could not both
# delete and re-insert the same diagnosis row). CLAIM_SQL locked the windows, so their
# version cannot move underneath.
_CLAIMED = """
    unnest(%(probe_id)s::text[], %(target)s::text[], %(window_start)s::timestamptz[],
           %(window_seconds)s::integer[], %(version)s::bigint[])
        AS c(probe_id, target, window_start, window_seconds, version)
"""
DELETE_SQL = f"""
DELETE FROM diagnoses d
USING {_CLAIMED}
WHERE (d.probe_id, d.target, d.window_start, d.window_seconds)
    = (c.probe_id, c.target, c.window_start, c.window_seconds)
"""
INSERT_SQL = """
INSERT INTO diagnoses
    (probe_id, target, window_start, window_seconds, kind, observed, threshold)
SELECT * FROM unnest(%(d_probe_id)s::text[], %(d_target)s::text[],
                     %(d_window_start)s::timestamptz[], %(d_window_seconds)s::integer[],
                     %(d_kind)s::text[], %(d_observed)s::float8[], %(d_threshold)s::float8[])
"""
MARK_SQL = f"""
UPDATE window_aggregates w
SET diagnosed_version = c.version
FROM {_CLAIMED}
WHERE (w.probe_id, w.target, w.window_start, w.window_seconds)
    = (c.probe_id, c.target, c.window_start, c.window_seconds)
"""
REPLACE_SQL = (DELETE_SQL, INSERT_SQL, MARK_SQL)
"""Run in order, in the claiming transaction, each with replace_params(...)."""


def replace_params(judged: list[tuple[WindowSums, list[Diagnosis]]]) -> dict[str, Any]:
    """Parallel arrays for REPLACE_SQL: the claimed windows and their new diagnoses."""
    params: dict[str, list[Any]] = {
        key: []
        for key in (
            "probe_id", "target", "window_start", "window_seconds", "version",
            "d_probe_id", "d_target", "d_window_start", "d_window_seconds",
            "d_kind", "d_observed", "d_threshold",
        )
    }  # fmt: skip
    for window, found in judged:
        for key in ("probe_id", "target", "window_start", "window_seconds", "version"):
            params[key].append(getattr(window, key))
        for d in found:
            for key in ("probe_id", "target", "window_start", "window_seconds"):
                params[f"d_{key}"].append(getattr(window, key))
            params["d_kind"].append(d.kind)
            params["d_observed"].append(d.observed)
            params["d_threshold"].append(d.threshold)
    return params


async def sweep_once(
    conn: psycopg.AsyncConnection, thresholds: Thresholds, limit: int = 500
) -> int:
    """Diagnose up to `limit` changed windows in one transaction; how many were claimed.

    Component tests call this directly with any connection not already in a transaction.
    """
    async with conn.transaction():
        cur = await conn.execute(CLAIM_SQL, {"limit": limit})
        windows = [WindowSums(*row) for row in await cur.fetchall()]
        if not windows:
            return 0
        judged = [(w, diagnose(w, thresholds)) for w in windows]
        params = replace_params(judged)
        for statement in REPLACE_SQL:
            await conn.execute(statement, params)
    WINDOWS.inc(len(windows))
    for _, found in judged:
        for d in found:
            DIAGNOSES.labels(d.kind).inc()
    return len(windows)


ADOPT_SQL = (
    "SELECT thresholds FROM diagnoser_thresholds WHERE id = 1 FOR UPDATE",
    "UPDATE window_aggregates SET diagnosed_version = 0 WHERE diagnosed_version <> 0",
    "INSERT INTO diagnoser_thresholds (id, thresholds) VALUES (1, %(thresholds)s)"
    " ON CONFLICT (id) DO UPDATE SET thresholds = excluded.thresholds, updated_at = now()",
)


async def adopt_thresholds(conn: psycopg.AsyncConnection, thresholds: Thresholds) -> bool:
    """Record `thresholds`; if they differ from the recorded ones, queue every window for a
    new judgement (diagnoses must match the rules in force, not the ones of a past run).

    Returns True when windows were re-queued.
    """
    wanted = Jsonb(dataclasses.asdict(thresholds))
    select, requeue, record = ADOPT_SQL
    async with conn.transaction():
        cur = await conn.execute(select)
        row = await cur.fetchone()
        if row is not None and row[0] == wanted.obj:
            return False
        if row is not None:
            await conn.execute(requeue)
        await conn.execute(record, {"thresholds": wanted})
    return row is not None


@dataclass(frozen=True)
class DiagnoserSettings:
    database_url: str
    thresholds: Thresholds
    sweep_interval: float = 1.0
    min_sweep_gap: float = 0.5
    batch_limit: int = 500

    @classmethod
    def from_env(cls, env: Env | None = None) -> DiagnoserSettings:
        return cls(
            database_url=get_str("DATABASE_URL", None, env),
            thresholds=Thresholds.from_env(env),
            sweep_interval=get_float("SWEEP_INTERVAL_SECONDS", 1.0, env, minimum=0.05),
            min_sweep_gap=get_float("MIN_SWEEP_GAP_SECONDS", 0.5, env, minimum=0.0),
        )


class Diagnoser:
    """The sweep loop: woken by hints (coalesced) or the timer; backs off while the DB is down."""

    def __init__(self, settings: DiagnoserSettings) -> None:
        self.settings = settings
        self.wake = asyncio.Event()
        self.conn: psycopg.AsyncConnection | None = None
        self.db_problem: str | None = None
        self.thresholds_adopted = False

    async def on_hint(self, _msg: Any) -> None:
        # Many hints before the next sweep collapse into one wake-up.
        self.wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        backoff = Backoff(base=0.1, cap=5.0)
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            self.wake.clear()
            started = loop.time()
            try:
                await self.sweep_all(stop)
                backoff.reset()
                await self._wait(stop, self.settings.sweep_interval)
                # Every aggregator commit sends a hint (tens a second under load). Sweeping on
                # each re-judged and re-marked the same windows many times a second, which cost
                # the database more than the diagnoses are worth; a gap lets changes pile up.
                gap = self.settings.min_sweep_gap - (loop.time() - started)
                await sleep_or_stop(stop, gap)
            except Exception as exc:
                DB_ERRORS.inc()
                self.db_problem = f"{type(exc).__name__}: {exc}".strip()
                noisy.warning("sweep", "sweep failed: %s", self.db_problem)
                self.conn = await db.close_quietly(self.conn)
                await sleep_or_stop(stop, backoff.next_delay())
        await db.close_quietly(self.conn)

    async def sweep_all(self, stop: asyncio.Event) -> None:
        """Sweep until no changed window is left (a backlog drains at full speed)."""
        if self.conn is None or self.conn.closed:
            self.conn = await db.connect(self.settings.database_url)
        if not self.thresholds_adopted:
            if await adopt_thresholds(self.conn, self.settings.thresholds):
                log.warning("thresholds changed since the last run: re-judging every window")
            self.thresholds_adopted = True
        limit = self.settings.batch_limit
        while not stop.is_set():
            with SWEEP_SECONDS.time():
                claimed = await sweep_once(self.conn, self.settings.thresholds, limit)
            self.db_problem = None
            if claimed:
                SWEEPS.inc()
            if claimed < limit:
                return

    async def _wait(self, stop: asyncio.Event, seconds: float) -> None:
        """Until a hint, stop, or `seconds` pass."""
        waiters = [asyncio.ensure_future(self.wake.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()


async def main(stop: asyncio.Event) -> None:
    settings = DiagnoserSettings.from_env()
    urls = natsutil.nats_urls()
    health = db.DbHealth(settings.database_url)
    diagnoser = Diagnoser(settings)
    nats_state: dict[str, NATS | None] = {"nc": None}

    async def readiness() -> dict[str, str]:
        nc = nats_state["nc"]
        problems = dict(health.report())
        if diagnoser.db_problem:
            problems["postgres"] = diagnoser.db_problem
        if nc is None or not nc.is_connected:
            problems["nats"] = "disconnected"
        return problems

    http = HttpServer(make_app(readiness), http_port())
    await http.start()
    tasks = [asyncio.create_task(health.run(stop))]
    if await db.migrate_forever(settings.database_url, stop):
        tasks.append(asyncio.create_task(_listen_for_hints(urls, diagnoser, nats_state, stop)))
        await diagnoser.run(stop)  # sweeps on the timer even while NATS is unreachable
    await asyncio.gather(*tasks, return_exceptions=True)
    await http.stop()


async def _listen_for_hints(
    urls: list[str], diagnoser: Diagnoser, state: dict[str, NATS | None], stop: asyncio.Event
) -> None:
    nc = await natsutil.connect(urls, "qoe-diagnoser", stop)
    if nc is None:
        return
    state["nc"] = nc
    await nc.subscribe(natsutil.WINDOWS_CHANGED_SUBJECT, cb=diagnoser.on_hint)
    await stop.wait()
    try:
        await asyncio.wait_for(nc.drain(), timeout=5)
    except Exception as exc:
        log.warning("NATS drain failed: %r", exc)


if __name__ == "__main__":
    run("diagnoser", main)
