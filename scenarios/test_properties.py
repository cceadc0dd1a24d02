"""Property tests against the live stack: generated batches (duplicates inside and across
batches, ids reused with other payloads, boundary and out-of-order timestamps in any RFC 3339
form, maximum-length ids, unicode targets, values at their bounds, windows on and one float
step beside each diagnosis threshold) must always leave the aggregates and diagnoses the
oracle predicts.

The example budget comes from the hypothesis profile: `live` (the default, with or without
CI=true) is small, `--hypothesis-profile thorough` runs many more.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
from hypothesis import given

from harness.history import Event, History, Outcome
from harness.workload import MAX_EVENT_ID, MAX_PROBE_ID, IngestClient, batches, prefixed

pytestmark = pytest.mark.e2e
_examples = itertools.count()


def isolate(batch_list: list[list[Event]], prefix: str) -> list[list[Event]]:
    """Ids and probe ids unique to one example: the stack remembers ids for 48 h and the
    checker reads only this example's probes. Maximum-length ones stay maximum-length."""
    return [
        [
            replace(
                e,
                event_id=prefixed(f"{prefix}.", e.event_id, MAX_EVENT_ID),
                probe_id=prefixed(f"{prefix}-", e.probe_id, MAX_PROBE_ID),
            )
            for e in b
        ]
        for b in batch_list
    ]


@given(batch_list=batches(probe_ids=("a", "b"), targets=("t1", "t2"), max_batches=4))
def test_generated_batches_match_the_oracle(batch_list, endpoints, probe_prefix, verifier):
    prefix = f"{probe_prefix}x{next(_examples)}"
    sent = isolate(batch_list, prefix)
    history = History()
    with IngestClient(
        endpoints.ingest_urls, endpoints.ingest_token, history, "hypothesis"
    ) as client:
        for batch in sent:
            op = client.send(batch)
            assert op.outcome is not Outcome.FAIL, f"valid batch rejected: {op.status} {op.error}"
        client.settle(deadline_s=30)
    verifier.verify(history, sorted({e.probe_id for b in sent for e in b}), timeout_s=20)
