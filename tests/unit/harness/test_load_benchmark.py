"""The benchmark page renders from its JSON alone: tables, inline SVG plots, no network."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from harness import benchmark
from harness.benchmark import cpu_cost, cpu_line, machine, render
from harness.load import LoadSpec


def fake_results() -> dict[str, object]:
    stage = {
        "rate": 1000,
        "held": True,
        "breaches": [],
        "run": {"events_per_s": 990.0, "freshness_s": {"p95": 0.8}},
    }
    steady = {
        "offered": 500,
        "batch": 200,
        "events_per_s": 498.0,
        "error_rate": 0.0,
        "latency_ms": {"p50": 12.0, "p95": 30.0, "p99": 45.0},
        "freshness_s": {"p50": 0.4, "p95": 0.9},
        "events_per_locust_cpu_s": 40000.0,
        "verdict": "valid: 10 windows match",
        "cpu": cpu_cost(
            {"nats-1": 10.0, "aggregator-1": 5.0},
            {"nats-1": 10.5, "aggregator-1": 5.25},
            locust_s=0.1,
            harness_s=0.05,
            wall_s=2.0,
            events=1000,
        ),
        "locust_history": [
            {
                "t": 100.0,
                "users": 2,
                "rps": 2.5,
                "fps": 0,
                "p50_ms": 12,
                "p95_ms": 30,
                "p99_ms": 45,
            },
            {
                "t": 101.0,
                "users": 2,
                "rps": 2.5,
                "fps": 0,
                "p50_ms": 11,
                "p95_ms": 29,
                "p99_ms": 40,
            },
        ],
    }
    return {
        "started": "2026-11-27 22:00:00 UTC",
        "command": "python -m harness benchmark",
        "machine": machine(),
        "replicas": {
            "1": {
                "stages": [stage, {**stage, "rate": 2000, "held": False}],
                "max_sustainable_events_per_s": 990.0,
                "at_50pct": steady,
                "at_90pct": {**steady, "offered": 900},
            }
        },
    }


def test_page_has_the_figures_and_inline_plots() -> None:
    page = render(fake_results())
    assert "<svg" in page and "990" in page and "valid: 10 windows match" in page
    # Nothing loads from the network (namespace URIs in the SVG are names, not fetches).
    assert "<script" not in page and "<link" not in page and 'src="http' not in page


def test_machine_says_what_it_ran_on() -> None:
    m = machine()
    assert m["cpus"] and "kernel" in m


def test_cpu_cost_is_microseconds_per_acknowledged_event_by_consumer() -> None:
    cost = cpu_cost(
        {"nats-1": 10.0, "aggregator-1": 5.0},
        {"nats-1": 10.5, "aggregator-1": 5.25, "ingest-1": 0.2},  # ingest-1 started meanwhile
        locust_s=0.1,
        harness_s=0.05,
        wall_s=2.0,
        events=1000,
    )
    assert cost["us_per_event"] == {
        "nats-1": 500.0,
        "aggregator-1": 250.0,
        "ingest-1": 200.0,
        "locust": 100.0,
        "harness": 50.0,
    }
    assert cost["us_per_event_total"] == 1100.0
    assert cost["cores"] == 0.55
    assert cpu_line(cost).startswith("CPU per acknowledged event: 1100 us (0.55 cores over 2 s)")


def test_page_breaks_the_cpu_down_by_consumer() -> None:
    page = render(fake_results())
    assert "Where the CPU went" in page
    assert "<td>nats-1</td><td>500</td><td>500</td>" in page
    assert "<th>900 (0.45)</th>" in page


def test_refine_bisects_between_the_rate_that_held_and_the_one_that_did_not(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Stages at 18,600 held and 21,400 did not; the true limit is 20,300: two bisections try
    20,000 (holds) then 20,700 (does not), each after the backlog drained."""
    tried: list[float] = []
    drained: list[str] = []

    class Admin:
        def __init__(self, urls: object) -> None:
            pass

        def await_acknowledged(self, what: str, timeout_s: float) -> float:
            drained.append(what)
            return 0.1

    def fake_run(endpoints: object, spec: LoadSpec, out_dir: Path, **_: object) -> object:
        tried.append(spec.rate)
        run = SimpleNamespace(to_dict=lambda: {"events_per_s": spec.rate})
        return SimpleNamespace(
            spec=spec,
            breaches=[SimpleNamespace(message=lambda: "freshness")] if spec.rate > 20_300 else [],
            phases={"run": run},
            locust=SimpleNamespace(users=1, cpu_s=1.0),
            events_per_cpu_s=lambda: None,
        )

    monkeypatch.setattr(benchmark, "JetStreamAdmin", Admin)
    monkeypatch.setattr(benchmark, "run_load", fake_run)
    base = LoadSpec(rate=0, duration_s=20, batch_size=500)
    stages = benchmark.refine(SimpleNamespace(nats_urls=()), base, 18_600, 21_400, tmp_path, print)
    assert tried == [20_000, 20_700]
    assert [s["held"] for s in stages] == [True, False]
    assert all(s["refined"] for s in stages) and len(drained) == 2
