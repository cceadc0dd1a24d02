"""The ingest HTTP app against a fake JetStream: answers, bodies and what gets published."""

from __future__ import annotations

import asyncio
import json
import warnings
from dataclasses import dataclass, field
from typing import Any

import pytest
from qoe.config import ConfigError
from qoe.contract import MAX_BODY_BYTES
from qoe.ingest import (
    IngestSettings,
    create_app,
    is_json_content_type,
    token_is_valid,
)

from .conftest import NOW, make_event

with warnings.catch_warnings():  # starlette nags about httpx vs httpx2; httpx is what we ship
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


@dataclass
class FakeAck:
    duplicate: bool | None = None


@dataclass
class FakeJetStream:
    """Remembers ids like JetStream's duplicate window; can stall or fail on demand."""

    seen: set[str] = field(default_factory=set)
    published: list[tuple[str, bytes, dict[str, str]]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    stall: bool = False
    fail_id: str | None = None

    async def publish(
        self, subject: str, payload: bytes, headers: dict[str, str], timeout: float
    ) -> FakeAck:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.01)  # lets concurrent publishes overlap
            if self.stall:
                await asyncio.sleep(3600)
            msg_id = headers["Nats-Msg-Id"]
            if msg_id == self.fail_id:
                raise ConnectionError("boom")
            self.published.append((subject, payload, headers))
            duplicate = msg_id in self.seen
            self.seen.add(msg_id)
            return FakeAck(duplicate=duplicate)
        finally:
            self.in_flight -= 1


async def always_ready() -> dict[str, str]:
    return {}


def client_for(js: FakeJetStream, **settings: Any) -> TestClient:
    config = IngestSettings(tokens={"probe-1": TOKEN, "probe-2": "other"}, **settings)
    return TestClient(create_app(js, config, always_ready, clock=lambda: NOW))


def post(client: TestClient, events: list[dict[str, Any]], headers: dict[str, str] = AUTH):
    return client.post("/v1/events", content=json.dumps({"events": events}), headers=headers)


def test_202_after_every_ack_with_canonical_payload_and_msg_id() -> None:
    js = FakeJetStream()
    events = [make_event(event_id=f"e{i}", ts="2024-05-01T13:59:00+02:00") for i in range(20)]
    response = post(client_for(js), events)
    assert response.status_code == 202
    assert response.json() == {"accepted": 20, "duplicates": 0}
    assert len(js.published) == 20
    subject, payload, headers = js.published[0]
    assert subject == "qoe.events"
    assert headers == {"Nats-Msg-Id": json.loads(payload)["event_id"]}
    assert json.loads(payload)["ts"] == "2024-05-01T11:59:00.000000Z"
    assert js.max_in_flight > 1, "publishes must run concurrently"


def test_repeated_id_in_a_batch_is_published_once_and_counted_once() -> None:
    js = FakeJetStream()
    events = [make_event(event_id="a"), make_event(event_id="b"), make_event(event_id="a")]
    response = post(client_for(js), events)
    assert response.json() == {"accepted": 2, "duplicates": 0}
    assert sorted(h["Nats-Msg-Id"] for _, _, h in js.published) == ["a", "b"]


def test_resent_batch_reports_duplicates() -> None:
    js = FakeJetStream()
    client = client_for(js)
    events = [make_event(event_id="a"), make_event(event_id="b")]
    post(client, events)
    response = post(client, [*events, make_event(event_id="c")])
    assert response.status_code == 202
    assert response.json() == {"accepted": 3, "duplicates": 2}


def test_publish_timeout_is_503_with_retry_after() -> None:
    js = FakeJetStream(stall=True)
    response = post(client_for(js, publish_timeout=0.1), [make_event()])
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert "error" in response.json()


def test_publish_error_is_503() -> None:
    js = FakeJetStream(fail_id="b")
    events = [make_event(event_id=i) for i in "abc"]
    response = post(client_for(js), events)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"


def test_early_ack_bug_answers_202_even_when_publishing_fails() -> None:
    js = FakeJetStream(fail_id="a")
    response = post(client_for(js, early_ack=True), [make_event(event_id="a")])
    assert response.status_code == 202
    assert response.json() == {"accepted": 1, "duplicates": 0}


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Content-Type": "application/json"}, 401),
        ({**AUTH, "Authorization": "Bearer wrong"}, 401),
        ({**AUTH, "Authorization": TOKEN}, 401),
        ({**AUTH, "Authorization": f"Basic {TOKEN}"}, 401),
        ({**AUTH, "Authorization": "Bearer "}, 401),
        ({**AUTH, "Content-Type": "text/plain"}, 415),
        ({**AUTH, "Content-Type": "application/jsonx"}, 415),
        ({"Authorization": f"Bearer {TOKEN}"}, 415),
    ],
)
def test_auth_and_content_type_errors_publish_nothing(headers: dict[str, str], status: int) -> None:
    js = FakeJetStream()
    client = client_for(js)
    response = client.post(
        "/v1/events", content=json.dumps({"events": [make_event()]}), headers=headers
    )
    assert response.status_code == status
    assert "error" in response.json()
    assert js.published == []


@pytest.mark.parametrize(
    ("content", "status"),
    [
        (b"not json", 400),
        (b'{"events": []}', 400),
        (json.dumps({"events": [make_event(event_id=f"e{i}") for i in range(1001)]}), 413),
        (json.dumps({"events": [make_event(), make_event(rtt_ms=-5)]}), 422),
        (b"x" * (MAX_BODY_BYTES + 1), 413),
    ],
)
def test_invalid_batches_publish_nothing(content: bytes | str, status: int) -> None:
    js = FakeJetStream()
    response = client_for(js).post("/v1/events", content=content, headers=AUTH)
    assert response.status_code == status
    assert "error" in response.json()
    assert js.published == []


def test_422_body_lists_errors() -> None:
    response = post(client_for(FakeJetStream()), [make_event(), make_event(loss_pct=101)])
    assert response.json()["errors"] == [
        {"index": 1, "field": "loss_pct", "reason": "Expected `float` <= 100.0"}
    ]


def test_declared_content_length_over_limit_is_413_before_reading() -> None:
    js = FakeJetStream()
    headers = {**AUTH, "Content-Length": str(MAX_BODY_BYTES + 1)}
    response = client_for(js).post("/v1/events", content=b"{}", headers=headers)
    assert response.status_code == 413


def test_streamed_body_over_limit_is_413() -> None:
    def chunks():
        for _ in range(20):
            yield b" " * 65536

    js = FakeJetStream()
    response = client_for(js).post("/v1/events", content=chunks(), headers=AUTH)
    assert response.status_code == 413


def test_charset_parameter_is_accepted() -> None:
    headers = {**AUTH, "Content-Type": "Application/JSON; charset=utf-8"}
    assert post(client_for(FakeJetStream()), [make_event()], headers).status_code == 202


def test_health_ready_and_metrics() -> None:
    js = FakeJetStream()
    client = client_for(js)
    post(client, [make_event()])
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").json() == {"ready": True}
    metrics = client.get("/metrics").text
    assert 'qoe_ingest_requests_total{status="202"}' in metrics
    assert "qoe_ingest_publish_seconds_bucket" in metrics


def test_readyz_names_what_is_unreachable() -> None:
    async def nats_down() -> dict[str, str]:
        return {"nats": "disconnected"}

    app = create_app(FakeJetStream(), IngestSettings(tokens={"p": "t"}), nats_down)
    response = TestClient(app).get("/readyz")
    assert response.status_code == 503
    assert response.json() == {"ready": False, "unreachable": {"nats": "disconnected"}}


def test_token_helpers() -> None:
    assert token_is_valid("Bearer abc", ["x", "abc"])
    assert token_is_valid("bearer abc", ["abc"])
    assert not token_is_valid(None, ["abc"])
    assert not token_is_valid("Bearer abcd", ["abc"])
    assert is_json_content_type("application/json; charset=utf-8")
    assert not is_json_content_type(None)


def test_settings_from_env() -> None:
    settings = IngestSettings.from_env(
        {"PROBE_TOKENS": "probe-1:t1,probe-2:t2", "PUBLISH_TIMEOUT_SECONDS": "0.5"}
    )
    assert settings.tokens == {"probe-1": "t1", "probe-2": "t2"}
    assert settings.publish_timeout == 0.5
    with pytest.raises(ConfigError, match="PROBE_TOKENS"):
        IngestSettings.from_env({})
