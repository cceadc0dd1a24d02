"""harness.load without a stack: outcome files, stats, SLO files and gates, locust command lines."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from harness.history import Event, History, Operation, Outcome
from harness.load import (
    Breach,
    FreshnessSample,
    LoadSpec,
    LoadStats,
    LocustProcesses,
    Slo,
    evaluate,
    load_slo,
    outcomes,
    percentile,
    read_locust_history,
    read_outcomes,
    stats_of,
    step_rates,
)


def wire(event_id: str, probe: str = "L1-p0") -> dict[str, object]:
    return Event(
        event_id=event_id,
        probe_id=probe,
        target="t0.example.net",
        ts=datetime(2026, 11, 27, 12, 0, 1, tzinfo=UTC),
        rtt_ms=10.0,
        jitter_ms=1.0,
        loss_pct=0.0,
        throughput_kbps=5000.0,
    ).to_wire()


def invocation(n: int, t: float, ids: list[str], late: float = 0.0) -> str:
    body = json.dumps({"events": [wire(i) for i in ids]})
    return outcomes.invocation_line(n, t - late, t, "http://x/v1/events", "w1.u1", body).strip()


def completion(n: int, t: float, outcome: str, status: int | None) -> str:
    return outcomes.completion_line(n, t, outcome, status).strip()


def test_read_outcomes_pairs_invocations_with_completions(tmp_path: Path) -> None:
    (tmp_path / "outcomes-w1.jsonl").write_text(
        "\n".join(
            [
                invocation(1, 10.0, ["a", "b"]),
                completion(1, 10.1, "ok", 202),
                invocation(2, 11.0, ["c"], late=0.3),
                completion(2, 11.2, "unknown", 503),
                invocation(3, 12.0, ["d"]),  # the worker stopped before the answer
                outcomes.dropped_line(2, 12.5, 13.0, "w1.u1").strip(),  # not an operation
            ]
        )
        + "\n"
    )
    (tmp_path / "outcomes-w2.jsonl").write_text(
        invocation(1, 10.5, ["e"]) + "\n" + completion(1, 10.6, "fail", None) + "\n"
    )
    ops = read_outcomes(tmp_path, ended_at=20.0).operations()
    assert [op.invoked_at for op in ops] == [10.0, 10.5, 11.0, 12.0]
    by_first = {op.events[0].event_id: op for op in ops}
    assert by_first["a"].outcome is Outcome.OK and by_first["a"].status == 202
    assert [e.event_id for e in by_first["a"].events] == ["a", "b"]
    assert by_first["c"].outcome is Outcome.UNKNOWN and by_first["c"].status == 503
    assert by_first["c"].intended_at == pytest.approx(10.7) and by_first["c"].invoked_at == 11.0
    assert by_first["d"].outcome is Outcome.UNKNOWN and by_first["d"].completed_at == 20.0
    assert "stopped mid-request" in by_first["d"].error
    assert by_first["e"].outcome is Outcome.FAIL


def test_a_truncated_last_line_is_skipped_but_damage_elsewhere_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "outcomes-w1.jsonl"
    path.write_text(
        invocation(1, 1.0, ["a"]) + "\n" + completion(1, 1.1, "ok", 202) + "\n" + '{"i": 2, "t"'
    )
    assert len(read_outcomes(tmp_path)) == 1
    path.write_text('{"i": 2, "t"\n' + invocation(1, 1.0, ["a"]) + "\n")
    with pytest.raises(ValueError, match="outcome file is damaged"):
        read_outcomes(tmp_path)


def test_a_remote_workers_outcomes_must_have_arrived_whole(tmp_path: Path) -> None:
    (tmp_path / "outcomes-w9.jsonl").write_text(invocation(1, 1.0, ["a"]) + "\n")
    marker = tmp_path / "outcomes-w9.shipped.json"
    marker.write_text(json.dumps({"origin": "box2:41", "complete": False, "at": 2.0}))
    with pytest.raises(ValueError, match="worker on box2:41 stopped shipping"):
        read_outcomes(tmp_path)
    marker.write_text(json.dumps({"origin": "box2:41", "complete": True, "at": 3.0}))
    assert len(read_outcomes(tmp_path)) == 1


def op(
    t: float,
    outcome: Outcome,
    n: int,
    latency: float = 0.1,
    status: int | None = 202,
    late: float = 0.0,
) -> Operation:
    """A batch meant to go out at t, sent `late` after that, ended `latency` after sending."""
    events = tuple(Event.from_wire(wire(f"{t}-{i}")) for i in range(n))
    sent = t + late
    return Operation("w.u1", "u", sent, sent + latency, outcome, events, status, intended_at=t)


def test_stats_of_counts_a_phase_and_ignores_the_sentinels() -> None:
    history = History(
        [
            op(0.0, Outcome.OK, 100, 0.010),
            op(1.0, Outcome.OK, 100, 0.020),
            op(2.0, Outcome.UNKNOWN, 100, 2.0, status=None),  # timed out: in, at its timeout
            op(3.0, Outcome.FAIL, 100, 0.001, status=None),  # refused: in, errors count
            op(9.0, Outcome.OK, 100, 0.030),  # outside the phase
            Operation("freshness", "u", 1.0, 1.5, Outcome.OK, (), 202),
        ]
    )
    fresh = [FreshnessSample(0.5, 0.4), FreshnessSample(1.5, 0.8), FreshnessSample(9.5, 5.0)]
    s = stats_of(history, 0.0, 4.0, fresh)
    assert (s.batches, s.ok, s.failed, s.unknown, s.unanswered) == (4, 2, 1, 1, 2)
    assert s.events_acked == 200 and s.events_per_s == 50.0
    assert s.error_rate == 0.5
    assert s.latency_ms["p50"] == pytest.approx(10.0)
    assert s.latency_ms["max"] == pytest.approx(2000.0)
    assert s.freshness_s == {"p50": 0.4, "p95": 0.8, "max": 0.8}
    assert s.freshness_samples == 2


def test_response_time_counts_from_the_intended_send_and_service_time_from_the_send() -> None:
    # A stall: the batches meant for 1.0 and 1.5 went out 1.2 s and 0.7 s late (no free
    # connection), each then answered in 50 ms; the one at 0.0 went on time.
    history = History(
        [
            op(0.0, Outcome.OK, 10, 0.05),
            op(1.0, Outcome.OK, 10, 0.05, late=1.2),
            op(1.5, Outcome.OK, 10, 0.05, late=0.7),
            op(2.0, Outcome.OK, 10, 0.05, late=0.05),  # within LATE_AFTER_S: on time
        ]
    )
    s = stats_of(history, 0.0, 4.0)
    assert s.service_ms["max"] == pytest.approx(50.0) and s.service_ms["p50"] == pytest.approx(50)
    assert s.latency_ms["max"] == pytest.approx(1250.0)
    assert s.latency_ms["p50"] == pytest.approx(100.0)  # 50, 100, 750, 1250
    assert s.late == 2 and s.lateness_ms["max"] == pytest.approx(1200.0)
    # A phase holds the batches meant for it, whenever they went.
    assert stats_of(history, 1.0, 2.0).batches == 0  # 1.0 and 1.5 ended after 2.0
    assert stats_of(history, 1.0, 3.0).batches == 3


def test_dropped_sends_count_in_the_phase_they_were_meant_for() -> None:
    history = History([op(float(t), Outcome.OK, 10, 0.05) for t in range(10)])
    dropped = [outcomes.Dropped(3, 9.5, 9.6, "w.u1"), outcomes.Dropped(1, 20.0, 20.0, "w.u2")]
    assert stats_of(history, 0.0, 10.0, dropped=dropped).dropped == 3
    assert stats_of(history, 0.0, 5.0, dropped=dropped).dropped == 0


def test_percentile_is_nearest_rank() -> None:
    xs = list(range(1, 101))
    assert percentile(xs, 50) == 50 and percentile(xs, 95) == 95 and percentile(xs, 100) == 100
    assert percentile([], 99) is None


def stats(**overrides: object) -> LoadStats:
    history = History([op(float(i) / 10, Outcome.OK, 100, 0.05) for i in range(100)])
    base = stats_of(history, 0.0, 10.0, [FreshnessSample(1.0, 0.5)])
    return replace(base, **overrides)


def test_evaluate_names_threshold_limit_and_measured_value() -> None:
    slo = Slo(max_error_rate=0.01, max_p99_ms=40, max_freshness_p95_s=2, max_convergence_s=5)
    breaches = evaluate(slo, stats(), offered_rate=1000, convergence_s=7.5)
    names = {b.threshold for b in breaches}
    assert names == {"max_p99_ms", "max_convergence_s"}
    p99 = next(b for b in breaches if b.threshold == "max_p99_ms")
    assert p99.limit == 40 and p99.measured == pytest.approx(50.0)
    message = p99.message()
    assert "max_p99_ms" in message and "50 ms" in message and "limit <= 40 ms" in message


def test_evaluate_rate_fraction_missing_freshness_and_missing_convergence() -> None:
    slo = Slo(min_rate_fraction=0.9, max_freshness_p95_s=2.0, max_convergence_s=30)
    breaches = evaluate(slo, stats(freshness_missing=1), offered_rate=2000, convergence_s=None)
    by_name = {b.threshold: b for b in breaches}
    assert (
        by_name["min_events_per_s"].limit == 1800 and by_name["min_events_per_s"].measured == 1000
    )
    assert "limit >= 1800" in by_name["min_events_per_s"].message()
    assert math.isinf(by_name["max_freshness_p95_s"].measured)
    assert by_name["max_convergence_s"].measured is None
    assert "nothing measured" in by_name["max_convergence_s"].message()
    assert evaluate(Slo(), stats(), offered_rate=0) == []  # closed loop: no rate to hold


def test_late_and_dropped_sends_are_gated() -> None:
    on_time = stats()
    assert evaluate(Slo(), on_time, offered_rate=0) == []
    breaches = evaluate(Slo(), replace(on_time, late=2, dropped=1), offered_rate=0)
    by_name = {b.threshold: b for b in breaches}
    assert set(by_name) == {"max_late_fraction", "max_dropped"}
    assert by_name["max_late_fraction"].measured == pytest.approx(0.02)
    assert "max_dropped measured 1 sends, limit <= 0 sends" in by_name["max_dropped"].message()
    assert evaluate(Slo(max_late_fraction=0.05), replace(on_time, late=2), offered_rate=0) == []


def test_breach_message_says_the_phase() -> None:
    b = Breach("max_error_rate", 0.01, 0.2, phase="after recovery")
    assert (
        b.message() == "SLO breached (after recovery): max_error_rate measured 0.2, limit <= 0.01"
    )


def test_load_slo_overlays_default_profile_and_nested_profile(tmp_path: Path) -> None:
    path = tmp_path / "slo.toml"
    path.write_text(
        "[default]\nmax_error_rate = 0.01\nmax_p99_ms = 500\n"
        "[chaos]\nrecovery_grace_s = 10\n[chaos.fault]\nmax_error_rate = 1.0\n"
    )
    assert load_slo(path, "steady") == Slo(max_error_rate=0.01, max_p99_ms=500)
    assert load_slo(path, "chaos").recovery_grace_s == 10
    fault = load_slo(path, "chaos.fault")
    assert (fault.max_error_rate, fault.max_p99_ms, fault.recovery_grace_s) == (1.0, 500, 10)
    assert Slo(max_p99_ms=500).overridden(max_p99_ms=100, max_p95_ms=None).max_p99_ms == 100


def test_load_slo_rejects_unknown_keys(tmp_path: Path) -> None:
    path = tmp_path / "slo.toml"
    path.write_text("[default]\nmax_p999_ms = 5\n")
    with pytest.raises(ValueError, match="unknown SLO key 'max_p999_ms'"):
        load_slo(path)


def test_the_repository_slo_file_loads_for_every_profile() -> None:
    for profile in ("steady", "soak", "step", "chaos", "chaos.fault"):
        load_slo(profile=profile)


def test_step_rates() -> None:
    assert step_rates(1000, 2, 8000) == [1000, 2000, 4000, 8000]
    assert step_rates(1000, 1.5, 4000) == [1000, 1500, 2200, 3400]
    with pytest.raises(ValueError):
        step_rates(1000, 1.0, 2000)


def test_locust_commands_local_and_distributed(tmp_path: Path) -> None:
    spec = LoadSpec(rate=4000, duration_s=30, batch_size=200)
    local = LocustProcesses(spec, ["http://a", "http://b"], "secret-token", "L1", tmp_path)
    [command] = local.commands()
    assert "--headless" in command and "--csv-full-history" in command
    assert local.env["QOE_LOAD_USERS"] == "20"  # 4000/200 = 20 batches/s, 1 per user
    assert local.env["QOE_LOAD_DURATION"] == "30"
    assert all("secret-token" not in part for part in command)  # only in the environment
    assert local.env["QOE_LOAD_TOKEN"] == "secret-token"
    assert local.env["QOE_LOAD_URLS"] == "http://a,http://b"
    spread = LocustProcesses(
        LoadSpec(rate=4000, duration_s=30, workers=3), ["http://a"], "t", "L1", tmp_path
    )
    master, *workers = spread.commands(master_port=5599)
    assert "--master" in master and master[master.index("--expect-workers") + 1] == "3"
    assert len(workers) == 3 and all("--worker" in w and "5599" in w for w in workers)
    assert all("--headless" not in w for w in workers)
    assert master[master.index("--master-bind-host") + 1] == "127.0.0.1"
    elsewhere = LocustProcesses(
        LoadSpec(rate=4000, duration_s=30, workers=1, remote_workers=2, master_bind="0.0.0.0"),
        ["http://a"],
        "t",
        "L1",
        tmp_path,
    )
    master, *workers = elsewhere.commands(master_port=5557)
    assert master[master.index("--expect-workers") + 1] == "3" and len(workers) == 1
    assert master[master.index("--master-bind-host") + 1] == "0.0.0.0"


def test_read_locust_history_keeps_the_aggregated_rows(tmp_path: Path) -> None:
    (tmp_path / "locust_stats_history.csv").write_text(
        "Timestamp,User Count,Type,Name,Requests/s,Failures/s,50%,95%,99%\n"
        "100,4,POST,POST /v1/events,10,0,20,30,40\n"
        "100,4,,Aggregated,10,0.5,20,30,N/A\n"
    )
    [row] = read_locust_history(tmp_path)
    assert row["rps"] == 10 and row["fps"] == 0.5 and row["p50_ms"] == 20
    assert math.isnan(row["p99_ms"])


def test_the_run_summary_draws_each_load_run_with_its_fault_band(tmp_path: Path) -> None:
    from harness.report import RunReport

    doc = {
        "name": "chaos cut-ingest-nats",
        "spec": {"batch_size": 100},
        "fault": {"name": "cut-ingest-nats", "start": 105.0, "end": 110.0},
        "locust_history": [
            {
                "t": 100.0 + i,
                "users": 5,
                "rps": 10,
                "fps": 0,
                "p50_ms": 20,
                "p95_ms": 40,
                "p99_ms": 60,
            }
            for i in range(20)
        ],
        "freshness": [{"sent_at": 100.0 + i, "lag_s": 0.5} for i in range(20)],
    }
    (tmp_path / "scenarios" / "x" / "load").mkdir(parents=True)
    (tmp_path / "scenarios" / "x" / "load" / "load.json").write_text(json.dumps(doc))
    page = RunReport(tmp_path, "run-1", seed=1).write().read_text()
    assert ">Load</h2>" in page and "chaos cut-ingest-nats" in page
    assert page.count("<svg") >= 1 and "freshness lag" in page


def test_a_batch_in_flight_when_a_fault_starts_belongs_to_the_fault_window() -> None:
    # Invoked 0.1 s before the fault at t=10 and answered 503 two seconds later: the fault's doing.
    history = History([op(5.0, Outcome.OK, 100), op(9.9, Outcome.UNKNOWN, 100, 2.0, status=503)])
    before = stats_of(history, 0.0, 10.0)
    fault = stats_of(history, 10.0, 20.0, overlapping=True)
    assert (before.batches, before.error_rate) == (1, 0.0)
    assert (fault.batches, fault.unknown) == (1, 1)


def test_a_phase_counts_the_events_acknowledged_inside_it() -> None:
    # One batch a second, each answered 1.5 s later: at any moment one or two are in flight.
    history = History([op(float(t), Outcome.OK, 100, 1.5) for t in range(20)])
    before = stats_of(history, 2.0, 10.0)
    assert before.batches == 7  # invoked at 2..8 and answered by t=10: latency counted
    assert before.events_per_s == pytest.approx(100.0)  # answered at 2.5..9.5: 8 batches / 8 s


def test_read_history_gives_headers_and_the_same_oracle_as_read_outcomes(tmp_path: Path) -> None:
    from harness.checker import expectation
    from harness.columnar import OutcomeSource
    from harness.load import read_history

    (tmp_path / "outcomes-w1.jsonl").write_text(
        "\n".join(
            [
                invocation(1, 10.0, ["a", "b"]),
                completion(1, 10.1, "ok", 202),
                invocation(2, 11.0, ["c"]),
                completion(2, 11.2, "unknown", 503),
                invocation(3, 12.0, ["c"], late=0.5),  # the resend, stopped before the answer
                outcomes.dropped_line(2, 12.5, 13.0, "w1.u1").strip(),
            ]
        )
        + "\n"
    )
    sentinel = op(10.5, Outcome.OK, 1)
    sentinels = History([sentinel])
    full = History.merge(read_outcomes(tmp_path, ended_at=20.0), sentinels)
    read = read_history([OutcomeSource(tmp_path, 20.0)], sentinels, 60)
    headers, expected = read.history, read.expected
    assert read.dropped == (outcomes.Dropped(2, 12.5, 13.0, "w1.u1"),)
    assert [o.batch_size for o in headers] == [2, 1, 1, 1]
    assert headers.operations()[-1].intended_at == pytest.approx(11.5)
    assert headers.operations()[1] is sentinel  # kept as given, events and all
    assert [o.invoked_at for o in headers] == [o.invoked_at for o in full]
    assert stats_of(headers, 0.0, 30.0) == stats_of(full, 0.0, 30.0)
    in_memory = expectation(full, 60)
    assert expected is not None and expected.choices == in_memory.choices
    assert (expected.acked_events, expected.unknown_events) == (3, 1)
    assert read_history([OutcomeSource(tmp_path, 20.0)]).expected is None  # no window


def test_outcome_lines_decode_to_what_was_written() -> None:
    body = json.dumps({"events": [wire("a")]})
    line = outcomes.invocation_line(7, 1.5, 1.75, "http://x/v1/events", "w1.u2", body)
    assert outcomes.decode(json.loads(line)) == outcomes.Invocation(
        7, 1.5, 1.75, "http://x/v1/events", "w1.u2", [wire("a")]
    )
    done = outcomes.completion_line(7, 2.0, "unknown", None, "x" * 500)
    assert outcomes.decode(json.loads(done)) == outcomes.Completion(
        7, 2.0, "unknown", None, "x" * outcomes.ERROR_CHARS
    )
    assert outcomes.decode(json.loads(outcomes.dropped_line(3, 4.0, 5.0, "w1.u2"))) == (
        outcomes.Dropped(3, 4.0, 5.0, "w1.u2")
    )
    assert outcomes.decode({"note": "ignored"}) is None
    with pytest.raises(ValueError, match="lacks 'd'"):
        outcomes.decode({"i": 1, "t": 1.0, "u": "u", "p": "p", "b": {"events": []}})
    with pytest.raises(ValueError, match="an outcome is one of ok, fail, unknown"):
        outcomes.completion_line(1, 1.0, "maybe", None)


def test_one_table_of_settings_sets_the_locust_environment(tmp_path: Path) -> None:
    from harness.load import settings

    assert settings.environment(batch=100, seeded_bugs="closed_model") == {
        "QOE_LOAD_BATCH": "100",
        "QOE_LOAD_SEEDED_BUGS": "closed_model",
    }
    with pytest.raises(ValueError, match=r"unknown load settings \['batch_size'\]"):
        settings.environment(batch_size=100)
    assert LoadSpec(rate=1, duration_s=1).batch_size == int(settings.default("batch"))
    env = LocustProcesses(LoadSpec(rate=1, duration_s=1), ["http://a"], "t", "L1", tmp_path).env
    assert {s.env for s in settings.RUN} - {"QOE_LOAD_WORKER_URLS"} <= set(env)


def test_unknown_seeded_bugs_of_the_load_generator_are_refused() -> None:
    from harness.load import settings

    assert settings.seeded_bugs(" closed_model, ") == {"closed_model"}
    with pytest.raises(ValueError, match=r"unknown bug.*closed_modle.*valid names: closed_model"):
        settings.seeded_bugs("closed_modle")
    with pytest.raises(ValueError, match="closed_modle"):
        LoadSpec(rate=1, duration_s=1, seeded_bugs=("closed_modle",))


def test_the_load_package_imports_its_parts_only_when_used() -> None:
    """The locustfile imports harness.load.settings and .outcomes in every locust process:
    the package must not bring Docker clients and DuckDB with them."""
    import subprocess
    import sys

    probe = (
        "import sys, harness.load.settings, harness.load.outcomes; "
        "print(sorted(m for m in sys.modules if m.startswith(('harness.', 'duckdb', 'docker'))))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert (
        out.stdout.strip() == "['harness.load', 'harness.load.outcomes', 'harness.load.settings']"
    )
