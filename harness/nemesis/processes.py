"""Process faults: SIGKILL, graceful stop and restart, pause (cgroup freezer), and the hard
partition of a container taken off its network. They go through the stack's ServiceControl
capability (`engine(service)`, `container(service)`, `start(services)`), so they work on any
backend that gives the containers behind the services, whichever engine runs each.

A service started again or reconnected gets new host ports: scenarios read
`stack.endpoints()` again afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager

from python_on_whales import Container, DockerClient

from harness.nemesis.core import Fault, NemesisCore, NemesisError
from harness.polling import wait_until
from harness.stack import NATS_NODES, ServiceControl


class ProcessFaults(NemesisCore):
    """Faults on the services' containers."""

    @property
    def control(self) -> ServiceControl:
        """The stack's containers; a clear error on a backend that does not give them."""
        if not isinstance(self.stack, ServiceControl):
            raise NemesisError(
                f"{self.stack.name} gives no access to its containers (no ServiceControl); "
                "process faults need it"
            )
        return self.stack

    def _on_each_engine(
        self, services: Sequence[str], action: Callable[[DockerClient, list[Container]], object]
    ) -> None:
        """`action(engine, its containers)` once per engine, the engines at the same time: a
        fault "on all at once" stays that when the services run on several hosts."""
        by_engine: dict[int, tuple[DockerClient, list[Container]]] = {}
        for service in services:
            engine = self.control.engine(service)
            by_engine.setdefault(id(engine), (engine, []))[1].append(
                self.control.container(service)
            )
        with ThreadPoolExecutor(max_workers=len(by_engine) or 1) as pool:
            for done in [pool.submit(action, e, cs) for e, cs in by_engine.values()]:
                done.result()

    # -- state ----------------------------------------------------------------------------------

    def _running(self, service: str) -> bool:
        return bool(self.control.container(service).state.running)

    def _stopped(self, service: str) -> bool:
        return not self._running(service)

    def _healthy(self, service: str) -> bool:
        state = self.control.container(service).state
        return bool(state.running and (state.health is None or state.health.status == "healthy"))

    def _start(self, services: Sequence[str]) -> None:
        self.control.start(list(services))

    def _sigkill(self, service: str) -> None:
        container = self.control.container(service)
        if container.state.running:
            self.control.engine(service).container.kill(container, signal="SIGKILL")

    # -- kills, stops, restarts, pauses -----------------------------------------------------------

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

        def stop() -> None:
            self._on_each_engine(
                services, lambda engine, containers: engine.container.stop(containers, time=grace_s)
            )

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
            inject=lambda: self.control.engine(service).container.restart(
                self.control.container(service), time=grace_s
            ),
            heal=[],
            healed=lambda: self._healthy(service),
        ) as fault:
            pass
        return (fault.effect_s or 0.0) + (fault.heal_s or 0.0)

    @contextmanager
    def paused(self, *services: str) -> Iterator[Fault]:
        """Freeze services (docker pause: cgroup freezer) for the body, all at once, then
        unpause them.

        Their containers are looked up once, before the fault's clock starts: a lookup is a
        `docker compose ps`, seconds each at a load average of 50, and looking them up again
        to pause, check and unpause stretched a 5 s freeze of both ingest replicas to 22 s.
        """
        frozen = [(self.control.engine(s), self.control.container(s)) for s in services]

        def unpause() -> None:
            for engine, container in frozen:
                if container.state.paused:
                    engine.container.unpause(container)

        def pause() -> bool:
            for engine, container in frozen:
                if not container.state.paused:
                    engine.container.pause(container)
            return True

        with self.fault(
            f"pause {', '.join(services)}",
            "frozen",
            # The cgroup freezer sometimes answers "unable to freeze" on a busy host: retried.
            inject=lambda: wait_until(
                pause, timeout_s=20, interval_s=0.5, what=f"{', '.join(services)} paused"
            ),
            effect=lambda: all(container.state.paused for _, container in frozen),
            heal=[unpause],
        ) as fault:
            yield fault

    # -- NATS nodes -------------------------------------------------------------------------------

    def nats_node_lost(self, node: str) -> AbstractContextManager[Fault]:
        """One JetStream node SIGKILLed for the body; back and healthy (caught up) after."""
        if node not in NATS_NODES:
            raise ValueError(f"NATS nodes are {NATS_NODES}, got {node!r}")
        return self.killed(node)

    def nats_cluster_restarted(self, grace_s: int = 15) -> AbstractContextManager[Fault]:
        """The whole cluster stopped gracefully for the body, then started (file storage keeps
        the stream and the consumer)."""
        return self.stopped(NATS_NODES, grace_s=grace_s)

    # -- hard partitions (Docker networks) ------------------------------------------------------

    def networks_of(self, service: str) -> list[str]:
        container = self.control.container(service)
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
        reconnected with its service name as alias so service DNS works again. Docker gives
        the reconnected container new host ports (`stack.endpoints()` has them)."""
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
        container = self.control.container(service)
        engine = self.control.engine(service)

        def reconnect() -> None:
            if network not in self.networks_of(service):
                engine.network.connect(network, container, alias=service)

        with self.fault(
            f"disconnect {service}",
            f"from {network}",
            inject=lambda: engine.network.disconnect(network, container),
            heal=[reconnect],
            effect=effect,
            healed=healed,
        ) as fault:
            yield fault
