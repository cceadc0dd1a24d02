"""The ceilings against a real NATS (and a real aggregator and PostgreSQL): what they count is
what was stored and folded, they leave no stream behind, and a consumer that was not paused
voids the aggregation ceiling instead of shortening it."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import nats
import pytest
from qoe.natsutil import StreamSettings

from harness.ceiling import CeilingError, aggregation_ceiling, jetstream_publish_ceiling
from harness.containers import Service
from harness.nats_admin import JetStreamAdmin
from tests.component.test_aggregator import ServiceProcess, samples

pytestmark = pytest.mark.component


def events_stream(nats_url: str) -> None:
    async def add() -> None:
        nc = await nats.connect(nats_url)
        await nc.jetstream().add_stream(
            StreamSettings(name="QOE_EVENTS", replicas=1, dedup_window_seconds=120).config()
        )
        await nc.close()

    asyncio.run(add())


def stream_names(nats_url: str) -> list[str]:
    async def names() -> list[str]:
        nc = await nats.connect(nats_url)
        found = [s.config.name for s in await nc.jetstream().streams_info()]
        await nc.close()
        return [n for n in found if n]

    return asyncio.run(names())


class Frozen:
    """A service process paused the way `docker pause` pauses a container: SIGSTOP, SIGCONT."""

    def __init__(self, process: ServiceProcess) -> None:
        self.process = process

    def pause(self) -> None:
        assert self.process.process is not None
        self.process.process.send_signal(signal.SIGSTOP)

    def unpause(self) -> None:
        assert self.process.process is not None
        self.process.process.send_signal(signal.SIGCONT)


class NotPaused(Frozen):
    def pause(self) -> None:  # a consumer the measurement believes paused
        pass


def test_the_publish_ceiling_counts_acknowledged_publishes_and_removes_its_stream(
    nats_service: Service,
):
    events_stream(nats_service.url)
    ceiling = jetstream_publish_ceiling([nats_service.url], duration_s=1.0)
    assert ceiling.events > 0 and ceiling.errors == 0, ceiling.line()
    assert "R1" in ceiling.what
    assert "QOE_CEILING" not in stream_names(nats_service.url)
    assert JetStreamAdmin([nats_service.url]).stored_messages() == 0  # the events stream untouched


def test_the_aggregation_ceiling_times_a_backlog_the_aggregator_folds(
    nats_service: Service, postgres_service: Service, tmp_path: Path
):
    events_stream(nats_service.url)
    aggregator = ServiceProcess(
        "aggregator", nats_service.url, postgres_service.url, tmp_path / "a.log"
    )
    aggregator.start()
    try:
        ceiling = aggregation_ceiling(
            [nats_service.url], [Frozen(aggregator)], events=3000, run="ceil"
        )
        assert ceiling.events == 3000 and ceiling.seconds > 0, ceiling.line()
        assert samples(postgres_service.url, [f"ceil-p{k}" for k in range(20)]) == 3000
        with pytest.raises(CeilingError, match="while paused"):
            aggregation_ceiling(
                [nats_service.url], [NotPaused(aggregator)], events=3000, run="again"
            )
    finally:
        aggregator.stop()
