"""Batch preparation for the aggregator's single statement, and message decoding."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from qoe import bugs
from qoe.aggregator import (
    AGGREGATE_SQL,
    AGGREGATE_SQL_NO_DEDUP,
    Aggregator,
    AggregatorSettings,
    BatchResult,
    BatchRows,
    WindowKey,
    decode_messages,
    prepare_batch,
)
from qoe.contract import ValidEvent, canonical_json, check_event

from .conftest import NOW, make_event


def event(event_id: str, rtt: float = 10.0, ts: datetime = NOW, probe: str = "p1") -> ValidEvent:
    return ValidEvent(event_id, probe, "t", ts, rtt, 1.0, 0.0, 5000.0)


def test_first_occurrence_of_an_id_wins_and_rows_are_sorted_by_id() -> None:
    rows = prepare_batch([event("b", 1), event("a", 2), event("b", 3), event("c", 4)], 60)
    assert rows.event_id == ["a", "b", "c"]
    assert rows.rtt == [2, 1, 4]
    assert len(rows) == 3


def test_window_start_is_computed_per_event() -> None:
    times = [NOW, NOW + timedelta(seconds=59, microseconds=999999), NOW + timedelta(seconds=60)]
    rows = prepare_batch([event(f"e{i}", ts=t) for i, t in enumerate(times)], 60)
    assert rows.window_start == [NOW, NOW, NOW + timedelta(seconds=60)]
    assert rows.event_ts == times


def test_off_by_one_bug_reaches_the_batch() -> None:
    bugs.reset(frozenset({"window_off_by_one"}))
    rows = prepare_batch([event("a", ts=NOW)], 60)
    assert rows.window_start == [NOW - timedelta(seconds=60)]


def test_no_dedup_keeps_every_event_in_batch_order() -> None:
    rows = prepare_batch([event("b", 1), event("a", 2), event("b", 3)], 60, dedup=False)
    assert rows.event_id == ["b", "a", "b"]
    assert rows.rtt == [1, 2, 3]


def test_params_are_the_rows_as_one_json_array_plus_window_seconds() -> None:
    rows = prepare_batch([event("a", 1.25), event("b", 0.1)], 60)
    params = rows.params(60)
    assert set(params) == {"rows", "window_seconds"} and params["window_seconds"] == 60
    decoded = json.loads(params["rows"])
    assert [r[0] for r in decoded] == ["a", "b"]
    assert [r[5] for r in decoded] == [1.25, 0.1]  # floats round-trip exactly
    first = decoded[0]
    assert datetime.fromisoformat(first[1]) == rows.event_ts[0]
    assert datetime.fromisoformat(first[4]) == rows.window_start[0]
    assert "%(rows)s::json" in AGGREGATE_SQL and "%(window_seconds)s" in AGGREGATE_SQL


def test_sql_variants_differ_only_in_the_dedup_filter() -> None:
    assert "JOIN inserted" in AGGREGATE_SQL
    assert "JOIN inserted" not in AGGREGATE_SQL_NO_DEDUP
    for sql in (AGGREGATE_SQL, AGGREGATE_SQL_NO_DEDUP):
        assert "ORDER BY event_id" in sql  # processed_events locked in one order
        assert "ORDER BY probe_id, target, window_start" in sql  # windows too
        assert "version = w.version + 1" in sql


def test_decode_messages_separates_poison() -> None:
    good = canonical_json(check_event(make_event(event_id="ok"), NOW))
    old = json.dumps(make_event(event_id="old", ts="2001-01-01T00:00:00Z")).encode()
    payloads = [good, b"\xff not json", old, json.dumps(make_event(rtt_ms=-1)).encode(), b"{}"]
    decoded, poison = decode_messages(payloads)
    assert [(i, e.event_id) for i, e in decoded] == [(0, "ok"), (2, "old")]
    assert poison == [1, 3, 4]
    assert decoded[1][1].ts == datetime(2001, 1, 1, tzinfo=UTC)


def test_settings_defaults_and_env() -> None:
    settings = AggregatorSettings.from_env({"DATABASE_URL": "postgresql://x/y"})
    assert (settings.window_seconds, settings.fetch_batch, settings.ack_wait_seconds) == (
        60,
        500,
        10,
    )
    assert settings.retention_hours == 48
    custom = AggregatorSettings.from_env(
        {"DATABASE_URL": "postgresql://x/y", "WINDOW_SECONDS": "10", "FETCH_BATCH": "50"}
    )
    assert (custom.window_seconds, custom.fetch_batch) == (10, 50)


class FakeMsg:
    """A JetStream message that records what the aggregator did with it, in order."""

    def __init__(self, data: bytes, journal: list[str]) -> None:
        self.data, self.journal = data, journal

    async def ack(self) -> None:
        self.journal.append("ack")

    async def nak(self) -> None:
        self.journal.append("nak")

    async def term(self) -> None:
        self.journal.append("term")

    async def in_progress(self) -> None:
        self.journal.append("in_progress")


class FakeNats:
    is_connected = True

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    async def publish(self, subject: str, payload: bytes) -> None:
        self.published.append((subject, payload))


class ScriptedAggregator(Aggregator):
    """The real process()/commit() logic over a scripted database."""

    def __init__(self, journal: list[str], failures: list[Exception], **settings: Any) -> None:
        super().__init__(
            AggregatorSettings(database_url="postgresql://unused", **settings), FakeNats()
        )
        self.journal, self.failures = journal, failures

    async def _commit_once(self, rows: BatchRows) -> BatchResult:
        if self.failures:
            self.journal.append("commit failed")
            raise self.failures.pop(0)
        self.journal.append(f"commit {len(rows)}")
        key = WindowKey("p1", "t", NOW, 60)
        return BatchResult([key], len(rows))


def payload(event_id: str) -> bytes:
    return canonical_json(check_event(make_event(event_id=event_id), NOW))


def run_process(agg: ScriptedAggregator, msgs: list[FakeMsg], stop_after: float | None = None):
    async def go() -> None:
        stop = asyncio.Event()
        if stop_after is not None:
            asyncio.get_running_loop().call_later(stop_after, stop.set)
        await agg.process(msgs, stop)

    asyncio.run(go())


def test_acks_only_after_commit_and_terminates_poison() -> None:
    journal: list[str] = []
    agg = ScriptedAggregator(journal, [])
    msgs = [
        FakeMsg(payload("a"), journal),
        FakeMsg(b"junk", journal),
        FakeMsg(payload("b"), journal),
    ]
    run_process(agg, msgs)
    assert journal == ["term", "commit 2", "ack", "ack"]
    [(subject, hint)] = agg.nc.published
    assert subject == "qoe.windows.changed"
    assert json.loads(hint)["windows"][0]["probe_id"] == "p1"


def test_conflicts_and_outages_are_retried_before_acking() -> None:
    journal: list[str] = []
    failures: list[Exception] = [
        psycopg.errors.DeadlockDetected("deadlock"),
        psycopg.OperationalError("server closed the connection"),
    ]
    agg = ScriptedAggregator(journal, failures)
    run_process(agg, [FakeMsg(payload("a"), journal)])
    assert journal == ["commit failed", "commit failed", "commit 1", "ack"]
    assert agg.db_problem is None


def test_shutdown_during_an_outage_naks_and_keeps_the_batch_alive_meanwhile() -> None:
    journal: list[str] = []
    agg = ScriptedAggregator(journal, [psycopg.OperationalError("down")] * 100, ack_wait_seconds=1)
    run_process(agg, [FakeMsg(payload("a"), journal)], stop_after=1.2)
    assert "ack" not in journal
    assert journal[-1] == "nak"
    assert "in_progress" in journal
    assert agg.db_problem is not None
    assert "postgres" in asyncio.run(agg.readiness())


def test_ack_before_commit_bug_acks_first_and_drops_on_failure() -> None:
    bugs.reset(frozenset({"aggregator_ack_before_commit"}))
    journal: list[str] = []
    agg = ScriptedAggregator(journal, [psycopg.OperationalError("down")])
    run_process(agg, [FakeMsg(payload("a"), journal)])
    assert journal == ["ack", "commit failed"]
