"""The swarm backend's pure parts: the deploy file made from the merged tier files, the
placement read from it (and the topology the override must keep), the endpoints at the hosts'
addresses, which services a redeploy updates, and a task's state from its container."""

from __future__ import annotations

import shutil
from typing import Any

import pytest

from harness.stack import HTTP_SERVICES, NATS_NODES, POSTGRES_NODES, StackError
from harness.swarm import (
    DROPPED_KEYS,
    MANAGER,
    Placed,
    changed_services,
    deploy_file,
    host_names,
    images_by_host,
    newest,
    placement,
    render,
    state_of,
    swarm_endpoints,
)

ENV = {"POSTGRES_PASSWORD": "pw", "HARNESS_TOKEN": "tok"}


def service(host: str, image: str = "qoe/x:dev", **ports: int) -> dict[str, Any]:
    return {
        "image": image,
        "environment": {"A": "1"},
        "deploy": {"placement": {"constraints": [f"node.labels.qoe.host == {host}"]}},
        "ports": [
            {"target": int(t.removeprefix("p")), "published": str(p), "mode": "host"}
            for t, p in ports.items()
        ],
    }


def rendered(**services: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "qoe-test",
        "services": services,
        "networks": {"nats": {"name": "qoe-test_nats", "driver": "overlay", "attachable": True}},
        "volumes": {"nats-1": {"name": "qoe-test_nats-1", "labels": {"k": "v"}}},
        "x-anchor": {"whatever": 1},
    }


def test_deploy_file_keeps_the_service_and_drops_what_stack_deploy_rejects() -> None:
    s = service("h2", p4222=4221)
    s.update(depends_on={"x": {"condition": "service_healthy"}}, pull_policy="never")
    s.update(cpu_shares=16384, command=None)
    deploy = deploy_file(rendered(**{"nats-1": s}))
    out = deploy["services"]["nats-1"]
    assert set(out) == {"image", "environment", "deploy", "ports"}
    assert out["ports"] == [{"target": 4222, "published": 4221, "protocol": "tcp", "mode": "host"}]
    assert deploy["version"] == "3.9" and "name" not in deploy and "x-anchor" not in deploy
    # The stack names its networks and volumes <stack>_<key> itself.
    assert deploy["networks"] == {"nats": {"driver": "overlay", "attachable": True}}
    assert deploy["volumes"] == {"nats-1": {"labels": {"k": "v"}}}
    assert set(DROPPED_KEYS) == {"depends_on", "pull_policy", "cpu_shares"}


def test_an_unknown_service_key_is_an_error_not_silently_dropped() -> None:
    s = service("h2") | {"sysctls": {"net.core.somaxconn": 1024}}
    with pytest.raises(StackError, match=r"service nats-1 has \['sysctls'\].*SERVICE_KEYS"):
        deploy_file(rendered(**{"nats-1": s}))


@pytest.mark.parametrize(
    "port",
    [
        {"target": 8080, "host_ip": "127.0.0.1", "mode": "ingress"},  # the tier files' form
        {"target": 8080, "mode": "host"},  # no fixed published port
    ],
)
def test_a_port_not_published_in_host_mode_on_a_fixed_port_is_refused(port) -> None:
    s = service("h1") | {"ports": [port]}
    with pytest.raises(StackError, match=r"host mode on a fixed port.*IPVS"):
        deploy_file(rendered(probe=s))


def test_placement_reads_each_services_host_image_and_ports() -> None:
    deploy = deploy_file(
        rendered(
            toxiproxy=service("h1", "qoe/toxiproxy:dev", p8474=8474, p18011=18011),
            **{"ingest-1": service("h2", "qoe/ingest:dev", p8080=8081)},
        )
    )
    placed = placement(deploy)
    assert placed["toxiproxy"] == Placed(
        "toxiproxy", "h1", "qoe/toxiproxy:dev", {8474: 8474, 18011: 18011}
    )
    assert host_names(placed) == ["h1", "h2"]
    assert images_by_host(placed) == {"h1": ["qoe/toxiproxy:dev"], "h2": ["qoe/ingest:dev"]}


@pytest.mark.parametrize(
    "constraints",
    [[], ["node.role == worker"], ["node.labels.qoe.host == h1", "node.labels.qoe.host == h2"]],
)
def test_a_service_not_pinned_to_exactly_one_host_is_refused(constraints) -> None:
    s = service("h1")
    s["deploy"]["placement"]["constraints"] = constraints
    with pytest.raises(StackError, match="pinned to exactly one host"):
        placement(deploy_file(rendered(probe=s)))


def test_two_services_publishing_one_port_on_one_host_are_refused() -> None:
    deploy = deploy_file(rendered(a=service("h4", p8080=8083), b=service("h4", p8080=8083)))
    with pytest.raises(StackError, match="a and b on h4:8083"):
        placement(deploy)
    # The same port on two hosts is two addresses: fine.
    placement(deploy_file(rendered(a=service("h4", p8080=8083), b=service("h5", p8080=8083))))


def test_endpoints_are_each_port_at_its_hosts_address() -> None:
    placed = {
        "toxiproxy": Placed(
            "toxiproxy", "h1", "t", {8474: 8474, 18011: 18011, 18012: 18012, 15439: 15439}
        ),
        **{s: Placed(s, "h2", "i", {8080: 8081 + i}) for i, s in enumerate(HTTP_SERVICES)},
        **{
            n: Placed(n, "h3", "n", {4222: 4221 + i, 8222: 8221 + i})
            for i, n in enumerate(NATS_NODES)
        },
        **{p: Placed(p, "h5", "p", {5432: 5432 + i}) for i, p in enumerate(POSTGRES_NODES)},
    }
    addresses = {"h1": "198.18.0.2", "h2": "198.18.0.3", "h3": "198.18.0.4", "h5": "198.18.0.6"}
    e = swarm_endpoints(placed, addresses, ENV, window_s=60)
    assert e.ingest_urls == ("http://198.18.0.2:18011", "http://198.18.0.2:18012")
    assert e.database_dsn == "postgresql://qoe:pw@198.18.0.2:15439/qoe"
    assert e.toxiproxy_url == "http://198.18.0.2:8474" and e.ingest_token == "tok"
    assert e.nats_urls[0] == "nats://198.18.0.4:4221"
    assert e.nats_monitors["nats-3"] == "http://198.18.0.4:8223"
    assert e.services["ingest-2"] == "http://198.18.0.3:8082"
    assert e.postgres_nodes["postgres-replica"] == "postgresql://qoe:pw@198.18.0.6:5433/qoe"


def test_endpoints_need_every_port_the_harness_reaches() -> None:
    placed = {"toxiproxy": Placed("toxiproxy", "h1", "t", {8474: 8474})}
    with pytest.raises(StackError, match="toxiproxy publishes no port for 18011"):
        swarm_endpoints(placed, {"h1": "198.18.0.2"}, ENV, window_s=60)


def test_a_redeploy_updates_only_the_services_whose_definition_changed() -> None:
    before = deploy_file(rendered(a=service("h1"), b=service("h2")))
    after = deploy_file(rendered(a=service("h1"), b=service("h2"), c=service("h3")))
    after["services"]["b"]["environment"] = {"A": "2"}
    assert changed_services(before, after) == ["b", "c"]
    assert changed_services(after, after) == []


def test_the_newest_container_is_the_current_task_and_its_health_says_why() -> None:
    listed = [
        {"Id": "old", "Created": 100, "State": "exited"},
        {"Id": "new", "Created": 105, "State": "running"},
        {"Id": "tie", "Created": 105, "State": "exited"},
    ]
    assert newest(listed) == "new"
    inspected = {
        "Id": "new",
        "State": {
            "Status": "running",
            "Health": {"Status": "starting", "Log": [{"Output": "connect: refused\n"}]},
        },
    }
    state = state_of("ingest-1", "h2", inspected)
    assert not state.healthy and state.detail == "connect: refused"
    assert state.describe() == "ingest-1 on h2 (running, starting): connect: refused"
    inspected["State"]["Health"]["Status"] = "healthy"
    assert state_of("ingest-1", "h2", inspected).healthy
    assert state_of("x", "h1", {"Id": "c", "State": {"Status": "running"}}).healthy  # no check


@pytest.mark.skipif(shutil.which("docker") is None, reason="needs the docker CLI's compose")
def test_the_swarm_override_keeps_the_original_topology() -> None:
    """stack/swarm/overrides.yml as `docker compose config` merges it with the tier files."""
    placed = placement(deploy_file(render("qoe-topology", None)))
    on = {name: p.host for name, p in placed.items()}
    assert set(on) == {*HTTP_SERVICES, *NATS_NODES, *POSTGRES_NODES, "toxiproxy"}
    probes_host = on["probe-1"]
    assert on["probe-2"] == probes_host
    # Probes on their own host (with Toxiproxy, the test's network, and nothing of the platform).
    assert {s for s, h in on.items() if h == probes_host} == {"probe-1", "probe-2", "toxiproxy"}
    assert on["ingest-1"] != on["ingest-2"]
    assert len({on[n] for n in NATS_NODES}) == 3
    assert on["postgres-primary"] != on["postgres-replica"]
    assert on["aggregator-1"] == on["aggregator-2"] == on["diagnoser"]
    # The database primary alone on its host: crashing it fails over the database only.
    assert [s for s, h in on.items() if h == on["postgres-primary"]] == ["postgres-primary"]
    # The manager on a host no scenario crashes or cuts (the processing, storage, edge and
    # ingest-1 hosts are): a host cut from the manager has its tasks replaced on return.
    faulted = {on["aggregator-1"], on["postgres-primary"], on["probe-1"], on["ingest-1"]}
    assert MANAGER in host_names(placed) and MANAGER not in faulted
    assert len(host_names(placed)) == 5
