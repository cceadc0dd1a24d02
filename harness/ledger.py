"""The probes' own ledgers as a history: what each probe generated and whether ingest acknowledged it."""

from __future__ import annotations

import json
import time

import httpx

from harness.history import Event, History, Operation, Outcome
from harness.polling import wait_until
from harness.stack import Endpoints

# A probe's ledger state -> the outcome the checker reasons with.
OUTCOMES = {"acked": Outcome.OK, "pending": Outcome.UNKNOWN, "rejected": Outcome.FAIL}


def probe_urls(endpoints: Endpoints) -> dict[str, str]:
    """The stack's own probes (its services named probe-N) by name, with their URLs."""
    return {name: url for name, url in endpoints.services.items() if name.startswith("probe-")}


def stop(probe_urls: dict[str, str]) -> None:
    """Stop generating on every probe; what they hold is still delivered."""
    with httpx.Client(timeout=5.0) as http:
        for url in probe_urls.values():
            http.post(f"{url}/stop").raise_for_status()


def stop_and_drain(probe_urls: dict[str, str], timeout_s: float = 60.0) -> dict[str, dict]:
    """Stop generating on every probe and wait until each has nothing pending; return their status.

    A probe that keeps events pending past the deadline is reported as it stands, so the
    caller's assertion names what was never delivered.
    """
    stop(probe_urls)
    with httpx.Client(timeout=5.0) as http:

        def statuses() -> dict[str, dict]:
            return {name: http.get(f"{url}/status").json() for name, url in probe_urls.items()}

        def drained() -> dict[str, dict] | None:
            current = statuses()
            return current if all(s["pending"] == 0 for s in current.values()) else None

        try:
            return wait_until(drained, timeout_s=timeout_s, what="probes delivering spools")[0]
        except AssertionError:
            return statuses()


def start(probe_urls: dict[str, str]) -> None:
    """Let stopped probes generate again (the stack's probes keep running between scenarios)."""
    with httpx.Client(timeout=5.0) as http:
        for url in probe_urls.values():
            http.post(f"{url}/start").raise_for_status()


def undelivered(status: dict[str, dict]) -> dict[str, dict]:
    """Probes that, after draining, still hold events ingest never acknowledged (or rejected)."""
    return {name: s for name, s in status.items() if s["pending"] or s["rejected"]}


def read_history(probe_urls: dict[str, str]) -> History:
    """One operation per ledger line, invoked and completed now (ledgers carry no timing)."""
    history = History()
    now = time.time()
    with httpx.Client(timeout=30.0) as http:
        for name, url in probe_urls.items():
            response = http.get(f"{url}/ledger")
            response.raise_for_status()
            for line in response.text.splitlines():
                if not line.strip():
                    continue
                row = json.loads(line)
                history.append(
                    Operation(
                        process=name,
                        endpoint=url,
                        invoked_at=now,
                        completed_at=now,
                        outcome=OUTCOMES[row["state"]],
                        events=(Event.from_wire(row["event"]),),
                        status=None,
                        error="" if row["state"] == "acked" else row["state"],
                    )
                )
    return history
