"""Synchronous access to the stack's JetStream for scenarios: stream and consumer state, stream config."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import nats
from nats.js.api import StreamConfig, StreamState

from harness.polling import wait_until

T = TypeVar("T")
STREAM = "QOE_EVENTS"
CONSUMER = "aggregator"


class JetStreamAdmin:
    """Each call opens a short connection: scenarios call it rarely and the cluster may be faulted."""

    def __init__(self, urls: Sequence[str], stream: str = STREAM) -> None:
        if not urls:
            raise ValueError("no NATS URLs for this stack; add nats_urls to the endpoints file")
        self.urls = list(urls)
        self.stream = stream

    def _call(self, action: Callable[[Any], Awaitable[T]]) -> T:
        async def run() -> T:
            nc = await nats.connect(self.urls, connect_timeout=3, max_reconnect_attempts=2)
            try:
                return await action(nc.jetstream(timeout=5))
            finally:
                await nc.close()

        return asyncio.run(run())

    def stream_config(self) -> StreamConfig:
        return self._call(lambda js: _config(js, self.stream))

    def set_duplicate_window(self, seconds: float) -> None:
        async def update(js: Any) -> None:
            config = await _config(js, self.stream)
            config.duplicate_window = seconds
            await js.update_stream(config)

        self._call(update)

    def publish(self, subject: str, payload: bytes, msg_id: str) -> bool:
        """Publish straight to the stream; True when JetStream reported a duplicate."""

        async def publish(js: Any) -> bool:
            ack = await js.publish(subject, payload, headers={"Nats-Msg-Id": msg_id})
            return bool(ack.duplicate)

        return self._call(publish)

    def _stream_state(self) -> StreamState:
        async def info(js: Any) -> StreamState:
            return (await js.stream_info(self.stream)).state

        return self._call(info)

    def last_sequence(self) -> int:
        """The stream sequence of the newest stored message."""
        return int(self._stream_state().last_seq)

    def stored_messages(self) -> int:
        """How many messages the stream holds now."""
        return int(self._stream_state().messages)

    def ack_floor(self, consumer: str = CONSUMER) -> int:
        """The stream sequence up to which the consumer has acknowledged every message."""

        async def info(js: Any) -> int:
            return int((await js.consumer_info(self.stream, consumer)).ack_floor.stream_seq)

        return self._call(info)

    def await_acknowledged(self, what: str, timeout_s: float = 30) -> float:
        """Wait until the consumer has acknowledged everything stored now; seconds waited."""
        stored = self.last_sequence()
        _, took = wait_until(lambda: self.ack_floor() >= stored, timeout_s=timeout_s, what=what)
        return took

    def consumer_pending(self, consumer: str = CONSUMER) -> tuple[int, int]:
        """(messages not yet delivered, delivered but not yet acknowledged)."""

        async def info(js: Any) -> tuple[int, int]:
            state = await js.consumer_info(self.stream, consumer)
            return state.num_pending, state.num_ack_pending

        return self._call(info)


async def _config(js: Any, stream: str) -> StreamConfig:
    return (await js.stream_info(stream)).config


class LagSampler:
    """Samples the aggregators' consumer lag (messages not yet acknowledged: pending plus in
    flight) on a thread, for the report's picture of a scenario. A sample that cannot be read
    (the cluster may be faulted) is recorded as None, not retried."""

    def __init__(self, admin: JetStreamAdmin, interval_s: float = 0.25) -> None:
        self.admin = admin
        self.interval_s = interval_s
        self._samples: list[tuple[float, int | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lag-sampler", daemon=True)

    def start(self) -> LagSampler:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            at = time.time()
            try:
                lag: int | None = sum(self.admin.consumer_pending())
            except Exception:  # a faulted cluster is what is being pictured
                lag = None
            self._samples.append((at, lag))
            self._stop.wait(self.interval_s)

    def samples(self) -> list[tuple[float, int | None]]:
        return list(self._samples)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)
