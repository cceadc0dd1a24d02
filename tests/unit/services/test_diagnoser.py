"""The diagnosis rules and the sweep's statement parameters."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest
from qoe import bugs
from qoe.config import ConfigError
from qoe.diagnoser import (
    INSERT_SQL,
    REPLACE_SQL,
    Diagnoser,
    DiagnoserSettings,
    Diagnosis,
    Thresholds,
    WindowSums,
    diagnose,
    replace_params,
)

from .conftest import NOW


def window(samples: int = 2, rtt=0.0, jitter=0.0, loss=0.0, throughput=4000.0) -> WindowSums:
    """Sums for `samples` events whose averages are the given numbers."""
    return WindowSums(
        "p1", "t", NOW, 60, samples, rtt * samples, jitter * samples, loss * samples,
        throughput * samples, 3,
    )  # fmt: skip


DEFAULTS = Thresholds()


def kinds(w: WindowSums, t: Thresholds = DEFAULTS) -> list[str]:
    return [d.kind for d in diagnose(w, t)]


def test_healthy_window_has_no_diagnosis() -> None:
    assert diagnose(window(rtt=50, jitter=5, loss=0.1, throughput=9000), Thresholds()) == []


def test_each_rule_fires_with_average_and_threshold() -> None:
    found = diagnose(window(rtt=200, jitter=40, loss=3, throughput=500), Thresholds())
    assert found == [
        Diagnosis("high_latency", 200, 150),
        Diagnosis("high_jitter", 40, 30),
        Diagnosis("packet_loss", 3, 2),
        Diagnosis("low_throughput", 500, 1000),
    ]


def test_comparisons_are_strict_at_the_threshold() -> None:
    assert kinds(window(rtt=150, jitter=30, loss=2, throughput=1000)) == []
    assert kinds(window(rtt=150.001)) == ["high_latency"]
    assert kinds(window(throughput=999.999)) == ["low_throughput"]


def test_inclusive_threshold_bug_diagnoses_averages_exactly_on_the_threshold() -> None:
    on_every_threshold = window(rtt=150, jitter=30, loss=2, throughput=1000)
    bugs.reset(frozenset({"diagnoser_threshold_inclusive"}))
    assert kinds(on_every_threshold) == [
        "high_latency", "high_jitter", "packet_loss", "low_throughput"
    ]  # fmt: skip
    assert kinds(window(rtt=149.999, jitter=29.9, loss=1.9, throughput=1000.001)) == []
    assert kinds(window(rtt=150.001)) == ["high_latency"]


def test_rules_use_averages_not_sums() -> None:
    # 10 events of 100 ms: rtt_sum 1000 is far over 150, the average is not.
    assert kinds(window(samples=10, rtt=100)) == []


def test_thresholds_come_from_env() -> None:
    t = Thresholds.from_env({"HIGH_LATENCY_MS": "50", "LOW_THROUGHPUT_KBPS": "5000"})
    assert t == Thresholds(50, 30, 2, 5000)
    assert kinds(window(rtt=60), t) == ["high_latency", "low_throughput"]
    with pytest.raises(ConfigError, match="HIGH_JITTER_MS"):
        Thresholds.from_env({"HIGH_JITTER_MS": "lots"})


def test_replace_params_cover_windows_without_diagnoses() -> None:
    healthy, sick = window(), window(rtt=500)
    judged = [(healthy, diagnose(healthy, Thresholds())), (sick, diagnose(sick, Thresholds()))]
    params = replace_params(judged)
    assert params["version"] == [3, 3]  # both windows are marked judged...
    assert params["d_kind"] == ["high_latency"]  # ...only one gets a row
    assert params["d_observed"] == [500]
    delete, insert, mark = REPLACE_SQL
    assert insert is INSERT_SQL
    assert "%(d_threshold)s" in insert
    assert "%(probe_id)s" in delete
    assert "diagnosed_version = c.version" in mark


def test_integer_thresholds_still_give_float_columns() -> None:
    # psycopg cannot send a list mixing int and float as one array parameter.
    [d] = diagnose(window(samples=1, rtt=20, throughput=5000), Thresholds(high_latency_ms=10))
    assert isinstance(d.observed, float) and isinstance(d.threshold, float)


def test_a_stream_of_hints_does_not_sweep_more_often_than_the_gap_allows() -> None:
    settings = DiagnoserSettings("postgresql://unused", DEFAULTS, min_sweep_gap=0.2)
    diagnoser = Diagnoser(settings)
    sweeps: list[float] = []

    async def sweep_all(stop: asyncio.Event) -> None:
        sweeps.append(asyncio.get_running_loop().time())

    diagnoser.sweep_all = sweep_all  # type: ignore[method-assign]

    async def scenario() -> None:
        stop = asyncio.Event()
        running = asyncio.create_task(diagnoser.run(stop))
        for _ in range(100):  # a hint every 10 ms, as aggregator commits send them under load
            await diagnoser.on_hint(None)
            await asyncio.sleep(0.01)
        stop.set()
        await running

    started = time.monotonic()
    asyncio.run(scenario())
    elapsed = time.monotonic() - started  # about 1 s; more on a busy machine
    gaps = [b - a for a, b in itertools.pairwise(sweeps)]
    assert 3 <= len(sweeps) <= elapsed / 0.2 + 1, (elapsed, sweeps)
    assert min(gaps) >= 0.19, gaps
