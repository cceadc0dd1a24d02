"""The outcome-line format of a load run, defined once: what the locustfile writes, what the
harness reads (harness.load.locust in Python, harness.columnar with DuckDB) and what
harness.checkbench generates.

Standard library only: every locust process imports this (scenarios/load/locustfile.py).

An outcome file (``outcomes-<worker>.jsonl``) holds one JSON object per line, written and
flushed as it happens, so a killed worker loses nothing it sent:

    invocation  {"i": n, "d": intended, "t": sent, "u": url, "p": process, "b": body}
    completion  {"c": n, "t": completed, "o": "ok" | "fail" | "unknown", "s": status, "x": error}
    dropped     {"m": count, "d": first intended, "t": at, "p": process}

Times are epoch seconds (time.time()). ``n`` numbers a worker's invocations from 1. The
invocation is flushed before the request: "d" is when the load's schedule meant the batch to
go out, "t" when it went (later when the user had no free connection: the lateness is measured,
not hidden). An invocation without a completion is an unknown outcome (the worker stopped
mid-request). A dropped line counts the sends a user's schedule held when the load stopped
but that it never made (every connection still busy, or the generator behind): the first
one's intended time and how many, of those already LATE_AFTER_S late. The body is the batch
exactly as posted, ``{"events": [...]}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

OUTCOMES = ("ok", "fail", "unknown")
# Every key of every line kind with its DuckDB type (harness.columnar reads the lines as rows).
LINE_COLUMNS: Mapping[str, str] = {
    "i": "BIGINT",
    "c": "BIGINT",
    "m": "BIGINT",
    "d": "DOUBLE",
    "t": "DOUBLE",
    "u": "VARCHAR",
    "p": "VARCHAR",
    "o": "VARCHAR",
    "s": "BIGINT",
    "x": "VARCHAR",
}
ERROR_CHARS = 200  # an error message is cut to this many characters
MISSING_COMPLETION = "no completion recorded (the worker stopped mid-request)"
# A send this long after its intended time is late: the user had no free connection, or the
# load generator itself fell behind (its own scheduling jitter on a busy machine is tens of
# ms). A send the schedule held when the load stopped is dropped only once it was this late:
# one due a moment before the stop was not missed, the stop came first.
LATE_AFTER_S = 0.1


def invocation_line(n: int, intended: float, sent: float, url: str, process: str, body: str) -> str:
    """The line written before a request; ``body`` is the JSON text posted, kept verbatim."""
    head = json.dumps({"i": n, "d": intended, "t": sent, "u": url, "p": process})
    return f'{head[:-1]}, "b": {body}}}\n'


def completion_line(
    n: int, completed: float, outcome: str, status: int | None, error: str = ""
) -> str:
    """The line written when request ``n`` ended (``outcome`` one of OUTCOMES)."""
    if outcome not in OUTCOMES:
        raise ValueError(f"an outcome is one of {', '.join(OUTCOMES)}, got {outcome!r}")
    row = {"c": n, "t": completed, "o": outcome, "s": status, "x": error[:ERROR_CHARS]}
    return json.dumps(row) + "\n"


def dropped_line(count: int, first_intended: float, at: float, process: str) -> str:
    """The line a user writes when the load stopped with ``count`` sends it never made."""
    return json.dumps({"m": count, "d": first_intended, "t": at, "p": process}) + "\n"


@dataclass(frozen=True)
class Invocation:
    n: int
    intended: float
    sent: float
    url: str
    process: str
    events: list[dict[str, Any]]  # the batch's events as posted


@dataclass(frozen=True)
class Completion:
    n: int
    completed: float
    outcome: str
    status: int | None
    error: str


@dataclass(frozen=True)
class Dropped:
    count: int
    first_intended: float
    at: float
    process: str


def decode(row: Mapping[str, Any]) -> Invocation | Completion | Dropped | None:
    """The record an outcome line holds; None for an object of no known kind (ignored, as
    DuckDB's reader ignores it). A missing or mistyped key raises ValueError."""
    try:
        if "i" in row:
            return Invocation(
                n=int(row["i"]),
                intended=float(row["d"]),
                sent=float(row["t"]),
                url=str(row["u"]),
                process=str(row["p"]),
                events=list(row["b"]["events"]),
            )
        if "c" in row:
            outcome = str(row["o"])
            if outcome not in OUTCOMES:
                raise ValueError(f"outcome {outcome!r} is none of {', '.join(OUTCOMES)}")
            status = row.get("s")
            return Completion(
                n=int(row["c"]),
                completed=float(row["t"]),
                outcome=outcome,
                status=None if status is None else int(status),
                error=str(row.get("x") or ""),
            )
        if "m" in row:
            return Dropped(int(row["m"]), float(row["d"]), float(row["t"]), str(row["p"]))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"an outcome line lacks {exc} or has it of the wrong type") from exc
    return None
