"""Ingest service: `POST /v1/events` validates a batch and publishes it to JetStream.

Stateless. A 202 is sent only after JetStream acknowledged every distinct event of the batch
(CONTRACT.md); anything short of that is a 503 the probe must retry. Run with
`python -m qoe.ingest`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import msgspec
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from prometheus_client import Counter, Histogram
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from qoe import bugs, natsutil, openapi
from qoe.config import Env, get_float, parse_tokens
from qoe.contract import (
    MAX_BODY_BYTES,
    Rejection,
    ValidEvent,
    canonical_json,
    distinct_by_id,
    validate_batch,
)
from qoe.service import HttpServer, Readiness, http_port, make_app, run

log = logging.getLogger("qoe.ingest")

REQUESTS = Counter("qoe_ingest_requests_total", "POST /v1/events answers", ["status"])
EVENTS = Counter("qoe_ingest_events_total", "Events by outcome", ["outcome"])
PUBLISH_SECONDS = Histogram(
    "qoe_ingest_publish_seconds",
    "Time to get JetStream acks for a whole batch",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5),
)
BATCH_SIZE = Histogram(
    "qoe_ingest_batch_events",
    "Events per valid batch",
    buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000),
)


class Ack(Protocol):
    duplicate: bool | None


class Publisher(Protocol):
    """What the app needs from JetStream; tests pass a fake."""

    async def publish(
        self, subject: str, payload: bytes, headers: dict[str, str], timeout: float
    ) -> Ack: ...


@dataclass(frozen=True)
class IngestSettings:
    tokens: dict[str, str]
    publish_timeout: float = 2.0
    early_ack: bool = False  # seeded bug ingest_early_ack

    @classmethod
    def from_env(cls, env: Env | None = None) -> IngestSettings:
        source = os.environ if env is None else env
        return cls(
            tokens=parse_tokens(source.get("PROBE_TOKENS", "")),
            publish_timeout=get_float("PUBLISH_TIMEOUT_SECONDS", 2.0, env, minimum=0.01),
            early_ack=bugs.enabled("ingest_early_ack"),
        )


class PublishFailed(Exception):
    """JetStream did not acknowledge every event in time; the outcome is unknown."""


def token_is_valid(authorization: str | None, tokens: Iterable[str]) -> bool:
    """Whether the header is `Bearer <one of tokens>`.

    Compares against every token with hmac.compare_digest and without an early exit, so
    timing does not reveal which token (or how much of one) matched.
    """
    scheme, _, presented = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        return False
    candidate = presented.strip().encode()
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(candidate, token.encode())
    return matched


def is_json_content_type(value: str | None) -> bool:
    """application/json, with or without parameters such as charset."""
    return (value or "").split(";", 1)[0].strip().lower() == "application/json"


async def publish_batch(
    publisher: Publisher, events: list[ValidEvent], timeout: float
) -> tuple[int, int]:
    """Publish every event concurrently; (accepted, duplicates) once all are acknowledged.

    The whole batch shares one deadline. Raises PublishFailed on the first error or timeout.
    A publisher with ``publish_many`` (the production one) gets the whole batch at once.
    """
    many = getattr(publisher, "publish_many", None)
    if many is not None:
        items = [(canonical_json(e), e.event_id) for e in events]
        return len(events), await many(natsutil.EVENTS_SUBJECT, items, timeout)

    async def one(event: ValidEvent) -> Ack:
        return await publisher.publish(
            natsutil.EVENTS_SUBJECT,
            canonical_json(event),
            {"Nats-Msg-Id": event.event_id},
            timeout,
        )

    try:
        acks = await asyncio.wait_for(
            asyncio.gather(*(one(e) for e in events), return_exceptions=True), timeout
        )
    except TimeoutError:
        raise PublishFailed(f"no acks for all {len(events)} events within {timeout}s") from None
    failures = [a for a in acks if isinstance(a, BaseException)]
    if failures:
        raise PublishFailed(f"{len(failures)} of {len(events)} publishes failed: {failures[0]!r}")
    duplicates = sum(1 for ack in acks if getattr(ack, "duplicate", False))
    return len(events), duplicates


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


async def _read_body(request: Request) -> bytes | JSONResponse:
    """The body, or a 400/413 answer; stops reading as soon as it passes the limit."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            return _error(400, "Content-Length is not a number")
        if int(declared) > MAX_BODY_BYTES:
            return _error(413, f"body over {MAX_BODY_BYTES} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return _error(413, f"body over {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(
    publisher: Publisher,
    settings: IngestSettings,
    readiness: Readiness,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> Starlette:
    """The ingest HTTP app; all I/O goes through `publisher`, so tests can fake JetStream."""
    background: set[asyncio.Task[Any]] = set()

    async def post_events(request: Request) -> Response:
        try:
            response = await _handle(request)
        except ClientDisconnect:
            response = _error(400, "client disconnected before sending the whole body")
        except Exception:  # a hostile request must never take the worker down
            log.exception("unexpected error handling a batch")
            response = _error(500, "internal error")
        REQUESTS.labels(str(response.status_code)).inc()
        return response

    async def _handle(request: Request) -> Response:
        if not token_is_valid(request.headers.get("authorization"), settings.tokens.values()):
            return _error(401, "missing or wrong bearer token")
        if not is_json_content_type(request.headers.get("content-type")):
            return _error(415, "Content-Type must be application/json")
        body = await _read_body(request)
        if isinstance(body, Response):
            return body
        result = validate_batch(body, clock())
        if isinstance(result, Rejection):
            EVENTS.labels("rejected").inc(len(result.body.get("errors", ())))
            return JSONResponse(result.body, status_code=result.status)
        events = distinct_by_id(result.events)
        BATCH_SIZE.observe(len(result.events))
        if settings.early_ack:
            return _ack_early(events)
        return await _publish(events)

    async def _publish(events: list[ValidEvent]) -> Response:
        started = time.perf_counter()
        try:
            accepted, duplicates = await publish_batch(publisher, events, settings.publish_timeout)
        except PublishFailed as exc:
            log.warning("batch not acknowledged: %s", exc, extra={"events": len(events)})
            return _error(503, "events could not be stored in time; retry the whole batch")
        PUBLISH_SECONDS.observe(time.perf_counter() - started)
        EVENTS.labels("accepted").inc(accepted - duplicates)
        EVENTS.labels("duplicate").inc(duplicates)
        return JSONResponse({"accepted": accepted, "duplicates": duplicates}, status_code=202)

    def _ack_early(events: list[ValidEvent]) -> Response:
        # Seeded bug ingest_early_ack: answer before JetStream has the events; errors are lost.
        task = asyncio.create_task(_publish_ignoring_errors(events))
        background.add(task)
        task.add_done_callback(background.discard)
        EVENTS.labels("accepted").inc(len(events))
        return JSONResponse({"accepted": len(events), "duplicates": 0}, status_code=202)

    async def _publish_ignoring_errors(events: list[ValidEvent]) -> None:
        with contextlib.suppress(PublishFailed):
            await publish_batch(publisher, events, settings.publish_timeout)

    schema = Response(msgspec.json.encode(openapi.document()), media_type="application/json")

    async def get_openapi(_: Request) -> Response:
        return schema  # no token: the API's description is not a secret

    routes = [
        Route(openapi.EVENTS_PATH, post_events, methods=["POST"]),
        Route("/openapi.json", get_openapi, methods=["GET"]),
    ]
    app = make_app(readiness, routes)
    app.state.background = background
    return app


class _BatchAcks:
    """The acks one batch is still waiting for (counted, not one future per event)."""

    __slots__ = ("done", "duplicates", "remaining", "seen")

    def __init__(self, size: int, done: asyncio.Future[int]) -> None:
        self.remaining = size
        self.duplicates = 0
        self.seen = bytearray(size)
        self.done = done


class JetStreamPublisher:
    """The production Publisher; fails fast while NATS is disconnected.

    ``publish_many`` is the hot path: each event of a batch is a plain NATS publish whose
    JetStream ack comes back to ``<inbox>.<batch>.<index>`` on one wildcard subscription,
    and the batch completes when every index has been acknowledged. nats-py's
    ``js.publish`` per event (a request future, a timer, a task and a PubAck per event)
    cost several times more CPU than the rest of ingest together.
    """

    def __init__(self) -> None:
        self.nc: NATS | None = None
        self.js: JetStreamContext | None = None
        self.stream_ready = False
        self._inbox = ""
        self._batches: dict[int, _BatchAcks] = {}
        self._next_batch = 0

    def attach(self, nc: NATS) -> None:
        self.nc, self.js = nc, nc.jetstream()

    async def start_acks(self) -> None:
        """Subscribe to the ack inbox (once, after attach)."""
        assert self.nc is not None
        self._inbox = self.nc.new_inbox()
        await self.nc.subscribe(f"{self._inbox}.*.*", cb=self._on_ack)

    async def publish(
        self, subject: str, payload: bytes, headers: dict[str, str], timeout: float
    ) -> Ack:
        if self.nc is None or self.js is None or not self.nc.is_connected:
            raise ConnectionError("NATS is not connected")
        return await self.js.publish(subject, payload, timeout=timeout, headers=dict(headers))

    async def publish_many(
        self, subject: str, items: list[tuple[bytes, str]], timeout: float
    ) -> int:
        """Publish (payload, Nats-Msg-Id) pairs; the number of duplicates once all are acked.

        Raises PublishFailed on an error ack or when not every ack arrived within timeout.
        """
        nc = self.nc
        if nc is None or not nc.is_connected or not self._inbox:
            raise PublishFailed("NATS is not connected")
        self._next_batch += 1
        batch_id = self._next_batch
        pending = _BatchAcks(len(items), asyncio.get_running_loop().create_future())
        self._batches[batch_id] = pending
        reply = f"{self._inbox}.{batch_id}."
        try:
            for index, (payload, msg_id) in enumerate(items):
                await nc.publish(
                    subject, payload, reply=f"{reply}{index}", headers={"Nats-Msg-Id": msg_id}
                )
            return await asyncio.wait_for(asyncio.shield(pending.done), timeout)
        except TimeoutError:
            raise PublishFailed(
                f"{pending.remaining} of {len(items)} events not acknowledged within {timeout}s"
            ) from None
        except PublishFailed:
            raise
        except Exception as exc:  # connection closed or draining while publishing
            raise PublishFailed(f"publishing failed: {exc!r}") from exc
        finally:
            del self._batches[batch_id]
            if not pending.done.done():
                pending.done.cancel()

    async def _on_ack(self, msg: Any) -> None:
        _, batch_text, index_text = msg.subject.rsplit(".", 2)
        pending = self._batches.get(int(batch_text))
        if pending is None or pending.done.done():
            return  # a late ack for a batch that already failed or timed out
        index = int(index_text)
        if pending.seen[index]:
            return
        data = msg.data
        if not data or b'"error"' in data:
            # No responders (an empty message with a 503 status header) or a JetStream error.
            status = (msg.headers or {}).get("Status", "") if not data else ""
            reason = data[:200].decode(errors="replace") if data else f"status {status or '?'}"
            pending.done.set_exception(PublishFailed(f"JetStream refused an event: {reason}"))
            return
        pending.seen[index] = 1
        # The server writes `"duplicate": true`; parse only when the word is there (rare).
        if b"duplicate" in data and json.loads(data).get("duplicate"):
            pending.duplicates += 1
        pending.remaining -= 1
        if pending.remaining == 0:
            pending.done.set_result(pending.duplicates)

    async def readiness(self) -> dict[str, str]:
        if self.nc is None or not self.nc.is_connected:
            return {"nats": "disconnected"}
        if not self.stream_ready:
            return {"stream": "events stream not created yet"}
        return {}


async def main(stop: asyncio.Event) -> None:
    settings = IngestSettings.from_env()
    stream = natsutil.StreamSettings.from_env()
    urls = natsutil.nats_urls()
    publisher = JetStreamPublisher()
    app = create_app(publisher, settings, publisher.readiness)
    http = HttpServer(app, http_port())
    await http.start()  # /healthz answers while NATS is still coming up
    log.info("ingest listening", extra={"probes": sorted(settings.tokens)})
    nc = await natsutil.connect(urls, "qoe-ingest", stop)
    if nc is not None:
        publisher.attach(nc)
        await publisher.start_acks()
        publisher.stream_ready = await natsutil.ensure_stream_forever(nc.jetstream(), stream, stop)
    await stop.wait()
    await http.stop()  # in-flight requests finish: each waits for its acks or its deadline
    if app.state.background:
        await asyncio.wait(app.state.background, timeout=settings.publish_timeout + 1)
    if nc is not None:
        await nc.drain()


if __name__ == "__main__":
    run("ingest", main)
