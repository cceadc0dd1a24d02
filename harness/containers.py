"""Throwaway single services from the stack's own images, for component tests (testcontainers).

Ryuk cannot be pulled here, so it is disabled; every container carries the harness's run label
and owner pid, so `stack.reap_orphans` removes what a killed run left behind.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg

os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")

from testcontainers.core.container import DockerContainer

from harness.polling import wait_until
from harness.stack import PID_LABEL, RUN_LABEL


@dataclass(frozen=True)
class Service:
    """A started throwaway service: where to reach it and its container (for kills and logs)."""

    url: str
    container: DockerContainer
    startup_s: float


def _labelled(image: str, run_id: str) -> DockerContainer:
    return DockerContainer(image).with_kwargs(
        labels={RUN_LABEL: run_id, PID_LABEL: str(os.getpid())}
    )


def _accepts_connections(dsn: str) -> bool:
    with psycopg.connect(dsn, connect_timeout=2):
        return True


@contextmanager
def postgres(run_id: str, image: str = "qoe/postgres:dev") -> Iterator[Service]:
    """A lone PostgreSQL primary (asynchronous: it has no replica to wait for)."""
    password = secrets.token_urlsafe(16)
    container = (
        _labelled(image, run_id)
        .with_env("POSTGRES_PASSWORD", password)
        .with_env("REPLICATION_PASSWORD", secrets.token_urlsafe(16))
        .with_env("SYNC_REPLICATION", "off")
        .with_exposed_ports(5432)
    )
    with container:
        host, port = container.get_container_host_ip(), container.get_exposed_port(5432)
        url = f"postgresql://qoe:{password}@{host}:{port}/qoe"
        _, took = wait_until(
            lambda: _accepts_connections(url),
            timeout_s=60,
            what=f"throwaway PostgreSQL from {image} accepting connections",
        )
        yield Service(url=url, container=container, startup_s=took)


@contextmanager
def nats_server(run_id: str, image: str = "qoe/nats:dev") -> Iterator[Service]:
    """A single-node JetStream server (streams on it must use one replica)."""
    container = (
        _labelled(image, run_id).with_env("NATS_NAME", "component").with_exposed_ports(4222, 8222)
    )
    with container:
        host = container.get_container_host_ip()
        monitor = f"http://{host}:{container.get_exposed_port(8222)}/healthz"
        import httpx

        _, took = wait_until(
            lambda: httpx.get(monitor, timeout=2).status_code == 200,
            timeout_s=60,
            what=f"throwaway NATS from {image} healthy",
        )
        yield Service(
            url=f"nats://{host}:{container.get_exposed_port(4222)}",
            container=container,
            startup_s=took,
        )
