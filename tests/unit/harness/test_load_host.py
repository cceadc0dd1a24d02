"""A host of its own for the load generator: the bare host's place in the run's record, the
hosts it joins (all of them, not the engines), the processes found in a namespace, and the
locust workers' command lines entering it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from harness import hosts as hosts_module
from harness.hosts import (
    Host,
    Hosts,
    HostsError,
    RunRecord,
    processes_in_netns,
    with_bare_host,
    without_bare_host,
)
from harness.load import LoadSpec, LocustProcesses

RECORD = RunRecord(
    run_id="r1",
    owner_pid=0,
    owner_started=0,
    subnet="198.18.7.0/24",
    addresses={"h1": "198.18.7.2", "h2": "198.18.7.3"},
)


def test_a_bare_host_gets_the_next_free_address_and_keeps_it():
    added = with_bare_host(RECORD, "load")
    assert added.addresses == {**RECORD.addresses, "load": "198.18.7.4"}
    assert list(added.bare) == ["load"]
    assert with_bare_host(added, "load") == added  # idempotent
    gone = without_bare_host(added, "load")
    assert gone.addresses == RECORD.addresses and list(gone.bare) == []


def test_an_engine_host_is_never_made_a_bare_one():
    with pytest.raises(HostsError, match="engine hosts"):
        with_bare_host(RECORD, "h2")


def test_the_record_keeps_bare_hosts_and_reads_records_written_before_them(monkeypatch, tmp_path):
    monkeypatch.setattr(hosts_module, "DATA_ROOT", tmp_path)
    with_bare_host(RECORD, "load").save()
    assert list(RunRecord.load(RECORD.short).bare) == ["load"]  # type: ignore[union-attr]
    path = RunRecord.path_for(RECORD.short)
    older = json.loads(path.read_text())
    del older["bare"]
    path.write_text(json.dumps(older))
    assert list(RunRecord.load(RECORD.short).bare) == []  # type: ignore[union-attr]


def test_bare_hosts_are_hosts_of_the_run_but_not_engines():
    hosts = Hosts(["h1", "h2"], run_id="r1")
    hosts._hosts = {
        "h1": Host("h1", "198.18.7.2", "unix:///run/qoe-harness/qoe-x-h1/docker.sock", True),
        "h2": Host("h2", "198.18.7.3", "unix:///run/qoe-harness/qoe-x-h2/docker.sock", True),
        "load": Host(
            "load",
            "198.18.7.4",
            "unix:///run/qoe-harness/qoe-x-load/docker.sock",
            True,
            engine=False,
        ),
    }
    hosts._bare = ["load"]
    assert [h.name for h in hosts.all()] == ["h1", "h2", "load"]  # a partition can cut it
    assert [h.name for h in hosts.engines()] == ["h1", "h2"]  # the swarm's nodes
    with pytest.raises(HostsError, match="engine host"):
        hosts.remove_bare("h1")


def test_a_bare_host_is_refused_on_listed_machines(tmp_path):
    hosts = Hosts(["h1"], run_id="r1", hosts_file=tmp_path / "hosts.toml")
    with pytest.raises(HostsError, match="namespace made here"):
        hosts.add_bare("load")


def test_the_processes_of_a_namespace_are_found_by_its_inode():
    found = processes_in_netns(Path(f"/proc/{os.getpid()}/ns/net"))
    assert os.getpid() in found and "pytest" in found[os.getpid()]
    assert processes_in_netns(Path("/nonexistent/netns")) == {}


def test_workers_enter_the_load_hosts_namespace_and_reach_the_master_on_the_bridge(tmp_path):
    spec = LoadSpec(
        rate=1000,
        duration_s=30,
        workers=2,
        worker_netns="/var/run/netns/qoe-abcd-load",
        master_bind="198.18.7.1",
    )
    master, *workers = LocustProcesses(spec, ["http://a"], "t", "L1", tmp_path).commands(5600)
    assert master[0] != "nsenter"  # the master stays in the harness's namespace
    assert master[master.index("--master-bind-host") + 1] == "198.18.7.1"
    assert len(workers) == 2
    for worker in workers:
        assert worker[:2] == ["nsenter", "--net=/var/run/netns/qoe-abcd-load"]
        assert worker[worker.index("--master-host") + 1] == "198.18.7.1"


@pytest.mark.parametrize(
    "changes", [{"workers": 0}, {"master_bind": "127.0.0.1"}, {"master_bind": "0.0.0.0"}]
)
def test_workers_in_a_namespace_need_a_master_they_can_reach(changes):
    values: dict[str, object] = {"workers": 2, "master_bind": "198.18.7.1", **changes}
    with pytest.raises(ValueError, match="worker_netns"):
        LoadSpec(rate=1000, duration_s=30, worker_netns="/var/run/netns/x", **values)  # type: ignore[arg-type]
