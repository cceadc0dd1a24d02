"""Docker hosts for the multi-machine backend: made here, or real machines listed in a file.

Made here (the default, and CI): each host is a network namespace with its own address on a
bridge of the run, and its own dockerd (own data-root, exec-root, socket, pidfile, cgroups).
The harness, in the root namespace, reaches every host's address over the bridge. Listed in a
hosts file (`--hosts FILE`): the engines of real machines; then nothing is created, and only
what the run itself did (the swarm, if it formed it; node labels) is undone.

`Hosts` makes (or checks) the hosts, forms a swarm across them, loads images from the default
engine onto each, and removes everything it made. Every step is idempotent and quick when
done. Each run's hosts are named `qoe-<short run id>-<host>` (namespaces, veths, cgroups,
folders) and the run's firewall rules carry the comment `qoe-harness:<run id>`; a record of
the run (/var/lib/qoe-harness/qoe-<short>/run.json) names its owner process, so
`reap_orphaned_hosts()` removes what a killed harness left, as `stack.reap_orphans` does for
compose. Commands on a host (iptables for the host faults) go through one seam, `Hosts.run_on`:
`nsenter --net=…` for a host made here, `ssh` for a real machine.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import docker
from python_on_whales import DockerClient
from python_on_whales.exceptions import DockerException

from harness.polling import DeadlineExceeded, wait_until

DATA_ROOT = Path("/var/lib/qoe-harness")  # a folder per run: its record, each host's data-root
RUN_ROOT = Path("/run/qoe-harness")  # a folder per host: socket, pidfile, exec-root
NETNS_DIR = Path("/var/run/netns")
CGROUP_ROOT = Path("/sys/fs/cgroup")
# RFC 2544's benchmarking range: used by nothing on an ordinary network, and outside Docker's
# default address pools (172.17/16.., 192.168/16, swarm's 10/8), so no engine inside a host
# picks a network that shadows the bridge. One /24 per run.
SUBNETS = ipaddress.ip_network("198.18.0.0/15")
RULE_TAG = "qoe-harness:"
HOST_LABEL = "qoe.host"  # swarm node label: qoe.host=<host name>
SWARM_PORT = 2377
NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,5}$")  # "qoe-abcd-" + 6 characters = 15, IFNAMSIZ - 1
OWN_NAME_RE = re.compile(r"^qoe-([0-9a-f]{4})(?:-([a-z][a-z0-9]{0,5}))?$")
ENGINE_START_TIMEOUT_S = 90
ENGINE_STOP_GRACE_S = 15
DISK_BYTES = 32 * 2**30  # sparse: only what the engine writes takes space


class HostsError(RuntimeError):
    """Hosts could not be made, reached or removed; the message says what and what to do."""


def log(message: str) -> None:
    print(f"[hosts {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Host:
    """One Docker host of the run."""

    name: str  # e.g. "h1"; the node label qoe.host=<name> in the swarm
    address: str  # its IP, reachable from the harness (published ports are reached here)
    docker_url: str  # unix:///run/qoe-harness/<ns>/docker.sock, ssh://user@host, tcp://host:2376
    local: bool  # made here (network namespace + own dockerd) rather than a listed real machine
    ssh: str | None = None  # real machine: "user@host" that runs its commands (iptables)
    sudo: bool = False  # real machine: commands need `sudo -n` (the SSH user is not root)
    engine: bool = True  # False: a bare host made here, a namespace without dockerd (Hosts.bare)


# -- names and places (pure) -------------------------------------------------------------------


def short_id(run_id: str) -> str:
    """Four hex digits naming a run's namespaces and links (interface names have 15 characters)."""
    return hashlib.sha1(run_id.encode()).hexdigest()[:4]


def check_names(names: Sequence[str]) -> list[str]:
    names = list(names)
    if not names:
        raise HostsError("no hosts asked for: name at least one (e.g. ['h1', 'h2', 'h3'])")
    bad = [n for n in names if not NAME_RE.match(n)]
    if bad:
        raise HostsError(
            f"host names {bad} are not 1-6 characters [a-z0-9] starting with a letter; they "
            "become part of interface names (qoe-<run>-<host>, at most 15 characters)"
        )
    if len(set(names)) != len(names):
        raise HostsError(f"host names repeat: {names}")
    return names


def run_of(resource: str) -> str | None:
    """The short run id in a name the harness gives (qoe-abcd, qoe-abcd-h1), else None."""
    match = OWN_NAME_RE.match(resource)
    return match.group(1) if match else None


@dataclass(frozen=True)
class Layout:
    """Where one host made here lives: names and paths, from the run and the host name."""

    short: str
    name: str

    @property
    def ns(self) -> str:
        return f"qoe-{self.short}-{self.name}"

    @property
    def veth(self) -> str:  # the root namespace's end; the host's end is eth0 in its namespace
        return self.ns

    @property
    def netns_path(self) -> Path:
        return NETNS_DIR / self.ns

    @property
    def run_dir(self) -> Path:
        return RUN_ROOT / self.ns

    @property
    def socket(self) -> Path:
        return self.run_dir / "docker.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "docker.pid"

    @property
    def exec_root(self) -> Path:
        return self.run_dir / "exec"

    @property
    def config_file(self) -> Path:
        return self.run_dir / "daemon.json"

    @property
    def data_root(self) -> Path:
        return DATA_ROOT / f"qoe-{self.short}" / self.name

    @property
    def disk(self) -> Path:
        """The host's disk: a sparse ext4 image, mounted on the data-root."""
        return DATA_ROOT / f"qoe-{self.short}" / f"{self.name}.img"

    @property
    def log_file(self) -> Path:
        return DATA_ROOT / f"qoe-{self.short}" / f"{self.name}.dockerd.log"

    @property
    def cgroup_parent(self) -> str:
        """The engine's containers go under /<ns>/<id>, the engine itself under /<ns>/engine:
        the whole host is one cgroup subtree, frozen and killed at once (a power cut)."""
        return f"/{self.ns}"


@dataclass(frozen=True)
class RunRecord:
    """What a run made here, and which process owns it (0: kept on purpose)."""

    run_id: str
    owner_pid: int
    owner_started: int  # the owner's start time (clock ticks since boot): pid reuse is no owner
    subnet: str
    addresses: Mapping[str, str]  # host name -> address
    swarm_manager: str | None = None  # the host the run formed its swarm on
    bare: Sequence[str] = ()  # hosts without an engine (Hosts.bare), among the addresses

    @property
    def short(self) -> str:
        return short_id(self.run_id)

    @property
    def bridge(self) -> str:
        return f"qoe-{self.short}"

    @property
    def bridge_address(self) -> str:
        return str(next(ipaddress.ip_network(self.subnet).hosts()))

    @property
    def tag(self) -> str:
        return RULE_TAG + self.run_id

    @staticmethod
    def path_for(short: str) -> Path:
        return DATA_ROOT / f"qoe-{short}" / "run.json"

    def save(self) -> None:
        path = self.path_for(self.short)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(asdict(self), indent=2) + "\n")
        temporary.replace(path)

    @classmethod
    def load(cls, short: str) -> RunRecord | None:
        try:
            raw = json.loads(cls.path_for(short).read_text())
            return cls(**raw)
        except (OSError, ValueError, TypeError):
            return None


def choose_subnet(taken: Iterable[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
    """The first /24 of SUBNETS that overlaps nothing already routed or addressed here."""
    taken = list(taken)
    for candidate in SUBNETS.subnets(new_prefix=24):
        if not any(candidate.overlaps(other) for other in taken):
            return candidate  # type: ignore[return-value]
    raise HostsError(f"every /24 of {SUBNETS} is in use here; remove old bridges (ip link)")


def assign_addresses(
    subnet: ipaddress.IPv4Network, names: Sequence[str], existing: Mapping[str, str]
) -> dict[str, str]:
    """Host addresses: kept for hosts that have one, the next free ones (after the bridge's
    .1) for new hosts, in the order given."""
    addresses = dict(existing)
    used = {*addresses.values()}
    free = (str(a) for a in list(subnet.hosts())[1:] if str(a) not in used)
    for name in names:
        if name not in addresses:
            addresses[name] = next(free)
    return addresses


def with_bare_host(record: RunRecord, name: str) -> RunRecord:
    """The run's record with a bare host `name` in it: its address kept if it has one, else
    the next free one of the run's subnet."""
    if name in record.addresses and name not in record.bare:
        raise HostsError(f"{name} is one of the run's engine hosts, not a bare host")
    subnet = ipaddress.ip_network(record.subnet)
    addresses = assign_addresses(subnet, [name], record.addresses)  # type: ignore[arg-type]
    bare = [*record.bare, *([] if name in record.bare else [name])]
    return RunRecord(**{**asdict(record), "addresses": addresses, "bare": bare})


def without_bare_host(record: RunRecord, name: str) -> RunRecord:
    """The run's record with the bare host `name` gone (its address free again)."""
    addresses = {h: a for h, a in record.addresses.items() if h != name}
    bare = [h for h in record.bare if h != name]
    return RunRecord(**{**asdict(record), "addresses": addresses, "bare": bare})


@dataclass(frozen=True)
class TaggedRule:
    """A firewall rule that carries the harness's comment, as `iptables -S` lists it."""

    table: str
    run_id: str
    spec: tuple[str, ...]  # "-A CHAIN ..." as listed
    comment: str = ""  # qoe-harness:<run id>, or qoe-harness:<run id>/<fault> for a fault's

    def delete_args(self) -> list[str]:
        return ["-t", self.table, "-D", *self.spec[1:]]


def tagged_rules(listing: str, table: str = "filter") -> list[TaggedRule]:
    """The rules in an `iptables -S` listing whose comment is qoe-harness:<run id>."""
    rules: list[TaggedRule] = []
    for line in listing.splitlines():
        words = shlex.split(line)
        if not words or words[0] != "-A" or "--comment" not in words:
            continue
        comment = words[words.index("--comment") + 1]
        if comment.startswith(RULE_TAG):
            run_id = comment.removeprefix(RULE_TAG).split("/", 1)[0]  # <run id>[/<fault>]
            rules.append(TaggedRule(table, run_id, tuple(words), comment))
    return rules


def mount_points_under(mountinfo: str, prefixes: Sequence[Path]) -> list[str]:
    """Mount points (from /proc/self/mountinfo) at or under any prefix, deepest first."""
    points: set[str] = set()
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        if any(point == str(p) or point.startswith(f"{p}/") for p in prefixes):
            points.add(point)
    return sorted(points, key=lambda p: (-p.count("/"), p))


def orphaned(record: RunRecord | None, alive: Callable[[int, int], bool]) -> bool:
    """A run's leftovers are orphaned when no living process owns them: no record (the
    harness died before writing it, or after removing it), or an owner that is gone. Kept
    runs (owner 0) are never orphans."""
    if record is None:
        return True
    if record.owner_pid == 0:
        return False
    return not alive(record.owner_pid, record.owner_started)


def host_command(host: Host, argv: Sequence[str]) -> list[str]:
    """The command that runs `argv` on `host`: in its network namespace for a host made here,
    over SSH for a real machine (the host file's `ssh`, or the engine's ssh:// address)."""
    if host.local:
        return ["nsenter", f"--net={NETNS_DIR / _ns_of(host)}", *argv]
    target = host.ssh or _ssh_target(host.docker_url)
    if target is None:
        raise HostsError(
            f"host {host.name} ({host.docker_url}) has no SSH address to run commands on: add "
            f'ssh = "user@{host.address}" to its entry in the hosts file'
        )
    remote = ["sudo", "-n", *argv] if host.sudo else list(argv)
    return [
        "ssh",
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=10",
        target,
        "--",
        shlex.join(remote),
    ]


def _ns_of(host: Host) -> str:
    # unix:///run/qoe-harness/<ns>/docker.sock
    return Path(urlsplit(host.docker_url).path).parent.name


def _ssh_target(docker_url: str) -> str | None:
    parts = urlsplit(docker_url)
    if parts.scheme != "ssh" or not parts.hostname:
        return None
    user = f"{parts.username}@" if parts.username else ""
    port = f":{parts.port}" if parts.port else ""  # ssh takes ssh://user@host:port as well
    return f"ssh://{user}{parts.hostname}{port}" if port else f"{user}{parts.hostname}"


# -- the hosts file (real machines) ----------------------------------------------------------


HOST_FILE_KEYS = {"name", "docker", "address", "ssh", "sudo"}


def parse_hosts_file(text: str, path: Path) -> list[Host]:
    """Real machines from a TOML file, one [[host]] table each:

    [[host]]
    name = "h1"                       # the qoe.host label; 1-6 characters [a-z0-9]
    docker = "ssh://qoe@10.0.0.11"    # or "tcp://10.0.0.11:2376"
    address = "10.0.0.11"             # where the harness reaches its published ports
    ssh = "root@10.0.0.11"            # optional: who runs iptables there (host faults)
    sudo = false                      # optional: run those commands with sudo -n
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise HostsError(f"hosts file {path} is not TOML: {error}") from error
    entries = raw.get("host")
    if set(raw) != {"host"} or not isinstance(entries, list) or not entries:
        raise HostsError(
            f"hosts file {path}: expected only [[host]] tables (name, docker, address), found "
            f"keys {sorted(raw)}"
        )
    hosts: list[Host] = []
    for number, entry in enumerate(entries, 1):
        where = f"hosts file {path}, host #{number}"
        missing = {"name", "docker", "address"} - entry.keys()
        unknown = entry.keys() - HOST_FILE_KEYS
        if missing or unknown:
            raise HostsError(
                f"{where}: missing {sorted(missing)} unknown {sorted(unknown)}; keys are "
                f"{sorted(HOST_FILE_KEYS)}"
            )
        scheme = urlsplit(entry["docker"]).scheme
        if scheme not in ("ssh", "tcp"):
            raise HostsError(
                f"{where}: docker = {entry['docker']!r}; expected ssh://user@host or "
                "tcp://host:2376 (the engine of a real machine)"
            )
        try:
            ipaddress.ip_address(entry["address"])
        except ValueError as error:
            raise HostsError(f"{where}: address {entry['address']!r} is not an IP") from error
        hosts.append(
            Host(
                name=entry["name"],
                address=entry["address"],
                docker_url=entry["docker"],
                local=False,
                ssh=entry.get("ssh"),
                sudo=bool(entry.get("sudo", False)),
            )
        )
    check_names([h.name for h in hosts])
    return hosts


# -- commands --------------------------------------------------------------------------------


def _run(
    argv: Sequence[str], *, check: bool = True, timeout_s: float = 60
) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired as error:
        raise HostsError(f"`{shlex.join(argv)}` did not finish within {timeout_s:g} s") from error
    if check and done.returncode != 0:
        raise HostsError(
            f"`{shlex.join(argv)}` failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-500:]}"
        )
    return done


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run(["ip", *args], check=check)


def _iptables(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run(["iptables", "-w", "5", *args], check=check)


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """One harness at a time creates or removes hosts here (concurrent runs, their reapers)."""
    RUN_ROOT.mkdir(parents=True, exist_ok=True)
    with (RUN_ROOT / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _process_started(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _alive(pid: int, started: int) -> bool:
    return _process_started(pid) == started


# -- cgroups: the whole of a host made here --------------------------------------------------


class HostCgroup:
    """A host's processes (engine, containerd, shims, containers) as one cgroup subtree.

    cgroup v1 (this machine): the engine joins /<ns>/engine in the pids and freezer
    hierarchies, Docker puts each container in /<ns>/<id> (--cgroup-parent); cgroup v2: one
    tree /<ns>. Freezing /<ns> stops every process of the host at once."""

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self.v2 = (CGROUP_ROOT / "cgroup.controllers").exists()
        if self.v2:
            self.tree, self.freezer = CGROUP_ROOT / ns, CGROUP_ROOT / ns
        else:
            self.tree, self.freezer = CGROUP_ROOT / "pids" / ns, CGROUP_ROOT / "freezer" / ns

    def engine_dirs(self) -> list[Path]:
        """The cgroups the engine's first process joins (the rest of the host inherits them)."""
        return list(dict.fromkeys([self.tree / "engine", self.freezer / "engine"]))

    def create(self) -> None:
        for path in self.engine_dirs():
            path.mkdir(parents=True, exist_ok=True)

    def pids(self) -> set[int]:
        found: set[int] = set()
        if not self.tree.exists():
            return found
        for directory, _, _ in os.walk(self.tree):
            with contextlib.suppress(OSError):
                found.update(int(p) for p in (Path(directory) / "cgroup.procs").read_text().split())
        return found

    def engine_pids(self) -> set[int]:
        with contextlib.suppress(OSError):
            return {int(p) for p in (self.tree / "engine" / "cgroup.procs").read_text().split()}
        return set()

    def set_frozen(self, frozen: bool) -> None:
        if not self.freezer.exists():
            return
        if self.v2:
            (self.freezer / "cgroup.freeze").write_text("1" if frozen else "0")
        else:
            (self.freezer / "freezer.state").write_text("FROZEN" if frozen else "THAWED")

    def thaw_all(self) -> None:
        """The host and every cgroup in it thawed, also containers `docker pause` froze
        (a SIGKILLed process in a frozen cgroup does not die until it is thawed)."""
        if not self.freezer.exists():
            return
        for directory, _, _ in os.walk(self.freezer, topdown=True):
            state = Path(directory) / ("cgroup.freeze" if self.v2 else "freezer.state")
            with contextlib.suppress(OSError):
                state.write_text("0" if self.v2 else "THAWED")

    def frozen(self) -> bool:
        if self.v2:
            return "frozen 1" in (self.freezer / "cgroup.events").read_text()
        return (self.freezer / "freezer.state").read_text().strip() == "FROZEN"

    def kill_all(self, timeout_s: float = 30) -> int:
        """Every process of the host SIGKILLed at once: frozen first, so none runs on (or
        forks) while the others die; thawed, so the kills take effect. Returns how many."""
        pids = self.pids()
        if not pids:
            return 0
        self.set_frozen(True)
        wait_until(self.frozen, timeout_s=timeout_s, what=f"cgroup {self.ns} frozen")
        pids = self.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.thaw_all()
        wait_until(lambda: not self.pids(), timeout_s=timeout_s, what=f"{self.ns}'s processes gone")
        return len(pids)

    def remove(self) -> None:
        """Every cgroup of the host, in every hierarchy (Docker made some in each), deepest first."""
        for top in [*CGROUP_ROOT.glob(f"*/{self.ns}"), CGROUP_ROOT / self.ns]:
            if not top.is_dir():
                continue
            for directory, _, _ in os.walk(top, topdown=False):
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(directory)


# -- one host made here: network and engine --------------------------------------------------


def _engine_answers(url: str, timeout_s: int = 3) -> bool:
    try:
        with docker.APIClient(base_url=url, timeout=timeout_s) as api:
            return bool(api.ping())
    except Exception:  # no socket yet, refused, timed out: not answering
        return False


def _log_tail(path: Path, lines: int = 8) -> str:
    with contextlib.suppress(OSError):
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"


def _unmount_under(prefixes: Sequence[Path]) -> None:
    """Every mount at or under the prefixes: dockerd's (its data-root bind, overlay layers,
    network namespaces) and the host's disk. Mounts stack on one point (the disk, then
    dockerd's bind of it), hence passes until none is left."""
    for _ in range(5):
        points = mount_points_under(Path("/proc/self/mountinfo").read_text(), prefixes)
        if not points:
            return
        for point in points:
            if _run(["umount", point], check=False).returncode != 0:
                _run(["umount", "--lazy", point], check=False)
    raise HostsError(f"mounts under {[str(p) for p in prefixes]} stay mounted: {points}")


def _loop_devices(disk: Path) -> list[str]:
    return _run(["losetup", "--associated", str(disk)], check=False).stdout.splitlines()


def mount_disk(layout: Layout) -> None:
    """The host's disk mounted on its data-root (made first if missing). A disk of its own,
    mounted without discard, because removing an engine's data-root file by file on this
    machine's discard-mounted disk takes minutes (15 s for the 6,700 files of one 240 MB
    image); removing one image file takes under a second."""
    if os.path.ismount(layout.data_root):
        return
    layout.data_root.mkdir(parents=True, exist_ok=True)
    if not layout.disk.exists():
        with layout.disk.open("wb") as disk:
            disk.truncate(DISK_BYTES)
        _run(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-m",
                "0",
                "-E",
                "nodiscard,lazy_itable_init=1",
                str(layout.disk),
            ]
        )
    # A disk still attached (a lazy unmount not yet released) must not be mounted twice.
    wait_until(lambda: not _loop_devices(layout.disk), timeout_s=30, what=f"{layout.disk} released")
    _run(["mount", "-o", "loop,nodiscard", str(layout.disk), str(layout.data_root)])


def stop_engine(layout: Layout, *, grace_s: float = ENGINE_STOP_GRACE_S) -> None:
    """The host's dockerd stopped (SIGTERM; its containers with it), then whatever of the
    host still runs killed, its mounts unmounted. Only processes in the host's cgroup are
    signalled, so a stale pidfile never hits a stranger."""
    cgroup = HostCgroup(layout.ns)
    engine = cgroup.engine_pids()
    with contextlib.suppress(OSError, ValueError):
        pid = int(layout.pidfile.read_text())
        if pid in engine:
            os.kill(pid, signal.SIGTERM)
            with contextlib.suppress(DeadlineExceeded):
                wait_until(
                    lambda: pid not in cgroup.engine_pids(),
                    timeout_s=grace_s,
                    interval_s=0.1,
                    what=f"dockerd of {layout.ns} stopped",
                )
    cgroup.kill_all()
    _unmount_under([layout.data_root, layout.run_dir])


def remove_host(layout: Layout) -> None:
    """Everything of one host made here: engine, mounts, cgroups, veth, namespace, folders."""
    stop_engine(layout)
    HostCgroup(layout.ns).remove()
    _ip("link", "delete", layout.veth, check=False)
    if layout.netns_path.exists():
        _ip("netns", "delete", layout.ns, check=False)
    shutil.rmtree(layout.run_dir, ignore_errors=True)
    with contextlib.suppress(DeadlineExceeded):
        wait_until(lambda: not _loop_devices(layout.disk), timeout_s=30, what="disk released")
    if not os.path.ismount(layout.data_root):  # never delete into a disk still mounted
        shutil.rmtree(layout.data_root, ignore_errors=True)
        layout.disk.unlink(missing_ok=True)
    layout.log_file.unlink(missing_ok=True)


# -- leftovers of runs here: found by name, owned by a record --------------------------------


@dataclass
class Leftovers:
    """What of one run (by short id) exists here now."""

    short: str
    hosts: set[str] = field(default_factory=set)
    bridge: bool = False
    rules: list[TaggedRule] = field(default_factory=list)
    folders: list[Path] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.hosts or self.bridge or self.rules or self.folders)


def find_leftovers() -> dict[str, Leftovers]:
    """Every run's namespaces, links, cgroups, folders and root-namespace rules, by short id."""
    found: dict[str, Leftovers] = {}

    def of(short: str) -> Leftovers:
        return found.setdefault(short, Leftovers(short))

    def named(names: Iterable[str], on_host: Callable[[Leftovers, str], None]) -> None:
        for name in names:
            match = OWN_NAME_RE.match(name)
            if match:
                on_host(of(match.group(1)), match.group(2) or "")

    def add_host(left: Leftovers, host: str) -> None:
        if host:
            left.hosts.add(host)

    def add_link(left: Leftovers, host: str) -> None:
        if host:
            left.hosts.add(host)
        else:
            left.bridge = True

    netns = [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()]
    named(netns, add_host)
    links = _ip("-o", "link", "show").stdout.splitlines()
    named((line.split(":")[1].strip().split("@")[0] for line in links), add_link)
    named((p.name for p in CGROUP_ROOT.glob("*/qoe-*")), add_host)
    named((p.name for p in CGROUP_ROOT.glob("qoe-*")), add_host)
    named((p.name for p in RUN_ROOT.glob("qoe-*")), add_host)
    for folder in DATA_ROOT.glob("qoe-*"):
        short = run_of(folder.name)
        if short:
            of(short).folders.append(folder)
            named((f"{folder.name}-{p.name}" for p in folder.iterdir() if p.is_dir()), add_host)
    for table in ("filter", "nat"):
        listing = _iptables("-t", table, "-S", check=False).stdout
        for rule in tagged_rules(listing, table):
            of(short_id(rule.run_id)).rules.append(rule)
    return found


def remove_run(left: Leftovers, record: RunRecord | None) -> None:
    """Everything a run made here: hosts (in parallel), bridge, rules, folders; record last."""
    hosts = left.hosts | set(record.addresses if record else ())
    with ThreadPoolExecutor(max_workers=max(1, len(hosts))) as pool:
        list(pool.map(lambda h: remove_host(Layout(left.short, h)), sorted(hosts)))
    for rule in left.rules:
        _iptables(*rule.delete_args(), check=False)
    _ip("link", "delete", f"qoe-{left.short}", check=False)
    mountinfo = Path("/proc/self/mountinfo").read_text()
    for folder in left.folders or [DATA_ROOT / f"qoe-{left.short}"]:
        still = mount_points_under(mountinfo, [folder])
        if still:
            raise HostsError(f"{folder} still has mounts {still}; unmount them and run again")
        shutil.rmtree(folder, ignore_errors=True)


def reap_orphaned_hosts() -> list[str]:
    """Remove the hosts (engines, namespaces, veths, bridges, firewall rules, cgroups, mounts,
    folders) of runs whose owning process is gone; returns their run ids (or short ids when
    no record was left). Kept hosts (owner 0) and living runs' hosts are left alone."""
    with _locked():
        return _reap_locked(exclude=set())


def _reap_locked(exclude: set[str]) -> list[str]:
    if not (DATA_ROOT.exists() or RUN_ROOT.exists() or NETNS_DIR.exists()):
        return []
    reaped: list[str] = []
    for short, left in sorted(find_leftovers().items()):
        record = RunRecord.load(short)
        if short in exclude or left.empty() or not orphaned(record, _alive):
            continue
        started = time.monotonic()
        remove_run(left, record)
        name = record.run_id if record else f"qoe-{short}"
        reaped.append(name)
        log(
            f"removed the hosts a killed run left: {name} ({', '.join(sorted(left.hosts)) or 'no hosts'}) "
            f"in {time.monotonic() - started:.1f} s"
        )
    return reaped


def local_runs() -> list[tuple[RunRecord | None, Leftovers]]:
    """Runs with hosts made here, for `status`."""
    return [(RunRecord.load(short), left) for short, left in sorted(find_leftovers().items())]


def engine_rss_mb(name: str, run_id: str) -> float:
    """Resident memory of a host's engine processes (dockerd, containerd, shims), MiB."""
    total_kb = 0
    for pid in HostCgroup(Layout(short_id(run_id), name).ns).engine_pids():
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
    return total_kb / 1024


# -- the hosts of a run ----------------------------------------------------------------------


class Hosts:
    """The Docker hosts a run uses: made here (namespaces on a bridge, one dockerd each) or
    listed in a hosts file. Idempotent; quick when already done; progress shown."""

    def __init__(
        self,
        names: Sequence[str],
        *,
        run_id: str,
        keep: bool = False,
        hosts_file: Path | None = None,
        engine_tcp_port: int | None = None,
    ) -> None:
        """`engine_tcp_port`: hosts made here also serve their engine API, unauthenticated, on
        tcp://<address>:<port> of the run's bridge (to try the tcp:// path of a hosts file)."""
        self.names = check_names(names)
        self.run_id = run_id
        self.short = short_id(run_id)
        self.keep = keep
        self.hosts_file = hosts_file
        self.engine_tcp_port = engine_tcp_port
        self.manager: str | None = None
        self._hosts: dict[str, Host] = {}
        self._clients: dict[str, DockerClient] = {}
        self._engines: dict[str, subprocess.Popen[bytes]] = {}
        self._formed_swarm = False  # listed hosts: the run formed the swarm, so it leaves it
        self._labelled: set[str] = set()  # listed hosts: nodes the run labelled
        self._node_ids: dict[str, str] = {}  # host -> swarm node id
        self._bare: list[str] = []  # bare hosts (no engine) added since up(): see bare()

    # -- access -----------------------------------------------------------------------------

    def host(self, name: str) -> Host:
        if name not in self._hosts:
            raise HostsError(
                f"no host {name!r} in this run (hosts: {sorted(self._hosts) or 'none; up() first'})"
            )
        return self._hosts[name]

    def all(self) -> list[Host]:
        """Every host of the run: the engine hosts, then the bare ones (host faults cut both)."""
        return [self._hosts[n] for n in [*self.names, *self._bare] if n in self._hosts]

    def engines(self) -> list[Host]:
        """The hosts with a Docker engine (the swarm's nodes)."""
        return [h for h in self.all() if h.engine]

    def client(self, host: str) -> DockerClient:
        if host not in self._clients:
            self._clients[host] = DockerClient(host=self.host(host).docker_url)
        return self._clients[host]

    def layout(self, host: str) -> Layout:
        if not self.host(host).local:
            raise HostsError(f"host {host} is a listed machine, not made here")
        return Layout(self.short, host)

    def run_on(
        self, host: str, argv: Sequence[str], *, check: bool = True, timeout_s: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """Run a command on a host: in its network namespace here, over SSH on a real one."""
        return _run(host_command(self.host(host), argv), check=check, timeout_s=timeout_s)

    # -- lifecycle ---------------------------------------------------------------------------

    def up(self) -> list[Host]:
        """Make what is missing (or check the listed machines); seconds when all is there."""
        started = time.monotonic()
        if self.hosts_file is not None:
            self._attach_listed()
        else:
            self._make_here()
        log(f"{len(self.names)} hosts up in {time.monotonic() - started:.1f} s: {self.describe()}")
        return self.all()

    def describe(self) -> str:
        return ", ".join(f"{h.name} {h.address}" for h in self.all())

    def _make_here(self) -> None:
        with _locked():
            _reap_locked(exclude={self.short})
            record = self._own_record()
            self._ensure_bridge(record)
            for name in self.names:
                self._ensure_namespace(record, name)
            self._hosts = {
                **{name: self._hosts[name] for name in self._bare if name in self._hosts},
                **{
                    name: Host(name, record.addresses[name], Layout(self.short, name).url, True)
                    for name in self.names
                },
            }
            starting = [n for n in self.names if not _engine_answers(Layout(self.short, n).url)]
            for name in starting:
                self._start_engine(name)
        if starting:
            self._await_engines(starting)
        reused = [n for n in self.names if n not in starting]
        log(f"engines started: {starting or 'none'}; already running: {reused or 'none'}")

    def _own_record(self) -> RunRecord:
        record = RunRecord.load(self.short)
        if record is not None and record.run_id != self.run_id:
            raise HostsError(
                f"run {self.run_id!r} and run {record.run_id!r} share the short id {self.short} "
                f"(their hosts are qoe-{self.short}-*); use another run id"
            )
        taken = _routed_networks()
        subnet = choose_subnet(taken) if record is None else ipaddress.ip_network(record.subnet)
        pid = 0 if self.keep else os.getpid()
        record = RunRecord(
            run_id=self.run_id,
            owner_pid=pid,
            owner_started=(_process_started(pid) or 0) if pid else 0,
            subnet=str(subnet),
            addresses=assign_addresses(subnet, self.names, record.addresses if record else {}),  # type: ignore[arg-type]
            swarm_manager=record.swarm_manager if record else None,
            bare=record.bare if record else (),
        )
        record.save()
        return record

    def _ensure_bridge(self, record: RunRecord) -> None:
        bridge = record.bridge
        if _ip("link", "show", bridge, check=False).returncode != 0:
            _ip("link", "add", bridge, "type", "bridge")
            prefix = ipaddress.ip_network(record.subnet).prefixlen
            _ip("addr", "add", f"{record.bridge_address}/{prefix}", "dev", bridge)
            _ip("link", "set", bridge, "up")
            log(f"bridge {bridge} {record.subnet} created")
        # The root namespace's Docker drops forwarded traffic that it did not set up itself.
        chain = (
            "DOCKER-USER"
            if _iptables("-S", "DOCKER-USER", check=False).returncode == 0
            else "FORWARD"
        )
        rule = [
            "-i",
            bridge,
            "-o",
            bridge,
            "-m",
            "comment",
            "--comment",
            record.tag,
            "-j",
            "ACCEPT",
        ]
        if _iptables("-C", chain, *rule, check=False).returncode != 0:
            _iptables("-I", chain, *rule)

    def _ensure_namespace(self, record: RunRecord, name: str) -> None:
        layout = Layout(self.short, name)
        address = record.addresses[name]
        prefix = ipaddress.ip_network(record.subnet).prefixlen
        if not layout.netns_path.exists():
            _ip("netns", "add", layout.ns)
        if _ip("link", "show", layout.veth, check=False).returncode != 0:
            _ip("-n", layout.ns, "link", "delete", "eth0", check=False)
            _ip(
                "link",
                "add",
                layout.veth,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                layout.ns,
            )
        _ip("link", "set", layout.veth, "master", record.bridge, "up")
        shown = _ip("-n", layout.ns, "-4", "-o", "addr", "show", "dev", "eth0").stdout
        if f" {address}/" not in shown:
            _ip("-n", layout.ns, "addr", "add", f"{address}/{prefix}", "dev", "eth0")
            log(f"{name}: namespace {layout.ns} at {address}")
        _ip("-n", layout.ns, "link", "set", "eth0", "up")
        _ip("-n", layout.ns, "link", "set", "lo", "up")

    def _start_engine(self, name: str) -> None:
        """dockerd in the host's namespace, its first process placed in the host's cgroups
        (by a shell that writes its own pid there, then becomes nsenter, then dockerd)."""
        layout = Layout(self.short, name)
        stop_engine(layout)  # a hung or half-dead engine of the same host
        for stale in (layout.socket, layout.pidfile):
            stale.unlink(missing_ok=True)
        layout.run_dir.mkdir(parents=True, exist_ok=True)
        mount_disk(layout)
        layout.config_file.write_text("{}\n")  # not /etc/docker/daemon.json of this machine
        cgroup = HostCgroup(layout.ns)
        cgroup.create()
        join = " && ".join(f"echo $$ > {d / 'cgroup.procs'}" for d in cgroup.engine_dirs())
        listen = [f"unix://{layout.socket}"]
        if self.engine_tcp_port:
            listen.append(f"tcp://{self._hosts[name].address}:{self.engine_tcp_port}")
        dockerd = [
            "nsenter",
            f"--net={layout.netns_path}",
            "dockerd",
            f"--data-root={layout.data_root}",
            f"--exec-root={layout.exec_root}",
            f"--pidfile={layout.pidfile}",
            f"--config-file={layout.config_file}",
            f"--cgroup-parent={layout.cgroup_parent}",
            "--shutdown-timeout=2",
            *(f"--host={url}" for url in listen),
        ]
        with layout.log_file.open("ab") as log_file:
            self._engines[name] = subprocess.Popen(
                ["sh", "-c", f'{join} && exec "$@"', "sh", *dockerd],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in the terminal reaches the harness, not it
            )

    def _await_engines(self, names: Sequence[str]) -> None:
        waiting = set(names)

        def answered() -> bool:
            for name in list(waiting):
                process = self._engines.get(name)
                if process is not None and process.poll() is not None:
                    raise HostsError(
                        f"dockerd of host {name} exited ({process.returncode}): "
                        f"{_log_tail(Layout(self.short, name).log_file)}"
                    )
                if _engine_answers(Layout(self.short, name).url):
                    waiting.discard(name)
            return not waiting

        try:
            _, took = wait_until(
                answered,
                timeout_s=ENGINE_START_TIMEOUT_S,
                interval_s=0.1,
                what=f"engines of {sorted(names)} answering",
            )
        except DeadlineExceeded as error:
            tails = "; ".join(f"{n}: {_log_tail(Layout(self.short, n).log_file)}" for n in waiting)
            raise HostsError(f"{error}. Their logs end: {tails}") from error
        log(f"engines of {', '.join(names)} answer after {took:.1f} s")

    def power_off(self, name: str) -> int:
        """A power cut of a host made here: every process of it (engine, containerd, shims,
        containers) SIGKILLed at once, then what a reboot loses gone too (its mounts, the
        exec-root: /run is memory). The namespace and its address stay, as a machine's NIC
        does. Returns how many processes were killed."""
        layout = self.layout(name)
        killed = HostCgroup(layout.ns).kill_all()
        self.reap_engine(name)
        _unmount_under([layout.data_root, layout.run_dir])
        shutil.rmtree(layout.exec_root, ignore_errors=True)
        for stale in (layout.socket, layout.pidfile):
            stale.unlink(missing_ok=True)
        return killed

    def engine_answers(self, name: str) -> bool:
        host = self.host(name)
        if host.local:
            return _engine_answers(host.docker_url)
        try:
            self.client(name).system.info()
        except DockerException:
            return False
        return True

    def firewall_tag(self, fault: str) -> str:
        """The comment on a fault's firewall rules: heal deletes exactly these, reaping all
        of the run's."""
        return f"{RULE_TAG}{self.run_id}/{fault}"

    def tagged_rules(
        self, name: str, tables: Sequence[str] = ("raw", "filter")
    ) -> list[TaggedRule]:
        """The rules on a host that carry the harness's comment (any run's)."""
        rules: list[TaggedRule] = []
        for table in tables:
            listing = self.run_on(name, ["iptables", "-w", "5", "-t", table, "-S"]).stdout
            rules += tagged_rules(listing, table)
        return rules

    def start_engine(self, name: str) -> float:
        """Start a host's engine again (same data-root; after a crash); seconds until it answers."""
        started = time.monotonic()
        with _locked():
            self._start_engine(name)
        self._await_engines([name])
        return time.monotonic() - started

    def reap_engine(self, name: str) -> None:
        """Collect the exit status of an engine this process started and that has died."""
        process = self._engines.pop(name, None)
        if process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)

    # -- bare hosts: a machine of its own for a process of the harness ------------------------

    def bare(self, name: str) -> contextlib.AbstractContextManager[Host]:
        """A host without an engine for the body (`add_bare`, then `remove_bare`)."""
        return _bare_host(self, name)

    def add_bare(self, name: str) -> Host:
        """A host made here without an engine: a network namespace with its own address on
        the run's bridge, for processes that must run on a machine of their own (a load
        generator's workers: `nsenter --net=<netns_path(name)> …`). Idempotent. From now on it
        is one of `all()` (a host partition can cut it); `remove_bare` removes it, and so do
        `down()` and, after a kill, the next run's reaping: it is in the run's record."""
        if self.hosts_file is not None:
            raise HostsError(
                "a bare host is a namespace made here; with --hosts FILE run the process on a "
                "machine of your own (e.g. `load --remote-workers` and `load-worker` there)"
            )
        check_names([*self.names, name])
        with _locked():
            record = RunRecord.load(self.short)
            if record is None:
                raise HostsError(f"run {self.run_id} has no hosts here yet: up() first")
            record = with_bare_host(record, name)
            record.save()
            self._ensure_namespace(record, name)
        layout = Layout(self.short, name)
        self._hosts[name] = Host(name, record.addresses[name], layout.url, True, engine=False)
        if name not in self._bare:
            self._bare.append(name)
        return self._hosts[name]

    def remove_bare(self, name: str) -> None:
        """The bare host gone: its veth (so nothing left inside its namespace can reach the
        bridge), its namespace, its place in the record."""
        host = self._hosts.get(name)
        if name in self.names or (host is not None and host.engine):
            raise HostsError(f"{name} is an engine host; down() removes those")
        with _locked():
            remove_host(Layout(self.short, name))
            record = RunRecord.load(self.short)
            if record is not None:
                without_bare_host(record, name).save()
        self._hosts.pop(name, None)
        self._bare = [b for b in self._bare if b != name]

    def netns_path(self, name: str) -> Path:
        """Where a host made here has its network namespace (`nsenter --net=` this)."""
        return self.layout(name).netns_path

    def processes_in(self, name: str) -> dict[int, str]:
        """The processes in a host's network namespace (made here): pid -> command line."""
        return processes_in_netns(self.netns_path(name))

    def bridge_address(self) -> str:
        """The harness's own address on the run's bridge (root namespace): where a process on
        a host made here reaches one of the harness's (e.g. a locust master)."""
        record = RunRecord.load(self.short) if self.hosts_file is None else None
        if record is None:
            raise HostsError(f"run {self.run_id} made no bridge here (listed hosts, or no up())")
        return record.bridge_address

    def _attach_listed(self) -> None:
        assert self.hosts_file is not None
        try:
            text = self.hosts_file.read_text()
        except OSError as error:
            raise HostsError(f"cannot read the hosts file {self.hosts_file}: {error}") from error
        listed = {h.name: h for h in parse_hosts_file(text, self.hosts_file)}
        missing = [n for n in self.names if n not in listed]
        if missing:
            raise HostsError(
                f"the run needs hosts {self.names}; {self.hosts_file} lists {sorted(listed)} "
                f"(missing {missing}): name the machines so"
            )
        self._hosts = {n: listed[n] for n in self.names}
        silent: list[str] = []
        for host in self.all():
            try:
                self.client(host.name).system.info()
            except DockerException as error:
                silent.append(f"{host.name} ({host.docker_url}): {str(error).strip()[-200:]}")
        if silent:
            raise HostsError(
                "these engines do not answer: " + "; ".join(silent) + ". Check that each "
                "engine runs and that `docker -H URL info` works from here (SSH keys in the "
                "agent for ssh://, the TLS variables for tcp://)."
            )

    # -- swarm --------------------------------------------------------------------------------

    def form_swarm(self, manager: str) -> None:
        """Init the swarm on `manager`, join the others as workers, label every node
        qoe.host=<name>; nothing happens for what is already so."""
        started = time.monotonic()
        boss = self.host(manager)
        boss_client = self.client(manager)
        states = self._swarm_states()
        swarm = states[manager]
        if swarm.local_node_state == "active" and swarm.control_available:
            log(f"swarm already managed by {manager}")
        else:
            self._leave_foreign(manager, swarm.local_node_state)
            boss_client.swarm.init(
                advertise_address=boss.address, listen_address=f"{boss.address}:{SWARM_PORT}"
            )
            self._formed_swarm = True
            log(f"swarm initialised on {manager} ({boss.address})")
            states[manager] = boss_client.system.info().swarm
        self.manager = manager
        if self._hosts[manager].local:
            self._note_manager(manager)
        members = {n.id for n in boss_client.node.list()}
        joining = [
            h for h in self.engines() if h.name != manager and states[h.name].node_id not in members
        ]
        if joining:
            token = boss_client.swarm.join_token("worker")

            def join(host: Host) -> None:
                self._leave_foreign(host.name, states[host.name].local_node_state)
                self.client(host.name).swarm.join(
                    f"{boss.address}:{SWARM_PORT}",
                    advertise_address=host.address,
                    listen_address=f"{host.address}:{SWARM_PORT}",
                    token=token,
                )

            with ThreadPoolExecutor(max_workers=len(joining)) as pool:
                list(pool.map(join, joining))
            states.update(self._swarm_states([h.name for h in joining]))
        self._node_ids = {name: state.node_id or "" for name, state in states.items()}
        name_of = {node_id: name for name, node_id in self._node_ids.items()}
        nodes, _ = wait_until(
            lambda: self._ready_nodes(name_of),
            timeout_s=60,
            interval_s=0.2,
            what="every host a ready swarm node",
            describe=lambda: str(self.node_states()),
        )
        for node in nodes:
            name = name_of[node.id]
            if (node.spec.labels or {}).get(HOST_LABEL) != name:
                boss_client.node.update(node.id, labels_add={HOST_LABEL: name})
                self._labelled.add(name)
        log(
            f"swarm of {len(nodes)} nodes ({', '.join(h.name for h in joining) or 'none'} "
            f"joined) ready in {time.monotonic() - started:.1f} s"
        )

    def _swarm_states(self, names: Sequence[str] | None = None) -> dict[str, Any]:
        """Each host's own view of its swarm membership (docker info), asked in parallel."""
        names = list(names or self.names)
        with ThreadPoolExecutor(max_workers=len(names)) as pool:
            infos = list(pool.map(lambda n: self.client(n).system.info().swarm, names))
        return dict(zip(names, infos, strict=True))

    def _ready_nodes(self, name_of: Mapping[str, str]) -> list[Any]:
        """The swarm's nodes of these hosts if every one is ready, else an empty list."""
        assert self.manager is not None
        nodes = [n for n in self.client(self.manager).node.list() if n.id in name_of]
        ready = len(nodes) == len(name_of) and all(n.status.state == "ready" for n in nodes)
        return nodes if ready else []

    def _leave_foreign(self, name: str, state: str) -> None:
        """A host made here still in an old swarm (e.g. its manager's engine was remade)
        leaves it; a real machine in someone else's swarm is not ours to change."""
        if state not in ("active", "pending", "error"):
            return
        if not self.host(name).local:
            raise HostsError(
                f"host {name} is already in a swarm the run did not form (state {state}); make "
                "it leave (`docker swarm leave`) or name its manager as the run's manager"
            )
        self.client(name).swarm.leave(force=True)

    def _note_manager(self, manager: str) -> None:
        record = RunRecord.load(self.short)
        if record is not None and record.swarm_manager != manager:
            with _locked():
                RunRecord(**{**asdict(record), "swarm_manager": manager}).save()

    def _node_id(self, name: str) -> str:
        swarm = self.client(name).system.info().swarm
        return (swarm.node_id if swarm else None) or ""

    def node_states(self) -> dict[str, str]:
        """Each swarm node as the manager sees it: host name (label) or id -> status."""
        assert self.manager is not None, "form_swarm() first"
        states = {}
        for node in self.client(self.manager).node.list():
            name = (node.spec.labels or {}).get(HOST_LABEL) or node.id[:12]
            states[name] = f"{node.status.state}/{node.spec.availability}"
        return states

    def node_id(self, name: str) -> str:
        """The swarm node id of a host (asked of its own engine once; a crash keeps it)."""
        if not self._node_ids.get(name):
            self._node_ids[name] = self._node_id(name)
        return self._node_ids[name]

    # -- images -------------------------------------------------------------------------------

    def load_images(self, images_by_host: Mapping[str, Sequence[str]]) -> None:
        """Copy images from the default engine (docker save | docker -H … load), each host
        only the ones it needs and lacks (same image id), hosts in parallel."""
        started = time.monotonic()
        default = docker.from_env()
        wanted_ids: dict[str, str | None] = {}
        for ref in {r for refs in images_by_host.values() for r in refs}:
            try:
                wanted_ids[ref] = default.images.get(ref).id
            except docker.errors.ImageNotFound as error:
                raise HostsError(
                    f"image {ref} is not on the default engine; build it first "
                    "(python -m harness build)"
                ) from error
        plan = {
            host: [r for r in refs if self._image_ids(host).get(r) != wanted_ids[r]]
            for host, refs in images_by_host.items()
        }
        todo = {h: refs for h, refs in plan.items() if refs}
        if todo:
            with ThreadPoolExecutor(max_workers=len(todo)) as pool:
                list(pool.map(lambda item: self._copy_images(*item), todo.items()))
        skipped = sum(len(refs) for refs in images_by_host.values()) - sum(map(len, todo.values()))
        log(
            f"images loaded in {time.monotonic() - started:.1f} s: "
            + (", ".join(f"{h} {len(r)}" for h, r in todo.items()) or "none needed")
            + f" ({skipped} already there)"
        )

    def _image_ids(self, host: str) -> dict[str, str]:
        listing = _run(
            [
                "docker",
                "-H",
                self.host(host).docker_url,
                "image",
                "ls",
                "--no-trunc",
                "--format",
                "{{.Repository}}:{{.Tag}} {{.ID}}",
            ]
        ).stdout
        return dict(line.split() for line in listing.splitlines() if line.strip())

    def _copy_images(self, host: str, refs: Sequence[str]) -> None:
        started = time.monotonic()
        url = self.host(host).docker_url
        with subprocess.Popen(["docker", "save", *refs], stdout=subprocess.PIPE) as save:
            loaded = subprocess.run(
                ["docker", "-H", url, "load", "--quiet"],
                stdin=save.stdout,
                capture_output=True,
                text=True,
                check=False,
            )
            assert save.stdout is not None
            save.stdout.close()
        if save.returncode != 0 or loaded.returncode != 0:
            raise HostsError(
                f"copying {refs} to host {host} failed: save {save.returncode}, load "
                f"{loaded.returncode}: {loaded.stderr.strip()[-300:]}"
            )
        log(f"{host}: {len(refs)} images loaded in {time.monotonic() - started:.1f} s")

    # -- teardown -----------------------------------------------------------------------------

    def down(self) -> None:
        """Remove what the run made: hosts made here entirely; on listed machines only the
        swarm (if the run formed it) and the labels it added."""
        if self.keep:
            log(
                f"keeping hosts of {self.run_id} up (kept); remove_hosts({self.run_id!r}) removes them"
            )
            return
        started = time.monotonic()
        if self.hosts_file is not None:
            undone = self._leave_listed()
            log(f"listed hosts: {undone} in {time.monotonic() - started:.1f} s")
        else:
            remove_hosts(self.run_id)
            for name in list(self._engines):
                self.reap_engine(name)
            log(f"hosts of {self.run_id} removed in {time.monotonic() - started:.1f} s")
        self._clients.clear()

    def _leave_listed(self) -> str:
        """What the run did to listed machines undone; says what that was."""
        if self._formed_swarm and self.manager:
            for host in self.engines():
                if host.name != self.manager:
                    with contextlib.suppress(DockerException):
                        self.client(host.name).swarm.leave(force=True)
            self.client(self.manager).swarm.leave(force=True)
            return "the swarm the run formed left"
        if self.manager and self._labelled:
            for name in self._labelled:
                with contextlib.suppress(DockerException):
                    self.client(self.manager).node.update(
                        self.node_id(name), rm_labels=[HOST_LABEL]
                    )
            return f"labels the run added removed ({sorted(self._labelled)})"
        return "nothing to undo"

    def __enter__(self) -> Hosts:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()


def processes_in_netns(netns: Path) -> dict[int, str]:
    """pid -> command line of every process whose network namespace is `netns` (a bound
    namespace file): the same inode as its /proc/<pid>/ns/net."""
    try:
        wanted = os.stat(netns).st_ino
    except OSError:
        return {}
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.stat(proc / "ns" / "net").st_ino == wanted:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                found[int(proc.name)] = " ".join(a.decode(errors="replace") for a in argv if a)
    return found


@contextlib.contextmanager
def _bare_host(hosts: Hosts, name: str) -> Iterator[Host]:
    host = hosts.add_bare(name)
    try:
        yield host
    finally:
        hosts.remove_bare(name)


def remove_hosts(run_id: str) -> None:
    """Remove a run's hosts made here, kept or not."""
    short = short_id(run_id)
    with _locked():
        left = find_leftovers().get(short, Leftovers(short))
        remove_run(left, RunRecord.load(short))


def _routed_networks() -> list[ipaddress.IPv4Network]:
    """Networks this machine routes or has addresses in (root namespace), and other runs'."""
    networks: list[ipaddress.IPv4Network] = []
    for line in _ip("-4", "-o", "route", "show", "table", "all").stdout.splitlines():
        first = line.split()[0] if line.split() else ""
        with contextlib.suppress(ValueError):
            if first not in ("default", "broadcast", "local", "unreachable"):
                networks.append(ipaddress.ip_network(first, strict=False))  # type: ignore[arg-type]
    for line in _ip("-4", "-o", "addr", "show").stdout.splitlines():
        with contextlib.suppress(ValueError, IndexError):
            networks.append(ipaddress.ip_interface(line.split()[3]).network)  # type: ignore[arg-type]
    for folder in DATA_ROOT.glob("qoe-*"):
        record = RunRecord.load(folder.name.removeprefix("qoe-"))
        if record:
            networks.append(ipaddress.ip_network(record.subnet))  # type: ignore[arg-type]
    return networks


# -- the CLI's `hosts` verb (kept hosts for trying things out) --------------------------------

DEV_RUN_ID = "hosts-dev"  # the kept hosts of `python -m harness hosts up`


def command_up(names: Sequence[str], hosts_file: Path | None = None) -> int:
    """Kept hosts (and a swarm over them, managed by the first), left up until `hosts down`."""
    hosts = Hosts(names, run_id=DEV_RUN_ID, keep=True, hosts_file=hosts_file)
    hosts.up()
    hosts.form_swarm(hosts.names[0])
    for host in hosts.all():
        print(f"{host.name}: {host.address}  DOCKER_HOST={host.docker_url}")
    print(f"swarm managed by {hosts.names[0]}: {hosts.node_states()}")
    print("remove them with: python -m harness hosts down")
    return 0


def command_down(hosts_file: Path | None = None) -> int:
    """The kept hosts made here removed, and whatever killed runs left; with a hosts file,
    every harness firewall rule on the listed machines (a killed run's host faults)."""
    remove_hosts(DEV_RUN_ID)
    reap_orphaned_hosts()
    if hosts_file is not None:
        for line in remove_listed_rules(hosts_file):
            print(line)
    return 0


def command_status() -> int:
    for line in status_lines():
        print(line)
    return 0


def status_lines() -> list[str]:
    """The hosts made here, each with its engine's state and the containers it runs (a swarm
    stack's tasks among them), for `hosts status` and `status`."""
    runs = local_runs()
    if not runs:
        return ["no hosts made here"]
    lines = []
    for record, left in runs:
        if record is None:
            lines.append(f"qoe-{left.short}: no record (orphaned): {sorted(left.hosts)}")
            continue
        owner = "kept" if record.owner_pid == 0 else f"pid {record.owner_pid}"
        if record.owner_pid and not _alive(record.owner_pid, record.owner_started):
            owner += " (gone: reaped by the next run)"
        lines.append(f"{record.run_id} ({owner}) on {record.bridge} {record.subnet}")
        for name, address in sorted(record.addresses.items()):
            layout = Layout(record.short, name)
            if name in record.bare:
                lines.append(f"  {name} {address} bare (a namespace, no engine)")
                continue
            answers = _engine_answers(layout.url, 2)
            rss = engine_rss_mb(name, record.run_id)
            state = "answering" if answers else "silent"
            lines.append(f"  {name} {address} {layout.url} engine {state}, {rss:.0f} MiB")
            if answers:
                lines.extend(f"    {row}" for row in _container_rows(layout.url))
    return lines


def _container_rows(url: str) -> list[str]:
    """One line per container on an engine: name, state, health."""
    engine = docker.DockerClient(base_url=url, timeout=5)
    try:
        containers = engine.containers.list(all=True)
    finally:
        engine.close()
    return [
        f"{c.name:60} {c.status:10} {c.attrs['State'].get('Health', {}).get('Status', '-')}"
        for c in sorted(containers, key=lambda c: c.name or "")
    ] or ["(no containers)"]


def remove_listed_rules(hosts_file: Path) -> list[str]:
    """Every firewall rule carrying the harness's comment on the machines of a hosts file."""
    said = []
    for host in parse_hosts_file(hosts_file.read_text(), hosts_file):
        removed = 0
        for table in ("raw", "filter"):
            listing = _run(host_command(host, ["iptables", "-w", "5", "-t", table, "-S"])).stdout
            for rule in tagged_rules(listing, table):
                _run(host_command(host, ["iptables", "-w", "5", *rule.delete_args()]), check=False)
                removed += 1
        said.append(f"{host.name}: {removed} harness firewall rules removed")
    return said
