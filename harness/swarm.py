"""The swarm stack backend: the reference stack's tier files deployed with `docker stack deploy`
over several Docker hosts (harness.hosts) joined in a Swarm.

The tier files (stack/compose/) and the swarm override (stack/swarm/overrides.yml) are merged
and interpolated by `docker compose config`, as the compose backend reads them; `deploy_file`
then keeps what a swarm service is made of and drops, with the reason, what `docker stack
deploy` rejects (cpu_shares, pull_policy, depends_on's long form). The override pins every
service to a host by the node label qoe.host and publishes its ports in host mode on that
host's address, so the endpoints are a function of the deploy file and the host addresses;
they are written to the same endpoints file as the compose backend's, and every check works
unchanged. Services keep their compose names (ingest-1, nats-2, ...); in the swarm they are
`<stack>_<name>`.

Tasks are read from the engine of the host they are pinned to, not from the manager: during a
partition the manager's view of a cut-off host is stale, the host's own engine is not.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import docker
import httpx
import psycopg
from python_on_whales import Container, DockerClient

from harness.hosts import Hosts, HostsError, engine_rss_mb, reap_orphaned_hosts
from harness.polling import DeadlineExceeded, wait_until
from harness.stack import (
    COMPOSE_DIR,
    ROOT,
    TIER_FILES,
    Endpoints,
    ReferenceStack,
    StackError,
    StackOptions,
    StackSettings,
    _forget_state,
    build_images,
    contract_endpoints,
    log,
    reap_orphans,
    stats_now,
)

OVERRIDES = ROOT / "stack" / "swarm" / "overrides.yml"
HOST_LABEL = "qoe.host"
# The manager is the host no multihost scenario faults by itself (they isolate nats-1's host,
# cut ingest-1's host from the edge host, crash the storage host or the processing host, cut
# the processing host from the storage host): a lost manager would leave the swarm unable to
# restart anything, and a host cut from it is marked down and has its tasks replaced on return.
MANAGER = "h3"
DEPLOY_VERSION = "3.9"  # the newest compose-file version Docker 20.10's stack deploy knows

# What a swarm service is made of, as `docker compose config` writes it.
SERVICE_KEYS = frozenset(
    {
        "image",
        "command",
        "entrypoint",
        "environment",
        "labels",  # container labels; deploy.labels are the service's
        "networks",
        "ports",
        "volumes",
        "healthcheck",
        "stop_grace_period",
        "deploy",
    }
)
# What the tier files say that a swarm service cannot, and why leaving it out is right.
DROPPED_KEYS = {
    "depends_on": "stack deploy has no start order (and rejects the long form): services "
    "retry their dependencies, and the harness waits until every task is healthy",
    "pull_policy": "not in the stack file schema; images are loaded onto each host and "
    "deployed with --resolve-image never",
    "cpu_shares": "a forbidden property in stack files (a swarm service has CPU limits and "
    "reservations, no weight): the ingest path's CPU weight does not apply on this backend",
}
_CONSTRAINT = re.compile(rf"^node\.labels\.{re.escape(HOST_LABEL)}\s*==\s*(\S+)$")
_FAILURE_STATES = {"failed", "rejected", "orphaned"}


# -- the deploy file (pure) ------------------------------------------------------------------


def deploy_file(rendered: Mapping[str, Any]) -> dict[str, Any]:
    """The `docker stack deploy` file made from the merged tier files (`docker compose config
    --format json` of the tier files and the swarm override).

    Raises StackError for a service key this backend does not know (a new key in a tier file
    must be looked at, not silently dropped) and for a port not published in host mode."""
    services = {}
    for name, service in rendered.get("services", {}).items():
        unknown = set(service) - SERVICE_KEYS - set(DROPPED_KEYS)
        if unknown:
            raise StackError(
                f"service {name} has {sorted(unknown)}, which the swarm backend does not "
                f"know: add them to harness/swarm.py SERVICE_KEYS (kept) or DROPPED_KEYS "
                "(left out, with the reason)"
            )
        kept = {k: v for k, v in service.items() if k in SERVICE_KEYS and v is not None}
        kept["ports"] = [_host_mode_port(name, p) for p in service.get("ports", [])]
        services[name] = kept
    return {
        "version": DEPLOY_VERSION,
        "services": services,
        # Without compose's `name`, the stack names networks and volumes <stack>_<key> itself.
        "networks": {k: _without_name(v) for k, v in rendered.get("networks", {}).items()},
        "volumes": {k: _without_name(v) for k, v in rendered.get("volumes", {}).items()},
    }


def _host_mode_port(service: str, port: Mapping[str, Any]) -> dict[str, Any]:
    if port.get("mode") != "host" or not port.get("published"):
        raise StackError(
            f"service {service} publishes {dict(port)}: on the swarm backend every port is "
            "published in host mode on a fixed port (stack/swarm/overrides.yml); the ingress "
            "routing mesh needs IPVS, which this machine's kernel lacks"
        )
    return {
        "target": int(port["target"]),
        "published": int(port["published"]),
        "protocol": port.get("protocol", "tcp"),
        "mode": "host",
    }


def _without_name(resource: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (resource or {}).items() if k != "name"}


@dataclass(frozen=True)
class Placed:
    """One service of the deploy file: the host it is pinned to, its image, its ports."""

    service: str
    host: str
    image: str
    ports: Mapping[int, int]  # container port -> host-mode published port


def placement(deploy: Mapping[str, Any]) -> dict[str, Placed]:
    """Every service's host (its `node.labels.qoe.host == <name>` constraint), image and ports."""
    placed: dict[str, Placed] = {}
    for name, service in deploy["services"].items():
        constraints = service.get("deploy", {}).get("placement", {}).get("constraints", [])
        hosts = [m.group(1) for c in constraints if (m := _CONSTRAINT.match(c.strip()))]
        if len(hosts) != 1:
            raise StackError(
                f"service {name} must be pinned to exactly one host by a constraint "
                f"'node.labels.{HOST_LABEL} == <host>' (stack/swarm/overrides.yml); it has "
                f"{constraints}"
            )
        ports = {int(p["target"]): int(p["published"]) for p in service.get("ports", [])}
        placed[name] = Placed(name, hosts[0], service["image"], ports)
    clashes = _port_clashes(placed.values())
    if clashes:
        raise StackError(f"two services publish the same port on one host: {clashes}")
    return placed


def _port_clashes(placed: Sequence[Placed] | Any) -> list[str]:
    seen: dict[tuple[str, int], str] = {}
    clashes = []
    for p in placed:
        for published in p.ports.values():
            other = seen.setdefault((p.host, published), p.service)
            if other != p.service:
                clashes.append(f"{other} and {p.service} on {p.host}:{published}")
    return clashes


def host_names(placed: Mapping[str, Placed]) -> list[str]:
    return sorted({p.host for p in placed.values()})


def images_by_host(placed: Mapping[str, Placed]) -> dict[str, list[str]]:
    """The images each host needs: those of the services pinned to it, nothing else."""
    by_host: dict[str, set[str]] = {}
    for p in placed.values():
        by_host.setdefault(p.host, set()).add(p.image)
    return {host: sorted(images) for host, images in sorted(by_host.items())}


def swarm_endpoints(
    placed: Mapping[str, Placed],
    addresses: Mapping[str, str],
    env: Mapping[str, str],
    window_s: int,
) -> Endpoints:
    """The endpoints of a deployed stack: each port at its host's address (`addresses`: host
    name -> address the harness reaches it at) and its host-mode published port."""

    def locate(service: str, port: int) -> str:
        if service not in placed or port not in placed[service].ports:
            raise StackError(
                f"{service} publishes no port for {port} in the deploy file "
                f"(stack/swarm/overrides.yml); the harness needs it"
            )
        return f"{addresses[placed[service].host]}:{placed[service].ports[port]}"

    return contract_endpoints(locate, env, window_s)


def changed_services(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """The services whose definition differs between two deploy files (a redeploy updates
    exactly these)."""
    old, new = before.get("services", {}), after.get("services", {})
    return sorted(name for name in new if old.get(name) != new[name])


# -- what the hosts' engines say about the tasks -----------------------------------------------


@dataclass(frozen=True)
class TaskState:
    """A service's newest container on its host, or why there is none."""

    service: str
    host: str
    container_id: str | None
    status: str  # running / exited / created / ...; "no container" / "host unreachable"
    health: str | None  # healthy / starting / unhealthy; None without a health check
    detail: str = ""  # the last health output, the swarm task's error, the engine's error

    @property
    def healthy(self) -> bool:
        return self.status == "running" and self.health in (None, "healthy")

    def describe(self) -> str:
        health = f", {self.health}" if self.health else ""
        detail = f": {' | '.join(self.detail.splitlines())}" if self.detail else ""
        return f"{self.service} on {self.host} ({self.status}{health}){detail}"


def render(project: str, env_file: Path | None) -> dict[str, Any]:
    """The tier files and the swarm override merged by `docker compose config` (JSON),
    interpolated from `env_file`; without one, not interpolated (enough for the placement)."""
    files = [COMPOSE_DIR / f for f in TIER_FILES] + [OVERRIDES]
    command = ["docker", "compose", "-p", project]
    if env_file is not None:
        command += ["--env-file", str(env_file)]
    for file in files:
        command += ["-f", str(file)]
    command += ["config", "--format", "json"]
    if env_file is None:
        command.append("--no-interpolate")
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise StackError(
            f"docker compose could not merge the tier files with {OVERRIDES}: "
            f"{result.stderr.strip()[-800:]}"
        )
    return json.loads(result.stdout)


class SwarmStack(ReferenceStack):
    """The reference stack as one swarm stack over the hosts its deploy file pins it to."""

    def __init__(self, options: StackOptions) -> None:
        super().__init__(options)
        self.deploy_path = self.state_dir / "stack.yml"  # interpolated: holds the secrets
        self.hosts_file = options.hosts_file
        self.placed = placement(deploy_file(render(self.name, None)))
        if MANAGER not in host_names(self.placed):
            raise StackError(f"the swarm manager {MANAGER} runs no service of {OVERRIDES}")
        self.hosts = Hosts(
            host_names(self.placed),
            run_id=self.run_id,
            keep=self.keep,
            hosts_file=self.hosts_file,
        )
        self.phases_s: dict[str, float] = {}
        self._deployed: dict[str, Any] = {}
        self._engines: dict[str, docker.DockerClient] = {}

    # -- lifecycle --------------------------------------------------------------------------

    def up(self) -> Endpoints:
        """Hosts, swarm, images, deploy, every task healthy, endpoints saved. A failed or
        interrupted bring-up takes down what it made (unless the stack is kept)."""
        reap_orphans()
        reap_orphaned_hosts()
        started = time.monotonic()
        self.phases_s = {}
        try:
            with self._phase("build"):
                build_images()
            with self._phase("hosts"):
                self.hosts.up()
            with self._phase("swarm"):
                self.hosts.form_swarm(MANAGER)
            with self._phase("images"):
                self.hosts.load_images(images_by_host(self.placed))
            with self._phase("deploy"):
                env = self._deploy()
            with self._phase("ready"):
                self.wait_ready(list(self.placed))
            endpoints = self._endpoints(env)
            endpoints.save(self.endpoints_file)
        except BaseException:
            if not self.keep:
                self.down()
            raise
        self.bring_up_s = time.monotonic() - started
        phases = ", ".join(f"{k} {v:.1f} s" for k, v in self.phases_s.items())
        log(
            f"{self.name} ready on {len(self.hosts_in_use())} hosts after "
            f"{self.bring_up_s:.1f} s ({phases}); memory by host, MiB: {self.memory_mb()}"
        )
        return endpoints

    def endpoints(self) -> Endpoints:
        """The endpoints as they are now: pinned services on fixed host-mode ports do not move
        when a task restarts, so this is the deploy file at the hosts' addresses."""
        return self._endpoints(self.env.read())

    def apply(self, settings: StackSettings) -> Endpoints:
        """New settings on the running stack: redeployed; the swarm updates the services whose
        definition changed (stop first), and those are awaited healthy in a new task."""
        self.settings = settings
        # What is deployed now: this process's last deploy, or the file a kept stack was
        # deployed from (a new process reconfiguring it).
        if not self._deployed and self.deploy_path.exists():
            self._deployed = json.loads(self.deploy_path.read_text())
        before = self._deployed
        replaced = {s: self.task_state(s).container_id for s in self.placed}
        started = time.monotonic()
        env = self._deploy()
        changed = changed_services(before, self._deployed)
        self.wait_ready(changed, replacing=replaced)
        log(
            f"{self.name} reconfigured in {time.monotonic() - started:.1f} s "
            f"(updated: {', '.join(changed) or 'nothing'})"
        )
        return self._endpoints(env)

    def down(self) -> None:
        """The stack, its networks and volumes removed, then the hosts (unless kept)."""
        if self.keep:
            log(f"keeping {self.name} up; `python -m harness down` removes it")
            return
        started = time.monotonic()
        try:
            self._remove_stack()
        finally:
            try:
                self.hosts.down()
            finally:
                for engine in self._engines.values():
                    engine.close()
                self._engines.clear()
                self.endpoints_file.unlink(missing_ok=True)
                self.deploy_path.unlink(missing_ok=True)
                _forget_state(self.state_dir)
        log(f"{self.name} removed in {time.monotonic() - started:.1f} s")

    @contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        began = time.monotonic()
        try:
            yield
        finally:
            self.phases_s[name] = time.monotonic() - began

    def _deploy(self) -> dict[str, str]:
        """Secrets and settings into the env file, the deploy file rendered from it (mode 600:
        it holds the secrets), and `docker stack deploy` on the manager."""
        env = self.env.write(self.settings)
        deploy = deploy_file(render(self.name, self.env.path))
        self.placed = placement(deploy)
        self.deploy_path.touch(mode=0o600)
        self.deploy_path.write_text(json.dumps(deploy, indent=2) + "\n")  # JSON is YAML
        command = [
            *map(str, self.hosts.client(MANAGER).client_config.docker_cmd),
            "stack",
            "deploy",
            "--detach=true",  # the harness waits itself, and says for what
            "--resolve-image",
            "never",  # no registry: every host has its images loaded
            "--prune",
            "--compose-file",
            str(self.deploy_path),
            self.name,
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise StackError(
                f"docker stack deploy of {self.name} failed: {result.stderr.strip()[-800:]} "
                f"(deploy file {self.deploy_path})"
            )
        for line in result.stderr.splitlines():
            log(f"stack deploy: {line}")
        self._deployed = deploy
        return env

    def wait_ready(
        self,
        services: Sequence[str],
        *,
        replacing: Mapping[str, str | None] | None = None,
        timeout_s: float | None = None,
    ) -> float:
        """Poll each service until its newest task runs, alive by its health check, on its
        host (in a new container, for those in `replacing`) and is ready as the harness sees
        it (`not_ready`); returns the seconds it took. Progress is logged; a timeout names the
        services that are not ready with what they last said, and saves their logs."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        pending = set(services)
        endpoints = self._endpoints(self.env.read())
        started = last_report = time.monotonic()
        states: dict[str, TaskState] = {}

        def all_ready() -> bool:
            nonlocal last_report
            for service in sorted(pending):
                state = states[service] = self.task_state(service)
                fresh = replacing is None or state.container_id != replacing.get(service)
                if not (state.healthy and fresh):
                    continue
                unready = not_ready(service, endpoints)
                if unready:
                    states[service] = replace(state, status="not ready", detail=unready)
                    continue
                pending.discard(service)
                log(f"{service} ready on {state.host} after {time.monotonic() - started:.1f} s")
            if pending and time.monotonic() - last_report > 15:
                last_report = time.monotonic()
                log("waiting for " + "; ".join(states[s].describe() for s in sorted(pending)))
            return not pending

        try:
            return wait_until(all_ready, timeout_s=timeout_s, interval_s=1.0, what="ready")[1]
        except DeadlineExceeded as error:
            unready = [states[s] for s in sorted(pending)]
            raise StackError(self._failure_report(unready, timeout_s)) from error

    def _failure_report(self, unhealthy: Sequence[TaskState], timeout_s: float) -> str:
        failure_dir = self.state_dir / "bring-up-failure"
        failure_dir.mkdir(parents=True, exist_ok=True)
        for state in unhealthy:
            (failure_dir / f"{state.service}.log").write_text(self._logs_of(state, tail=300))
        listing = "; ".join(s.describe() for s in unhealthy)
        return (
            f"swarm stack {self.name}: not ready within {timeout_s:g} s: "
            f"{listing}. Service logs are in {failure_dir}; the deploy file is {self.deploy_path}."
        )

    def _remove_stack(self) -> None:
        """`docker stack rm`, then every container and volume of the stack gone from every
        host that answers. Hosts made here go whole right after (Hosts.down: engines, data
        dirs, namespaces), with the stack on them: for those this is skipped (it took 23 s of
        graceful stops)."""
        if self.hosts_file is not None and not self.hosts.all():
            self.hosts.up()  # listed machines (`harness down` in a new process): reach them
        try:
            hosts = [self.hosts.host(name) for name in self.hosts_in_use()]
            manager = self.hosts.client(MANAGER)
        except HostsError as error:  # the hosts were never made: nothing of the stack exists
            log(f"no swarm to remove {self.name} from ({error})")
            return
        if all(host.local for host in hosts):
            return
        result = subprocess.run(
            [*map(str, manager.client_config.docker_cmd), "stack", "rm", self.name],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            log(f"docker stack rm {self.name}: {result.stderr.strip()[-300:]}")
        namespace = {"label": f"com.docker.stack.namespace={self.name}"}
        for host in self.hosts_in_use():
            try:
                engine = self._engine(host)
                wait_until(
                    partial(_no_containers, engine, namespace),
                    timeout_s=60,
                    interval_s=0.5,
                    what=f"the containers of {self.name} gone from {host}",
                )
                for volume in engine.api.volumes(filters=namespace).get("Volumes") or []:
                    engine.api.remove_volume(volume["Name"], force=True)
            except (docker.errors.DockerException, OSError, DeadlineExceeded) as error:
                log(f"could not clean {self.name} off {host}: {error}")

    # -- services, tasks and containers ----------------------------------------------------

    def hosts_in_use(self) -> list[str]:
        return host_names(self.placed)

    def host_of(self, service: str) -> str:
        """The host the service's task runs on: the one it is pinned to."""
        if service not in self.placed:
            raise StackError(
                f"no service {service!r} in {self.name}; services: {sorted(self.placed)}"
            )
        return self.placed[service].host

    def engine(self, service: str) -> DockerClient:
        return self.hosts.client(self.host_of(service))

    def container(self, service: str) -> Container:
        """The service's newest container (its current task's) on its host's engine."""
        state = self.task_state(service)
        if state.container_id is None:
            raise StackError(f"no container for {service}: {state.describe()}")
        return self.engine(service).container.inspect(state.container_id)

    def task_state(self, service: str) -> TaskState:
        host = self.host_of(service)
        label = {"label": f"com.docker.swarm.service.name={self.name}_{service}"}
        try:
            engine = self._engine(host)
            found = engine.api.containers(all=True, filters=label)
            if not found:
                return TaskState(
                    service, host, None, "no container", None, self._task_error(service)
                )
            return state_of(service, host, engine.api.inspect_container(newest(found)))
        except (docker.errors.DockerException, OSError) as error:
            return TaskState(service, host, None, "host unreachable", None, str(error)[-200:])

    def _task_error(self, service: str) -> str:
        """What the manager says of a service's task that has no container (e.g. pending: no
        suitable node; rejected: no such image)."""
        try:
            tasks = self._engine(MANAGER).api.tasks(
                filters={"service": f"{self.name}_{service}", "desired-state": "running"}
            )
        except (docker.errors.DockerException, OSError) as error:
            return f"manager unreachable: {error}"
        if not tasks:
            return "no task yet"
        status = max(tasks, key=lambda t: t["CreatedAt"])["Status"]
        return " ".join(
            x for x in (status.get("State"), status.get("Err") or status.get("Message")) if x
        )

    def _replicas(self, service: str) -> int:
        spec = self._engine(MANAGER).api.inspect_service(f"{self.name}_{service}")["Spec"]
        return int(spec["Mode"]["Replicated"]["Replicas"])

    def _scale(self, services: Sequence[str], replicas: int) -> None:
        manager = self.hosts.client(MANAGER)
        manager.service.scale({f"{self.name}_{s}": replicas for s in services}, detach=True)

    def start(self, services: Sequence[str]) -> None:
        """Services stopped with `stop` scaled back to one task; every one awaited running.
        (A killed task needs nothing: the swarm restarts it by itself.)"""
        stopped = [s for s in services if self._replicas(s) == 0]
        if stopped:
            self._scale(stopped, 1)
        wait_until(
            lambda: all(self.task_state(s).status == "running" for s in services),
            timeout_s=120,
            interval_s=0.5,
            what=f"{', '.join(services)} running again",
            describe=lambda: "; ".join(self.task_state(s).describe() for s in services),
        )

    def stop(self, services: Sequence[str]) -> None:
        """Services scaled to no task (each stops gracefully, within its grace period), and
        kept so until `start`: on a swarm a killed task would come back by itself."""
        self._scale(services, 0)
        wait_until(
            lambda: all(self.task_state(s).status != "running" for s in services),
            timeout_s=60,
            interval_s=0.5,
            what=f"{', '.join(services)} stopped",
        )

    # -- endpoints, metering and logs ------------------------------------------------------

    def _endpoints(self, env: Mapping[str, str]) -> Endpoints:
        addresses = {h: self.hosts.host(h).address for h in self.hosts_in_use()}
        return swarm_endpoints(self.placed, addresses, env, self.settings.window_s)

    def _engine(self, host: str) -> docker.DockerClient:
        """A docker-py client of a host's engine (one connection, no CLI process per call:
        the bring-up polls every service each second)."""
        if host not in self._engines:
            url = self.hosts.host(host).docker_url
            self._engines[host] = docker.DockerClient(
                base_url=url, timeout=15, use_ssh_client=url.startswith("ssh://")
            )
        return self._engines[host]

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds (user + system) each service's running container has used."""
        used: dict[str, float] = {}
        prefix = f"{self.name}_"
        for host in self.hosts_in_use():
            engine = self._engine(host)
            namespace = f"com.docker.stack.namespace={self.name}"
            for container in engine.containers.list(filters={"label": namespace}):
                service = container.labels["com.docker.swarm.service.name"].removeprefix(prefix)
                used[service] = stats_now(container)["cpu_stats"]["cpu_usage"]["total_usage"] / 1e9
        return used

    def memory_mb(self) -> dict[str, float]:
        """Memory each host uses, MiB: its containers' (less reclaimable page cache) and, for
        a host made here, its engine's processes (dockerd, containerd, shims)."""
        used: dict[str, float] = {}
        for name in self.hosts_in_use():
            engine = self._engine(name)
            total = 0.0
            for container in engine.containers.list():
                memory = stats_now(container)["memory_stats"]
                cache = (memory.get("stats") or {}).get("total_inactive_file", 0)
                total += (memory.get("usage", 0) - cache) / 2**20
            if self.hosts.host(name).local:
                total += engine_rss_mb(name, self.run_id)
            used[name] = round(total, 1)
        return used

    def logs(self, services: list[str] | None = None, tail: int = 200) -> dict[str, str]:
        """Each service's current container's logs, read from its host's engine."""
        return {
            service: self._logs_of(self.task_state(service), tail)
            for service in (services or sorted(self.placed))
        }

    def _logs_of(self, state: TaskState, tail: int) -> str:
        if state.container_id is None:
            return f"(no container: {state.describe()})"
        try:
            raw = self._engine(state.host).api.logs(state.container_id, tail=tail)
            return raw.decode(errors="replace")
        except (docker.errors.DockerException, OSError) as error:
            return f"(logs unavailable: {error})"


def newest(containers: Sequence[Mapping[str, Any]]) -> str:
    """The id of the newest of a service's containers (the engine's container list); a running
    one wins a tie (the swarm keeps earlier tasks' containers as history)."""
    return max(containers, key=lambda c: (c["Created"], c["State"] == "running"))["Id"]


def state_of(service: str, host: str, inspected: Mapping[str, Any]) -> TaskState:
    """A service's task state from its container's inspect document."""
    state = inspected["State"]
    health = state.get("Health") or {}
    entries = health.get("Log") or []
    last = (entries[-1].get("Output") or "").strip()[-300:] if entries else ""
    status = health.get("Status")
    return TaskState(
        service, host, inspected["Id"], state["Status"], status, "" if status == "healthy" else last
    )


def not_ready(service: str, endpoints: Endpoints) -> str | None:
    """Why a service is not ready as the harness reaches it (None: ready): an HTTP service's
    /readyz, a NATS node's full /healthz (JetStream with a meta leader), a PostgreSQL node
    accepting a query, Toxiproxy's API."""
    try:
        if service in endpoints.services:
            return _http_not_ok(f"{endpoints.services[service]}/readyz")
        if service in endpoints.nats_monitors:
            return _http_not_ok(f"{endpoints.nats_monitors[service]}/healthz")
        if service in endpoints.postgres_nodes:
            with psycopg.connect(endpoints.postgres_nodes[service], connect_timeout=3) as conn:
                conn.execute("SELECT 1")
            return None
        if service == "toxiproxy" and endpoints.toxiproxy_url:
            return _http_not_ok(f"{endpoints.toxiproxy_url}/version")
    except (httpx.HTTPError, psycopg.Error) as error:
        return f"{type(error).__name__}: {str(error).strip()[:200]}"
    return None  # nothing to ask: alive is all the harness can know


def _http_not_ok(url: str) -> str | None:
    response = httpx.get(url, timeout=3)
    if response.status_code == 200:
        return None
    return f"{url} answered {response.status_code}: {response.text.strip()[:200]}"


def _no_containers(engine: docker.DockerClient, filters: dict[str, str]) -> bool:
    """No container of the engine's, running or not, matches `filters`."""
    return not engine.api.containers(all=True, filters=filters)
