"""The hosts layer's pure parts and the host faults' logic, with fakes: grudges and their DROP
rules, names, subnets, the hosts file, the command seam, which leftovers are reaped, and a
partition that heals exactly its own rules, also when the body fails."""

from __future__ import annotations

import ipaddress
import itertools
import re
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness import hosts as hosts_module
from harness.history import History
from harness.hosts import (
    Host,
    HostsError,
    Layout,
    Leftovers,
    RunRecord,
    assign_addresses,
    check_names,
    choose_subnet,
    host_command,
    mount_points_under,
    orphaned,
    parse_hosts_file,
    run_of,
    short_id,
    tagged_rules,
)
from harness.nemesis import Nemesis, NemesisError
from harness.nemesis.hosts import (
    HostNemesis,
    bridge,
    complete,
    cut_pairs,
    describe,
    drop_rules,
    halves,
    isolate,
    one_way,
)
from harness.nemesis.registry import named

H3 = ["h1", "h2", "h3"]
H5 = ["h1", "h2", "h3", "h4", "h5"]

# -- grudges ----------------------------------------------------------------------------------


def test_isolate_cuts_one_host_from_the_others_both_ways():
    grudge = isolate(H3, "h2")
    assert grudge == {"h2": {"h1", "h3"}, "h1": {"h2"}, "h3": {"h2"}}
    assert cut_pairs(grudge) == [("h1", "h2"), ("h2", "h1"), ("h2", "h3"), ("h3", "h2")]
    with pytest.raises(ValueError, match="not one of"):
        isolate(H3, "h9")


def test_halves_split_first_half_from_the_rest():
    assert halves(H5) == {
        "h1": {"h3", "h4", "h5"},
        "h2": {"h3", "h4", "h5"},
        "h3": {"h1", "h2"},
        "h4": {"h1", "h2"},
        "h5": {"h1", "h2"},
    }
    with pytest.raises(ValueError, match="at least 2"):
        halves(["h1"])


def test_bridge_host_sees_both_halves_which_do_not_see_each_other():
    grudge = bridge(H5)  # h1 h2 | h3 | h4 h5
    assert grudge["h3"] == frozenset()
    assert grudge["h1"] == {"h4", "h5"} and grudge["h4"] == {"h1", "h2"}
    assert all("h3" not in dropped for dropped in grudge.values())
    assert bridge(H3) == {"h1": {"h3"}, "h2": frozenset(), "h3": {"h1"}}
    with pytest.raises(ValueError, match="at least 3"):
        bridge(["h1", "h2"])


def test_one_way_loss_drops_only_at_the_destination():
    assert one_way("h1", "h3") == {"h3": {"h1"}}
    assert cut_pairs(one_way("h1", "h3")) == [("h1", "h3")]
    with pytest.raises(ValueError):
        one_way("h1", "h1")


def test_complete_refuses_a_host_in_two_components():
    with pytest.raises(ValueError, match="two components"):
        complete([["h1", "h2"], ["h2", "h3"]])


@given(
    st.lists(st.sampled_from([*H5, "a", "b", "c"]), min_size=3, max_size=8, unique=True),
    st.sampled_from(["isolate", "halves", "bridge"]),
)
def test_symmetric_grudges_never_drop_a_host_itself_and_cut_both_ways(names, kind):
    grudge = {
        "isolate": lambda: isolate(names, names[-1]),
        "halves": lambda: halves(names),
        "bridge": lambda: bridge(names),
    }[kind]()
    assert set(grudge) == set(names)
    pairs = set(cut_pairs(grudge))
    assert all(source != destination for source, destination in pairs)
    assert pairs == {(d, s) for s, d in pairs}
    assert pairs, "a partition that cuts nothing"


def test_drop_rules_one_tagged_drop_per_source_in_the_raw_table():
    addresses = {"h1": "198.18.0.2", "h2": "198.18.0.3", "h3": "198.18.0.4"}
    rules = drop_rules(isolate(H3, "h1"), addresses, "qoe-harness:r1/p1")
    assert sorted(rules) == ["h1", "h2", "h3"]
    assert [r[r.index("-s") + 1] for r in rules["h1"]] == ["198.18.0.3", "198.18.0.4"]
    assert rules["h2"] == [
        [
            "PREROUTING",
            "-t",
            "raw",
            "-s",
            "198.18.0.2",
            "-m",
            "comment",
            "--comment",
            "qoe-harness:r1/p1",
            "-j",
            "DROP",
        ]
    ]
    assert "h2" not in drop_rules(one_way("h2", "h1"), addresses, "t")
    with pytest.raises(ValueError, match="no address"):
        drop_rules(isolate(["h1", "h9"], "h9"), addresses, "t")
    assert describe(one_way("h2", "h1")) == "h1 drops h2"


# -- names, subnets, records ------------------------------------------------------------------


def test_names_fit_interface_names_and_are_found_again():
    layout = Layout(short_id("20261202-061015-ab12"), "nats3")
    assert len(layout.ns) <= 15 and layout.veth == layout.ns
    assert run_of(layout.ns) == layout.short and run_of(f"qoe-{layout.short}") == layout.short
    assert run_of("qoe-dev") is None and run_of("br-1234abcd") is None
    assert check_names(["h1", "nats1"]) == ["h1", "nats1"]
    for bad in (["h1", "h1"], [], ["toolong7"], ["H1"], ["1h"]):
        with pytest.raises(HostsError):
            check_names(bad)


def test_subnet_avoids_networks_in_use_and_addresses_are_stable():
    taken = [ipaddress.ip_network("198.18.0.0/24"), ipaddress.ip_network("198.18.1.128/25")]
    subnet = choose_subnet(taken)
    assert str(subnet) == "198.18.2.0/24"
    first = assign_addresses(subnet, ["h1", "h2"], {})
    assert first == {"h1": "198.18.2.2", "h2": "198.18.2.3"}  # .1 is the bridge
    again = assign_addresses(subnet, ["h3", "h1"], first)
    assert again == {"h1": "198.18.2.2", "h2": "198.18.2.3", "h3": "198.18.2.4"}


def test_tagged_rules_parse_iptables_listing_and_give_the_delete():
    listing = "\n".join(
        [
            "-P FORWARD DROP",
            "-N DOCKER-USER",
            '-A DOCKER-USER -i qoe-ab12 -o qoe-ab12 -m comment --comment "qoe-harness:run-1" -j ACCEPT',
            "-A DOCKER-USER -j RETURN",
            '-A PREROUTING -s 198.18.0.3/32 -m comment --comment "qoe-harness:run-2/p4" -j DROP',
            '-A INPUT -m comment --comment "someone else" -j DROP',
        ]
    )
    rules = tagged_rules(listing, "raw")
    assert [(r.run_id, r.comment) for r in rules] == [
        ("run-1", "qoe-harness:run-1"),
        ("run-2", "qoe-harness:run-2/p4"),
    ]
    assert rules[0].delete_args() == shlex.split(
        "-t raw -D DOCKER-USER -i qoe-ab12 -o qoe-ab12 -m comment --comment qoe-harness:run-1 -j ACCEPT"
    )


def test_mounts_under_the_hosts_deepest_first_and_no_lookalikes():
    mountinfo = "\n".join(
        f"{i} 1 0:1 / {point} rw - ext4 /dev/vda rw"
        for i, point in enumerate(
            [
                "/var/lib/qoe-harness/qoe-ab12/h1",
                "/var/lib/qoe-harness/qoe-ab12/h1/overlay2/x/merged",
                "/var/lib/qoe-harness/qoe-ab12/h10",
                "/run/qoe-harness/qoe-ab12-h1/exec/netns/1-abc",
                "/run/qoe-harness/qoe-ab12-h1/with\\040space",
                "/var/lib/docker/overlay2/y/merged",
            ]
        )
    )
    prefixes = [Path("/var/lib/qoe-harness/qoe-ab12/h1"), Path("/run/qoe-harness/qoe-ab12-h1")]
    points = mount_points_under(mountinfo, prefixes)
    assert set(points) == {
        "/run/qoe-harness/qoe-ab12-h1/exec/netns/1-abc",
        "/var/lib/qoe-harness/qoe-ab12/h1/overlay2/x/merged",
        "/run/qoe-harness/qoe-ab12-h1/with space",
        "/var/lib/qoe-harness/qoe-ab12/h1",
    }
    for inner, outer in itertools.permutations(points, 2):
        if inner.startswith(outer + "/"):
            assert points.index(inner) < points.index(outer), "unmount what is inside first"


# -- which leftovers are reaped -----------------------------------------------------------------


def _record(run_id: str, pid: int, started: int = 100) -> RunRecord:
    return RunRecord(run_id, pid, started, "198.18.0.0/24", {"h1": "198.18.0.2"})


def test_orphaned_when_no_record_or_owner_gone_never_when_kept():
    def alive(pid: int, started: int) -> bool:
        return pid == 42 and started == 100

    assert orphaned(None, alive)
    assert orphaned(_record("dead", 43), alive)
    assert orphaned(_record("reused-pid", 42, started=999), alive), "a new process on the pid"
    assert not orphaned(_record("alive", 42), alive)
    assert not orphaned(_record("kept", 0), alive)


def test_reaper_removes_only_orphaned_runs(monkeypatch, tmp_path):
    records = {
        short_id("dead"): _record("dead", 43),
        short_id("alive"): _record("alive", 42),
        short_id("kept"): _record("kept", 0),
        short_id("mine"): _record("mine", 43),
    }
    found = {s: Leftovers(s, hosts={"h1"}) for s in [*records, "ffff"]}  # ffff: no record
    found["eeee"] = Leftovers("eeee")  # nothing left: nothing to do
    removed: list[str] = []
    monkeypatch.setattr(hosts_module, "DATA_ROOT", tmp_path)
    monkeypatch.setattr(hosts_module, "find_leftovers", lambda: found)
    monkeypatch.setattr(RunRecord, "load", classmethod(lambda cls, short: records.get(short)))
    monkeypatch.setattr(hosts_module, "_alive", lambda pid, started: pid == 42)
    monkeypatch.setattr(hosts_module, "remove_run", lambda left, record: removed.append(left.short))
    reaped = hosts_module._reap_locked(exclude={short_id("mine")})
    assert sorted(removed) == sorted([short_id("dead"), "ffff"])
    assert sorted(reaped) == ["dead", "qoe-ffff"]


# -- the hosts file and the command seam ---------------------------------------------------------

GOOD_FILE = """
[[host]]
name = "h1"
docker = "ssh://qoe@10.0.0.11"
address = "10.0.0.11"

[[host]]
name = "h2"
docker = "tcp://10.0.0.12:2376"
address = "10.0.0.12"
ssh = "admin@10.0.0.12"
sudo = true
"""


def test_hosts_file_lists_real_machines():
    h1, h2 = parse_hosts_file(GOOD_FILE, Path("hosts.toml"))
    assert h1 == Host("h1", "10.0.0.11", "ssh://qoe@10.0.0.11", local=False)
    assert h2.ssh == "admin@10.0.0.12" and h2.sudo and not h2.local


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("not toml = = 1", "not TOML"),
        ('[[host]]\nname = "h1"\ndocker = "ssh://a@b"\n', "missing \\['address'\\]"),
        (GOOD_FILE.replace("sudo = true", "colour = 1"), "unknown \\['colour'\\]"),
        (GOOD_FILE.replace("tcp://", "http://"), "expected ssh://user@host"),
        (GOOD_FILE.replace('"10.0.0.12"', '"the-host"'), "is not an IP"),
        (GOOD_FILE.replace('name = "h2"', 'name = "h1"'), "repeat"),
        ('hosts = ["a"]', "only \\[\\[host\\]\\] tables"),
    ],
)
def test_hosts_file_errors_say_what_is_wrong(text, complaint):
    with pytest.raises(HostsError, match=complaint):
        parse_hosts_file(text, Path("hosts.toml"))


def test_commands_run_in_the_namespace_here_and_over_ssh_there():
    layout = Layout("ab12", "h1")
    here = Host("h1", "198.18.0.2", layout.url, local=True)
    assert host_command(here, ["iptables", "-S"]) == [
        "nsenter",
        "--net=/var/run/netns/qoe-ab12-h1",
        "iptables",
        "-S",
    ]
    h1, h2 = parse_hosts_file(GOOD_FILE, Path("hosts.toml"))
    assert host_command(h1, ["iptables", "-S"])[-3:] == ["qoe@10.0.0.11", "--", "iptables -S"]
    assert host_command(h2, ["iptables", "-S"])[-3:] == [
        "admin@10.0.0.12",
        "--",
        "sudo -n iptables -S",
    ]
    with_port = Host("h3", "10.0.0.13", "ssh://qoe@10.0.0.13:2222", local=False)
    assert "ssh://qoe@10.0.0.13:2222" in host_command(with_port, ["true"])
    tcp_only = Host("h4", "10.0.0.14", "tcp://10.0.0.14:2376", local=False)
    with pytest.raises(HostsError, match=re.escape('ssh = "user@10.0.0.14"')):
        host_command(tcp_only, ["true"])


# -- a partition against fake hosts ---------------------------------------------------------------


class FakeHosts:
    """Hosts whose firewalls are lists of rules and whose TCP connects obey them."""

    run_id = "unit"

    def __init__(self, names: Sequence[str], *, unreachable: set[tuple[str, str]] = frozenset()):
        self._hosts = {
            n: Host(n, f"198.18.9.{i}", f"unix:///x/{n}", True) for i, n in enumerate(names, 2)
        }
        self.rules: dict[str, list[list[str]]] = {n: [] for n in names}
        self.unreachable = set(unreachable)  # pairs that fail whatever the rules say
        self.manager = None

    def all(self) -> list[Host]:
        return list(self._hosts.values())

    def host(self, name: str) -> Host:
        return self._hosts[name]

    def firewall_tag(self, fault: str) -> str:
        return f"qoe-harness:{self.run_id}/{fault}"

    def tagged_rules(self, name: str, tables: Sequence[str] = ("raw",)) -> list:
        listing = "\n".join(shlex.join(["-A", *r[:1], *r[3:]]) for r in self.rules[name])
        return tagged_rules(listing, "raw")

    def run_on(self, name: str, argv: Sequence[str], **_: object) -> subprocess.CompletedProcess:
        argv = list(argv)
        if argv[0] == "iptables":
            op, rule = argv[3], argv[4:]
            if op == "-I":
                self.rules[name].append(rule)
            else:  # -D from TaggedRule.delete_args: -t raw -D CHAIN ...
                chain_and_spec = argv[6:]
                wanted = [chain_and_spec[0], "-t", "raw", *chain_and_spec[1:]]
                if wanted not in self.rules[name]:
                    return subprocess.CompletedProcess(argv, 1, "", "no such rule")
                self.rules[name].remove(wanted)
            return subprocess.CompletedProcess(argv, 0, "", "")
        address = argv[-1].split("/dev/tcp/")[1].split("/")[0]
        destination = next(h.name for h in self.all() if h.address == address)
        source_address = self.host(name).address
        dropped = any(r[r.index("-s") + 1] == source_address for r in self.rules[destination])
        ok = not dropped and (name, destination) not in self.unreachable
        return subprocess.CompletedProcess(argv, 0 if ok else 124, "", "")


def test_partition_in_effect_then_healed_leaving_other_faults_rules():
    fake = FakeHosts(H3)
    foreign = ["PREROUTING", "-t", "raw", "-s", "10.9.9.9", "-m", "comment", "--comment", "qoe-harness:other/p1", "-j", "DROP"]  # fmt: skip
    fake.rules["h1"].append(foreign)
    history = History()
    nemesis = HostNemesis(fake, history)  # type: ignore[arg-type]
    with nemesis.isolated("h1") as fault:
        assert len(fake.rules["h1"]) == 3 and len(fake.rules["h2"]) == 1
        assert not nemesis.connects("h2", "h1") and nemesis.connects("h2", "h3")
    assert fake.rules == {"h1": [foreign], "h2": [], "h3": []}
    assert fault.effect_s is not None and fault.heal_s is not None
    assert history.faults() == (fault,) and fault.name == "isolate h1"


def test_partition_heals_when_the_body_fails():
    fake = FakeHosts(H3)
    nemesis = HostNemesis(fake, History())  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="scenario broke"), nemesis.bridged():
        assert fake.rules["h1"] and fake.rules["h3"] and not fake.rules["h2"]
        raise RuntimeError("scenario broke")
    assert fake.rules == {"h1": [], "h2": [], "h3": []}


def test_partition_refuses_when_hosts_cannot_connect_before_the_cut():
    fake = FakeHosts(H3, unreachable={("h2", "h1")})
    nemesis = HostNemesis(fake, History())  # type: ignore[arg-type]
    with pytest.raises(NemesisError, match="cannot connect"), nemesis.isolated("h1"):
        pass
    assert fake.rules == {"h1": [], "h2": [], "h3": []}


def test_partition_not_in_effect_fails_and_still_heals(monkeypatch):
    """A cut that does not cut (here: the rules land but connects still pass) is an error."""
    fake = FakeHosts(H3)
    nemesis = HostNemesis(fake, History())  # type: ignore[arg-type]
    monkeypatch.setattr(nemesis, "connects", lambda source, destination: True)
    loss = nemesis.host_partition(one_way("h1", "h2"), effect_timeout_s=0.3)
    with pytest.raises(AssertionError, match="taking effect"), loss:
        pass
    assert fake.rules == {"h1": [], "h2": [], "h3": []}


def test_named_host_faults_reach_the_hosts_through_the_stack():
    """The registry's entry finds the host by the service on it (stack.host_of) and the hosts
    through stack.hosts; a stack without hosts of its own is told what is missing."""
    fake = FakeHosts(H3)
    on_hosts = SimpleNamespace(name="qoe-swarm", hosts=fake, host_of={"nats-2": "h3"}.get)
    nemesis = Nemesis(on_hosts, SimpleNamespace(toxiproxy_url=None), History())  # type: ignore[arg-type]
    with named("isolate-nats-2-host").start(nemesis) as fault:
        assert fault.name == "isolate h3" and fake.rules["h3"]
    assert fake.rules == {"h1": [], "h2": [], "h3": []}
    compose = SimpleNamespace(name="qoe-compose")
    assert named("isolate-nats-2-host").missing(compose) == ["MultiHost"]  # type: ignore[arg-type]
    on_compose = Nemesis(compose, SimpleNamespace(toxiproxy_url=None), History())  # type: ignore[arg-type]
    with pytest.raises(NemesisError, match="--stack swarm"):
        on_compose.isolated("h1")
