"""Faults: link faults through Toxiproxy, hard partitions and process faults through Docker,
and database failover.

Every fault is a context manager that always heals, also when the body fails or is
interrupted, and records in the run timeline (source "nemesis"): its start, when it took effect
(duration_s = time to effect), when it was healed (duration_s = time to heal) and the whole
fault as a band. The context yields a `Fault` the scenario can read those times from.

Link faults drive Toxiproxy with toxiproxy-python; what it lacks (moving a proxy's upstream,
reading one proxy) goes to Toxiproxy's documented HTTP API (`GET/POST /proxies/{name}`)
directly. Nothing here depends on anything but that API and the Docker CLI.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from toxiproxy.api import APIConsumer
from toxiproxy.exceptions import NotFound
from toxiproxy.server import Toxiproxy

from harness.history import Mark, Timeline
from harness.polling import DeadlineExceeded, wait_until
from harness.stack import RUN_LABEL, ComposeStack, Endpoints, StackError

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
NATS_NODES = ("nats-1", "nats-2", "nats-3")


class NemesisError(RuntimeError):
    """A fault could not be injected or healed; the message says what was expected and seen."""


@dataclass
class Fault:
    """One injected fault: what, and its clock (seconds; None until it happened)."""

    name: str
    detail: str = ""
    started_at: float = 0.0  # time.time() when injection began
    effect_s: float | None = None  # injection start -> the fault observably in effect
    healed_at: float | None = None  # time.time() when healing began
    heal_s: float | None = None  # healing start -> healed (e.g. the service healthy again)
    ended_at: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def duration_s(self) -> float | None:
        return None if self.ended_at is None else self.ended_at - self.started_at

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "detail": self.detail,
            "started_at": self.started_at,
            "effect_s": self.effect_s,
            "healed_at": self.healed_at,
            "heal_s": self.heal_s,
            "duration_s": self.duration_s,
            **({"notes": self.notes} if self.notes else {}),
        }


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


def _run_all(steps: Sequence[Callable[[], object]]) -> None:
    """Run every step even if some fail; then raise the first failure."""
    errors: list[BaseException] = []
    for step in steps:
        try:
            step()
        except Exception as error:  # keep healing the rest
            errors.append(error)
    if errors:
        raise errors[0]


class Nemesis:
    """Injects faults into one compose stack and records them in the run's timeline."""

    def __init__(self, stack: ComposeStack, endpoints: Endpoints, timeline: Timeline) -> None:
        if endpoints.toxiproxy_url is None:
            raise StackError("this stack has no toxiproxy_url; link faults need Toxiproxy")
        self.stack = stack
        self.endpoints = endpoints
        self.timeline = timeline
        self.toxiproxy = ToxiproxyAPI(endpoints.toxiproxy_url)
        self.faults: list[Fault] = []

    # -- the fault skeleton -----------------------------------------------------------------

    @contextmanager
    def fault(
        self,
        name: str,
        detail: str,
        inject: Callable[[], object],
        heal: Sequence[Callable[[], object]],
        *,
        effect: Callable[[], object] | None = None,
        effect_timeout_s: float = 30.0,
        healed: Callable[[], object] | None = None,
        heal_timeout_s: float = 120.0,
    ) -> Iterator[Fault]:
        """Inject, wait for `effect` (if given), run the body, then always run every `heal`
        step and wait for `healed` (if given). Marks: start, effective, healed, and the band."""
        fault = Fault(name=name, detail=detail, started_at=time.time())
        self.faults.append(fault)
        self.timeline.append(Mark(fault.started_at, "nemesis", f"{name} start", detail))
        began = time.monotonic()
        try:
            inject()
            if effect is not None:
                wait_until(effect, timeout_s=effect_timeout_s, what=f"{name} taking effect")
            fault.effect_s = time.monotonic() - began
            self.timeline.append(
                Mark(time.time(), "nemesis", f"{name} effective", detail, fault.effect_s)
            )
            yield fault
        finally:
            fault.healed_at = time.time()
            healing = time.monotonic()
            try:
                _run_all(heal)
                if healed is not None:
                    wait_until(healed, timeout_s=heal_timeout_s, what=f"{name} healed")
                fault.heal_s = time.monotonic() - healing
            finally:
                fault.ended_at = time.time()
                self.timeline.append(
                    Mark(
                        fault.healed_at,
                        "nemesis",
                        f"{name} healed",
                        detail,
                        fault.heal_s if fault.heal_s is not None else None,
                    )
                )
                self.timeline.append(
                    Mark(
                        fault.started_at,
                        "nemesis",
                        name,
                        f"{detail}; effect {_s(fault.effect_s)}, heal {_s(fault.heal_s)}",
                        duration_s=fault.ended_at - fault.started_at,
                    )
                )

    def _instant(self, name: str, detail: str, action: Callable[[], object]) -> float:
        """An action that is not a state (a move, a restart): one band of its duration."""
        started, began = time.time(), time.monotonic()
        action()
        took = time.monotonic() - began
        self.timeline.append(Mark(started, "nemesis", name, detail, duration_s=took))
        return took

    # -- link faults (Toxiproxy) --------------------------------------------------------------

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
    ) -> Any:  # a context manager of Fault
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
        with self.fault(
            f"move {', '.join(proxies)}",
            f"upstream -> {upstream}",
            inject=lambda: [self.toxiproxy.set_upstream(p, upstream) for p in proxies],
            heal=[(lambda p=p, u=u: self.toxiproxy.set_upstream(p, u)) for p, u in before.items()],
        ) as fault:
            yield fault

    # -- hard partitions (Docker networks) ------------------------------------------------------

    def networks_of(self, service: str) -> list[str]:
        container = self.stack.container(service)
        return sorted(container.network_settings.networks or {})

    @contextmanager
    def disconnected(
        self,
        service: str,
        network: str | None = None,
        *,
        effect: Callable[[], object] | None = None,
        healed: Callable[[], object] | None = None,
    ) -> Iterator[Fault]:
        """Hard partition: the container taken off its tier network (no proxy involved), then
        reconnected with its service name as alias so service DNS works again.

        Docker gives a reconnected container new host ports; the endpoints are updated in
        place so scenarios keep reaching the service.
        """
        if service == "toxiproxy":
            raise ValueError(
                "hard-partitioning toxiproxy would move the harness's own ports; cut links instead"
            )
        networks = self.networks_of(service)
        if network is None:
            if len(networks) != 1:
                raise ValueError(f"{service} is on networks {networks}; say which to disconnect")
            network = networks[0]
        elif network not in networks:
            network = f"{self.stack.name}_{network}"
            if network not in networks:
                raise ValueError(f"{service} is not on network {network}; it is on {networks}")
        container = self.stack.container(service)
        docker = self.stack.docker

        def reconnect() -> None:
            if network not in self.networks_of(service):
                docker.network.connect(network, container, alias=service)
            self._refresh_ports(service)

        with self.fault(
            f"disconnect {service}",
            f"from {network}",
            inject=lambda: docker.network.disconnect(network, container),
            heal=[reconnect],
            effect=effect,
            healed=healed,
        ) as fault:
            yield fault

    def _start(self, services: Sequence[str]) -> None:
        """Start stopped services and re-read their host ports (Docker picks new ones)."""
        self.stack.docker.compose.start(list(services))
        for service in services:
            self._refresh_ports(service)

    def _refresh_ports(self, service: str) -> None:
        """Re-read a service's published ports into the endpoints, in place, so every holder of
        the session's Endpoints sees them (Docker assigns new ephemeral host ports when a
        container starts again or is reconnected to its network)."""
        if service in NATS_NODES and self.endpoints.nats_urls:
            port = self._wait_port(service, 4222)
            urls = list(self.endpoints.nats_urls)
            urls[NATS_NODES.index(service)] = f"nats://127.0.0.1:{port}"
            # Endpoints is frozen and shared by the session's fixtures: update it in place.
            object.__setattr__(self.endpoints, "nats_urls", tuple(urls))
        if service in self.endpoints.services:
            port = self._wait_port(service, 8080)
            self.endpoints.services[service] = f"http://127.0.0.1:{port}"  # type: ignore[index]
        if service in self.endpoints.nats_monitors:
            port = self._wait_port(service, 8222)
            self.endpoints.nats_monitors[service] = f"http://127.0.0.1:{port}"  # type: ignore[index]
        if service in self.endpoints.postgres_nodes:
            port = self._wait_port(service, 5432)
            old = self.endpoints.postgres_nodes[service]
            base, _, rest = old.rpartition(":")
            self.endpoints.postgres_nodes[service] = (  # type: ignore[index]
                f"{base}:{port}/{rest.split('/', 1)[1]}"
            )

    def _wait_port(self, service: str, private: int) -> int:
        return wait_until(
            lambda: self.stack.host_port(service, private),
            timeout_s=10,
            what=f"{service} publishing port {private} again",
        )[0]

    # -- process faults (Docker) ---------------------------------------------------------------

    def _running(self, service: str) -> bool:
        return bool(self.stack.container(service).state.running)

    def _stopped(self, service: str) -> bool:
        return not self._running(service)

    def _healthy(self, service: str) -> bool:
        state = self.stack.container(service).state
        return bool(state.running and (state.health is None or state.health.status == "healthy"))

    def kill(self, service: str, *, await_healthy: bool = True) -> float:
        """SIGKILL a service's container and start it again; returns seconds until it is back.

        Under a partition the restarted service cannot be ready, so `await_healthy=False` waits
        only until it runs.
        """
        check = self._healthy if await_healthy else self._running
        with self.fault(
            f"kill {service}",
            "SIGKILL, then start",
            inject=lambda: self._sigkill(service),
            heal=[lambda: self._start([service])],
            healed=lambda: check(service),
        ) as fault:
            pass
        return (fault.effect_s or 0.0) + (fault.heal_s or 0.0)

    def _sigkill(self, service: str) -> None:
        container = self.stack.container(service)
        if container.state.running:
            self.stack.docker.container.kill(container, signal="SIGKILL")

    @contextmanager
    def killed(self, service: str, *, await_healthy: bool = True) -> Iterator[Fault]:
        """SIGKILL a service and keep it down for the body; started again afterwards."""
        check = self._healthy if await_healthy else self._running
        with self.fault(
            f"kill {service}",
            "SIGKILL, down for the body",
            inject=lambda: self._sigkill(service),
            effect=lambda: self._stopped(service),
            heal=[lambda: self._start([service])],
            healed=lambda: check(service),
        ) as fault:
            yield fault

    @contextmanager
    def stopped(self, services: Sequence[str], *, grace_s: int = 15) -> Iterator[Fault]:
        """Graceful stop (SIGTERM, then SIGKILL after grace_s) of services, all at once; started
        again afterwards and awaited healthy."""
        services = list(services)
        docker = self.stack.docker

        def stop() -> None:
            docker.container.stop([self.stack.container(s) for s in services], time=grace_s)

        with self.fault(
            f"stop {', '.join(services)}",
            f"graceful, {grace_s} s grace",
            inject=stop,
            effect=lambda: all(self._stopped(s) for s in services),
            heal=[lambda: self._start(services)],
            healed=lambda: all(self._healthy(s) for s in services),
            heal_timeout_s=180,
        ) as fault:
            yield fault

    def restart(self, service: str, *, grace_s: int = 10) -> float:
        """Graceful restart (SIGTERM, start); returns seconds until healthy again."""
        with self.fault(
            f"restart {service}",
            f"graceful, {grace_s} s grace",
            inject=lambda: self.stack.docker.container.restart(
                self.stack.container(service), time=grace_s
            ),
            heal=[lambda: self._refresh_ports(service)],
            healed=lambda: self._healthy(service),
        ) as fault:
            pass
        return (fault.effect_s or 0.0) + (fault.heal_s or 0.0)

    @contextmanager
    def paused(self, service: str) -> Iterator[Fault]:
        """Freeze a service (docker pause: cgroup freezer) for the body, then unpause it."""
        docker = self.stack.docker

        def unpause() -> None:
            container = self.stack.container(service)
            if container.state.paused:
                docker.container.unpause(container)

        def pause() -> bool:
            container = self.stack.container(service)
            if not container.state.paused:
                docker.container.pause(container)
            return True

        with self.fault(
            f"pause {service}",
            "frozen",
            # The cgroup freezer sometimes answers "unable to freeze" on a busy host: retried.
            inject=lambda: wait_until(
                pause, timeout_s=20, interval_s=0.5, what=f"{service} paused"
            ),
            effect=lambda: self.stack.container(service).state.paused,
            heal=[unpause],
        ) as fault:
            yield fault

    # -- NATS ------------------------------------------------------------------------------------

    def nats_node_lost(self, node: str) -> Any:
        """One JetStream node SIGKILLed for the body; back and healthy (caught up) after."""
        if node not in NATS_NODES:
            raise ValueError(f"NATS nodes are {NATS_NODES}, got {node!r}")
        return self.killed(node)

    def nats_cluster_restarted(self, grace_s: int = 15) -> Any:
        """The whole cluster stopped gracefully for the body, then started (file storage keeps
        the stream and the consumer)."""
        return self.stopped(NATS_NODES, grace_s=grace_s)

    # -- PostgreSQL ------------------------------------------------------------------------------

    def psql(self, service: str, sql: str, database: str = "qoe") -> str:
        """Run SQL as the superuser inside a Postgres container (no network path needed)."""
        out = self.stack.docker.container.execute(
            self.stack.container(service),
            ["psql", "-X", "-q", "-At", "-U", "postgres", "-d", database, "-c", sql],
        )
        return str(out or "").strip()

    def postgres_roles(self) -> tuple[str, str]:
        """(primary, standby) among the running Postgres nodes, by pg_is_in_recovery()."""
        primary, standby = [], []
        for node in ("postgres-primary", "postgres-replica"):
            if not self._running(node):
                continue
            (standby if self.psql(node, "SELECT pg_is_in_recovery()") == "t" else primary).append(
                node
            )
        if len(primary) != 1 or len(standby) != 1:
            raise NemesisError(
                f"expected one primary and one standby, found primaries {primary}, "
                f"standbys {standby}; was a failover left half done?"
            )
        return primary[0], standby[0]

    def replication_state(self, primary: str) -> list[tuple[str, str, str]]:
        """(application_name, state, sync_state) of the standbys connected to `primary`."""
        rows = self.psql(
            primary, "SELECT application_name, state, sync_state FROM pg_stat_replication"
        )
        return [tuple(line.split("|")) for line in rows.splitlines() if line]  # type: ignore[misc]

    @contextmanager
    def replication_cut(self) -> Iterator[Fault]:
        """The standby taken off the storage network: no WAL reaches it. With synchronous
        replication the primary's commits wait; with asynchronous ones they go ahead."""
        _, standby = self.postgres_roles()
        with self.disconnected(standby, "storage") as fault:
            fault.notes["standby"] = standby
            yield fault

    def failover(self, *, rebuild_old_primary: bool = True) -> Failover:
        """Database failover as a context manager (see Failover). On enter it stops the primary
        and promotes the standby; use `Failover(...)` with stage="manual" to do it step by step."""
        return Failover(self, rebuild_old_primary=rebuild_old_primary, auto=True)

    def staged_failover(self, *, rebuild_old_primary: bool = True) -> Failover:
        """A failover whose steps (stop_primary, promote) the scenario calls itself."""
        return Failover(self, rebuild_old_primary=rebuild_old_primary, auto=False)

    def heal_all(self) -> None:
        """Last resort after an interrupted scenario: every proxy enabled, no toxics, no
        container paused. (Each fault heals itself; this only helps a killed harness.)"""
        self.toxiproxy.client.reset()
        for container in self.stack.docker.compose.ps():
            if container.state.paused:
                self.stack.docker.container.unpause(container)


class Failover:
    """Stop the primary, promote the standby (pg_promote), move the database proxies to it.

    Healing restores redundancy: the old primary is rebuilt (pg_basebackup from the new one
    into its volume) and started as the new standby; the new primary then replicates to it
    synchronously or not, as the stack's settings say. A failover stopped before promotion is
    healed by starting the old primary again. The timeline gets each step.
    """

    def __init__(self, nemesis: Nemesis, *, rebuild_old_primary: bool, auto: bool) -> None:
        self.nemesis = nemesis
        self.rebuild_old_primary = rebuild_old_primary
        self.auto = auto
        self.primary, self.standby = nemesis.postgres_roles()
        self.stopped = False
        self.promoted = False
        self.fault = Fault(name="failover", detail=f"{self.primary} -> {self.standby}")
        self.promotion_s: float | None = None  # primary stopped -> writes work on the new one

    def __enter__(self) -> Failover:
        nemesis = self.nemesis
        self.fault.started_at = time.time()
        nemesis.faults.append(self.fault)
        nemesis.timeline.append(
            Mark(self.fault.started_at, "nemesis", "failover start", self.fault.detail)
        )
        if self.auto:
            try:
                self.stop_primary()
                self.promote()
            except BaseException:
                self.__exit__(None, None, None)
                raise
        return self

    def stop_primary(self) -> None:
        """SIGKILL the primary (a crash: nothing flushed to the standby on the way out)."""
        nemesis = self.nemesis
        self._stopped_at = time.monotonic()
        nemesis._instant(
            f"kill {self.primary}", "primary crash", lambda: nemesis._sigkill(self.primary)
        )
        wait_until(
            lambda: nemesis._stopped(self.primary), timeout_s=30, what=f"{self.primary} stopped"
        )
        self.stopped = True

    def promote(self) -> float:
        """pg_promote() on the standby, move the proxies, wait until a write works through
        the harness's database link. Returns seconds since the primary was stopped."""
        if not self.stopped:
            self.stop_primary()
        nemesis = self.nemesis
        nemesis._instant(
            f"promote {self.standby}",
            "SELECT pg_promote(true, 60)",
            lambda: _expect(nemesis.psql(self.standby, "SELECT pg_promote(true, 60)"), "t"),
        )
        self.promoted = True
        nemesis.move_upstream(POSTGRES_PROXIES, f"{self.standby}:5432")
        wait_until(
            self._writable, timeout_s=60, what=f"writes through the proxies to {self.standby}"
        )
        self.promotion_s = time.monotonic() - self._stopped_at
        self.fault.effect_s = time.time() - self.fault.started_at
        nemesis.timeline.append(
            Mark(time.time(), "nemesis", "failover effective", self.fault.detail, self.promotion_s)
        )
        return self.promotion_s

    def _writable(self) -> bool:
        import psycopg

        with psycopg.connect(
            self.nemesis.endpoints.database_dsn, autocommit=True, connect_timeout=3
        ) as conn:
            return conn.execute("SELECT NOT pg_is_in_recovery()").fetchone()[0]  # type: ignore[index]

    def __exit__(self, *exc: object) -> None:
        nemesis = self.nemesis
        self.fault.healed_at = time.time()
        healing = time.monotonic()
        try:
            if not self.promoted:
                if self.stopped:  # never promoted: the old primary simply comes back
                    nemesis._start([self.primary])
                    wait_until(
                        lambda: nemesis._healthy(self.primary),
                        timeout_s=120,
                        what=f"{self.primary} back",
                    )
            else:
                # Whatever happened in between, the database proxies lead to the new primary.
                nemesis.move_upstream(POSTGRES_PROXIES, f"{self.standby}:5432")
                if self.rebuild_old_primary:
                    self.rebuild()
            self.fault.heal_s = time.monotonic() - healing
        finally:
            self.fault.ended_at = time.time()
            nemesis.timeline.append(
                Mark(
                    self.fault.healed_at,
                    "nemesis",
                    "failover healed",
                    "old primary rebuilt as standby" if self.promoted else "primary restarted",
                    self.fault.heal_s,
                )
            )
            nemesis.timeline.append(
                Mark(
                    self.fault.started_at,
                    "nemesis",
                    "failover",
                    f"{self.fault.detail}; promotion {_s(self.promotion_s)}, "
                    f"rebuild {_s(self.fault.heal_s)}",
                    duration_s=self.fault.ended_at - self.fault.started_at,
                )
            )

    def rebuild(self) -> None:
        """The old primary's volume replaced by a base backup of the new primary; started as
        its standby; the new primary's synchronous_standby_names set from the stack settings."""
        nemesis, stack = self.nemesis, self.nemesis.stack
        old, new = self.primary, self.standby
        container = stack.container(old)
        if container.state.running:
            stack.docker.container.kill(container, signal="SIGKILL")
        volume = next(
            m.name for m in container.mounts if m.destination == "/var/lib/postgresql/data"
        )
        env = stack._env()
        script = (
            'set -eu; rm -rf "$PGDATA"/* "$PGDATA"/.[!.]* 2>/dev/null || true; '
            f'pg_basebackup -h {new} -U replicator -D "$PGDATA" -X stream -R -c fast '
            '-d "application_name=replica"; '
            'echo "synchronous_standby_names = \'\'" >> "$PGDATA/postgresql.auto.conf"; '
            'chmod 700 "$PGDATA"'
        )
        nemesis._instant(
            f"rebuild {old}",
            f"pg_basebackup from {new}",
            lambda: stack.docker.run(
                container.config.image,
                ["-c", script],
                entrypoint="/bin/sh",
                remove=True,
                networks=[f"{stack.name}_storage"],
                volumes=[(volume, "/var/lib/postgresql/data")],
                envs={"PGPASSWORD": env["REPLICATION_PASSWORD"]},
                labels={RUN_LABEL: stack.run_id},
            ),
        )
        nemesis._start([old])
        wait_until(lambda: nemesis._healthy(old), timeout_s=120, what=f"{old} up as standby")
        names = "'replica'" if stack.settings.sync_replication else "''"
        nemesis.psql(new, f"ALTER SYSTEM SET synchronous_standby_names = {names}")
        nemesis.psql(new, "SELECT pg_reload_conf()")
        wanted = "sync" if stack.settings.sync_replication else "async"
        wait_until(
            lambda: ("replica", "streaming", wanted) in nemesis.replication_state(new),
            timeout_s=60,
            what=f"{old} streaming from {new} ({wanted})",
            describe=lambda: str(nemesis.replication_state(new)),
        )


def _expect(got: str, wanted: str) -> None:
    if got != wanted:
        raise NemesisError(f"expected {wanted!r}, got {got!r}")


def _label(link: str | Sequence[str]) -> str:
    return link if isinstance(link, str) else ",".join(link)


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}s"


# --- faults by name: chaos under load and `python -m harness fault` ---------------------------


@contextmanager
def _killed_and_back(nemesis: Nemesis, service: str) -> Iterator[None]:
    """SIGKILL a service and bring it back (the window lasts at least until it is healthy)."""
    nemesis.kill(service)
    yield


NAMED_FAULTS: dict[str, Callable[[Nemesis], AbstractContextManager[Any]]] = {
    "cut-ingest-nats": lambda n: n.cut("ingest-nats"),
    "cut-aggregator-nats": lambda n: n.cut("aggregator-nats"),
    "cut-aggregator-postgres": lambda n: n.cut("aggregator-postgres"),
    "partition-nats": lambda n: n.partition("nats"),
    "latency-ingest-nats": lambda n: n.toxic("ingest-nats", "latency", latency=100, jitter=50),
    "kill-ingest-1": lambda n: _killed_and_back(n, "ingest-1"),
    "kill-aggregator-1": lambda n: _killed_and_back(n, "aggregator-1"),
    "kill-nats-2": lambda n: _killed_and_back(n, "nats-2"),
    "pause-aggregator-1": lambda n: n.paused("aggregator-1"),
    "pause-nats-2": lambda n: n.paused("nats-2"),
}
"""Faults by name: name -> (Nemesis -> context manager holding the fault until it exits)."""
