"""The locustfile in a real locust process against a fake ingest: every batch's outcome lands in
the outcome files, classified like harness.workload, and resent unknown batches keep their ids.

Locust is never imported here (it monkey-patches with gevent); it runs as a subprocess.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import pairwise
from pathlib import Path
from typing import ClassVar

import pytest

from harness.history import Operation, Outcome
from harness.load import LoadSpec, LocustProcesses, read_outcomes, stats_of


class QuietHandler(BaseHTTPRequestHandler):
    """A fake ingest's handler: answers a JSON body, logs nothing."""

    def answer(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """A local HTTP server answering with `handler` for the body; yields its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


class FakeIngest(QuietHandler):
    """202 for most batches, 503 for every fourth, 401 without the right token."""

    token = "tok-123"
    count = 0
    lock = threading.Lock()
    bodies: ClassVar[list[dict[str, object]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            type(self).count += 1
            n = type(self).count
            self.bodies.append(body)
        if self.headers.get("Authorization") != f"Bearer {self.token}":
            status = 401
        else:
            status = 503 if n % 4 == 0 else 202
        self.answer(status, json.dumps({"accepted": len(body["events"]), "duplicates": 0}).encode())


@pytest.fixture
def fake_ingest() -> Iterator[str]:
    with serving(FakeIngest) as url:
        yield url


class StallingIngest(QuietHandler):
    """202 for every batch, but from 1 s after the first request until 3 s after it nothing
    is answered: requests arriving then wait until the stall ends (a frozen ingest)."""

    stall: ClassVar[list[float]] = []  # [start, end], set by the first request
    lock = threading.Lock()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        with self.lock:
            if not self.stall:
                first = time.time()
                self.stall.extend([first + 1.0, first + 3.0])
        start, end = self.stall
        if start <= time.time() < end:
            time.sleep(end - time.time())  # the fake server's own stall, not a wait for one
        self.answer(202, b'{"accepted": 1, "duplicates": 0}')


@pytest.fixture
def stalling_ingest() -> Iterator[str]:
    StallingIngest.stall.clear()
    with serving(StallingIngest) as url:
        yield url


def sent_into_a_stall(url: str, out: Path, seeded_bugs: tuple[str, ...] = ()) -> list[Operation]:
    """The operations of 2 users, a batch each 0.2 s for 5 s, meant to go out while the
    ingest at `url` stalled (StallingIngest)."""
    spec = LoadSpec(
        rate=100, duration_s=5, users=2, batch_size=10, probes=1, targets=1, seeded_bugs=seeded_bugs
    )
    with LocustProcesses(spec, [url], "t", "Ls1", out) as locust:
        run = locust.wait(timeout_s=60)
    assert run.returncodes == (0,), locust.log_tail()
    start, end = StallingIngest.stall
    ops = read_outcomes(out, run.ended_at).operations()
    return [op for op in ops if op.intended_at is not None and start <= op.intended_at < end]


def test_the_open_model_keeps_sending_through_a_stall(stalling_ingest: str, tmp_path: Path) -> None:
    """Each user's sends go out on schedule while the ingest answers nothing, each waiting
    until the stall ends: its response time holds the stall, its service time too."""
    during = sent_into_a_stall(stalling_ingest, tmp_path)
    _, end = StallingIngest.stall
    assert len(during) >= 2 * (2.0 / 0.2) - 2, f"only {len(during)} sends meant for the stall"
    assert all(op.invoked_at - op.intended_at < 0.1 for op in during if op.intended_at)
    assert all(op.completed_at >= end - 0.01 for op in during)


def test_the_closed_model_seeded_bug_stops_sending_in_a_stall(
    stalling_ingest: str, tmp_path: Path
) -> None:
    """closed_model (QOE_LOAD_SEEDED_BUGS): a user waits for its answer, so during the stall
    its schedule holds no send at all; the stall is in no response time but the one batch
    per user that was in flight (coordinated omission)."""
    during = sent_into_a_stall(stalling_ingest, tmp_path / "closed", ("closed_model",))
    assert len(during) <= 2, f"{len(during)} sends meant for the stall"
    warned = (tmp_path / "closed" / "locust-0.log").read_text()
    assert "SEEDED BUG ACTIVE: closed_model" in warned


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_every_batch_is_recorded_and_classified(fake_ingest: str, tmp_path: Path) -> None:
    spec = LoadSpec(rate=400, duration_s=2, users=2, batch_size=10, probes=3, targets=2)
    # User 1 gets the closed port (refused: fail), user 2 the fake ingest.
    with LocustProcesses(
        spec, [fake_ingest, closed_port()], FakeIngest.token, "Lt1", tmp_path
    ) as locust:
        run = locust.wait(timeout_s=60)
    assert run.returncodes == (0,), locust.log_tail()
    assert run.cpu_s > 0
    history = read_outcomes(tmp_path, run.ended_at)
    ops = history.operations()
    by_outcome = {o: [op for op in ops if op.outcome is o] for o in Outcome}
    assert by_outcome[Outcome.OK] and by_outcome[Outcome.UNKNOWN] and by_outcome[Outcome.FAIL]
    assert all(op.status == 503 for op in by_outcome[Outcome.UNKNOWN])
    assert all(op.status is None and "Refused" in op.error for op in by_outcome[Outcome.FAIL])
    # Every batch the fake ingest saw is in the history, with the same events.
    seen = {tuple(e["event_id"] for e in b["events"]) for b in FakeIngest.bodies}
    answered = {tuple(e.event_id for e in op.events) for op in ops if op.status is not None}
    assert seen == answered
    # A 503 batch is resent with the same ids (what a probe does), so it ends acknowledged.
    acked = {op.events for op in by_outcome[Outcome.OK]}
    assert any(op.events in acked for op in by_outcome[Outcome.UNKNOWN])
    # Ids are unique per batch and carry the prefix; probes come from the configured set.
    events = [e for op in by_outcome[Outcome.OK] for e in op.events]
    assert len({e.event_id for e in events}) == len(events)
    assert all(e.event_id.startswith("Lt1.") for e in events)
    assert {e.probe_id for e in events} <= {"Lt1-p0", "Lt1-p1", "Lt1-p2"}
    stats = stats_of(history, run.started_at, run.ended_at)
    assert stats.batches == len(ops) and 0 < stats.error_rate < 1


def test_the_load_goes_on_until_the_time_the_harness_asks_for(
    fake_ingest: str, tmp_path: Path
) -> None:
    """A fault that healed late moves the end of the load (chaos: the after-recovery phase)."""
    spec = LoadSpec(rate=100, duration_s=1, users=1, batch_size=10, probes=1, targets=1)
    with LocustProcesses(spec, [fake_ingest], FakeIngest.token, "Lt3", tmp_path) as locust:
        locust.run_until(locust.started_at + 6)
        locust.run_until(locust.started_at + 2)  # never shortens what was asked before
        run = locust.wait(timeout_s=60)
    assert run.returncodes == (0,), locust.log_tail()
    last = max(op.invoked_at for op in read_outcomes(tmp_path, run.ended_at).operations())
    assert last >= run.started_at + 5, f"last batch {last - run.started_at:.1f} s in"


def test_users_send_out_of_step_each_at_its_own_pace(fake_ingest: str, tmp_path: Path) -> None:
    """Users spawn within a quarter of a second; paced from then on, they sent in one burst per
    period, and ingest saw several times the offered rate in it (a 4,800 events/s run measured
    p99 234 ms that way, 55 ms spread out)."""
    spec = LoadSpec(rate=200, duration_s=3, users=20, batch_size=10, probes=2, targets=2)
    with LocustProcesses(spec, [fake_ingest], FakeIngest.token, "Lt4", tmp_path) as locust:
        run = locust.wait(timeout_s=60)
    assert run.returncodes == (0,), locust.log_tail()
    intended: dict[str, list[float]] = {}
    lateness = []
    for op in read_outcomes(tmp_path, run.ended_at).operations():
        assert op.intended_at is not None
        intended.setdefault(op.process, []).append(op.intended_at)
        lateness.append(op.invoked_at - op.intended_at)
    assert len(intended) == 20
    firsts = sorted(min(times) for times in intended.values())
    assert firsts[-1] - firsts[0] > 0.5, f"first batches within {firsts[-1] - firsts[0]:.2f} s"
    gaps = {round(b - a, 6) for times in intended.values() for a, b in pairwise(sorted(times))}
    assert gaps == {1.0}, f"intended sends {sorted(gaps)} s apart, not 1 s"
    lateness.sort()
    assert lateness[len(lateness) // 2] < 0.05, (
        f"median send {lateness[len(lateness) // 2]:.3f} s late"
    )


def test_a_remote_worker_ships_its_outcomes_to_the_master(fake_ingest: str, tmp_path: Path) -> None:
    # A worker "elsewhere": its own outcome folder, which the master cannot read, and only the
    # master's address (its settings, the token included, come from the master).
    master_dir, remote_dir = tmp_path / "master", tmp_path / "remote"
    port = int(closed_port().rsplit(":", 1)[1])
    spec = LoadSpec(
        rate=300,
        duration_s=3,
        users=4,
        batch_size=10,
        workers=1,
        remote_workers=1,
        master_port=port,
    )
    with LocustProcesses(spec, [fake_ingest], FakeIngest.token, "Lr1", master_dir) as locust:
        remote = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "harness",
                "load",
                "worker",
                "--master",
                f"127.0.0.1:{port}",
                "--out",
                str(remote_dir),
            ],
            env={**os.environ, "QOE_LOAD_TOKEN": "", "QOE_LOAD_URLS": ""},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        run = locust.wait(timeout_s=90)
        remote_log = remote.communicate(timeout=30)[0].decode(errors="replace")
    assert run.returncodes == (0, 0), locust.log_tail()
    assert remote.returncode == 0, remote_log
    [own] = remote_dir.glob("outcomes-*.jsonl")
    shipped = master_dir / own.name
    assert shipped.read_text() == own.read_text() != ""
    marker = json.loads((master_dir / own.name.replace(".jsonl", ".shipped.json")).read_text())
    assert marker["complete"] is True
    # Both workers' batches are in the history, and nothing the fake ingest saw is missing.
    ops = read_outcomes(master_dir, run.ended_at).operations()
    assert len({op.process.split(".")[0] for op in ops}) == 2
    seen = {tuple(e["event_id"] for e in b["events"]) for b in FakeIngest.bodies}
    recorded = {tuple(e.event_id for e in op.events) for op in ops}
    assert {ids for ids in seen if ids[0].startswith("Lr1.")} <= recorded
    assert all(op.outcome is not Outcome.FAIL for op in ops)  # the token reached the worker
