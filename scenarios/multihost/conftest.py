"""The multihost scenarios need a stack spread over Docker hosts of its own (the swarm
backend, `--stack swarm`); on any other stack they are skipped, saying why. Those that fault
the storage host need the PostgreSQL primary there (`primary_at_home`); the load across hosts
runs its workers on a host of their own (`load_host`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness.hosts import Host
from harness.nemesis import Nemesis
from harness.nemesis.hosts import MultiHost
from harness.nemesis.postgres import HoldsDown
from harness.pytest_plugin import require
from harness.stack import Stack, log


@pytest.fixture
def spread(stack: Stack) -> MultiHost:
    """The stack, as one whose services run on hosts the host faults can reach."""
    return require(stack, MultiHost, "host faults need hosts of their own (--stack swarm)")


HOME_PRIMARY = "postgres-primary"  # the service the topology puts alone on the storage host


@pytest.fixture
def primary_at_home(spread: MultiHost, nemesis: Nemesis) -> str:
    """The PostgreSQL primary on its own host, the storage host, which is returned: the host
    faults name hosts by what runs there, and a failover leaves the primary beside the
    processing tier. Switched back if so: the other node stopped gracefully (a fast shutdown
    ships its last WAL to the standby, so nothing is lost), the home node promoted, the
    proxies moved to it, the other rebuilt as its standby. Recorded in the history."""
    primary, _ = nemesis.postgres_roles()
    if primary != HOME_PRIMARY:
        log(f"the primary is {primary}: switching back to {HOME_PRIMARY}")
        holding = require(nemesis.stack, HoldsDown, "a switchover needs a stack that holds down")
        with nemesis.staged_failover() as back:
            holding.stop([primary])
            back.primary_lost()
            took = back.promote()
        log(f"switched back to {HOME_PRIMARY}: promoted {took:.1f} s after the stop")
    return spread.host_of(HOME_PRIMARY)


LOAD_HOST = "load"  # a host name (1-6 characters): the namespace is qoe-<run>-load


@pytest.fixture
def load_host(spread: MultiHost) -> Iterator[Host]:
    """A host of its own for the load generator: a network namespace with its own address on
    the hosts' bridge, no engine, not a swarm node (`Hosts.bare`); removed after the test."""
    if spread.hosts.hosts_file is not None:
        pytest.skip("a load host is a namespace made here; with --hosts there is none to make")
    with spread.hosts.bare(LOAD_HOST) as host:
        yield host
