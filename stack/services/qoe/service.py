"""Plumbing every service shares: JSON logs, health/readiness/metrics endpoints, uvicorn
inside the service's own asyncio loop, signal handling and capped backoff."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from qoe import bugs
from qoe.config import ConfigError, get_int, get_str

log = logging.getLogger("qoe.service")

# Attributes every LogRecord has; anything else was passed via `extra=` and is logged as a field.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's ANSI-coloured copy of msg
}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, service, logger, msg, then any extra fields."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and key not in doc:
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, ensure_ascii=False)


def setup_logging(service: str, level: str | None = None) -> None:
    """Route every logger (uvicorn's and nats' too) to stdout as JSON lines."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel((level or get_str("LOG_LEVEL", "INFO")).upper())
    # httpx logs every request at INFO; the probe's own lines say what matters.
    logging.getLogger("httpx").setLevel(logging.WARNING)


Readiness = Callable[[], Awaitable[dict[str, str]]]
"""Returns {dependency: problem} for each unreachable dependency; empty means ready."""


def make_app(readiness: Readiness, routes: Sequence[BaseRoute] = ()) -> Starlette:
    """A Starlette app with /healthz, /readyz and /metrics plus the service's own routes."""

    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(_: Request) -> Response:
        try:
            problems = await asyncio.wait_for(readiness(), timeout=3)
        except Exception as exc:  # a readiness check that fails is itself a "not ready"
            problems = {"readiness": f"check failed: {type(exc).__name__}: {exc}"}
        if problems:
            return JSONResponse({"ready": False, "unreachable": problems}, status_code=503)
        return JSONResponse({"ready": True})

    async def metrics(_: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    base = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    return Starlette(routes=[*base, *routes])


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the service owns SIGTERM and decides when
    HTTP stops (uvicorn would otherwise swallow the signal and re-raise it afterwards)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def install_signal_handlers(self) -> None:  # uvicorn < 0.29
        pass


class HttpServer:
    """uvicorn serving `app` as a task of the current loop."""

    def __init__(self, app: Starlette, port: int) -> None:
        self.port = port
        config = uvicorn.Config(
            app,
            host="0.0.0.0",
            port=port,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
        )
        self._server = _Server(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Serve in the background; returns once listening, raises if the port cannot be bound."""
        self._task = asyncio.create_task(self._serve(), name="http")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # re-raises the startup error
            await asyncio.sleep(0.01)

    async def _serve(self) -> None:
        try:
            await self._server.serve()
        except SystemExit:  # uvicorn exits the process when it cannot bind; we report instead
            raise OSError(f"cannot serve HTTP on port {self.port} (see the log above)") from None
        if not self._server.started:
            raise OSError(f"HTTP server on port {self.port} stopped during startup")

    async def stop(self) -> None:
        """Stop accepting connections and let in-flight requests finish (up to 5 s)."""
        self._server.should_exit = True
        if self._task is not None:
            await self._task


def http_port() -> int:
    return get_int("HTTP_PORT", 8080, minimum=1, maximum=65535)


def run(service: str, main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Set up logging and seeded bugs, run `main(stop)` until it returns, exit 0.

    SIGTERM and SIGINT set `stop`; main is expected to finish or hand back its in-flight
    work and return. A configuration error exits 2 with one clear log line.
    """
    setup_logging(service)
    try:
        bugs.load()
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(_with_signals(main))
    except ConfigError as exc:
        log.critical("configuration error: %s", exc)
        sys.exit(2)
    except Exception:
        log.critical("fatal error", exc_info=True)
        sys.exit(1)
    log.info("stopped cleanly")
    sys.exit(0)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed (it is, with uvicorn[standard]): the services are event-loop
    bound, and uvloop runs the same loop for about half the CPU of asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _with_signals(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, stop, sig)
    await main(stop)


def _on_signal(stop: asyncio.Event, sig: signal.Signals) -> None:
    log.info("received %s: shutting down", sig.name)
    stop.set()


class Backoff:
    """Capped exponential backoff with full jitter: delay n is uniform in [0, min(cap, base*2^n)].

    Full jitter spreads retries of many clients so a recovering server is not hit in waves.
    """

    def __init__(self, base: float = 0.1, cap: float = 5.0, rng: random.Random | None = None):
        self.base, self.cap = base, cap
        self.attempt = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 30)  # 2**30 * base is far past any cap
        return self._rng.uniform(0, ceiling)

    def reset(self) -> None:
        self.attempt = 0


async def sleep_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep up to `seconds`; return True early if `stop` is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=max(0.0, seconds))
    return stop.is_set()


class RateLimitedLog:
    """Log a repeating problem at most once per `every` seconds (NATS/DB retries are chatty)."""

    def __init__(self, logger: logging.Logger, every: float = 10.0) -> None:
        self._logger, self._every = logger, every
        self._last: dict[str, float] = {}

    def warning(self, key: str, msg: str, *args: Any, **extra: Any) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -1e9) >= self._every:
            self._last[key] = now
            self._logger.warning(msg, *args, extra=extra or None)
