"""open_stack picks the backend and says clearly what is missing; each backend declares its
capabilities; the compose stack's endpoints are re-read from the ports published now."""

from __future__ import annotations

import sys

import pytest

from harness.stack import (
    HTTP_SERVICES,
    NATS_NODES,
    POSTGRES_NODES,
    ComposeStack,
    ExternalStack,
    Metered,
    Reconfigurable,
    ServiceControl,
    StackError,
    StackOptions,
    open_stack,
)

CAPABILITIES = (ServiceControl, Reconfigurable, Metered)


def test_compose_has_every_capability_and_external_none(tmp_path):
    compose = open_stack(StackOptions(state_dir=tmp_path))
    assert isinstance(compose, ComposeStack)
    assert all(isinstance(compose, c) for c in CAPABILITIES)
    external = open_stack(StackOptions(backend="external", endpoints_file=tmp_path / "e.json"))
    assert isinstance(external, ExternalStack)
    assert not any(isinstance(external, c) for c in CAPABILITIES)


def test_bad_options_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(StackError, match="--stack-endpoints FILE"):
        open_stack(StackOptions(backend="external"))
    with pytest.raises(StackError, match="unknown stack backend 'kubernetes'"):
        open_stack(StackOptions(backend="kubernetes"))
    monkeypatch.setitem(sys.modules, "harness.swarm", None)  # a checkout without the backend
    with pytest.raises(StackError, match="swarm backend is not available"):
        open_stack(StackOptions(backend="swarm", state_dir=tmp_path))


def compose_with_ports(tmp_path, ports: dict[tuple[str, int], int]) -> ComposeStack:
    stack = ComposeStack(StackOptions(run_id="t", state_dir=tmp_path))
    stack.state_dir.mkdir(parents=True)
    stack.env.path.write_text("POSTGRES_PASSWORD=pw\nHARNESS_TOKEN=tok\n")
    stack._published_ports = lambda: dict(ports)  # type: ignore[method-assign]
    return stack


TOXIPROXY = {("toxiproxy", p): 40000 + i for i, p in enumerate((18011, 18012, 15439, 8474))}


def test_endpoints_are_what_is_published_now(tmp_path):
    ports = {**TOXIPROXY, ("ingest-1", 8080): 41001, ("nats-1", 4222): 41002}
    ports |= {("nats-1", 8222): 41003, ("postgres-primary", 5432): 41004}
    stack = compose_with_ports(tmp_path, ports)
    endpoints = stack.endpoints()
    assert endpoints.ingest_urls == ("http://127.0.0.1:40000", "http://127.0.0.1:40001")
    assert endpoints.database_dsn == "postgresql://qoe:pw@127.0.0.1:40002/qoe"
    # What publishes nothing now (stopped, or off its network) is left out, not guessed.
    assert endpoints.services == {"ingest-1": "http://127.0.0.1:41001"}
    assert endpoints.nats_urls == ("nats://127.0.0.1:41002",)
    assert endpoints.nats_monitors == {"nats-1": "http://127.0.0.1:41003"}
    assert endpoints.postgres_nodes == {
        "postgres-primary": "postgresql://qoe:pw@127.0.0.1:41004/qoe"
    }
    ports[("ingest-1", 8080)] = 42000  # started again: a new host port
    assert stack.endpoints().services["ingest-1"] == "http://127.0.0.1:42000"


def test_after_bring_up_every_service_must_publish(tmp_path):
    everything = {
        **TOXIPROXY,
        **{(s, 8080): 41000 + i for i, s in enumerate(HTTP_SERVICES)},
        **{(n, p): 42000 + i * 10 + p % 10 for i, n in enumerate(NATS_NODES) for p in (4222, 8222)},
        **{(n, 5432): 43000 + i for i, n in enumerate(POSTGRES_NODES)},
    }
    stack = compose_with_ports(tmp_path, everything)
    assert len(stack._discover(stack.env.read(), complete=True).services) == len(HTTP_SERVICES)
    del everything[("ingest-2", 8080)]
    stack = compose_with_ports(tmp_path / "again", everything)
    with pytest.raises(StackError, match="ingest-2 of qoe-t publishes no port for 8080"):
        stack._discover(stack.env.read(), complete=True)


def test_without_toxiproxy_there_are_no_endpoints(tmp_path):
    stack = compose_with_ports(tmp_path, {("ingest-1", 8080): 41001})
    with pytest.raises(StackError, match="toxiproxy of qoe-t publishes no port"):
        stack.endpoints()


def test_endpoints_of_a_stack_not_up_say_so(tmp_path):
    with pytest.raises(StackError, match="is not up"):
        ComposeStack(StackOptions(run_id="t", state_dir=tmp_path)).endpoints()
