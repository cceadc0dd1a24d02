"""Link faults through Toxiproxy: cuts, whole-tier partitions, toxics (latency, bandwidth,
timeouts, resets, ...) and upstream moves, on the proxies that are the only bridges between
the stack's tier networks (stack/images/toxiproxy/proxies.json).

toxiproxy-python drives Toxiproxy for what it has; what it lacks (moving a proxy's upstream,
reading one proxy) goes to Toxiproxy's documented HTTP API (`GET/POST /proxies/{name}`).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from functools import cached_property, partial
from typing import Any
from urllib.parse import urlsplit

from toxiproxy.api import APIConsumer
from toxiproxy.exceptions import NotFound
from toxiproxy.server import Toxiproxy

from harness.nemesis.core import Fault, NemesisCore, NemesisError
from harness.polling import DeadlineExceeded, wait_until
from harness.stack import StackError

# Proxies by link, as named in stack/images/toxiproxy/proxies.json.
LINKS: dict[str, tuple[str, ...]] = {
    "probe-ingest": ("probe_ingest1", "probe_ingest2"),
    "harness-ingest": ("harness_ingest1", "harness_ingest2"),
    "ingest-nats": ("ingest_nats1", "ingest_nats2", "ingest_nats3"),
    "aggregator-nats": ("aggregator_nats1", "aggregator_nats2", "aggregator_nats3"),
    "diagnoser-nats": ("diagnoser_nats1", "diagnoser_nats2", "diagnoser_nats3"),
    "aggregator-postgres": ("aggregator_postgres",),
    "diagnoser-postgres": ("diagnoser_postgres",),
    "harness-postgres": ("harness_postgres",),
    # Every client's link to one NATS node: the node is lost to the clients, not to the cluster.
    "clients-nats1": ("ingest_nats1", "aggregator_nats1", "diagnoser_nats1"),
    "clients-nats2": ("ingest_nats2", "aggregator_nats2", "diagnoser_nats2"),
    "clients-nats3": ("ingest_nats3", "aggregator_nats3", "diagnoser_nats3"),
}

# A whole tier: every proxy that crosses into or out of it.
TIERS: dict[str, tuple[str, ...]] = {
    "ingest": LINKS["probe-ingest"] + LINKS["harness-ingest"] + LINKS["ingest-nats"],
    "nats": LINKS["ingest-nats"] + LINKS["aggregator-nats"] + LINKS["diagnoser-nats"],
    "processing": LINKS["aggregator-nats"]
    + LINKS["diagnoser-nats"]
    + LINKS["aggregator-postgres"]
    + LINKS["diagnoser-postgres"],
    "storage": LINKS["aggregator-postgres"]
    + LINKS["diagnoser-postgres"]
    + LINKS["harness-postgres"],
}

# The proxies that lead to "the database": moved to the new primary on failover.
POSTGRES_PROXIES = ("aggregator_postgres", "diagnoser_postgres", "harness_postgres")
TOXICS = ("latency", "bandwidth", "timeout", "reset_peer", "slow_close", "slicer", "limit_data")
STREAMS = ("upstream", "downstream", "both")


def proxies_of(link_or_proxies: str | Sequence[str]) -> list[str]:
    """Proxy names for a link name, a tier name ("tier:nats") or an explicit list of proxies."""
    if isinstance(link_or_proxies, str):
        if link_or_proxies.startswith("tier:"):
            tier = link_or_proxies.removeprefix("tier:")
            if tier not in TIERS:
                raise ValueError(f"unknown tier {tier!r}; tiers are {sorted(TIERS)}")
            return list(dict.fromkeys(TIERS[tier]))
        if link_or_proxies not in LINKS:
            raise ValueError(
                f"unknown link {link_or_proxies!r}; links are {sorted(LINKS)} "
                f"(or tier:<{'|'.join(sorted(TIERS))}>)"
            )
        return list(LINKS[link_or_proxies])
    names = list(link_or_proxies)
    if not names:
        raise ValueError("no proxies given")
    return names


def toxic_attributes(kind: str, **given: float) -> dict[str, float]:
    """Validate a toxic's attributes against Toxiproxy's documented ones (defaults filled in)."""
    documented: dict[str, dict[str, float]] = {
        "latency": {"latency": 0, "jitter": 0},
        "bandwidth": {"rate": 0},
        "timeout": {"timeout": 0},
        "reset_peer": {"timeout": 0},
        "slow_close": {"delay": 0},
        "slicer": {"average_size": 0, "size_variation": 0, "delay": 0},
        "limit_data": {"bytes": 0},
    }
    if kind not in documented:
        raise ValueError(f"unknown toxic {kind!r}; Toxiproxy's toxics are {', '.join(TOXICS)}")
    unknown = set(given) - set(documented[kind])
    if unknown:
        raise ValueError(
            f"toxic {kind} has attributes {sorted(documented[kind])}, got unknown {sorted(unknown)}"
        )
    return {**documented[kind], **given}


class ToxiproxyAPI:
    """toxiproxy-python for what it has; Toxiproxy's HTTP API for the rest (upstream moves)."""

    def __init__(self, url: str) -> None:
        address = urlsplit(url)
        self.url = url.rstrip("/")
        # toxiproxy-python keeps the server address on a class; the harness talks to one server.
        APIConsumer.host, APIConsumer.port = address.hostname, address.port
        self.client = Toxiproxy()

    def _request(
        self, method: str, path: str, body: dict[str, Any] | None = None, timeout_s: float = 10
    ) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            if error.code == 503:  # the API's request timeout: the change may still happen
                raise
            raise NemesisError(
                f"Toxiproxy {method} {path} answered {error.code}: {error.read()[:300]!r}"
            ) from error

    def proxy(self, name: str) -> dict[str, Any]:
        """GET /proxies/{name}: name, listen, upstream, enabled, toxics."""
        return self._request("GET", f"/proxies/{name}")

    def set_enabled(self, names: Sequence[str], enabled: bool) -> None:
        proxies = self.client.proxies()
        for name in names:
            if name not in proxies:
                raise NemesisError(f"Toxiproxy has no proxy {name!r}; it has {sorted(proxies)}")
            try:
                if enabled:
                    proxies[name].enable()
                else:
                    proxies[name].disable()
            except (OSError, ValueError) as error:  # requests' errors, a non-JSON answer
                self._await_state(name, "enabled", enabled, error)

    def _await_state(self, name: str, key: str, wanted: object, error: BaseException) -> None:
        """Toxiproxy's API gives up on a request after 25 s (503, empty body) but carries on
        with the change, e.g. a proxy still closing connections to a crashed server: so a
        failed call is judged by the proxy's state, polled until it shows the change."""
        try:
            wait_until(
                lambda: self.proxy(name).get(key) == wanted,
                timeout_s=90,
                interval_s=0.5,
                what=f"Toxiproxy proxy {name} with {key} = {wanted!r} after the API answered "
                f"{error!r}",
            )
        except DeadlineExceeded as timeout:
            raise NemesisError(
                f"{timeout}; is the Toxiproxy server overloaded or stuck?"
            ) from error

    def add_toxic(self, proxy: str, name: str, kind: str, stream: str, attributes: dict) -> None:
        self.client.proxies()[proxy].add_toxic(
            name=name, type=kind, stream=stream, attributes=attributes
        )

    def remove_toxic(self, proxy: str, name: str) -> None:
        # NotFound: never added (injection failed part-way) or already gone.
        with suppress(NotFound):
            self.client.proxies()[proxy].destroy_toxic(name)

    def set_upstream(self, name: str, upstream: str) -> None:
        """POST /proxies/{name} {"upstream": ...}; Toxiproxy restarts the proxy (its open
        connections are closed), which can outlast the API's own request timeout."""
        try:
            self._request("POST", f"/proxies/{name}", {"upstream": upstream}, 30)
        except (OSError, ValueError) as error:  # URLError, timeouts, resets; a non-JSON answer
            self._await_state(name, "upstream", upstream, error)


class LinkFaults(NemesisCore):
    """Faults on the links between tiers, through the stack's Toxiproxy."""

    @cached_property
    def toxiproxy(self) -> ToxiproxyAPI:
        if self.endpoints.toxiproxy_url is None:
            raise StackError(f"{self.stack.name} has no toxiproxy_url; link faults need Toxiproxy")
        return ToxiproxyAPI(self.endpoints.toxiproxy_url)

    @contextmanager
    def cut(
        self, link: str | Sequence[str], *, effect: Callable[[], object] | None = None
    ) -> Iterator[Fault]:
        """Link down: every proxy of the link (or "tier:<name>") disabled; open connections
        are closed, new ones refused. `effect` is polled until the cut is observable."""
        names = proxies_of(link)
        with self.fault(
            f"cut {_label(link)}",
            ", ".join(names),
            inject=lambda: self.toxiproxy.set_enabled(names, False),
            heal=[lambda: self.toxiproxy.set_enabled(names, True)],
            effect=effect,
        ) as fault:
            yield fault

    def partition(
        self, tier: str, *, effect: Callable[[], object] | None = None
    ) -> AbstractContextManager[Fault]:
        """Isolate a whole tier: every proxy into or out of it is cut."""
        return self.cut(f"tier:{tier}", effect=effect)

    @contextmanager
    def toxic(
        self,
        link: str | Sequence[str],
        kind: str,
        stream: str = "downstream",
        *,
        effect: Callable[[], object] | None = None,
        **attributes: float,
    ) -> Iterator[Fault]:
        """A Toxiproxy toxic on every proxy of the link, in one direction or "both".

        kinds and attributes (Toxiproxy's documentation): latency (latency, jitter ms),
        bandwidth (rate KB/s), timeout (timeout ms; 0 = never, data dropped), reset_peer
        (timeout ms), slow_close (delay ms), slicer (average_size, size_variation bytes,
        delay us), limit_data (bytes).
        """
        if stream not in STREAMS:
            raise ValueError(f"stream must be one of {STREAMS}, got {stream!r}")
        attrs = toxic_attributes(kind, **attributes)
        names = proxies_of(link)
        streams = ("upstream", "downstream") if stream == "both" else (stream,)
        toxic_names = {s: f"nemesis_{kind}_{s}" for s in streams}

        def inject() -> None:
            for proxy in names:
                for s in streams:
                    self.toxiproxy.add_toxic(proxy, toxic_names[s], kind, s, attrs)

        heal = [
            (lambda p=proxy, t=toxic_names[s]: self.toxiproxy.remove_toxic(p, t))
            for proxy in names
            for s in streams
        ]
        with self.fault(
            f"{kind} {_label(link)}",
            f"{stream} {attrs} on {', '.join(names)}",
            inject=inject,
            heal=heal,
            effect=effect,
        ) as fault:
            yield fault

    def latency(self, link: str | Sequence[str], ms: float, jitter_ms: float = 0, **kw: Any):
        return self.toxic(link, "latency", latency=ms, jitter=jitter_ms, **kw)

    def bandwidth(self, link: str | Sequence[str], rate_kb_s: float, **kw: Any):
        return self.toxic(link, "bandwidth", rate=rate_kb_s, **kw)

    def timeout(self, link: str | Sequence[str], timeout_ms: float = 0, **kw: Any):
        return self.toxic(link, "timeout", timeout=timeout_ms, **kw)

    def reset_peer(self, link: str | Sequence[str], timeout_ms: float = 0, **kw: Any):
        return self.toxic(link, "reset_peer", timeout=timeout_ms, **kw)

    def slow_close(self, link: str | Sequence[str], delay_ms: float, **kw: Any):
        return self.toxic(link, "slow_close", delay=delay_ms, **kw)

    def slicer(
        self, link: str | Sequence[str], average_size: int, variation: int, delay_us: int, **kw
    ):
        return self.toxic(
            link,
            "slicer",
            average_size=average_size,
            size_variation=variation,
            delay=delay_us,
            **kw,
        )

    def limit_data(self, link: str | Sequence[str], limit_bytes: int, **kw: Any):
        return self.toxic(link, "limit_data", bytes=limit_bytes, **kw)

    def upstream(self, proxy: str) -> str:
        return str(self.toxiproxy.proxy(proxy)["upstream"])

    def move_upstream(self, proxies: Sequence[str], upstream: str) -> float:
        """Point proxies at another upstream (permanent; failover uses it). Returns seconds.

        The proxies are disabled first (clients are disconnected and no new connection dials
        the old upstream while Toxiproxy restarts the proxy), moved, then enabled again."""

        def move() -> None:
            moving = [p for p in proxies if self.upstream(p) != upstream]
            self.toxiproxy.set_enabled(moving, False)
            try:
                for proxy in moving:
                    self.toxiproxy.set_upstream(proxy, upstream)
            finally:
                self.toxiproxy.set_enabled(moving, True)

        return self._instant(f"move {', '.join(proxies)}", f"upstream -> {upstream}", move)

    @contextmanager
    def upstream_moved(self, proxies: Sequence[str], upstream: str) -> Iterator[Fault]:
        """Proxies pointed at another upstream for the body, then back where they were."""
        before = {p: self.upstream(p) for p in proxies}

        def move() -> None:
            for proxy in proxies:
                self.toxiproxy.set_upstream(proxy, upstream)

        with self.fault(
            f"move {', '.join(proxies)}",
            f"upstream -> {upstream}",
            inject=move,
            heal=[partial(self.toxiproxy.set_upstream, p, u) for p, u in before.items()],
        ) as fault:
            yield fault


def _label(link: str | Sequence[str]) -> str:
    return link if isinstance(link, str) else ",".join(link)
