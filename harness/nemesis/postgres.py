"""PostgreSQL faults: the standby cut off from the primary, and failover (the primary crashed,
the standby promoted, the database proxies moved to it, the old primary rebuilt as the new
standby). Built on the process faults (kill, start, disconnect) and the link faults (moving
the database proxies); SQL runs as the superuser inside the node's container (`psql`), so no
network path is needed.

The primary may also be lost by another fault (its host crashed: `Failover.primary_lost`).
On a stack that restarts lost services by itself (a swarm), it is then held down
(`HoldsDown`) until the rebuild starts it as the standby, so it never returns as a second
primary.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Protocol, runtime_checkable

from python_on_whales.exceptions import DockerException

from harness.nemesis.core import Fault, NemesisError
from harness.nemesis.hosts import MultiHost
from harness.nemesis.links import POSTGRES_PROXIES, LinkFaults
from harness.nemesis.processes import ProcessFaults
from harness.polling import wait_until
from harness.stack import POSTGRES_NODES, RUN_LABEL


@runtime_checkable
class HoldsDown(Protocol):
    """Capability: services stopped and kept so until started (a swarm starts a killed task
    again within a second, so a kill cannot keep a node down)."""

    def stop(self, services: Sequence[str]) -> None: ...


class PostgresFaults(LinkFaults, ProcessFaults):
    """Faults of the primary/standby pair."""

    def psql(self, service: str, sql: str, database: str = "qoe") -> str:
        """Run SQL as the superuser inside a Postgres container (no network path needed)."""
        out = self.control.engine(service).container.execute(
            self.control.container(service),
            ["psql", "-X", "-q", "-At", "-U", "postgres", "-d", database, "-c", sql],
        )
        return str(out or "").strip()

    def postgres_roles(self) -> tuple[str, str]:
        """(primary, standby) among the running Postgres nodes, by pg_is_in_recovery()."""
        primary: list[str] = []
        standby: list[str] = []
        for node in POSTGRES_NODES:
            if not self._running(node):
                continue
            (standby if self.psql(node, "SELECT pg_is_in_recovery()") == "t" else primary).append(
                node
            )
        if len(primary) != 1 or len(standby) != 1:
            raise NemesisError(
                f"expected one primary and one standby, found primaries {primary}, "
                f"standbys {standby}; was a failover left half done?"
            )
        return primary[0], standby[0]

    def replication_state(self, primary: str) -> list[tuple[str, str, str]]:
        """(application_name, state, sync_state) of the standbys connected to `primary`."""
        rows = self.psql(
            primary, "SELECT application_name, state, sync_state FROM pg_stat_replication"
        )
        return [tuple(line.split("|")) for line in rows.splitlines() if line]  # type: ignore[misc]

    @contextmanager
    def replication_cut(self) -> Iterator[Fault]:
        """The standby taken off the storage network: no WAL reaches it. With synchronous
        replication the primary's commits wait; with asynchronous ones they go ahead."""
        _, standby = self.postgres_roles()
        with self.disconnected(standby, "storage") as fault:
            fault.notes["standby"] = standby
            yield fault

    def staged_failover(self, *, rebuild_old_primary: bool = True) -> Failover:
        """A failover (a context manager) whose steps, stop_primary and promote, the scenario
        calls itself, doing what it needs in between; healed on exit."""
        return Failover(self, rebuild_old_primary=rebuild_old_primary)


class Failover:
    """Stop the primary, promote the standby (pg_promote), move the database proxies to it.

    Healing restores redundancy: the old primary is rebuilt (pg_basebackup from the new one
    into its volume) and started as the new standby; the new primary then replicates to it
    synchronously or not, as the stack's settings say. A failover stopped before promotion is
    healed by starting the old primary again. The history gets the failover and each step.
    """

    def __init__(self, nemesis: PostgresFaults, *, rebuild_old_primary: bool) -> None:
        self.nemesis = nemesis
        self.rebuild_old_primary = rebuild_old_primary
        self.primary, self.standby = nemesis.postgres_roles()
        self.old_node = NodeVolume.of(nemesis, self.primary)
        self.stopped = False
        self.promoted = False
        self.fault = Fault(name="failover", detail=f"{self.primary} -> {self.standby}")
        self.promotion_s: float | None = None  # primary stopped -> writes work on the new one

    def __enter__(self) -> Failover:
        nemesis = self.nemesis
        self.fault.started_at = time.time()
        nemesis.history.begin_fault(self.fault)
        return self

    def stop_primary(self) -> None:
        """SIGKILL the primary (a crash: nothing flushed to the standby on the way out)."""
        nemesis = self.nemesis
        self._stopped_at = time.monotonic()
        nemesis._instant(
            f"kill {self.primary}", "primary crash", lambda: nemesis._sigkill(self.primary)
        )
        wait_until(
            lambda: nemesis._stopped(self.primary), timeout_s=30, what=f"{self.primary} stopped"
        )
        self.stopped = True

    def primary_lost(self) -> None:
        """The primary lost by another fault the scenario holds (its host crashed), or stopped
        by the scenario; promotion is timed from now. Where the stack holds services down, it
        is held down until the rebuild starts it as the standby: a swarm would start it again
        as soon as its host is back, a second primary. Toxiproxy's sessions to it are dropped,
        as a load balancer drops a dead backend's (`drop_proxy_sessions`)."""
        self._stopped_at = time.monotonic()
        control = self.nemesis.control
        if isinstance(control, HoldsDown):
            self.nemesis._instant(
                f"hold {self.primary} down",
                "stopped until rebuilt as the standby",
                lambda: control.stop([self.primary]),
            )
        self.stopped = True
        self.drop_proxy_sessions()

    def drop_proxy_sessions(self) -> None:
        """Toxiproxy's connections to the old primary destroyed by the kernel (`ss -K` in
        Toxiproxy's network namespace), on a stack spread over hosts. A host that lost its
        power leaves them open with nobody answering, and Toxiproxy cannot stop a proxy (to
        move it) while it writes into one: without this the move took 56 s (two of Toxiproxy's
        25 s API timeouts before the proxies stopped)."""
        stack = self.nemesis.stack
        if not isinstance(stack, MultiHost):
            return
        pid = self.nemesis.control.container("toxiproxy").state.pid
        for address in self.old_node.addresses:
            command = ["nsenter", "-t", str(pid), "-n", "ss", "-t", "-K", "dst", address]
            self.nemesis._instant(
                f"drop proxy sessions to {self.primary}",
                f"ss -K dst {address} in Toxiproxy's network namespace",
                partial(stack.hosts.run_on, stack.host_of("toxiproxy"), command),
            )

    def promote(self) -> float:
        """pg_promote() on the standby, move the proxies, wait until a write works through
        the harness's database link. Returns seconds since the primary was stopped."""
        if not self.stopped:
            self.stop_primary()
        nemesis = self.nemesis
        nemesis._instant(
            f"promote {self.standby}",
            "SELECT pg_promote(true, 60)",
            lambda: _expect(nemesis.psql(self.standby, "SELECT pg_promote(true, 60)"), "t"),
        )
        self.promoted = True
        nemesis.move_upstream(POSTGRES_PROXIES, f"{self.standby}:5432")
        wait_until(
            self._writable, timeout_s=60, what=f"writes through the proxies to {self.standby}"
        )
        self.promotion_s = time.monotonic() - self._stopped_at
        self.fault.effect_s = time.time() - self.fault.started_at
        self.fault.notes["promotion_s"] = round(self.promotion_s, 3)
        return self.promotion_s

    def _writable(self) -> bool:
        import psycopg

        with psycopg.connect(
            self.nemesis.endpoints.database_dsn, autocommit=True, connect_timeout=3
        ) as conn:
            return conn.execute("SELECT NOT pg_is_in_recovery()").fetchone()[0]  # type: ignore[index]

    def __exit__(self, *exc: object) -> None:
        nemesis = self.nemesis
        self.fault.healed_at = time.time()
        healing = time.monotonic()
        try:
            if not self.promoted:
                if self.stopped:  # never promoted: the old primary simply comes back
                    nemesis._start([self.primary])
                    wait_until(
                        lambda: nemesis._healthy(self.primary),
                        timeout_s=120,
                        what=f"{self.primary} back",
                    )
            else:
                # Whatever happened in between, the database proxies lead to the new primary.
                nemesis.move_upstream(POSTGRES_PROXIES, f"{self.standby}:5432")
                if self.rebuild_old_primary:
                    self.rebuild()
            self.fault.heal_s = time.monotonic() - healing
        finally:
            self.fault.ended_at = time.time()
            self.fault.notes["healed_by"] = (
                "old primary rebuilt as standby" if self.promoted else "primary restarted"
            )

    def rebuild(self) -> None:
        """The old primary's volume replaced by a base backup of the new primary; started as
        its standby; the new primary's synchronous_standby_names set from the stack settings."""
        nemesis, settings = self.nemesis, self.nemesis.stack.settings
        old, new, node = self.primary, self.standby, self.old_node
        control = nemesis.control
        if isinstance(control, HoldsDown):
            control.stop([old])  # a killed task would be back at once, racing the backup
        else:
            nemesis._sigkill(old)
        engine = control.engine(old)
        script = (
            'set -eu; rm -rf "$PGDATA"/* "$PGDATA"/.[!.]* 2>/dev/null || true; '
            f'pg_basebackup -h {new} -U replicator -D "$PGDATA" -X stream -R -c fast '
            '-d "application_name=replica"; '
            'echo "synchronous_standby_names = \'\'" >> "$PGDATA/postgresql.auto.conf"; '
            'chmod 700 "$PGDATA"'
        )

        def backup() -> bool:
            try:
                engine.run(
                    node.image,
                    ["-c", script],
                    entrypoint="/bin/sh",
                    remove=True,
                    networks=node.networks,  # the storage network, where `new` is
                    volumes=[(node.volume, PGDATA)],
                    envs={"PGPASSWORD": node.replication_password},
                    labels={RUN_LABEL: node.run_label},
                )
            except DockerException as error:
                # A swarm host just back from a crash answers "network <id> not found" for an
                # overlay network until its engine has the network again (seconds).
                if "network" in str(error.stderr) and "not found" in str(error.stderr):
                    return False
                raise
            return True

        nemesis._instant(
            f"rebuild {old}",
            f"pg_basebackup from {new}",
            lambda: wait_until(
                backup, timeout_s=60, interval_s=1.0, what=f"a base backup into {node.volume}"
            ),
        )
        nemesis._start([old])
        wait_until(lambda: nemesis._healthy(old), timeout_s=120, what=f"{old} up as standby")
        names = "'replica'" if settings.sync_replication else "''"
        nemesis.psql(new, f"ALTER SYSTEM SET synchronous_standby_names = {names}")
        nemesis.psql(new, "SELECT pg_reload_conf()")
        wanted = "sync" if settings.sync_replication else "async"
        wait_until(
            lambda: ("replica", "streaming", wanted) in nemesis.replication_state(new),
            timeout_s=60,
            what=f"{old} streaming from {new} ({wanted})",
            describe=lambda: str(nemesis.replication_state(new)),
        )


PGDATA = "/var/lib/postgresql/data"


@dataclass(frozen=True)
class NodeVolume:
    """What rebuilding a node into its volume needs, and the addresses whose sessions a
    failover drops, read from its running container (on a swarm it goes with its task)."""

    image: str
    volume: str
    networks: list[str]
    addresses: list[str]  # on those networks
    replication_password: str  # the node's own environment has the run's
    run_label: str

    @classmethod
    def of(cls, nemesis: PostgresFaults, node: str) -> NodeVolume:
        container = nemesis.control.container(node)
        environment = dict(item.split("=", 1) for item in container.config.env or [])
        networks = container.network_settings.networks or {}
        return cls(
            image=str(container.image),
            volume=next(str(m.name) for m in container.mounts if m.destination == PGDATA),
            networks=sorted(networks),
            addresses=sorted(str(n.ip_address) for n in networks.values() if n.ip_address),
            replication_password=environment["REPLICATION_PASSWORD"],
            run_label=(container.config.labels or {})[RUN_LABEL],
        )


def _expect(got: str, wanted: str) -> None:
    if got != wanted:
        raise NemesisError(f"expected {wanted!r}, got {got!r}")
