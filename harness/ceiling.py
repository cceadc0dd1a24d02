"""The stack's ceilings: how fast its own parts go without the rest of the pipeline, measured in
the same run as the end-to-end maximum, so that maximum can be read as a share of them.

Absolute rates differ from machine to machine (and from hour to hour on a shared one); the
ratio of the end-to-end maximum to a ceiling measured minutes apart on the same stack does not
depend on the machine's speed, only on where the pipeline spends its time.

- **JetStream publish ceiling**: acknowledged publishes per second into a scratch stream with
  the events stream's own configuration (replicas, storage, duplicate window), from the harness,
  the way ingest publishes (plain publishes with a reply subject per message, a fixed number
  in flight, `Nats-Msg-Id` on each): what JetStream and one ingest-like publisher do with no
  HTTP, no validation and no aggregation behind them.
- **Aggregation ceiling**: events folded and committed per second when the aggregators meet a
  backlog: the events are stored in the events stream while the aggregators are paused, then
  timed from unpausing until their consumer acknowledged the last one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol

import nats

from harness.nats_admin import JetStreamAdmin
from harness.polling import wait_until

EVENTS_SUBJECT = "qoe.events"  # CONTRACT.md: the subject ingest publishes to
SCRATCH_STREAM = "QOE_CEILING"
SCRATCH_SUBJECT = "qoe.ceiling"
IN_FLIGHT = 2000  # unacknowledged publishes at once: ~ two ingest replicas' 500-event batches x2
ACK_GRACE_S = 10.0  # after the last publish, how long outstanding acks may take


class CeilingError(RuntimeError):
    """A ceiling could not be measured as defined."""


@dataclass(frozen=True)
class Ceiling:
    """One ceiling: `events` acknowledged over `seconds`."""

    what: str
    events: int
    seconds: float
    errors: int = 0  # publishes answered with an error, or not answered within ACK_GRACE_S

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "events_per_s": round(self.events_per_s, 1)}

    def line(self) -> str:
        errors = f", {self.errors} not acknowledged" if self.errors else ""
        return f"{self.what}: {self.events_per_s:,.0f} events/s ({self.events:,} in {self.seconds:.1f} s{errors})"


def event_payload(prefix: str, n: int, at: float) -> bytes:
    """A canonical event as ingest publishes it (CONTRACT.md field order, ts in UTC with Z)."""
    ts = datetime.fromtimestamp(at, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    event = {
        "event_id": f"{prefix}.{n}",
        "probe_id": f"{prefix}-p{n % 20}",
        "target": f"t{n % 5}.example.net",
        "ts": ts,
        "rtt_ms": 20.0 + n % 50,
        "jitter_ms": 1.5,
        "loss_pct": 0.0,
        "throughput_kbps": 25_000.0,
    }
    return json.dumps(event, separators=(",", ":")).encode()


async def _publish(
    urls: Sequence[str],
    subject: str,
    payload: Callable[[int], bytes],
    msg_id: Callable[[int], str],
    *,
    count: int | None = None,
    duration_s: float | None = None,
) -> Ceiling:
    """Publish until `count` messages or `duration_s` seconds, IN_FLIGHT at most unacknowledged;
    the acknowledged ones over the time from the first publish to the last ack."""
    nc = await nats.connect(list(urls), connect_timeout=3, max_reconnect_attempts=2)
    free = asyncio.Semaphore(IN_FLIGHT)
    answered = asyncio.Event()  # set once every publish has its answer
    sent = acked = errors = 0
    sending = True
    last_ack = start = time.monotonic()

    async def on_ack(msg: Any) -> None:
        nonlocal acked, errors, last_ack
        if b'"error"' in msg.data:
            errors += 1
        else:
            acked += 1
        last_ack = time.monotonic()
        free.release()
        if not sending and acked + errors >= sent:
            answered.set()

    inbox = nc.new_inbox()
    await nc.subscribe(f"{inbox}.*", cb=on_ack)
    try:
        start = time.monotonic()
        while (count is None or sent < count) and (
            duration_s is None or time.monotonic() - start < duration_s
        ):
            await free.acquire()
            sent += 1
            headers = {"Nats-Msg-Id": msg_id(sent)}
            await nc.publish(subject, payload(sent), reply=f"{inbox}.{sent}", headers=headers)
        sending = False
        if acked + errors >= sent:
            answered.set()
        await nc.flush()
        with contextlib.suppress(TimeoutError):  # unanswered ones are counted below
            await asyncio.wait_for(answered.wait(), ACK_GRACE_S)
    finally:
        await nc.close()
    return Ceiling("", acked, last_ack - start, sent - acked)


def jetstream_publish_ceiling(
    nats_urls: Sequence[str], duration_s: float = 10.0, run: str = "ceiling"
) -> Ceiling:
    """Acknowledged publishes per second into a scratch stream configured as the events stream;
    the scratch stream is deleted afterwards."""
    admin = JetStreamAdmin(nats_urls)
    config = replace(admin.stream_config(), name=SCRATCH_STREAM, subjects=[SCRATCH_SUBJECT])

    async def measure() -> Ceiling:
        nc = await nats.connect(list(nats_urls), connect_timeout=3, max_reconnect_attempts=2)
        js = nc.jetstream(timeout=10)
        try:
            await js.add_stream(config)
            now = time.time()
            return await _publish(
                nats_urls,
                SCRATCH_SUBJECT,
                lambda n: event_payload(run, n, now),
                lambda n: f"{run}.{n}",
                duration_s=duration_s,
            )
        finally:
            await js.delete_stream(SCRATCH_STREAM)
            await nc.close()

    ceiling = asyncio.run(measure())
    replicas = config.num_replicas or 1
    return replace(ceiling, what=f"JetStream publish ceiling (R{replicas}, scratch stream)")


class Pausable(Protocol):
    """A container that can be frozen and thawed (python-on-whales' Container is one)."""

    def pause(self) -> None: ...
    def unpause(self) -> None: ...


def aggregation_ceiling(
    nats_urls: Sequence[str],
    aggregators: Sequence[Pausable],
    events: int = 100_000,
    run: str = "ceiling",
    timeout_s: float = 300.0,
) -> Ceiling:
    """Events per second the aggregators fold and commit from a backlog of `events`: stored
    while `pause` holds them, timed from `unpause` until their consumer acknowledged them all.
    Their event ids and probes start with `run`, so they are nobody else's windows."""
    admin = JetStreamAdmin(nats_urls)
    now = time.time()
    with contextlib.ExitStack() as paused:
        for aggregator in aggregators:
            aggregator.pause()  # may fail (a busy engine's freezer times out): none stays paused
            paused.callback(aggregator.unpause)
        # Read once they are frozen: an ack sent just before a pause still lands after it.
        floor = admin.ack_floor()
        stored = asyncio.run(
            _publish(
                nats_urls,
                EVENTS_SUBJECT,
                lambda n: event_payload(run, n, now),
                lambda n: f"{run}.{n}",
                count=events,
            )
        )
        last = admin.last_sequence()
        moved = admin.ack_floor() - floor
    if moved > 0:
        raise CeilingError(
            f"the aggregators acknowledged {moved} messages while paused: they were not all "
            "paused, so the backlog's time would be only part of it; pause every consumer"
        )
    _, took = wait_until(
        lambda: admin.ack_floor() >= last,
        timeout_s=timeout_s,
        what=f"the aggregators acknowledging a backlog of {stored.events:,} events",
        interval_s=0.1,
    )
    return Ceiling("aggregation ceiling (backlog folded and committed)", stored.events, took)
