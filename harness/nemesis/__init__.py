"""Faults, one module per mechanism (after Jepsen's nemesis namespaces):

- `core`: the skeleton every fault shares (inject, effect, body, heal), each fault an
  operation of the nemesis in the run's History (`harness.history.Fault`);
- `links`: Toxiproxy link cuts, tier partitions, toxics, upstream moves;
- `processes`: kill, stop, restart, pause, disconnect, through the stack's ServiceControl;
- `postgres`: the standby cut off, and failover;
- `hosts`: partitions between Docker hosts, a host crashed, frozen, drained; a swarm task killed;
- `registry`: every named fault (CLI `fault`, chaos under load, generated schedules).

A new mechanism is a module here with a `NemesisCore` subclass holding its faults, added to
`Nemesis`'s bases below, and its named faults added to `registry.FAULTS` (with the stack
capabilities they need).
"""

from __future__ import annotations

from harness.nemesis.core import Fault, NemesisCore, NemesisError
from harness.nemesis.hosts import HostFaults
from harness.nemesis.links import LinkFaults
from harness.nemesis.postgres import PostgresFaults
from harness.nemesis.processes import ProcessFaults

__all__ = ["Fault", "Nemesis", "NemesisError"]


class Nemesis(PostgresFaults, LinkFaults, ProcessFaults, HostFaults, NemesisCore):
    """Every mechanism's faults on one stack, recorded in a History as the nemesis process.

    `Nemesis(stack, endpoints, history)`: link faults need the endpoints' Toxiproxy; process
    and PostgreSQL faults need a stack with ServiceControl (harness.stack); host faults a stack
    on hosts of its own (harness.nemesis.hosts.MultiHost: the swarm backend)."""
