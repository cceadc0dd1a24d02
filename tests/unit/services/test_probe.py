"""The probe's spool, ledger and delivery, against httpx.MockTransport (no network)."""

from __future__ import annotations

import asyncio
import json
import random
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from qoe import bugs
from qoe.config import ConfigError
from qoe.contract import validate_batch
from qoe.probe import (
    PROFILES,
    Probe,
    ProbeSettings,
    Spool,
    classify,
    create_app,
    events_due,
    events_endpoint,
    make_measurement,
)

from .conftest import NOW

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

URLS = ["http://ingest-a:8080", "http://ingest-b:8080/"]


def settings(tmp_path: Path, **overrides: Any) -> ProbeSettings:
    base: dict[str, Any] = {
        "ingest_urls": URLS,
        "probe_id": "probe-1",
        "token": "tok",
        "targets": ["a.example", "b.example"],
        "batch_size": 3,
        "spool_dir": tmp_path,
        "seed": 7,
    }
    return ProbeSettings(**{**base, **overrides})


class Ingest:
    """A scripted ingest: answers each POST with the next status (default 202)."""

    def __init__(self, *answers: int | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if self.answers else 202
        if isinstance(answer, Exception):
            raise answer
        return httpx.Response(answer, json={"accepted": 0, "duplicates": 0})

    def ids(self, index: int) -> list[str]:
        return [e["event_id"] for e in json.loads(self.requests[index].content)["events"]]


def probe_with(tmp_path: Path, ingest: Ingest, **overrides: Any) -> Probe:
    s = settings(tmp_path, **overrides)
    client = httpx.AsyncClient(transport=httpx.MockTransport(ingest.handler))
    return Probe(s, Spool(s.spool_dir / "spool.sqlite3", s.probe_id), client, clock=lambda: NOW)


def deliver(probe: Probe) -> str:
    return asyncio.run(probe.deliver_once())


def ledger(spool: Spool) -> list[dict[str, Any]]:
    return [json.loads(line) for _, line in spool.ledger_page(0, 10_000)]


def test_generated_events_are_valid_for_ingest() -> None:
    rng = random.Random(1)
    for profile in PROFILES:
        events = [make_measurement(rng, profile, f"p:1:{i}", "p", "t", NOW) for i in range(200)]
        body = json.dumps({"events": events}).encode()
        assert validate_batch(body, NOW).__class__.__name__ == "ValidBatch"


def test_profiles_shape_the_numbers() -> None:
    rng = random.Random(2)
    degraded = make_measurement(rng, "degraded", "i", "p", "t", NOW)
    lossy = make_measurement(rng, "lossy", "i", "p", "t", NOW)
    assert degraded["rtt_ms"] >= 160 and degraded["throughput_kbps"] <= 900
    assert lossy["loss_pct"] >= 3 and lossy["rtt_ms"] <= 80
    assert make_measurement(rng, "healthy", "i", "p", "t", NOW)["ts"].endswith(".000000+00:00")


def test_202_marks_the_batch_acked(tmp_path: Path) -> None:
    ingest = Ingest(202)
    probe = probe_with(tmp_path, ingest)
    probe.generate(5)
    assert deliver(probe) == "acked"
    assert ingest.ids(0) == ["probe-1:1:1", "probe-1:1:2", "probe-1:1:3"]
    request = ingest.requests[0]
    assert request.headers["authorization"] == "Bearer tok"
    assert request.headers["content-type"] == "application/json"
    assert str(request.url) == "http://ingest-a:8080/v1/events"
    assert probe.status() == {
        "generated": 5,
        "acked": 3,
        "pending": 2,
        "rejected": 0,
        "stopped": False,
    }


@pytest.mark.parametrize("failure", [503, 500, 429, httpx.ConnectError("refused")])
def test_failures_resend_the_same_events_to_the_next_url(tmp_path: Path, failure: Any) -> None:
    ingest = Ingest(failure, 202)
    probe = probe_with(tmp_path, ingest)
    probe.generate(3)
    assert deliver(probe) == "retry"
    assert probe.spool.counts()["pending"] == 3
    assert deliver(probe) == "acked"
    assert ingest.ids(0) == ingest.ids(1)
    assert ingest.requests[0].content == ingest.requests[1].content
    assert [r.url.host for r in ingest.requests] == ["ingest-a", "ingest-b"]
    assert {e["attempts"] for e in ledger(probe.spool)} == {2}


def test_timeout_is_a_retry(tmp_path: Path) -> None:
    ingest = Ingest(httpx.ReadTimeout("slow"))
    probe = probe_with(tmp_path, ingest)
    probe.generate(1)
    assert deliver(probe) == "retry"
    assert ledger(probe.spool)[0]["state"] == "pending"


@pytest.mark.parametrize("status", [400, 401, 413, 415, 422])
def test_client_errors_reject_the_batch(tmp_path: Path, status: int) -> None:
    probe = probe_with(tmp_path, Ingest(status))
    probe.generate(2)
    assert deliver(probe) == "rejected"
    assert [e["state"] for e in ledger(probe.spool)] == ["rejected", "rejected"]
    assert deliver(probe) == "idle"


def test_drop_after_503_bug_abandons_but_ledger_says_pending(tmp_path: Path) -> None:
    bugs.reset(frozenset({"probe_drop_after_503"}))
    ingest = Ingest(503)
    probe = probe_with(tmp_path, ingest)
    probe.generate(3)
    assert deliver(probe) == "dropped"
    assert deliver(probe) == "idle"
    assert [e["state"] for e in ledger(probe.spool)] == ["pending"] * 3
    assert probe.status()["pending"] == 3


def test_a_restart_without_the_bug_sends_what_the_bug_dropped(tmp_path: Path) -> None:
    bugs.reset(frozenset({"probe_drop_after_503"}))
    bugged = probe_with(tmp_path, Ingest(503))
    bugged.generate(3)
    assert deliver(bugged) == "dropped"
    bugged.spool.close()

    bugs.reset(frozenset())
    ingest = Ingest(202)
    restarted = probe_with(tmp_path, ingest)
    assert deliver(restarted) == "acked"
    assert ingest.ids(0) == ["probe-1:1:1", "probe-1:1:2", "probe-1:1:3"]
    assert restarted.status()["pending"] == 0


def test_restart_resends_pending_and_never_reuses_ids(tmp_path: Path) -> None:
    first = probe_with(tmp_path, Ingest(202))
    first.generate(4)
    assert deliver(first) == "acked"
    first.spool.close()

    ingest = Ingest(202)
    second = probe_with(tmp_path, ingest)
    assert second.spool.boot == 2
    second.generate(2)
    assert deliver(second) == "acked"
    assert ingest.ids(0) == ["probe-1:1:4", "probe-1:2:1", "probe-1:2:2"]
    ids = [e["event"]["event_id"] for e in ledger(second.spool)]
    assert len(ids) == len(set(ids)) == 6


def test_ledger_lines_carry_event_state_and_attempts(tmp_path: Path) -> None:
    probe = probe_with(tmp_path, Ingest(503, 202))
    events = probe.generate(3)
    deliver(probe)
    deliver(probe)
    lines = ledger(probe.spool)
    assert [line["event"] for line in lines] == events
    assert [(line["state"], line["attempts"]) for line in lines] == [("acked", 2)] * 3


def test_stop_is_persisted_across_restarts(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.sqlite3", "p")
    assert not spool.stopped
    spool.set_stopped()
    spool.close()
    assert Spool(tmp_path / "s.sqlite3", "p").stopped


def test_http_ledger_stop_and_status(tmp_path: Path) -> None:
    probe = probe_with(tmp_path, Ingest(202))
    probe.generate(4)
    deliver(probe)
    client = TestClient(create_app(probe))
    response = client.get("/ledger")
    assert response.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert [line["state"] for line in lines] == ["acked"] * 3 + ["pending"]
    assert client.get("/status").json()["stopped"] is False
    assert client.post("/stop").json()["stopped"] is True
    assert client.get("/status").json() == {
        "generated": 4,
        "acked": 3,
        "pending": 1,
        "rejected": 0,
        "stopped": True,
    }
    assert client.get("/readyz").status_code == 200  # ingest answered a moment ago


def test_not_ready_before_ingest_ever_answered(tmp_path: Path) -> None:
    probe = probe_with(tmp_path, Ingest())
    response = TestClient(create_app(probe)).get("/readyz")
    assert response.status_code == 503
    assert "ingest" in response.json()["unreachable"]


def test_generation_pauses_while_stopped_and_resumes_after_start(tmp_path: Path) -> None:
    probe = probe_with(tmp_path, Ingest(), rate=1000.0)
    probe.spool.set_stopped()

    async def generate_for(seconds: float) -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(probe.generate_forever(stop))
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.wait_for(task, timeout=2)

    asyncio.run(generate_for(0.3))
    assert probe.spool.counts()["generated"] == 0
    probe.spool.set_stopped(False)
    asyncio.run(generate_for(0.3))
    assert probe.spool.counts()["generated"] > 0


def test_pacing_and_helpers() -> None:
    assert events_due(elapsed=1.0, rate=20, produced=0) == 20
    assert events_due(elapsed=1.05, rate=20, produced=20) == 1
    assert events_due(elapsed=0.5, rate=20, produced=20) == 0
    assert events_endpoint("http://x:1/") == "http://x:1/v1/events"
    assert events_endpoint("http://x:1/v1/events") == "http://x:1/v1/events"
    assert [classify(s) for s in (202, 200, 400, 429, 503)] == [
        "acked",
        "retry",
        "rejected",
        "retry",
        "retry",
    ]


ENV = {
    "INGEST_URLS": "http://a:8080,http://b:8080",
    "PROBE_ID": "probe-1",
    "PROBE_TOKEN": "t",
    "TARGETS": "cdn.example.net, api.example.net",
}


def test_settings_from_env() -> None:
    s = ProbeSettings.from_env({**ENV, "RATE": "5", "PROFILE": "lossy", "SEED": "3"})
    assert s.ingest_urls == ["http://a:8080", "http://b:8080"]
    assert s.targets == ["cdn.example.net", "api.example.net"]
    assert (s.rate, s.profile, s.seed, s.batch_size) == (5.0, "lossy", 3, 50)
    assert ProbeSettings.from_env(ENV).seed is None


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda e: e.pop("PROBE_TOKEN"), "PROBE_TOKEN is required"),
        (lambda e: e.update(PROBE_ID="bad id"), "PROBE_ID is not valid"),
        (lambda e: e.update(TARGETS="ok," + "x" * 300), "TARGETS is not valid"),
        (lambda e: e.update(PROFILE="flaky"), "PROFILE must be one of"),
        (lambda e: e.update(BATCH_SIZE="1001"), "BATCH_SIZE must be <= 1000"),
    ],
)
def test_bad_probe_settings(change: Callable[[dict[str, str]], Any], fragment: str) -> None:
    env = dict(ENV)
    change(env)
    with pytest.raises(ConfigError, match=fragment):
        ProbeSettings.from_env(env)
