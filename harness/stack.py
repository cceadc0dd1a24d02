"""The stack under test: bring it up, tear it down, and say where its endpoints are.

`open_stack(StackOptions)` is the one way to get a stack, whichever backend runs it. Every
backend is a `Stack` (up, endpoints, logs, down); what only some backends can do is a
capability protocol a scenario asks for (`ServiceControl`: the container behind each service,
for kills and pauses; `Reconfigurable`: new settings on the running stack; `Metered`: CPU per
service), after Jepsen's `db` protocols. `ComposeStack` owns a compose project built from the
reference stack's tier files: a unique project per run, per-run secrets, `up --wait`, teardown
of every container, network and volume, even after a failure or Ctrl-C; resources left by a
killed run are reaped by label on the next start. `ExternalStack` points the harness at a
deployment that is already running, described by an endpoints file. `harness.swarm` spreads
the same tiers over several Docker hosts.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Protocol, cast, runtime_checkable

import docker
import docker.models.containers
from python_on_whales import Container, DockerClient
from python_on_whales.exceptions import DockerException

from harness.polling import wait_until

ROOT = Path(__file__).resolve().parent.parent
STATE_DIR = ROOT / ".run"  # per-stack secrets and endpoints; git-ignored
COMPOSE_DIR = ROOT / "stack" / "compose"
TIER_FILES = (
    "storage.yml",
    "nats.yml",
    "toxiproxy.yml",
    "ingest.yml",
    "processing.yml",
    "probe.yml",
)
RUN_LABEL = "io.qoe-harness.run"
PID_LABEL = "io.qoe-harness.pid"
HTTP_SERVICES = (
    "ingest-1",
    "ingest-2",
    "aggregator-1",
    "aggregator-2",
    "diagnoser",
    "probe-1",
    "probe-2",
)
NATS_NODES = ("nats-1", "nats-2", "nats-3")
POSTGRES_NODES = ("postgres-primary", "postgres-replica")
SEEDED_BUG_SERVICES = ("INGEST", "AGGREGATOR", "DIAGNOSER", "PROBE")


class StackError(RuntimeError):
    """The stack could not be brought up or used; the message names the service and what to do."""


@dataclass(frozen=True)
class Endpoints:
    """Where the harness reaches the stack. Written to and read from an endpoints file (JSON)."""

    ingest_urls: tuple[str, ...]
    # Secrets (the token, passwords in DSNs) stay out of repr: a failed test's output, which
    # goes into the reports, shows the fixtures' values.
    ingest_token: str = field(repr=False)
    database_dsn: str = field(repr=False)
    nats_urls: tuple[str, ...] = ()
    toxiproxy_url: str | None = None
    services: Mapping[str, str] = field(default_factory=dict)  # name -> http base URL
    nats_monitors: Mapping[str, str] = field(default_factory=dict)  # node -> http monitor URL
    postgres_nodes: Mapping[str, str] = field(default_factory=dict, repr=False)  # node -> DSN
    window_seconds: int = 60

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        path.chmod(0o600)

    @classmethod
    def load(cls, path: Path) -> Endpoints:
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise StackError(
                f"cannot read the endpoints file {path}: {error}. It is a JSON object with at "
                "least ingest_urls, ingest_token and database_dsn (see README, 'External deployments')."
            ) from error
        missing = {"ingest_urls", "ingest_token", "database_dsn"} - raw.keys()
        unknown = raw.keys() - cls.__dataclass_fields__.keys()
        if missing or unknown:
            raise StackError(
                f"endpoints file {path}: missing {sorted(missing)} unknown {sorted(unknown)}; "
                f"allowed keys are {sorted(cls.__dataclass_fields__)}"
            )
        for key in ("ingest_urls", "nats_urls"):
            raw[key] = tuple(raw.get(key, ()))
        return cls(**raw)


@dataclass(frozen=True)
class StackSettings:
    """Knobs of the reference stack, passed to compose as environment variables."""

    seeded_bugs: tuple[str, ...] = ()
    sync_replication: bool = True
    stream_replicas: int = 3
    dedup_window_s: int = 120
    window_s: int = 60
    ack_wait_s: int = 10
    probe_rate: int = 20
    # Every container's health check runs this often. 1 s keeps bring-up fast; each check is a
    # `docker exec` costing ~5 % of a core, so a benchmark on a small machine uses 10 s.
    health_interval_s: int = 1

    def environment(self) -> dict[str, str]:
        return {
            **self._bugs_by_service(),
            "SYNC_REPLICATION": "on" if self.sync_replication else "off",
            "STREAM_REPLICAS": str(self.stream_replicas),
            "DEDUP_WINDOW_SECONDS": str(self.dedup_window_s),
            "WINDOW_SECONDS": str(self.window_s),
            "ACK_WAIT_SECONDS": str(self.ack_wait_s),
            "PROBE_RATE": str(self.probe_rate),
            "HEALTH_INTERVAL": f"{self.health_interval_s}s",
        }

    def _bugs_by_service(self) -> dict[str, str]:
        """Each service gets only its own seeded bugs, so switching one on recreates only it."""
        owners = {"window_off_by_one": "AGGREGATOR"}
        by_service: dict[str, list[str]] = {s: [] for s in SEEDED_BUG_SERVICES}
        for bug in self.seeded_bugs:
            owner = owners.get(bug, bug.split("_", 1)[0].upper())
            if owner not in by_service:
                raise ValueError(
                    f"seeded bug {bug!r} belongs to no service of {SEEDED_BUG_SERVICES}"
                )
            by_service[owner].append(bug)
        return {f"{s}_SEEDED_BUGS": ",".join(bugs) for s, bugs in by_service.items()}


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


BACKENDS = ("compose", "external", "swarm")


def kept_project(backend: str) -> str:
    """The kept stack's name (`up`, `down`, `fault`, `--reuse-stack`): one per backend, so a
    kept swarm stack and a kept compose stack never share a name or a state folder."""
    return "qoe-dev" if backend == "compose" else f"qoe-dev-{backend}"


@dataclass(frozen=True)
class StackOptions:
    """How a run wants its stack; built from pytest options or CLI args, nowhere else."""

    backend: str = "compose"  # one of BACKENDS
    run_id: str = field(default_factory=new_run_id)
    state_dir: Path = STATE_DIR
    settings: StackSettings = StackSettings()
    keep: bool = False  # left up after the run (--reuse-stack, `harness up`)
    project: str | None = None  # fixed project name (the kept dev stack) instead of qoe-<run_id>
    timeout_s: int = 180
    endpoints_file: Path | None = None  # external backend
    hosts_file: Path | None = None  # swarm on real machines (--hosts FILE); None: hosts made here
    # Compose files laid over the tier files (compose backend), e.g. the mutation run's, which
    # points services at mutant images.
    compose_overrides: tuple[Path, ...] = ()


class Stack(Protocol):
    """What every backend has; scenarios needing more ask for a capability protocol below."""

    name: str
    settings: StackSettings
    bring_up_s: float | None

    def up(self) -> Endpoints: ...  # bring up (or attach) and return the endpoints
    def endpoints(self) -> Endpoints: ...  # as they are now (re-read, e.g. after restarts)
    def down(self) -> None: ...
    def logs(self, services: list[str] | None = None, tail: int = 200) -> dict[str, str]: ...


@runtime_checkable
class ServiceControl(Protocol):
    """Capability: the container behind each (compose) service name, and its engine."""

    def engine(self, service: str) -> DockerClient: ...  # the engine that runs it
    def container(self, service: str) -> Container: ...  # its current container
    def start(self, services: Sequence[str]) -> None: ...  # bring stopped ones back, running


@runtime_checkable
class Reconfigurable(Protocol):
    """Capability: new StackSettings on the running stack."""

    def apply(self, settings: StackSettings) -> Endpoints: ...


@runtime_checkable
class Metered(Protocol):
    """Capability: CPU seconds (user + system) each service has used (the benchmark's)."""

    def cpu_seconds(self) -> dict[str, float]: ...


def open_stack(options: StackOptions) -> Stack:
    """The stack `options` ask for, not yet up (`up()` brings it up or attaches to it)."""
    if options.backend == "compose":
        return ComposeStack(options)
    if options.backend == "external":
        if options.endpoints_file is None:
            raise StackError(
                "the external backend needs the deployment's endpoints file: pass "
                "--stack-endpoints FILE (see README, 'External deployments')"
            )
        return ExternalStack(options.endpoints_file)
    if options.backend == "swarm":
        try:
            from harness.swarm import SwarmStack
        except ModuleNotFoundError as error:
            if error.name != "harness.swarm":
                raise  # the backend is there but something it imports is not: show that
            raise StackError(
                "the swarm backend is not available in this checkout (no harness/swarm.py); "
                "use --stack compose or --stack external"
            ) from error
        return SwarmStack(options)
    raise StackError(f"unknown stack backend {options.backend!r}; choose one of {BACKENDS}")


def log(message: str) -> None:
    print(f"[stack {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _orphaned(labels: Mapping[str, str]) -> bool:
    pid = int(labels.get(PID_LABEL, "0") or 0)
    return bool(pid) and pid != os.getpid() and not _pid_alive(pid)


def remove_resources(
    client: docker.DockerClient, label: str, wanted: Callable[[Mapping[str, str]], bool]
) -> set[str]:
    """Remove the containers, then the networks and volumes, carrying `label` whose labels are
    `wanted`; returns the runs they belonged to.

    Another process (a concurrent run reaping the same leftovers, or compose itself) may be
    removing them too, so "already gone" and "already being removed" are not errors.
    """
    runs: set[str] = set()

    def listed() -> list[docker.models.containers.Container]:
        # Other runs remove their containers meanwhile: one gone between listing and
        # inspecting is not an error (docker-py would raise NotFound).
        return client.containers.list(all=True, filters={"label": label}, ignore_removed=True)

    for container in listed():
        if wanted(container.labels):
            runs.add(container.labels.get(RUN_LABEL, "?"))
            _quietly(partial(container.remove, force=True, v=True), container.name)
    wait_until(
        lambda: not any(wanted(c.labels) for c in listed()),
        timeout_s=60,
        what=f"containers labelled {label} removed",
    )
    for kind in (client.networks, client.volumes):
        for resource in kind.list(filters={"label": label}):
            labels = resource.attrs.get("Labels") or {}
            if wanted(labels):
                runs.add(labels.get(RUN_LABEL, "?"))
                _quietly(resource.remove, resource.name)
    return runs


def stats_now(container: docker.models.containers.Container) -> dict[str, Any]:
    """A container's resource counters as they are now (one_shot: without waiting for a
    second sample)."""
    # With stream=False docker-py returns the one dict; its stubs type every call's result
    # as the streaming iterator or a dict.
    return cast(dict[str, Any], container.stats(stream=False, one_shot=True))


def _quietly(remove: Callable[[], object], name: str | None) -> None:
    try:
        remove()
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as error:
        if error.status_code != 409:  # 409: removal already in progress elsewhere
            log(f"could not remove {name}: {error}")


def status_lines(client: docker.DockerClient | None = None) -> list[str]:
    """The harness's containers on the default engine (compose stacks), one line each."""
    client = client or docker.from_env()
    containers = client.containers.list(all=True, filters={"label": RUN_LABEL})
    if not containers:
        return ["no harness container on the default engine"]
    return [
        f"{c.labels[RUN_LABEL]:28} {c.name:45} {c.status:10} "
        f"{c.attrs['State'].get('Health', {}).get('Status', '-')}"
        for c in sorted(containers, key=lambda c: c.name or "")
    ]


def reap_orphans(client: docker.DockerClient | None = None) -> list[str]:
    """Remove containers, networks and volumes of harness runs whose owning process is gone.

    Only resources carrying the harness's run label are touched; stacks kept on purpose
    (`--reuse-stack`, `python -m harness up`) carry pid 0 and are left alone.
    """
    dead_runs = remove_resources(client or docker.from_env(), RUN_LABEL, _orphaned)
    for run_id in dead_runs:
        _forget_state(STATE_DIR / f"qoe-{run_id}")
    if dead_runs:
        log(f"removed what killed runs left behind: {', '.join(sorted(dead_runs))}")
    return sorted(dead_runs)


def _forget_state(state_dir: Path) -> None:
    """A stack's state folder holds its secrets: remove it, unless it keeps the diagnosis of
    a failed bring-up (then only the secrets go)."""
    if (state_dir / "bring-up-failure").exists():
        (state_dir / "stack.env").unlink(missing_ok=True)
    else:
        shutil.rmtree(state_dir, ignore_errors=True)


def _service_of(container: Container) -> str:
    """The compose service a container runs (its name when compose did not label it)."""
    labels = container.config.labels or {}
    return labels.get("com.docker.compose.service") or container.name


class StackEnv:
    """A stack's environment file (`<state dir>/stack.env`, mode 600): the run's secrets, made
    per run (a kept stack reuses the ones it was created with), and its settings. Compose reads
    it as its env file; the swarm backend interpolates its deploy file from it."""

    def __init__(self, state_dir: Path, run_id: str, keep: bool) -> None:
        self.path = state_dir / "stack.env"
        self.run_id = run_id
        self.keep = keep

    def exists(self) -> bool:
        return self.path.exists()

    def read(self) -> dict[str, str]:
        return dict(
            line.split("=", 1) for line in self.path.read_text().splitlines() if "=" in line
        )

    def write(self, settings: StackSettings) -> dict[str, str]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        env = {
            **self._secrets(),
            **settings.environment(),
            "QOE_HARNESS_RUN": self.run_id,
            "QOE_HARNESS_PID": "0" if self.keep else str(os.getpid()),
        }
        self.path.touch(mode=0o600)
        self.path.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
        return env

    def _secrets(self) -> dict[str, str]:
        if self.exists():
            existing = self.read()
            if "POSTGRES_PASSWORD" in existing:
                return {
                    k: existing[k] for k in existing if k.endswith(("PASSWORD", "TOKEN", "TOKENS"))
                }
        tokens = {
            name: secrets.token_urlsafe(24) for name in ("probe-1", "probe-2", "harness", "load")
        }
        return {
            "POSTGRES_PASSWORD": secrets.token_urlsafe(24),
            "REPLICATION_PASSWORD": secrets.token_urlsafe(24),
            "PROBE_TOKENS": ",".join(f"{name}:{token}" for name, token in tokens.items()),
            "PROBE_1_TOKEN": tokens["probe-1"],
            "PROBE_2_TOKEN": tokens["probe-2"],
            "HARNESS_TOKEN": tokens["harness"],
            "LOAD_TOKEN": tokens["load"],
        }


def build_images() -> None:
    """Build (or find, by content hash) the stack's images; seconds when nothing changed."""
    subprocess.run([sys.executable, str(ROOT / "stack" / "build.py")], check=True)


def _everyone(services: Sequence[str], port: int) -> list[str]:
    return list(services)


def contract_endpoints(
    locate: Callable[[str, int], str],
    env: Mapping[str, str],
    window_s: int,
    present: Callable[[Sequence[str], int], list[str]] = _everyone,
) -> Endpoints:
    """The contract's endpoints of the reference stack, whatever runs it: `locate(service,
    container_port)` is "address:port" where the harness reaches that port; `present(services,
    port)` the services reachable on it now (all, unless a backend knows some are down). The
    harness's own ways in (ingest, database, Toxiproxy's API) all go through Toxiproxy."""
    password = env["POSTGRES_PASSWORD"]

    def url(scheme: str, service: str, port: int) -> str:
        return f"{scheme}://{locate(service, port)}"

    return Endpoints(
        ingest_urls=(url("http", "toxiproxy", 18011), url("http", "toxiproxy", 18012)),
        ingest_token=env["HARNESS_TOKEN"],
        database_dsn=f"postgresql://qoe:{password}@{locate('toxiproxy', 15439)}/qoe",
        nats_urls=tuple(url("nats", node, 4222) for node in present(NATS_NODES, 4222)),
        toxiproxy_url=url("http", "toxiproxy", 8474),
        services={name: url("http", name, 8080) for name in present(HTTP_SERVICES, 8080)},
        nats_monitors={node: url("http", node, 8222) for node in present(NATS_NODES, 8222)},
        postgres_nodes={
            node: f"postgresql://qoe:{password}@{locate(node, 5432)}/qoe"
            for node in present(POSTGRES_NODES, 5432)
        },
        window_seconds=window_s,
    )


class ReferenceStack:
    """What every backend that deploys the reference stack itself has: its run, its name
    (qoe-<run id>, or the kept stack's), its settings, its state folder with the run's env
    file and endpoints file, and how long it took to come up."""

    def __init__(self, options: StackOptions) -> None:
        self.run_id = options.run_id
        self.name = options.project or f"qoe-{options.run_id}"
        self.settings = options.settings
        self.keep = options.keep
        self.timeout_s = options.timeout_s
        self.state_dir = options.state_dir / self.name
        self.env = StackEnv(self.state_dir, self.run_id, self.keep)
        self.endpoints_file = self.state_dir / "endpoints.json"
        self.bring_up_s: float | None = None


class ComposeStack(ReferenceStack):
    """The reference stack as one compose project of the tier files, on the default engine.

    A Stack with every capability: ServiceControl, Reconfigurable, Metered."""

    def __init__(self, options: StackOptions) -> None:
        super().__init__(options)
        self.docker = DockerClient(
            compose_files=[*(COMPOSE_DIR / f for f in TIER_FILES), *options.compose_overrides],
            compose_project_name=self.name,
            compose_env_files=[self.env.path],
        )
        self._api: docker.APIClient | None = None  # for reads cheap enough to poll

    # -- lifecycle ------------------------------------------------------------------------

    def up(self) -> Endpoints:
        reap_orphans()
        build_images()
        env = self.env.write(self.settings)
        started = time.monotonic()
        log(f"bringing up compose project {self.name} (timeout {self.timeout_s} s)")
        try:
            self.docker.compose.up(detach=True, wait=True, wait_timeout=self.timeout_s, quiet=True)
        except DockerException as error:
            raise StackError(self._failure_report(error)) from error
        self.bring_up_s = time.monotonic() - started
        log(f"{self.name} healthy after {self.bring_up_s:.1f} s")
        endpoints = self._discover(env, complete=True)
        endpoints.save(self.endpoints_file)
        return endpoints

    def apply(self, settings: StackSettings) -> Endpoints:
        """Reconfigure a running stack: compose recreates only the services whose config changed."""
        self.settings = settings
        env = self.env.write(settings)
        started = time.monotonic()
        try:
            self.docker.compose.up(detach=True, wait=True, wait_timeout=self.timeout_s, quiet=True)
        except DockerException as error:
            raise StackError(self._failure_report(error)) from error
        log(f"{self.name} reconfigured ({settings}) in {time.monotonic() - started:.1f} s")
        endpoints = self._discover(env, complete=True)
        endpoints.save(self.endpoints_file)
        return endpoints

    def down(self) -> None:
        if self.keep:
            log(f"keeping {self.name} up (--reuse-stack); `python -m harness down` removes it")
            return
        started = time.monotonic()
        try:
            # Without its env file compose cannot even parse the project: nothing was brought
            # up from this folder, and anything labelled with the run goes below.
            if self.env.exists():
                self.docker.compose.down(volumes=True, remove_orphans=True, timeout=5, quiet=True)
        finally:
            self._remove_labelled()
            self.endpoints_file.unlink(missing_ok=True)
            _forget_state(self.state_dir)
        log(f"{self.name} removed in {time.monotonic() - started:.1f} s")

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds (user + system) each service's container has used since it started."""
        used: dict[str, float] = {}
        client = docker.from_env()
        for container in client.containers.list(filters={"label": self._project_label()}):
            service = container.labels.get("com.docker.compose.service") or str(container.name)
            used[service] = stats_now(container)["cpu_stats"]["cpu_usage"]["total_usage"] / 1e9
        return used

    def _remove_labelled(self) -> None:
        """Belt and braces: anything of this run that compose did not remove (e.g. hand-made)."""
        remove_resources(docker.from_env(), f"{RUN_LABEL}={self.run_id}", lambda _: True)

    # -- endpoints --------------------------------------------------------------------------

    def endpoints(self) -> Endpoints:
        """The endpoints as they are now. Docker gives a container new host ports each time it
        starts or is reconnected to its network, so read this again after a fault, rather
        than keeping an old copy. A service publishing nothing at the moment (stopped, or off
        its network) is left out of `services`, `nats_urls`, `nats_monitors` and
        `postgres_nodes`. One call to the Docker API: cheap enough to poll."""
        if not self.env.exists():
            raise StackError(f"{self.name} is not up (no {self.env.path}); call up() first")
        return self._discover(self.env.read(), complete=False)

    def _project_label(self) -> str:
        return f"com.docker.compose.project={self.name}"

    def _published_ports(self) -> dict[tuple[str, int], int]:
        """(service, container port) -> host port for the project's running containers."""
        if self._api is None:
            self._api = docker.from_env().api
        ports: dict[tuple[str, int], int] = {}
        for container in self._api.containers(filters={"label": self._project_label()}):
            service = container["Labels"].get("com.docker.compose.service", container["Id"])
            for port in container.get("Ports") or []:
                if port.get("PublicPort"):
                    ports.setdefault((service, port["PrivatePort"]), port["PublicPort"])
        return ports

    def _discover(self, env: Mapping[str, str], *, complete: bool) -> Endpoints:
        """Endpoints from the published ports; `complete`: every service must publish its
        ports (after bring-up), else those that do not are left out. The harness's own ways
        in go through Toxiproxy, which must run."""
        published = self._published_ports()

        def port(service: str, private: int) -> int:
            found = published.get((service, private))
            if found is None:
                raise StackError(
                    f"{service} of {self.name} publishes no port for {private}; is it running? "
                    f"(`docker compose -p {self.name} ps -a` shows its state)"
                )
            return found

        def present(services: Sequence[str], private: int) -> list[str]:
            """The services publishing `private` now; with `complete`, all of them."""
            if complete:
                for service in services:
                    port(service, private)
            return [s for s in services if (s, private) in published]

        return contract_endpoints(
            lambda service, private: f"127.0.0.1:{port(service, private)}",
            env,
            self.settings.window_s,
            present,
        )

    # -- diagnostics ----------------------------------------------------------------------

    def logs(self, services: list[str] | None = None, tail: int = 200) -> dict[str, str]:
        result: dict[str, str] = {}
        for container in self.docker.compose.ps(all=True):
            service = _service_of(container)
            if services and service not in services:
                continue
            try:
                result[service] = container.logs(tail=tail)
            except DockerException as error:
                result[service] = f"(logs unavailable: {error})"
        return result

    # -- ServiceControl ---------------------------------------------------------------------

    def engine(self, service: str) -> DockerClient:
        """Every service runs on the default engine (a client that knows the compose project)."""
        return self.docker

    def container(self, service: str) -> Container:
        found = self.docker.compose.ps(services=[service], all=True)
        if not found:
            raise StackError(f"no container for service {service!r} in project {self.name}")
        return found[0]

    def start(self, services: Sequence[str]) -> None:
        """Start stopped services and wait until each runs and publishes its ports again."""
        self.docker.compose.start(list(services))
        for service in services:
            wait_until(
                partial(self._publishing, service),
                timeout_s=10,
                what=f"{service} running and publishing its ports again",
            )

    def _publishing(self, service: str) -> bool:
        container = self.container(service)
        wanted = container.host_config.port_bindings or {}
        ports = container.network_settings.ports or {}
        return bool(container.state.running) and all(ports.get(p) for p in wanted)

    def _failure_report(self, error: DockerException) -> str:
        """Name the services that are not healthy, with their last health output and logs."""
        problems: list[str] = []
        failure_dir = self.state_dir / "bring-up-failure"
        failure_dir.mkdir(parents=True, exist_ok=True)
        for container in self.docker.compose.ps(all=True):
            state = container.state
            health = state.health.status if state.health else None
            service = _service_of(container)
            if state.running and health in (None, "healthy"):
                continue
            last = ""
            if state.health and state.health.log:
                last = (state.health.log[-1].output or "").strip()[-300:]
            status = f"{state.status}, health={health}, exit={state.exit_code}"
            problems.append(f"{service} ({status}) {last}".strip())
            (failure_dir / f"{service}.log").write_text(container.logs(tail=300))
        listing = "; ".join(problems) or "no container reported unhealthy"
        return (
            f"stack {self.name} did not become healthy within {self.timeout_s} s: {listing}. "
            f"Service logs are in {failure_dir}. compose said: {str(error)[-500:]}"
        )


class ExternalStack:
    """An already-deployed stack: nothing to bring up or tear down, endpoints from a file."""

    def __init__(self, endpoints_file: Path) -> None:
        self.endpoints_file = endpoints_file
        self.name = f"external:{endpoints_file}"
        self.settings = StackSettings()
        self.bring_up_s: float | None = 0.0

    def up(self) -> Endpoints:
        endpoints = Endpoints.load(self.endpoints_file)
        self.settings = replace(self.settings, window_s=endpoints.window_seconds)
        return endpoints

    def endpoints(self) -> Endpoints:
        """The file's endpoints: a deployment the harness does not restart does not move."""
        return Endpoints.load(self.endpoints_file)

    def down(self) -> None:
        return None

    def logs(self, services: list[str] | None = None, tail: int = 200) -> dict[str, str]:
        return {}
