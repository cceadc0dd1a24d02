"""The aggregator against a real PostgreSQL and a real NATS: exactly once across kills and redelivery.

The aggregator runs as a real process (`python -m qoe.aggregator`) so it can be SIGKILLed
mid-batch; events are published straight to JetStream, some with fresh message ids so that
JetStream's own dedup does not hide duplicates from the aggregator.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import httpx
import nats
import psycopg
import pytest
from qoe.natsutil import StreamSettings

from harness import checker
from harness.containers import Service
from harness.history import Event, History, Operation, Outcome
from harness.nats_admin import JetStreamAdmin
from harness.polling import wait_until
from harness.workload import EventGenerator

pytestmark = pytest.mark.component
SERVICES = Path(__file__).resolve().parents[2] / "stack" / "services"


def publish(nats_url: str, events: Sequence[Event], msg_id_suffix: str = "") -> None:
    async def run() -> None:
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        # The services' own config: the aggregator updates the stream to it when it starts.
        await js.add_stream(
            StreamSettings(name="QOE_EVENTS", replicas=1, dedup_window_seconds=120).config()
        )
        for start in range(0, len(events), 500):
            await asyncio.gather(
                *(
                    js.publish(
                        "qoe.events",
                        _canonical(e),
                        headers={"Nats-Msg-Id": e.event_id + msg_id_suffix},
                    )
                    for e in events[start : start + 500]
                )
            )
        await nc.close()

    asyncio.run(run())


def _canonical(event: Event) -> bytes:
    import json

    return json.dumps(event.to_wire(), separators=(",", ":")).encode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceProcess:
    """`python -m qoe.<service>` on the host, pointed at the throwaway services."""

    def __init__(
        self, service: str, nats_url: str, database_url: str, log: Path, bugs: str = ""
    ) -> None:
        self.service = service
        self.env = {
            **os.environ,
            "PYTHONPATH": str(SERVICES),
            "NATS_URLS": nats_url,
            "DATABASE_URL": database_url,
            "STREAM_REPLICAS": "1",
            "FETCH_BATCH": "100",
            "ACK_WAIT_SECONDS": "3",
            "HTTP_PORT": str(_free_port()),
            "QOE_SEEDED_BUGS": bugs,
        }
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", f"qoe.{self.service}"], env=self.env, stdout=out, stderr=out
            )
        ready = f"http://127.0.0.1:{self.env['HTTP_PORT']}/readyz"
        wait_until(
            lambda: httpx.get(ready, timeout=2).status_code == 200,
            timeout_s=60,
            what=f"qoe.{self.service} ready (log: {self.log})",
        )

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def aggregator(
    nats_service: Service, postgres_service: Service, tmp_path: Path
) -> Iterator[ServiceProcess]:
    """The aggregator, with a diagnoser beside it so the verdict covers diagnoses too."""
    processes = [
        ServiceProcess(name, nats_service.url, postgres_service.url, tmp_path / f"{name}.log")
        for name in ("aggregator", "diagnoser")
    ]
    for process in processes:
        process.start()
    yield processes[0]
    for process in processes:
        process.stop()


def samples(database_url: str, probe_ids: Sequence[str]) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(samples), 0) FROM qoe_window_aggregates WHERE probe_id = ANY(%s)",
            (list(probe_ids),),
        ).fetchone()
    return int(row[0]) if row else 0


def verdict_for(
    database_url: str, events: Sequence[Event], probe_ids: Sequence[str], timeout_s: float = 60
) -> checker.Verdict:
    history = History(
        [Operation("component", "jetstream", 0.0, 0.0, Outcome.OK, tuple(events), 202)]
    )
    expected = checker.expectation(history, 60)
    with psycopg.connect(database_url, autocommit=True) as conn:
        verdict = checker.await_convergence(
            expected,
            lambda: checker.read_observed(conn, probe_ids),
            checker.Rules(),
            timeout_s=timeout_s,
            since=0.0,
        )
    return verdict


def verify(database_url: str, events: Sequence[Event], probe_ids: Sequence[str]) -> None:
    verdict = verdict_for(database_url, events, probe_ids)
    assert verdict.valid, verdict.summary()


def generator(prefix: str) -> EventGenerator:
    return EventGenerator(
        seed=7, run_prefix=prefix, probes=[f"{prefix}-p0", f"{prefix}-p1"], targets=["a", "b"]
    )


def part_way(
    database_url: str, probe_ids: Sequence[str], low: int, high: int
) -> Callable[[], bool]:
    """Whether the aggregator has counted more than ``low`` events but not yet ``high``."""
    return lambda: low < samples(database_url, probe_ids) < high


def test_sigkill_mid_batch_double_counts_nothing(aggregator, nats_service, postgres_service):
    gen = generator("kill")
    events: list[Event] = []
    for _ in range(3):
        # A fresh backlog each round, stored whole while the aggregator is down. Published
        # while it ran, it kept pace with the publisher and could finish between two polls,
        # and there was nothing left to be part-way through.
        aggregator.kill()
        counted = len(events)
        events += gen.batch(10_000)
        publish(nats_service.url, events[counted:])
        aggregator.start()
        # The next kill lands while the backlog is partly committed: some batches were fetched,
        # not all acked.
        wait_until(
            part_way(postgres_service.url, gen.probes, counted, len(events)),
            timeout_s=60,
            interval_s=0.01,
            what="the aggregator part-way through the backlog",
        )
    aggregator.kill()
    aggregator.start()
    verify(postgres_service.url, events, gen.probes)


def test_redelivered_and_republished_events_count_once(aggregator, nats_service, postgres_service):
    gen = generator("dup")
    events = gen.batch(500)
    publish(nats_service.url, events)
    # New message ids: JetStream stores them again, only the aggregator's dedup can drop them.
    publish(nats_service.url, events, msg_id_suffix="#again")
    variants = [replace(e, rtt_ms=e.rtt_ms + 1000) for e in events[:100]]
    publish(nats_service.url, variants, msg_id_suffix="#variant")
    verify(postgres_service.url, events, gen.probes)
    # Acknowledged events leave the stream; kept, they filled JetStream's store and then
    # every publish was refused.
    wait_until(
        lambda: JetStreamAdmin([nats_service.url]).stored_messages() == 0,
        timeout_s=30,
        what="the stream to drop the events the aggregator acknowledged",
    )


@pytest.mark.meta
def test_the_redelivery_check_fails_an_aggregator_without_dedup(
    nats_service, postgres_service, tmp_path
):
    bugged = ServiceProcess(
        "aggregator",
        nats_service.url,
        postgres_service.url,
        tmp_path / "bugged.log",
        bugs="aggregator_no_dedup",
    )
    bugged.start()
    try:
        gen = generator("nodedup")
        events = gen.batch(300)
        publish(nats_service.url, events)
        publish(nats_service.url, events, msg_id_suffix="#again")
        verdict = verdict_for(postgres_service.url, events, gen.probes, timeout_s=10)
    finally:
        bugged.stop()
    assert not verdict.valid, "the check passed an aggregator that counts redeliveries twice"
    # Counted twice, not merely undiagnosed (no diagnoser runs beside the bugged aggregator).
    assert "nodedup-p" in verdict.summary() and "samples expected" in verdict.summary()
