"""The ingest API fuzzed from its own OpenAPI document (`GET /openapi.json`) with schemathesis:
no 5xx, and every status, content type and body as the document says; and the fuzz changes
nothing it must not: the aggregates of a batch sent before it still match the oracle.

The fuzz's batches are of probes and event ids under this scenario's prefix (the document is
narrowed to them before generating), so the events ingest accepts from it land in windows no
other scenario reads; their timestamps are narrowed to an hour inside the ingest window, so
valid batches are accepted and stored rather than all refused for their ts.
"""

from __future__ import annotations

import copy
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from harness.history import Outcome
from harness.stack import Endpoints
from harness.workload import EventGenerator, IngestClient

pytestmark = pytest.mark.e2e

EVENTS_PATH = "/v1/events"
MAX_EXAMPLES = 250  # 11 s here idle, 25 s for 150 under load; shrinking a failure adds more
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def served_document(endpoints: Endpoints) -> dict[str, Any]:
    """The document every ingest serves, without a token; they must all serve the same one."""
    documents = []
    for url in endpoints.ingest_urls:
        response = httpx.get(f"{url.rstrip('/')}/openapi.json", timeout=5)
        assert response.status_code == 200, f"GET {url}/openapi.json: {response.status_code}"
        documents.append(response.json())
    assert all(d == documents[0] for d in documents), "the ingests serve different documents"
    return documents[0]


def narrowed(document: dict[str, Any], prefix: str, now: datetime) -> dict[str, Any]:
    """The document with the event's ids under `prefix` and its ts in the hour before `now`'s.

    The answers are left as served: they are what the checks hold the ingest to.
    """
    doc = copy.deepcopy(document)
    fields = doc["components"]["schemas"]["Event"]["properties"]
    fields["probe_id"]["pattern"] = f"^{prefix}[A-Za-z0-9._-]{{0,8}}$"
    fields["event_id"]["pattern"] = f"^{prefix}[A-Za-z0-9._:-]{{0,16}}$"
    hour = (now - timedelta(hours=1)).strftime("%Y-%m-%dT%H")
    # Without format: a generated date-time would almost never match the pattern.
    del fields["ts"]["format"]
    fields["ts"]["pattern"] = f"^{hour}:[0-5][0-9]:[0-5][0-9](\\.[0-9]{{1,9}})?(Z|\\+00:00)$"
    return doc


def fuzz(document: dict[str, Any], base_url: str, token: str, run_seed: int) -> Counter[int]:
    """Schemathesis's checks on MAX_EXAMPLES generated requests, valid and invalid ones;
    how many got each status. Raises with the failing case (a curl command) on a mismatch."""
    operation = schemathesis.openapi.from_dict(document)[EVENTS_PATH]["POST"]
    cases = st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE),
        operation.as_strategy(GenerationMode.NEGATIVE),
    )
    statuses: Counter[int] = Counter()

    @seed(run_seed)
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases)
    def one(case: schemathesis.Case) -> None:
        response = case.call_and_validate(
            base_url=base_url,
            headers={"Authorization": f"Bearer {token}"},
            checks=CHECKS,
            timeout=10,
        )
        statuses[response.status_code] += 1

    one()
    return statuses


def test_fuzzed_requests_get_the_documented_answers_and_change_nothing(
    client: IngestClient,
    generator: EventGenerator,
    verifier,
    history,
    endpoints: Endpoints,
    probe_prefix: str,
    scenario_seed: int,
    scenario_details: dict[str, Any],
) -> None:
    op = client.send(generator.batch(200, profile="mixed"))
    assert op.outcome is not Outcome.FAIL, f"the known batch was refused: {op.status} {op.error}"
    client.settle(deadline_s=60)  # a 503 is resent until acknowledged, as a probe would
    document = narrowed(served_document(endpoints), f"{probe_prefix}-fz", datetime.now(UTC))
    started = time.monotonic()
    statuses = fuzz(document, endpoints.ingest_urls[0], endpoints.ingest_token, scenario_seed)
    scenario_details["fuzz"] = {
        "cases": sum(statuses.values()),
        "statuses": {str(status): n for status, n in sorted(statuses.items())},
        "duration_s": round(time.monotonic() - started, 1),
    }
    # Without accepted batches "the fuzz changes nothing" would hold trivially.
    assert statuses[202], f"no fuzzed batch was accepted (statuses {dict(statuses)})"
    verifier.verify(history, list(generator.probes))
