"""History and timeline: wire form, JSON-lines round trips, merging, thread safety; the
nemesis's faults in the history and the recovery time computed from them."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from harness.history import Event, Fault, History, Mark, Operation, Outcome, Timeline, TsForm


def _event(i: int, ts: datetime | None = None) -> Event:
    return Event(
        event_id=f"run-{i}",
        probe_id="p1",
        target="t.example",
        ts=ts or datetime(2024, 5, 1, 12, 0, i % 60, 123456, tzinfo=UTC),
        rtt_ms=12.5 + i,
        jitter_ms=1.25,
        loss_pct=0.0,
        throughput_kbps=5000.125,
    )


def _op(t: float, outcome: Outcome = Outcome.OK, n: int = 2) -> Operation:
    return Operation(
        process="w1",
        endpoint="http://ingest:8080/v1/events",
        invoked_at=t,
        completed_at=t + 0.01,
        outcome=outcome,
        events=tuple(_event(i) for i in range(n)),
        status=202 if outcome is Outcome.OK else None,
        error="" if outcome is Outcome.OK else "ReadTimeout: timed out",
    )


def test_event_wire_roundtrip_keeps_microseconds_and_offset() -> None:
    e = _event(7)
    wire = e.to_wire()
    assert wire["ts"] == "2024-05-01T12:00:07.123456+00:00"
    assert Event.from_wire(wire) == e


def test_event_from_wire_accepts_z_and_other_offsets() -> None:
    wire = _event(1).to_wire()
    wire["ts"] = "2024-05-01T14:00:01.123456+02:00"
    assert Event.from_wire(wire).ts == datetime(2024, 5, 1, 12, 0, 1, 123456, tzinfo=UTC)
    wire["ts"] = "2024-05-01T12:00:01.123456Z"
    assert Event.from_wire(wire) == _event(1)


@pytest.mark.parametrize(
    ("form", "text"),
    [
        (TsForm(utc="Z", digits=0), "2024-05-01T12:00:00Z"),
        (TsForm(utc="z", separator="t", digits=3), "2024-05-01t12:00:00.000z"),
        (TsForm(utc="-00:00", digits=9), "2024-05-01T12:00:00.000000999-00:00"),
        (TsForm(330, digits=1), "2024-05-01T17:30:00.0+05:30"),
        (TsForm(-1439), "2024-04-30T12:01:00.000000-23:59"),
        (TsForm(1439, digits=0), "2024-05-02T11:59:00+23:59"),
    ],
)
def test_ts_forms_write_one_instant_and_read_back(form: TsForm, text: str) -> None:
    e = Event("e", "p", "t", datetime(2024, 5, 1, 12, tzinfo=UTC), 1.0, 1.0, 0.0, 1.0, form)
    assert e.to_wire()["ts"] == text
    back = Event.from_wire(e.to_wire())
    assert back == e and back.ts_form == form and back.to_wire() == e.to_wire()


def test_ts_form_writes_the_digits_an_instant_needs_and_truncatable_nanoseconds() -> None:
    ts = datetime(2024, 5, 1, 11, 59, 59, 999999, tzinfo=UTC)
    assert TsForm(utc="Z", digits=0).render(ts) == "2024-05-01T11:59:59.999999Z"
    # 9s past the microsecond: a reader that rounds would move this event into 12:00.
    assert TsForm(utc="Z", digits=9).render(ts) == "2024-05-01T11:59:59.999999999Z"
    assert Event.from_wire({**_event(1).to_wire(), "ts": "2024-05-01T11:59:59.999999999Z"}).ts == ts


def test_ts_form_rejects_what_rfc3339_cannot_write() -> None:
    for bad in ({"offset_minutes": 1440}, {"utc": "UTC"}, {"separator": " "}, {"digits": 10}):
        with pytest.raises(ValueError):
            TsForm(**bad)  # type: ignore[arg-type]


def test_event_normalises_to_utc_so_equal_instants_are_equal() -> None:
    cest = timezone(timedelta(hours=2))
    a = _event(3, ts=datetime(2024, 5, 1, 14, 0, 0, tzinfo=cest))
    b = _event(3, ts=datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC))
    assert a == b and hash(a) == hash(b)
    assert a.ts.tzinfo is UTC


def test_event_rejects_naive_timestamps_with_a_hint() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        _event(1, ts=datetime(2024, 5, 1, 12, 0, 0))


def test_history_save_load_roundtrip(tmp_path: Path) -> None:
    h = History([_op(1.0), _op(2.0, Outcome.UNKNOWN), _op(3.0, Outcome.FAIL, n=1)])
    h.save(tmp_path / "h.jsonl")
    assert History.load(tmp_path / "h.jsonl").operations() == h.operations()


def test_history_merge_orders_by_invocation(tmp_path: Path) -> None:
    a = History([_op(1.0), _op(5.0)])
    b = History([_op(3.0, Outcome.UNKNOWN)])
    a.save(tmp_path / "a.jsonl")
    b.save(tmp_path / "b.jsonl")
    merged = History.load_merged([tmp_path / "a.jsonl", tmp_path / "b.jsonl"])
    assert [op.invoked_at for op in merged] == [1.0, 3.0, 5.0]
    assert History.merge(a, b).operations() == merged.operations()


def _fault(start: float, healed: float | None, name: str = "cut ingest-nats") -> Fault:
    end = start + 0.5 if healed is None else healed + 1.0
    return Fault(name, "d", start, effect_s=0.2, healed_at=healed, heal_s=1.0, ended_at=end)


def test_faults_and_operations_share_one_history_file(tmp_path: Path) -> None:
    h = History([_op(1.0), _op(2.0, Outcome.UNKNOWN)])
    h.begin_fault(_fault(1.5, 3.0)).notes["containers"] = 2
    h.begin_fault(_fault(4.0, None, "move db"))  # an instant: no heal
    h.save(tmp_path / "h.jsonl")
    back = History.load(tmp_path / "h.jsonl")
    assert back.operations() == h.operations()
    assert back.faults() == h.faults()
    assert back.faults()[0].notes == {"containers": 2}


def test_merge_keeps_every_process_faults_by_start() -> None:
    a = History([_op(1.0)], [_fault(5.0, 6.0, "b")])
    b = History([_op(2.0)], [_fault(1.0, 2.0, "a")])
    assert [f.name for f in History.merge(a, b).faults()] == ["a", "b"]


def test_recovery_runs_from_the_last_heal_to_the_database_matching() -> None:
    ops = [_op(1.0), _op(10.0)]  # the last acknowledgement completes at 10.01
    assert History(ops).recovery_s(2.0) is None  # no fault healed: nothing to recover from
    h = History(ops, [_fault(2.0, 6.0), _fault(3.0, 8.0), _fault(9.0, None, "move db")])
    assert h.last_healed_at() == 8.0  # the later heal; the instant has none
    assert h.recovery_s(2.0) == pytest.approx(4.01)  # matched at 10.01 + 2.0
    assert h.recovery_s(None) == pytest.approx(2.01)
    # Matched before the heal began (the fault changed nothing the checker sees): zero.
    assert History([_op(1.0)], [_fault(0.5, 30.0)]).recovery_s(0.0) == 0.0


def test_history_last_ok_at() -> None:
    assert History().last_ok_at() is None
    h = History([_op(1.0), _op(9.0, Outcome.UNKNOWN), _op(4.0)])
    assert h.last_ok_at() == pytest.approx(4.01)


def test_history_append_is_thread_safe() -> None:
    h = History()

    def work() -> None:
        for i in range(200):
            h.append(_op(float(i), n=0))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(h) == 1600


def test_load_names_the_broken_line(tmp_path: Path) -> None:
    p = tmp_path / "h.jsonl"
    p.write_text('{"process": "w1"\n')
    with pytest.raises(ValueError, match=r"h.jsonl:1"):
        History.load(p)


def test_timeline_save_load_roundtrip(tmp_path: Path) -> None:
    t = Timeline()
    t.mark("nemesis", "partition", "ingest-1 | nats", duration_s=12.5, at=100.0)
    t.append(Mark(at=101.0, source="docker", name="die", detail="aggregator-1"))
    t.save(tmp_path / "t.jsonl")
    assert Timeline.load(tmp_path / "t.jsonl").marks() == t.marks()


def test_timeline_merge_orders_by_time() -> None:
    a = Timeline([Mark(at=3.0, source="docker", name="start")])
    b = Timeline([Mark(at=1.0, source="nemesis", name="kill")])
    assert [m.at for m in Timeline.merge(a, b)] == [1.0, 3.0]


def test_rates_bucket_what_the_clients_saw() -> None:
    ev = Event("e1", "p1", "t1", datetime(2024, 5, 1, tzinfo=UTC), 1.0, 1.0, 0.0, 1.0)
    history = History(
        [
            Operation("w", "u", 10.0, 10.1, Outcome.OK, (ev, ev), 202),
            Operation("w", "u", 10.2, 10.4, Outcome.UNKNOWN, (ev,), 503),
            Operation("w", "u", 10.5, 11.2, Outcome.OK, (ev,), 202),
        ]
    )
    assert history.rates(bucket_s=0.5) == [
        {"t": 10.0, "acked": 4.0, "batches": 2, "errors": 1},
        {"t": 11.0, "acked": 2.0, "batches": 1, "errors": 0},
    ]
