"""The served OpenAPI document: valid OpenAPI 3.1, its request schema agreeing with the
validator, and schemathesis failing an ingest whose answers the document does not describe."""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from jsonschema_rs import Draft202012Validator
from openapi_spec_validator import validate
from qoe.contract import MAX_EVENTS, Rejection, validate_batch
from qoe.ingest import IngestSettings, create_app
from qoe.openapi import EVENTS_PATH, document
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from .conftest import NOW, make_event
from .test_ingest import TOKEN, FakeJetStream, always_ready

with warnings.catch_warnings():  # starlette nags about httpx vs httpx2; httpx is what we ship
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def served() -> dict[str, Any]:
    app = create_app(FakeJetStream(), IngestSettings(tokens={"p": TOKEN}), always_ready)
    response = TestClient(app).get("/openapi.json")  # no token
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    doc: dict[str, Any] = response.json()
    return doc


def test_served_document_is_valid_openapi_3_1() -> None:
    doc = served()
    validate(doc)
    assert doc["openapi"].startswith("3.1")
    assert doc == json.loads(json.dumps(document()))


def test_documents_every_answer_of_the_contract() -> None:
    operation = served()["paths"][EVENTS_PATH]["post"]
    assert sorted(operation["responses"]) == ["202", "400", "401", "413", "415", "422", "503"]
    assert operation["security"] == [{"bearer": []}]
    assert "Retry-After" in operation["responses"]["503"]["headers"]


def body_validator() -> Draft202012Validator:
    doc = served()
    schema = doc["paths"][EVENTS_PATH]["post"]["requestBody"]["content"]["application/json"]
    # The $refs point into the document's components, so the document is the root.
    # jsonschema-rs (what schemathesis validates with): its regexes end at $ as ECMA-262's do,
    # where Python's re, and so the jsonschema package, let $ match before a final newline.
    return Draft202012Validator({**schema["schema"], "components": doc["components"]})


def events(*overrides: dict[str, Any]) -> dict[str, Any]:
    return {"events": [make_event(**o) for o in overrides]}


# Bodies on either side of every rule a JSON Schema can state; the ts window and RFC 3339
# syntax are in the ts description, not checked here.
SAMPLES = {
    "one event": events({}),
    "1000 events": events(*({"event_id": f"e{i}"} for i in range(MAX_EVENTS))),
    "bounds": events({"rtt_ms": 60000, "jitter_ms": 0, "loss_pct": 100, "throughput_kbps": 0}),
    "event id of every allowed char": events({"event_id": "aZ09._:-"}),
    "0 events": {"events": []},
    "1001 events": events(*({"event_id": f"e{i}"} for i in range(MAX_EVENTS + 1))),
    "second key": {**events({}), "more": 1},
    "no events key": {"event": []},
    "events an object": {"events": make_event()},
    "unknown field": events({"extra": 1}),
    "field missing": {"events": [{k: v for k, v in make_event().items() if k != "target"}]},
    "event id with a space": events({"event_id": "a b"}),
    "event id ending in a newline": events({"event_id": "a\n"}),
    "probe id with a colon": events({"probe_id": "p:1"}),
    "event id too long": events({"event_id": "x" * 129}),
    "empty target": events({"target": ""}),
    "rtt over 60000": events({"rtt_ms": 60000.5}),
    "negative loss": events({"loss_pct": -0.1}),
    "loss over 100": events({"loss_pct": 100.1}),
    "throughput a string": events({"throughput_kbps": "1"}),
    "ts a number": events({"ts": 1714564800}),
}


@pytest.mark.parametrize("name", SAMPLES)
def test_request_schema_accepts_what_the_validator_accepts(name: str) -> None:
    body = SAMPLES[name]
    by_validator = not isinstance(validate_batch(json.dumps(body).encode(), NOW), Rejection)
    by_schema = body_validator().is_valid(body)
    assert by_schema == by_validator, f"{name}: schema says {by_schema}, validator {by_validator}"


def fuzz(doc: dict[str, Any], clock: Callable[[], datetime] = lambda: NOW) -> None:
    """Schemathesis's checks on generated batches sent to an in-process ingest."""
    app = create_app(FakeJetStream(), IngestSettings(tokens={"p": TOKEN}), always_ready, clock)
    operation = schemathesis.openapi.from_dict(doc)[EVENTS_PATH]["POST"]

    @given(case=operation.as_strategy())
    @settings(
        max_examples=30,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: schemathesis.Case) -> None:
        case.call_and_validate(app=app, headers={"Authorization": f"Bearer {TOKEN}"}, checks=CHECKS)

    run()


def test_schemathesis_finds_nothing_wrong_with_the_served_document() -> None:
    fuzz(served())


def test_schemathesis_fails_a_document_the_server_disagrees_with() -> None:
    """The checker can fail: a document whose 422 body lacks `errors` (the server sends it),
    and one that leaves 422 out, are both caught."""
    doc = served()
    strict = copy.deepcopy(doc)
    strict["components"]["schemas"]["InvalidEvents"]["properties"].pop("errors")
    strict["components"]["schemas"]["InvalidEvents"]["required"].remove("errors")
    with pytest.raises(FailureGroup, match="Response violates schema"):
        fuzz(strict)
    without_422 = copy.deepcopy(doc)
    del without_422["paths"][EVENTS_PATH]["post"]["responses"]["422"]
    with pytest.raises(FailureGroup, match="Undocumented status code"):
        fuzz(without_422)


def test_schemathesis_fails_an_ingest_answering_500() -> None:
    def broken_clock() -> datetime:
        raise RuntimeError("clock broken")

    with pytest.raises(FailureGroup, match="Server error"):
        fuzz(served(), broken_clock)
