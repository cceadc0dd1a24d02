"""Every named fault, in one registry: `python -m harness fault NAME`, `load chaos --fault
NAME`, the chaos-under-load scenarios and generated fault schedules all read `FAULTS`.

Each entry is a small record, after Jepsen's nemesis packages: its name (kebab-case), one
line saying what it does, how to start it (Nemesis -> a context manager holding the fault
until it exits, healed on exit), the stack capabilities it needs beyond Toxiproxy
(harness.stack: ServiceControl, ...), and whether it is cheap enough for generated schedules
(seconds to inject and heal, and it leaves the stack as it found it). A mechanism's entries
are grouped under its heading below; a new mechanism adds its group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from harness.nemesis.hosts import MultiHost
from harness.stack import ServiceControl, Stack

if TYPE_CHECKING:
    from harness.nemesis import Nemesis


@dataclass(frozen=True)
class NamedFault:
    name: str
    description: str
    start: Callable[[Nemesis], AbstractContextManager[Any]]
    needs: tuple[type, ...] = ()  # capability protocols of harness.stack
    cheap: bool = False  # drawn by generated schedules

    def missing(self, stack: Stack) -> list[str]:
        """The capabilities `stack` lacks for this fault (empty: it can run)."""
        return [need.__name__ for need in self.needs if not isinstance(stack, need)]


@contextmanager
def _killed_and_back(nemesis: Nemesis, service: str) -> Iterator[None]:
    """SIGKILL a service and bring it back (the window lasts at least until it is healthy)."""
    nemesis.kill(service)
    yield


LINK: tuple[type, ...] = ()  # Toxiproxy, which every Nemesis has
PROCESS: tuple[type, ...] = (ServiceControl,)
HOSTS: tuple[type, ...] = (MultiHost,)

# In this order: generated schedules draw from the cheap ones in it (and shrink towards the
# first), so a run seed replays the same schedules.
_ENTRIES = (
    # -- links (harness.nemesis.links: Toxiproxy) --------------------------------------------------
    NamedFault(
        "cut-ingest-nats",
        "ingest cut off from every NATS node",
        lambda n: n.cut("ingest-nats"),
        needs=LINK,
        cheap=True,
    ),
    NamedFault(
        "cut-aggregator-nats",
        "the aggregators cut off from every NATS node",
        lambda n: n.cut("aggregator-nats"),
        needs=LINK,
        cheap=True,
    ),
    NamedFault(
        "cut-diagnoser-nats",
        "the diagnoser cut off from every NATS node",
        lambda n: n.cut("diagnoser-nats"),
        needs=LINK,
        cheap=True,
    ),
    NamedFault(
        "cut-aggregator-postgres",
        "the aggregators cut off from PostgreSQL",
        lambda n: n.cut("aggregator-postgres"),
        needs=LINK,
        cheap=True,
    ),
    NamedFault(
        "cut-clients-nats1",
        "every client's link to nats-1 cut (the cluster still reaches it)",
        lambda n: n.cut("clients-nats1"),
        needs=LINK,
        cheap=True,
    ),
    NamedFault(
        "latency-aggregator-postgres",
        "300 +- 100 ms each way between the aggregators and PostgreSQL",
        lambda n: n.latency("aggregator-postgres", 300, 100, stream="both"),
        needs=LINK,
        cheap=True,
    ),
    NamedFault(
        "high-latency-ingest-nats",
        "500 +- 250 ms on NATS's answers to ingest",
        lambda n: n.latency("ingest-nats", 500, 250),
        needs=LINK,
        cheap=True,
    ),
    NamedFault(
        "bandwidth-aggregator-nats",
        "NATS to the aggregators limited to 32 KB/s",
        lambda n: n.bandwidth("aggregator-nats", 32),
        needs=LINK,
        cheap=True,
    ),
    NamedFault(
        "slicer-ingest-nats",
        "NATS's answers to ingest sliced into ~64-byte pieces, 500 us apart",
        lambda n: n.slicer("ingest-nats", 64, 32, 500),
        needs=LINK,
        cheap=True,
    ),
    NamedFault(
        "response-cut-off-harness-ingest",
        "ingest's answers to the harness cut off after 64 bytes",
        lambda n: n.limit_data("harness-ingest", 64),
        needs=LINK,
        cheap=True,
    ),
    NamedFault(
        "response-timeout-harness-ingest",
        "ingest's answers to the harness held back, the connection closed after 500 ms",
        lambda n: n.timeout("harness-ingest", 500),
        needs=LINK,
        cheap=True,
    ),
    NamedFault(
        "partition-nats",
        "the whole NATS tier cut off from its clients",
        lambda n: n.partition("nats"),
        needs=LINK,
        cheap=False,
    ),
    NamedFault(
        "latency-ingest-nats",
        "100 +- 50 ms on NATS's answers to ingest",
        lambda n: n.latency("ingest-nats", 100, 50),
        needs=LINK,
        cheap=False,
    ),
    # -- processes (harness.nemesis.processes: the stack's ServiceControl) -------------------------
    NamedFault(
        "down-aggregator-1",
        "aggregator-1 SIGKILLed and kept down while held, then started",
        lambda n: n.killed("aggregator-1"),
        needs=PROCESS,
        cheap=True,
    ),
    NamedFault(
        "down-aggregator-2",
        "aggregator-2 SIGKILLed and kept down while held, then started",
        lambda n: n.killed("aggregator-2"),
        needs=PROCESS,
        cheap=True,
    ),
    NamedFault(
        "down-ingest-2",
        "ingest-2 SIGKILLed and kept down while held, then started",
        lambda n: n.killed("ingest-2"),
        needs=PROCESS,
        cheap=True,
    ),
    NamedFault(
        "down-nats-2",
        "nats-2 SIGKILLed and kept down while held, then started",
        lambda n: n.nats_node_lost("nats-2"),
        needs=PROCESS,
        cheap=True,
    ),
    NamedFault(
        "pause-aggregator-1",
        "aggregator-1 frozen (docker pause) while held",
        lambda n: n.paused("aggregator-1"),
        needs=PROCESS,
        cheap=True,
    ),
    NamedFault(
        "pause-diagnoser",
        "the diagnoser frozen (docker pause) while held",
        lambda n: n.paused("diagnoser"),
        needs=PROCESS,
        cheap=True,
    ),
    NamedFault(
        "kill-ingest-1",
        "ingest-1 SIGKILLed and started again at once",
        lambda n: _killed_and_back(n, "ingest-1"),
        needs=PROCESS,
        cheap=False,
    ),
    NamedFault(
        "kill-aggregator-1",
        "aggregator-1 SIGKILLed and started again at once",
        lambda n: _killed_and_back(n, "aggregator-1"),
        needs=PROCESS,
        cheap=False,
    ),
    NamedFault(
        "kill-nats-2",
        "nats-2 SIGKILLed and started again at once",
        lambda n: _killed_and_back(n, "nats-2"),
        needs=PROCESS,
        cheap=False,
    ),
    NamedFault(
        "pause-ingest",
        "both ingest replicas frozen (docker pause) while held: nothing answers the probes",
        lambda n: n.paused("ingest-1", "ingest-2"),
        needs=PROCESS,
        cheap=False,
    ),
    NamedFault(
        "pause-nats-2",
        "nats-2 frozen (docker pause) while held",
        lambda n: n.paused("nats-2"),
        needs=PROCESS,
        cheap=False,
    ),
    # -- hosts (harness.nemesis.hosts: firewall rules in each host, its engine, the swarm) -------
    NamedFault(
        "isolate-nats-2-host",
        "the host of nats-2 cut from every other host (a NATS minority)",
        lambda n: n.isolate_host_of("nats-2"),
        needs=HOSTS,
    ),
    NamedFault(
        "isolate-aggregator-1-host",
        "the host of aggregator-1 (processing) cut from every other host",
        lambda n: n.isolate_host_of("aggregator-1"),
        needs=HOSTS,
    ),
    NamedFault(
        "loss-probe-1-to-ingest-1-host",
        "packets from probe-1's host to ingest-1's host lost, the other way delivered",
        lambda n: n.one_way_loss_between("probe-1", "ingest-1"),
        needs=HOSTS,
    ),
    NamedFault(
        "halves-hosts",
        "the hosts split in two halves that cannot reach each other",
        lambda n: n.halved(),
        needs=HOSTS,
    ),
    NamedFault(
        "bridge-hosts",
        "two halves of the hosts cut from each other, one host in the middle seeing both",
        lambda n: n.bridged(),
        needs=HOSTS,
    ),
    NamedFault(
        "crash-postgres-primary-host",
        "the PostgreSQL primary's host powered off (all its processes SIGKILLed), back after",
        lambda n: n.crash_host_of("postgres-primary"),
        needs=HOSTS,
    ),
    NamedFault(
        "crash-aggregator-1-host",
        "the host of aggregator-1 powered off (all its processes SIGKILLed), back after",
        lambda n: n.crash_host_of("aggregator-1"),
        needs=HOSTS,
    ),
    NamedFault(
        "freeze-ingest-1-host",
        "every container on ingest-1's host paused while held",
        lambda n: n.freeze_host_of("ingest-1"),
        needs=HOSTS,
    ),
    NamedFault(
        "drain-ingest-2-host",
        "ingest-2's swarm node drained while held, then active again",
        lambda n: n.drain_host_of("ingest-2"),
        needs=HOSTS,
    ),
    NamedFault(
        "task-kill-ingest-1",
        "ingest-1's swarm task SIGKILLed; the swarm starts a new one",
        lambda n: n.kill_task_of("ingest-1"),
        needs=HOSTS,
    ),
)

FAULTS: Mapping[str, NamedFault] = {entry.name: entry for entry in _ENTRIES}
assert len(FAULTS) == len(_ENTRIES), "two named faults share a name"


def named(name: str) -> NamedFault:
    """The named fault, or a ValueError listing the names."""
    if name not in FAULTS:
        raise ValueError(f"unknown fault {name!r}; the named faults are {', '.join(FAULTS)}")
    return FAULTS[name]


def schedulable() -> list[str]:
    """The faults generated schedules draw from, in registry order."""
    return [entry.name for entry in FAULTS.values() if entry.cheap]
