"""NATS connection and the events stream: reconnect forever, create the stream idempotently."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError

from qoe.config import Env, get_int, get_list, get_str
from qoe.service import Backoff, RateLimitedLog, sleep_or_stop

log = logging.getLogger("qoe.nats")

EVENTS_SUBJECT = "qoe.events"
WINDOWS_CHANGED_SUBJECT = "qoe.windows.changed"
STREAM_NAME_IN_USE = 10058  # JetStream: a stream with this name but another config exists


@dataclass(frozen=True)
class StreamSettings:
    name: str
    replicas: int
    dedup_window_seconds: int

    @classmethod
    def from_env(cls, env: Env | None = None) -> StreamSettings:
        return cls(
            name=get_str("STREAM_NAME", "QOE_EVENTS", env),
            replicas=get_int("STREAM_REPLICAS", 3, env, minimum=1, maximum=5),
            dedup_window_seconds=get_int("DEDUP_WINDOW_SECONDS", 120, env, minimum=1),
        )

    def config(self) -> StreamConfig:
        # Work-queue retention: an event leaves the stream once the aggregators acknowledge
        # it. Under the default (limits, none set) every event stayed until JetStream's store
        # was full (max_file_store), and from then on ingest could only answer 503.
        return StreamConfig(
            name=self.name,
            subjects=[EVENTS_SUBJECT],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            num_replicas=self.replicas,
            duplicate_window=float(self.dedup_window_seconds),
        )


def nats_urls(env: Env | None = None) -> list[str]:
    return get_list("NATS_URLS", None, env)


async def connect(urls: list[str], name: str, stop: asyncio.Event) -> NATS | None:
    """Connect, retrying until NATS answers or `stop` is set (then None).

    The client reconnects forever afterwards (max_reconnect_attempts=-1), with a short wait
    so a restarted server is picked up quickly.
    """
    noisy = RateLimitedLog(log)

    async def on_error(exc: Exception) -> None:
        noisy.warning("nats-error", "NATS error: %s", exc, error=repr(exc))

    async def on_disconnect() -> None:
        log.warning("NATS disconnected")

    async def on_reconnect() -> None:
        log.info("NATS reconnected")

    backoff = Backoff(base=0.2, cap=5.0)
    while not stop.is_set():
        connecting = asyncio.ensure_future(
            nats.connect(
                servers=urls,
                name=name,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                connect_timeout=2,
                ping_interval=5,
                max_outstanding_pings=2,
                error_cb=on_error,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
            )
        )
        stopping = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if connecting not in done:  # stop requested while nats-py was still retrying
            connecting.cancel()
            return None
        try:
            nc = connecting.result()
        except Exception as exc:
            noisy.warning("connect", "cannot connect to NATS %s: %s", urls, exc)
            await sleep_or_stop(stop, backoff.next_delay())
            continue
        log.info("connected to NATS", extra={"server": str(nc.connected_url)})
        return nc
    return None


async def ensure_stream(js: JetStreamContext, settings: StreamSettings) -> None:
    """Create the events stream, or update it to our config; safe to race with other services.

    Creating a stream with an identical config is idempotent on the server; a different
    config (e.g. another replica count) is reported as 'name in use' and becomes an update.
    """
    try:
        await js.add_stream(settings.config())
    except BadRequestError as exc:
        if exc.err_code != STREAM_NAME_IN_USE:
            raise
        await js.update_stream(settings.config())
    log.info(
        "events stream ready",
        extra={"stream": settings.name, "replicas": settings.replicas},
    )


async def ensure_stream_forever(
    js: JetStreamContext, settings: StreamSettings, stop: asyncio.Event
) -> bool:
    """ensure_stream, retried with backoff (JetStream needs a quorum before it answers).

    Returns False only if `stop` was set first.
    """
    backoff = Backoff(base=0.2, cap=5.0)
    noisy = RateLimitedLog(log)
    while not stop.is_set():
        try:
            await ensure_stream(js, settings)
            return True
        except Exception as exc:
            noisy.warning("stream", "cannot create stream %s yet: %r", settings.name, exc)
            await sleep_or_stop(stop, backoff.next_delay())
    return False
