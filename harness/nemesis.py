"""Faults: link faults through toxiproxy and process faults through Docker.

Every fault is a context manager that always heals, also when the body fails or is
interrupted, and records its start and end (with the time the fault took to take effect) in
the run timeline.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from urllib.parse import urlsplit

from toxiproxy.api import APIConsumer
from toxiproxy.server import Toxiproxy

from harness.history import Mark, Timeline
from harness.polling import wait_until
from harness.stack import ComposeStack, Endpoints, StackError

# Proxies by link, as named in stack/images/toxiproxy/proxies.json.
LINKS: dict[str, tuple[str, ...]] = {
    "probe-ingest": ("probe_ingest1", "probe_ingest2"),
    "harness-ingest": ("harness_ingest1", "harness_ingest2"),
    "ingest-nats": ("ingest_nats1", "ingest_nats2", "ingest_nats3"),
    "aggregator-nats": ("aggregator_nats1", "aggregator_nats2", "aggregator_nats3"),
    "diagnoser-nats": ("diagnoser_nats1", "diagnoser_nats2", "diagnoser_nats3"),
    "aggregator-postgres": ("aggregator_postgres",),
    "diagnoser-postgres": ("diagnoser_postgres",),
}


class Nemesis:
    """Injects faults into one stack and records them in the run's timeline."""

    def __init__(self, stack: ComposeStack, endpoints: Endpoints, timeline: Timeline) -> None:
        if endpoints.toxiproxy_url is None:
            raise StackError("this stack has no toxiproxy_url; link faults need Toxiproxy")
        self.stack = stack
        self.timeline = timeline
        address = urlsplit(endpoints.toxiproxy_url)
        # toxiproxy-python keeps the server address on a class; this harness talks to one server.
        APIConsumer.host, APIConsumer.port = address.hostname, address.port
        self.toxiproxy = Toxiproxy()

    @contextmanager
    def _fault(self, name: str, detail: str = "") -> Iterator[None]:
        started = time.time()
        self.timeline.append(Mark(started, "nemesis", f"{name} start", detail))
        try:
            yield
        finally:
            self.timeline.append(
                Mark(started, "nemesis", name, detail, duration_s=time.time() - started)
            )

    def _proxies(self, link_or_proxies: str | Sequence[str]) -> list[str]:
        if isinstance(link_or_proxies, str):
            if link_or_proxies not in LINKS:
                raise ValueError(f"unknown link {link_or_proxies!r}; links are {sorted(LINKS)}")
            return list(LINKS[link_or_proxies])
        return list(link_or_proxies)

    @contextmanager
    def cut(self, link: str | Sequence[str]) -> Iterator[None]:
        """Link down: every proxy of the link disabled (open connections are closed)."""
        names = self._proxies(link)
        proxies = self.toxiproxy.proxies()
        with self._fault(f"cut {link}", ", ".join(names)):
            try:
                for name in names:
                    proxies[name].disable()
                yield
            finally:
                for name in names:
                    proxies[name].enable()

    @contextmanager
    def toxic(
        self, link: str | Sequence[str], kind: str, stream: str = "downstream", **attributes: float
    ) -> Iterator[None]:
        """A toxic (latency, bandwidth, timeout, reset_peer, slow_close, slicer, limit_data)."""
        names = self._proxies(link)
        proxies = self.toxiproxy.proxies()
        toxic_name = f"nemesis_{kind}_{stream}"
        with self._fault(f"{kind} {link}", f"{stream} {attributes}"):
            try:
                for name in names:
                    proxies[name].add_toxic(
                        name=toxic_name, type=kind, stream=stream, attributes=attributes
                    )
                yield
            finally:
                for name in names:
                    proxies[name].destroy_toxic(toxic_name)

    def kill(self, service: str, *, await_healthy: bool = True) -> float:
        """SIGKILL a service's container and start it again; returns seconds until it is back.

        Under a partition the restarted service cannot be ready, so `await_healthy=False` waits
        only until it runs.
        """
        container = self.stack.container(service)
        check = self._healthy if await_healthy else self._running
        with self._fault(f"kill {service}"):
            self.stack.docker.container.kill(container, signal="SIGKILL")
            self.stack.docker.compose.start([service])
            _, took = wait_until(
                lambda: check(service), timeout_s=120, what=f"{service} back after SIGKILL"
            )
        return took

    def _running(self, service: str) -> bool:
        return bool(self.stack.container(service).state.running)

    @contextmanager
    def paused(self, service: str) -> Iterator[None]:
        """Freeze a service (docker pause) for the body, then unpause it."""
        container = self.stack.container(service)
        with self._fault(f"pause {service}"):
            self.stack.docker.container.pause(container)
            try:
                yield
            finally:
                self.stack.docker.container.unpause(container)

    def _healthy(self, service: str) -> bool:
        state = self.stack.container(service).state
        return bool(state.running and (state.health is None or state.health.status == "healthy"))
