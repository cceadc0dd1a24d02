"""Bad input: each contract error case, sent between good batches, gets its status and changes nothing."""

from __future__ import annotations

import json

import pytest

from harness.history import Outcome
from harness.workload import EventGenerator, IngestClient

pytestmark = [pytest.mark.e2e, pytest.mark.smoke]


def good(generator: EventGenerator, n: int = 5) -> list[dict]:
    return [e.to_wire() for e in generator.batch(n)]


def body(events: list[dict]) -> bytes:
    return json.dumps({"events": events}).encode()


def cases(generator: EventGenerator, token: str) -> list[tuple[str, bytes, dict, int]]:
    """(name, body, headers, expected status). Each invalid body still carries valid-looking events
    with fresh ids, so anything published by mistake shows up as an extra window."""
    auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    one = good(generator, 3)

    def with_field(**change: object) -> bytes:
        events = good(generator, 3)
        events[1] = {**events[1], **change}
        return body(events)

    def without(field: str) -> bytes:
        events = good(generator, 3)
        del events[2][field]
        return body(events)

    return [
        ("not json", b'{"events": [', auth, 400),
        ("wrong shape", json.dumps({"evts": one}).encode(), auth, 400),
        ("events not a list", json.dumps({"events": one[0]}).encode(), auth, 400),
        ("no events", body([]), auth, 400),
        ("no token", body(good(generator)), {"Content-Type": "application/json"}, 401),
        ("wrong token", body(good(generator)), {**auth, "Authorization": "Bearer nope"}, 401),
        ("1001 events", body(good(generator, 1001)), auth, 413),
        (
            "over 1 MiB",
            body([{**e, "target": "t" * 250} for e in good(generator, 1000)]) + b" " * (1 << 20),
            auth,
            413,
        ),
        ("wrong content type", body(good(generator)), {**auth, "Content-Type": "text/plain"}, 415),
        ("unknown field", with_field(extra=1), auth, 422),
        ("missing field", without("loss_pct"), auth, 422),
        ("bad event id", with_field(event_id="has space"), auth, 422),
        ("rtt out of range", with_field(rtt_ms=60000.5), auth, 422),
        ("loss over 100", with_field(loss_pct=100.01), auth, 422),
        ("negative throughput", with_field(throughput_kbps=-1), auth, 422),
        ("ts without offset", with_field(ts="2026-01-01T00:00:00"), auth, 422),
        ("ts too old", with_field(ts="2001-01-01T00:00:00Z"), auth, 422),
        ("infinity", with_field(rtt_ms="@INF@").replace(b'"@INF@"', b"1e999"), auth, 422),
        ("NaN", with_field(rtt_ms="@NAN@").replace(b'"@NAN@"', b"NaN"), auth, 400),
        ("string number", with_field(jitter_ms="5"), auth, 422),
    ]


def test_each_error_case_between_good_batches(
    client: IngestClient, endpoints, generator, verifier, history
):
    failures = []
    for name, payload, headers, expected in cases(generator, endpoints.ingest_token):
        op = client.send(generator.batch(20))
        assert op.outcome is Outcome.OK, f"good batch before {name!r}: {op.status} {op.error}"
        response = client.send_raw(payload, headers)
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if (
            response.status_code != expected
            or not isinstance(answer, dict)
            or "error" not in answer
        ):
            failures.append(
                f"{name}: expected {expected} with a JSON error, got {response.status_code} {response.text[:200]}"
            )
        if response.status_code == 422 and isinstance(answer, dict):
            assert (
                answer.get("errors") and {"index", "field", "reason"} <= answer["errors"][0].keys()
            ), answer
    client.send(generator.batch(20))
    assert not failures, "ingest answered bad input wrongly:\n" + "\n".join(failures)
    verifier.verify(history, list(generator.probes))
