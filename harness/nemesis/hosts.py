"""Host faults (the multi-machine nemesis): partitions between hosts, a host's power cut and
return, a host frozen, a swarm node drained, a swarm task killed.

Partitions are Jepsen's grudges, pure data: for each host, the hosts whose packets it drops
(`isolate`, `halves`, `bridge`, `one_way`, `complete`). A grudge becomes DROP rules in the raw
table's PREROUTING chain of each dropping host (before conntrack and NAT, so published ports
and the overlay's VXLAN are cut alike), run through `Hosts.run_on` (nsenter here, ssh on a real
machine), each rule tagged `qoe-harness:<run id>/<fault>` so healing deletes exactly the
fault's rules and reaping all of the run's.

Every fault is a context manager on the nemesis fault skeleton (`NemesisCore.fault`): it
records its start, effect and heal in the run's history, is shown in effect before the body
runs (a TCP connect across the cut fails; a crashed engine's socket is silent and the manager
marks its node down; ...), and always heals, also when the body fails or is interrupted.

`HostFaults` is the mechanism `Nemesis` has: on a stack spread over hosts (`MultiHost`: its
`hosts` and `host_of(service)`, e.g. harness.swarm.SwarmStack) it reaches them through
`stack.hosts`, and its `*_of(service)` faults name a host by the service on it (the registry's
entries). `HostNemesis(hosts, history)` has the same faults on bare `Hosts`, without a stack.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from typing import Protocol, runtime_checkable

from python_on_whales import DockerClient
from python_on_whales.exceptions import DockerException

from harness.history import History
from harness.hosts import HOST_LABEL, Hosts
from harness.nemesis.core import Fault, NemesisCore, NemesisError
from harness.polling import wait_until

Grudge = Mapping[str, frozenset[str]]
"""host -> the hosts whose packets it drops (Jepsen's grudge)."""

PROBE_PORT = 7946  # swarm's gossip (memberlist) listens on TCP on every node
CONNECT_TIMEOUT_S = 2


# -- grudges (pure) --------------------------------------------------------------------------


def complete(components: Sequence[Sequence[str]]) -> Grudge:
    """Each host drops the packets of every host outside its own component."""
    everyone = [h for c in components for h in c]
    if len(set(everyone)) != len(everyone):
        raise ValueError(f"a host is in two components: {components}")
    return {
        host: frozenset(h for h in everyone if h not in component)
        for component in components
        for host in component
    }


def isolate(hosts: Sequence[str], one: str) -> Grudge:
    """One host cut from all the others, both ways."""
    if one not in hosts:
        raise ValueError(f"host {one!r} is not one of {list(hosts)}")
    return complete([[one], [h for h in hosts if h != one]])


def halves(hosts: Sequence[str]) -> Grudge:
    """The hosts split in two: the first half (rounded down) cut from the rest."""
    if len(hosts) < 2:
        raise ValueError(f"halves need at least 2 hosts, got {list(hosts)}")
    middle = len(hosts) // 2
    return complete([list(hosts[:middle]), list(hosts[middle:])])


def bridge(hosts: Sequence[str]) -> Grudge:
    """Two halves cut from each other, and one host (the first of the second half) that
    still sees both (Jepsen's bridge)."""
    if len(hosts) < 3:
        raise ValueError(f"a bridge needs at least 3 hosts, got {list(hosts)}")
    middle = len(hosts) // 2
    left, the_bridge, right = list(hosts[:middle]), hosts[middle], list(hosts[middle + 1 :])
    grudge = dict(complete([left, right]))
    grudge[the_bridge] = frozenset()
    return grudge


def one_way(source: str, destination: str) -> Grudge:
    """Packets from `source` to `destination` lost; the other direction delivered (so UDP
    flows one way, and TCP in neither: the handshake needs both)."""
    if source == destination:
        raise ValueError(f"one-way loss needs two hosts, got {source!r} twice")
    return {destination: frozenset({source})}


def cut_pairs(grudge: Grudge) -> list[tuple[str, str]]:
    """(source, destination) pairs whose packets are dropped, sorted."""
    return sorted((source, host) for host, sources in grudge.items() for source in sources)


def describe(grudge: Grudge) -> str:
    parts = [f"{host} drops {','.join(sorted(s))}" for host, s in sorted(grudge.items()) if s]
    return "; ".join(parts) or "nothing dropped"


def drop_rules(
    grudge: Grudge, addresses: Mapping[str, str], tag: str
) -> dict[str, list[list[str]]]:
    """iptables arguments (after -I or -D) per dropping host: one DROP per source address."""
    unknown = {h for h in grudge} | {s for sources in grudge.values() for s in sources}
    unknown -= set(addresses)
    if unknown:
        raise ValueError(f"grudge names hosts {sorted(unknown)} that have no address")
    return {
        host: [
            [
                "PREROUTING",
                "-t",
                "raw",
                "-s",
                addresses[source],
                "-m",
                "comment",
                "--comment",
                tag,
                "-j",
                "DROP",
            ]
            for source in sorted(sources)
        ]
        for host, sources in sorted(grudge.items())
        if sources
    }


# -- the faults ------------------------------------------------------------------------------


@runtime_checkable
class MultiHost(Protocol):
    """Capability: a stack spread over Docker hosts (host faults need it)."""

    hosts: Hosts

    def host_of(self, service: str) -> str: ...


class HostFaults(NemesisCore):
    """Faults on the hosts of a stack spread over several (MultiHost), recorded in the
    history. The swarm faults and the crash's "node marked down" ask the swarm manager the
    hosts formed (`Hosts.manager`)."""

    _bare_hosts: Hosts | None = None  # HostNemesis: hosts without a stack
    _manager_client: DockerClient | None = None

    @property
    def hosts(self) -> Hosts:
        if self._bare_hosts is not None:
            return self._bare_hosts
        if not isinstance(self.stack, MultiHost):
            raise NemesisError(
                f"{self.stack.name} does not run on hosts of its own (no MultiHost: `hosts` and "
                "`host_of`); host faults need the swarm backend (--stack swarm)"
            )
        return self.stack.hosts

    def host_of(self, service: str) -> str:
        if not isinstance(self.stack, MultiHost):
            raise NemesisError(f"{self.stack.name} does not say which host runs {service}")
        return self.stack.host_of(service)

    @property
    def manager(self) -> DockerClient:
        if self._manager_client is not None:
            return self._manager_client
        if self.hosts.manager is None:
            raise NemesisError("this fault needs the swarm: no manager given and no swarm formed")
        return self.hosts.client(self.hosts.manager)

    # -- reachability between hosts -----------------------------------------------------------

    def connects(self, source: str, destination: str, port: int = PROBE_PORT) -> bool:
        """A TCP connection from `source`'s network to `destination`'s address opens."""
        address = self.hosts.host(destination).address
        done = self.hosts.run_on(
            source,
            ["timeout", str(CONNECT_TIMEOUT_S), "bash", "-c", f"exec 3<>/dev/tcp/{address}/{port}"],
            check=False,
            timeout_s=CONNECT_TIMEOUT_S + 10,
        )
        return done.returncode == 0

    def _all_pairs(self, pairs: Iterable[tuple[str, str]], connected: bool) -> bool:
        pairs = list(pairs)
        with ThreadPoolExecutor(max_workers=max(1, len(pairs))) as pool:
            results = list(pool.map(lambda p: self.connects(*p), pairs))
        return all(r is connected for r in results)

    # -- partitions ---------------------------------------------------------------------------

    @contextmanager
    def host_partition(
        self, grudge: Grudge, *, name: str | None = None, effect_timeout_s: float = 30
    ) -> Iterator[Fault]:
        """The grudge applied (DROP rules in each dropping host), held for the body, healed.
        In effect when every cut pair's TCP connect fails; the same connects must succeed
        before (else the check could not fail) and after healing."""
        pairs = cut_pairs(grudge)
        if not pairs:
            raise ValueError("the grudge drops nothing")
        label = name or f"partition {describe(grudge)}"
        tag = self.hosts.firewall_tag(f"p{len(self.faults) + 1}")  # this nemesis's next fault
        addresses = {h.name: h.address for h in self.hosts.all()}
        rules = drop_rules(grudge, addresses, tag)
        if not self._all_pairs(pairs, connected=True):
            raise NemesisError(
                f"before {label}: some of {pairs} cannot connect to port {PROBE_PORT} already "
                "(is the swarm formed on every host?); a cut could not be told from that"
            )

        def inject() -> None:
            for host, host_rules in rules.items():
                for rule in host_rules:
                    self.hosts.run_on(host, ["iptables", "-w", "5", "-I", *rule])

        def heal() -> None:
            errors = []
            for host in rules:
                for rule in self.hosts.tagged_rules(host, ("raw",)):
                    if rule.comment == tag:
                        done = self.hosts.run_on(
                            host, ["iptables", "-w", "5", *rule.delete_args()], check=False
                        )
                        if done.returncode != 0:
                            errors.append(f"{host}: {done.stderr.strip()}")
            if errors:
                raise NemesisError(f"healing {label}: could not delete rules: {errors}")

        with self.fault(
            label,
            f"{len(pairs)} one-way cuts: {', '.join(f'{s}->{d}' for s, d in pairs)}",
            inject=inject,
            effect=lambda: self._all_pairs(pairs, connected=False),
            effect_timeout_s=effect_timeout_s,
            heal=[heal],
            healed=lambda: self._all_pairs(pairs, connected=True),
            heal_timeout_s=30,
        ) as fault:
            fault.notes["grudge"] = {h: sorted(s) for h, s in grudge.items()}
            yield fault

    def isolated(self, host: str) -> AbstractContextManager[Fault]:
        """`host` cut from every other host of the run (a context manager of Fault)."""
        return self.host_partition(isolate(self._names(), host), name=f"isolate {host}")

    def halved(self) -> AbstractContextManager[Fault]:
        names = self._names()
        return self.host_partition(halves(names), name=f"halves {describe(halves(names))}")

    def bridged(self) -> AbstractContextManager[Fault]:
        names = self._names()
        return self.host_partition(bridge(names), name=f"bridge via {names[len(names) // 2]}")

    def one_way_loss(self, source: str, destination: str) -> AbstractContextManager[Fault]:
        return self.host_partition(
            one_way(source, destination), name=f"loss {source}->{destination}"
        )

    def _names(self) -> list[str]:
        return [h.name for h in self.hosts.all()]

    # -- a host's power ------------------------------------------------------------------------

    @contextmanager
    def crashed(self, host: str) -> Iterator[Fault]:
        """Power off: every process of the host (engine, containerd, every container) killed
        at once; back after the body: the engine started again on the same data-root, in the
        swarm again. In effect when its socket is silent and (it being a worker) the manager
        marks its node down."""
        swarm = self.hosts.manager is not None or self._manager_client is not None
        watch_node = swarm and host != self.hosts.manager
        node_id = self.hosts.node_id(host) if swarm else ""

        def node_state() -> str | None:
            return self.manager.node.inspect(node_id).status.state

        def effect() -> bool:
            return not self.hosts.engine_answers(host) and (
                not watch_node or node_state() == "down"
            )

        def healed() -> bool:
            if not self.hosts.engine_answers(host):
                return False
            if not swarm:
                return True
            own = self.hosts.client(host).system.info().swarm
            return own is not None and own.local_node_state == "active" and node_state() == "ready"

        with self.fault(
            f"crash {host}",
            "power off: engine, containerd and containers SIGKILLed at once",
            inject=lambda: self._power_off(host),
            effect=effect,
            effect_timeout_s=60,
            heal=[lambda: self._power_on(host)],
            healed=healed,
            heal_timeout_s=120,
        ) as fault:
            yield fault

    def _power_off(self, host: str) -> None:
        killed = self.hosts.power_off(host)
        if self.faults:
            self.faults[-1].notes["processes_killed"] = killed

    def _power_on(self, host: str) -> None:
        if not self.hosts.engine_answers(host):
            self.hosts.start_engine(host)

    @contextmanager
    def frozen(self, host: str) -> Iterator[Fault]:
        """Every running container of the host paused (cgroup freezer) for the body, then
        unpaused. The engine itself keeps running and answering."""
        client = self.hosts.client(host)
        paused: list[str] = []

        def pause() -> None:
            for container in client.container.list():
                wait_until(
                    partial(_paused, client, container.id),
                    timeout_s=20,
                    interval_s=0.5,
                    what=f"{container.name} on {host} paused",
                )
                paused.append(container.id)
            if self.faults:
                self.faults[-1].notes["containers"] = len(paused)

        def unpause() -> None:
            for container_id in paused:
                state = client.container.inspect(container_id).state
                if state.paused:
                    client.container.unpause(container_id)

        with self.fault(
            f"freeze {host}",
            "all its containers paused",
            inject=pause,
            effect=lambda: all(client.container.inspect(c).state.paused for c in paused),
            heal=[unpause],
            healed=lambda: not any(client.container.inspect(c).state.paused for c in paused),
        ) as fault:
            yield fault

    # -- swarm ------------------------------------------------------------------------------------

    @contextmanager
    def drained(self, host: str) -> Iterator[Fault]:
        """The host's swarm node drained (its tasks shut down and rescheduled elsewhere where
        placement allows), then active again. Swarm does not move tasks back by itself."""
        manager = self.manager
        node_id = self.hosts.node_id(host)

        def running_here() -> list[str]:
            return [
                t.id
                for t in manager.node.ps(node_id)
                if t.desired_state == "running" or t.status.state == "running"
            ]

        with self.fault(
            f"drain {host}",
            "node availability drain",
            inject=lambda: manager.node.update(node_id, availability="drain"),
            effect=lambda: not running_here(),
            effect_timeout_s=60,
            heal=[lambda: manager.node.update(node_id, availability="active")],
            healed=lambda: manager.node.inspect(node_id).spec.availability == "active",
        ) as fault:
            yield fault

    @contextmanager
    def task_killed(self, service: str) -> Iterator[Fault]:
        """One running task of a swarm service SIGKILLed; the swarm starts a new one in its
        slot. In effect when the task's container has stopped on its host (the manager hears
        of it seconds later); healed when a new task runs in its place."""
        manager = self.manager
        running = [t for t in manager.service.ps(service) if t.status.state == "running"]
        if not running:
            raise NemesisError(f"service {service} has no running task to kill")
        task = running[0]
        container_status = task.status.container_status
        container_id = container_status.container_id if container_status else None
        if container_id is None:  # a running task has its container; the manager may lag
            raise NemesisError(f"the running task {task.id[:12]} of {service} names no container")
        host = self._host_of_node(task.node_id)

        def replaced() -> bool:
            return any(
                t.id != task.id
                and t.status.state == "running"
                and (t.slot == task.slot if task.slot else t.node_id == task.node_id)
                for t in manager.service.ps(service)
            )

        with self.fault(
            f"kill task {service}",
            f"task {task.id[:12]} (slot {task.slot}) on {host}, SIGKILL",
            inject=lambda: self.hosts.client(host).container.kill(container_id, signal="SIGKILL"),
            effect=lambda: (
                not self.hosts.client(host).container.inspect(container_id).state.running
            ),
            heal=[],
            healed=replaced,
            heal_timeout_s=120,
        ) as fault:
            fault.notes["host"] = host
            yield fault

    def _host_of_node(self, node_id: str) -> str:
        labels = self.manager.node.inspect(node_id).spec.labels or {}
        if HOST_LABEL not in labels:
            raise NemesisError(f"swarm node {node_id} has no {HOST_LABEL} label; form_swarm first")
        return labels[HOST_LABEL]

    # -- by the service a host runs (the registry's entries) ------------------------------------

    def isolate_host_of(self, service: str) -> AbstractContextManager[Fault]:
        """The host running `service` cut from every other host."""
        return self.isolated(self.host_of(service))

    def one_way_loss_between(self, source: str, destination: str) -> AbstractContextManager[Fault]:
        """Packets from the host of service `source` to the host of `destination` lost."""
        return self.one_way_loss(self.host_of(source), self.host_of(destination))

    def crash_host_of(self, service: str) -> AbstractContextManager[Fault]:
        return self.crashed(self.host_of(service))

    def freeze_host_of(self, service: str) -> AbstractContextManager[Fault]:
        return self.frozen(self.host_of(service))

    def drain_host_of(self, service: str) -> AbstractContextManager[Fault]:
        return self.drained(self.host_of(service))

    def kill_task_of(self, service: str) -> AbstractContextManager[Fault]:
        """The service's swarm task SIGKILLed (swarm names it <stack>_<service>)."""
        return self.task_killed(f"{self.stack.name}_{service}")


class HostNemesis(HostFaults):
    """Host faults on bare `Hosts`, without a stack (component tests, trying things out).
    `manager`: the swarm manager's engine, if not the one `hosts.form_swarm` chose."""

    def __init__(self, hosts: Hosts, history: History, manager: DockerClient | None = None):
        self.stack = None  # type: ignore[assignment]
        self.endpoints = None  # type: ignore[assignment]
        self.history = history
        self._bare_hosts = hosts
        self._manager_client = manager


def _paused(client: DockerClient, container_id: str) -> bool:
    """Pause a container unless it is; the freezer may answer "unable to freeze" on a busy
    machine, so the caller retries."""
    try:
        if not client.container.inspect(container_id).state.paused:
            client.container.pause(container_id)
    except DockerException:
        return False
    return True
