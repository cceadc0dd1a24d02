"""JetStreamPublisher.publish_many: one plain publish per event, acks counted per batch."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from qoe.ingest import JetStreamPublisher, PublishFailed


@dataclass
class FakeMsg:
    subject: str
    data: bytes
    headers: dict[str, str] | None = None


@dataclass
class FakeNats:
    """Answers each publish like JetStream would, through the publisher's ack callback."""

    publisher: JetStreamPublisher | None = None
    seen: set[str] = field(default_factory=set)
    published: list[tuple[str, bytes, str, dict[str, str]]] = field(default_factory=list)
    silent_ids: set[str] = field(default_factory=set)  # never acknowledged
    error_ids: set[str] = field(default_factory=set)
    is_connected: bool = True

    def jetstream(self) -> object:
        return object()  # publish_many does not use nats-py's JetStream context

    def new_inbox(self) -> str:
        return "_INBOX.test"

    async def subscribe(self, subject: str, cb: Any) -> None:
        assert subject == "_INBOX.test.*.*"

    async def publish(
        self, subject: str, payload: bytes, reply: str, headers: dict[str, str]
    ) -> None:
        self.published.append((subject, payload, reply, headers))
        msg_id = headers["Nats-Msg-Id"]
        if msg_id in self.silent_ids:
            return
        if msg_id in self.error_ids:
            data = json.dumps({"error": {"code": 503, "description": "no quorum"}}).encode()
        elif msg_id in self.seen:
            data = b'{"stream":"QOE_EVENTS", "seq":1,"duplicate": true}'
        else:
            data = b'{"stream":"QOE_EVENTS", "seq":2}'
        self.seen.add(msg_id)
        assert self.publisher is not None
        loop = asyncio.get_running_loop()
        loop.call_soon(lambda: loop.create_task(self.publisher._on_ack(FakeMsg(reply, data))))


async def publisher_with(fake: FakeNats) -> JetStreamPublisher:
    publisher = JetStreamPublisher()
    publisher.attach(fake)  # type: ignore[arg-type]
    fake.publisher = publisher
    await publisher.start_acks()
    return publisher


def items(*ids: str) -> list[tuple[bytes, str]]:
    return [(f'{{"id":"{i}"}}'.encode(), i) for i in ids]


def test_every_event_is_published_with_its_msg_id_and_duplicates_are_counted() -> None:
    async def scenario() -> tuple[int, int]:
        fake = FakeNats()
        publisher = await publisher_with(fake)
        first = await publisher.publish_many("qoe.events", items("a", "b", "c"), 1.0)
        again = await publisher.publish_many("qoe.events", items("a", "d"), 1.0)
        assert [h["Nats-Msg-Id"] for _, _, _, h in fake.published] == ["a", "b", "c", "a", "d"]
        assert {reply for _, _, reply, _ in fake.published[:3]} == {
            "_INBOX.test.1.0",
            "_INBOX.test.1.1",
            "_INBOX.test.1.2",
        }
        assert publisher._batches == {}
        return first, again

    assert asyncio.run(scenario()) == (0, 1)


def test_a_missing_ack_is_a_timeout_and_a_late_ack_is_ignored() -> None:
    async def scenario() -> None:
        fake = FakeNats(silent_ids={"b"})
        publisher = await publisher_with(fake)
        with pytest.raises(PublishFailed, match="1 of 2 events not acknowledged"):
            await publisher.publish_many("qoe.events", items("a", "b"), 0.05)
        await publisher._on_ack(FakeMsg("_INBOX.test.1.1", b'{"seq":3}'))  # after the deadline

    asyncio.run(scenario())


def test_an_error_ack_or_no_responders_fails_the_batch() -> None:
    async def scenario() -> None:
        fake = FakeNats(error_ids={"b"})
        publisher = await publisher_with(fake)
        with pytest.raises(PublishFailed, match="no quorum"):
            await publisher.publish_many("qoe.events", items("a", "b", "c"), 1.0)
        fake.error_ids.clear()
        fake.silent_ids = {"x"}
        task = asyncio.create_task(publisher.publish_many("qoe.events", items("x"), 1.0))
        await asyncio.sleep(0)
        await publisher._on_ack(FakeMsg("_INBOX.test.2.0", b"", {"Status": "503"}))
        with pytest.raises(PublishFailed, match="status 503"):
            await task

    asyncio.run(scenario())


def test_not_connected_fails_fast() -> None:
    async def scenario() -> None:
        fake = FakeNats()
        publisher = await publisher_with(fake)
        fake.is_connected = False
        with pytest.raises(PublishFailed, match="not connected"):
            await publisher.publish_many("qoe.events", items("a"), 1.0)
        assert fake.published == []

    asyncio.run(scenario())
