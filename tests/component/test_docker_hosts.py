"""Hosts made here for real (network namespaces, one dockerd each, a swarm across them):
nothing of a run outlives its down, nor a harness killed with SIGKILL once the next run reaps;
every host fault is in effect during its body and healed after, also when the body fails; an
engine reached over TCP works through the hosts-file path."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from harness.history import History
from harness.hosts import (
    CGROUP_ROOT,
    DATA_ROOT,
    RUN_ROOT,
    Hosts,
    HostsError,
    engine_rss_mb,
    reap_orphaned_hosts,
    short_id,
)
from harness.nemesis.hosts import HostNemesis
from harness.polling import wait_until
from harness.stack import ROOT

pytestmark = [
    pytest.mark.component,
    pytest.mark.multihost,
    pytest.mark.skipif(
        os.geteuid() != 0 or not shutil.which("dockerd") or not shutil.which("nsenter"),
        reason="hosts made here need root, dockerd and nsenter",
    ),
]

IMAGE = "debian:bookworm-slim"


def _out(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=False).stdout


def traces(run_id: str) -> list[str]:
    """Everything of the run this machine shows: what `ip netns`, `ip link`, `iptables -S`
    (filter, nat, raw), the process list, the default engine, mounts, cgroups and folders say."""
    short = short_id(run_id)
    own = re.compile(rf"qoe-{short}\b|qoe-harness:{re.escape(run_id)}\b")
    found = [
        f"netns {line}" for line in _out("ip", "netns", "list").splitlines() if own.search(line)
    ]
    found += [f"link {line}" for line in _out("ip", "-o", "link").splitlines() if own.search(line)]
    for table in ("filter", "nat", "raw"):
        listing = _out("iptables", "-t", table, "-S")
        found += [f"iptables {table}: {line}" for line in listing.splitlines() if own.search(line)]
    processes = _out("ps", "-eo", "pid,args").splitlines()
    found += [f"process {line}" for line in processes if own.search(line) and "dockerd" in line]
    found += [
        f"default engine: {line}"
        for line in _out("docker", "ps", "-a", "--format", "{{.Names}} {{.Labels}}").splitlines()
        if own.search(line)
    ]
    mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    found += [f"mount {line.split()[4]}" for line in mounts if own.search(line)]
    found += [f"cgroup {p}" for p in CGROUP_ROOT.glob(f"*/qoe-{short}-*")]
    found += [
        f"folder {p}" for p in (*DATA_ROOT.glob(f"qoe-{short}"), *RUN_ROOT.glob(f"qoe-{short}-*"))
    ]
    return found


def _run_container(hosts: Hosts, host: str) -> None:
    """A container on the host, so it has mounts, a container network namespace, cgroups."""
    hosts.client(host).run(IMAGE, ["sleep", "infinity"], detach=True, init=True)


def test_down_leaves_nothing_of_the_run(run):
    run_id = f"{run.run_id}-down"
    hosts = Hosts(["h1", "h2", "h3"], run_id=run_id)
    try:
        cold = time.monotonic()
        hosts.up()
        cold_s = time.monotonic() - cold
        warm = time.monotonic()
        hosts.up()
        warm_s = time.monotonic() - warm
        hosts.form_swarm("h1")
        hosts.load_images({"h2": [IMAGE]})
        _run_container(hosts, "h2")
        memory = {h: round(engine_rss_mb(h, run_id)) for h in hosts.names}
        print(f"3 hosts: cold up {cold_s:.1f} s, warm up {warm_s:.1f} s; engine RSS MiB {memory}")
        assert warm_s < 5, f"up() on healthy hosts took {warm_s:.1f} s"
        seen = traces(run_id)
        for kind in ("netns", "link", "iptables filter", "process", "mount", "cgroup", "folder"):
            assert any(t.startswith(kind) for t in seen), f"the check sees no {kind}: {seen}"
    finally:
        hosts.down()
    assert traces(run_id) == []


def test_hosts_of_a_killed_harness_are_reaped_by_the_next_run(run):
    run_id = f"{run.run_id}-killed"
    maker = textwrap.dedent(
        f"""
        import sys, time
        from harness.hosts import Hosts
        hosts = Hosts(["h1", "h2"], run_id={run_id!r})
        hosts.up()
        hosts.form_swarm("h1")
        hosts.load_images({{"h1": [{IMAGE!r}]}})
        hosts.client("h1").run({IMAGE!r}, ["sleep", "infinity"], detach=True, init=True)
        print("ready", flush=True)
        time.sleep(600)
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", maker], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready", "the child did not make its hosts"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        assert any(t.startswith("process") for t in traces(run_id)), "its engines died with it"
        started = time.monotonic()
        reaped = reap_orphaned_hosts()
        print(f"reaped {reaped} in {time.monotonic() - started:.1f} s")
        assert run_id in reaped
        assert traces(run_id) == []
        assert run_id not in reap_orphaned_hosts(), "reaped twice"
    finally:
        if child.poll() is None:
            child.kill()
        Hosts(["h1", "h2"], run_id=run_id).down()


def test_an_interrupted_run_removes_its_hosts_on_the_way_out(run):
    """Ctrl-C (SIGINT; the CLI and the plugin turn SIGTERM into the same) while the hosts
    are up: the context manager's down runs, nothing is left for a reaper."""
    run_id = f"{run.run_id}-sigint"
    holder = textwrap.dedent(
        f"""
        import time
        from harness.hosts import Hosts
        with Hosts(["h1", "h2"], run_id={run_id!r}) as hosts:
            hosts.form_swarm("h1")
            print("ready", flush=True)
            time.sleep(600)
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", holder], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        assert traces(run_id), "the check sees nothing of the hosts while they are up"
        child.send_signal(signal.SIGINT)
        child.wait(timeout=120)
        assert traces(run_id) == []
    finally:
        if child.poll() is None:
            child.kill()
        Hosts(["h1", "h2"], run_id=run_id).down()


# -- host faults on a three-host swarm --------------------------------------------------------


@pytest.fixture(scope="module")
def swarm_hosts(run) -> Iterator[Hosts]:
    with Hosts(["h1", "h2", "h3"], run_id=f"{run.run_id}-faults") as hosts:
        hosts.form_swarm("h1")
        hosts.load_images({name: [IMAGE] for name in hosts.names})
        url = hosts.host("h1").docker_url
        create = ["docker", "-H", url, "service", "create", "--detach", "--name", "sleeper"]
        pinned = ["--constraint", "node.labels.qoe.host==h2", "--restart-delay", "1s"]
        subprocess.run(
            [*create, *pinned, "--stop-grace-period", "1s", IMAGE, "sleep", "infinity"],
            check=True,
            capture_output=True,
        )
        wait_until(lambda: _running_task(hosts), timeout_s=60, what="the sleeper task running")
        yield hosts


def _running_task(hosts: Hosts) -> str | None:
    tasks = hosts.client("h1").service.ps("sleeper")
    return next((t.id for t in tasks if t.status.state == "running"), None)


def test_partitions_cut_tcp_across_the_grudge_and_heal(swarm_hosts):
    history = History()
    nemesis = HostNemesis(swarm_hosts, history)
    with nemesis.isolated("h2"):
        assert not nemesis.connects("h1", "h2") and not nemesis.connects("h2", "h3")
        assert nemesis.connects("h1", "h3")
        rules = swarm_hosts.tagged_rules("h2", ("raw",))
        assert len(rules) == 2 and all(r.run_id == swarm_hosts.run_id for r in rules)
    assert nemesis.connects("h1", "h2") and swarm_hosts.tagged_rules("h2", ("raw",)) == []
    with nemesis.one_way_loss("h1", "h3"):
        assert not nemesis.connects("h1", "h3")
    with nemesis.bridged():  # h1 | h2 | h3
        assert nemesis.connects("h1", "h2") and nemesis.connects("h3", "h2")
        assert not nemesis.connects("h1", "h3")
    assert [f.name for f in history.faults()] == ["isolate h2", "loss h1->h3", "bridge via h2"]
    assert all(f.effect_s is not None and f.heal_s is not None for f in history.faults())


def test_a_partition_heals_when_the_body_fails(swarm_hosts):
    nemesis = HostNemesis(swarm_hosts, History())
    with pytest.raises(RuntimeError, match="body failed"), nemesis.halved():
        raise RuntimeError("body failed")
    assert all(swarm_hosts.tagged_rules(h, ("raw",)) == [] for h in swarm_hosts.names)
    assert nemesis.connects("h1", "h3") and nemesis.connects("h3", "h1")


def test_freeze_pauses_every_container_of_the_host(swarm_hosts):
    client = swarm_hosts.client("h2")
    with HostNemesis(swarm_hosts, History()).frozen("h2") as fault:
        assert all(c.state.paused for c in client.container.list())
        assert fault.notes["containers"] >= 1
    assert not any(c.state.paused for c in client.container.list())


def test_task_killed_is_restarted_by_the_swarm(swarm_hosts):
    before = _running_task(swarm_hosts)
    with HostNemesis(swarm_hosts, History()).task_killed("sleeper") as fault:
        assert fault.notes["host"] == "h2"
    after = _running_task(swarm_hosts)
    assert after is not None and after != before


def test_drain_moves_tasks_off_the_node_and_back_to_active(swarm_hosts):
    manager = swarm_hosts.client("h1")
    node = swarm_hosts.node_id("h2")
    with HostNemesis(swarm_hosts, History()).drained("h2"):
        assert manager.node.inspect(node).spec.availability == "drain"
        assert not [t for t in manager.node.ps(node) if t.status.state == "running"]
    assert manager.node.inspect(node).spec.availability == "active"
    # Swarm does not move tasks back by itself; the pinned sleeper comes back as it is pending.
    wait_until(lambda: _running_task(swarm_hosts), timeout_s=60, what="sleeper back on h2")


def test_crash_kills_the_whole_host_at_once_and_it_returns_to_the_swarm(swarm_hosts):
    wait_until(lambda: _running_task(swarm_hosts), timeout_s=60, what="sleeper running")
    client = swarm_hosts.client("h2")
    container_pids = [c.state.pid for c in client.container.list()]
    assert container_pids
    history = History()
    with HostNemesis(swarm_hosts, history).crashed("h2") as fault:
        assert not swarm_hosts.engine_answers("h2")
        assert swarm_hosts.node_states()["h2"].startswith("down")
        assert not any(Path(f"/proc/{pid}").exists() for pid in container_pids)
        assert fault.notes["processes_killed"] >= 3  # dockerd, containerd, a shim, a container
    assert swarm_hosts.node_states()["h2"] == "ready/active"
    wait_until(lambda: _running_task(swarm_hosts), timeout_s=90, what="sleeper back after crash")
    print(f"crash: effect {fault.effect_s:.1f} s (node marked down), back {fault.heal_s:.1f} s")
    assert history.faults() == (fault,) and fault.name == "crash h2"


# -- an engine reached over TCP, through the hosts-file path ----------------------------------


def test_engines_over_tcp_through_a_hosts_file(run, tmp_path):
    run_id = f"{run.run_id}-tcp"
    with Hosts(["h1", "h2"], run_id=run_id, engine_tcp_port=2375) as made:
        hosts_file = tmp_path / "hosts.toml"
        hosts_file.write_text(
            "".join(
                f'[[host]]\nname = "{h.name}"\ndocker = "tcp://{h.address}:2375"\n'
                f'address = "{h.address}"\n\n'
                for h in made.all()
            )
        )
        listed = Hosts(["h1", "h2"], run_id=run_id, hosts_file=hosts_file)
        assert [h.local for h in listed.up()] == [False, False]
        listed.form_swarm("h1")
        assert listed.node_states() == {"h1": "ready/active", "h2": "ready/active"}
        with pytest.raises(HostsError, match="no SSH address"):
            listed.run_on("h1", ["true"])
        listed.down()  # the run formed the swarm: it leaves it, and makes nothing else
        assert made.client("h1").system.info().swarm.local_node_state == "inactive"
        assert made.client("h2").system.info().swarm.local_node_state == "inactive"
        assert docker.DockerClient(base_url=f"tcp://{made.host('h1').address}:2375").ping()
    assert traces(run_id) == []
