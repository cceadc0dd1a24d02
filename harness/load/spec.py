"""What a load run offers: rate, duration, batch, probes and targets, locust processes."""

from __future__ import annotations

import math
from dataclasses import dataclass

from harness.load.settings import default, seeded_bugs

LOOPBACK_OR_ANY = ("127.0.0.1", "localhost", "0.0.0.0", "*")

# --- what to run ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadSpec:
    """One load run: the offered rate and how the probes behave."""

    rate: float  # offered events/s over all users, on a schedule; 0: each user as fast as answered
    duration_s: float
    users: int = 0  # 0: a user per batch/s of offered rate
    batch_size: int = int(default("batch"))
    probes: int = int(default("probes"))
    targets: int = int(default("targets"))  # per probe
    degraded: float = float(default("degraded"))  # fraction of (probe, target) pairs degraded
    workers: int = 0  # 0: one local locust process; N: a master and N worker processes
    remote_workers: int = 0  # workers the master waits for from other machines
    master_bind: str = "127.0.0.1"  # the master's address (all interfaces: 0.0.0.0)
    master_port: int = 0  # 0: a free port
    # The network namespace the `workers` run in (a host of their own: harness.hosts.Hosts.bare,
    # e.g. /var/run/netns/qoe-abcd-load), entered with nsenter; master_bind must then be an
    # address they reach from there (the run's bridge address). "": this machine's namespace.
    worker_netns: str = ""
    timeout_s: float = float(default("timeout"))
    resends: int = int(default("resends"))  # an unknown batch is resent with the same ids
    seeded_bugs: tuple[str, ...] = ()  # the load generator's (settings.SEEDED_BUGS): meta-tests

    def __post_init__(self) -> None:
        seeded_bugs(",".join(self.seeded_bugs))  # an unknown name fails here, not later
        if self.worker_netns and (self.workers < 1 or self.master_bind in LOOPBACK_OR_ANY):
            raise ValueError(
                f"worker_netns {self.worker_netns!r} needs workers >= 1 (got {self.workers}) "
                f"and a master_bind they reach from that namespace (got {self.master_bind!r}: "
                "its loopback is its own); bind the master to the bridge address"
            )

    @property
    def distributed(self) -> bool:
        return self.workers + self.remote_workers > 0

    def user_count(self) -> int:
        if self.users > 0:
            return self.users
        if self.rate <= 0:
            return 16
        # Users stand for probes: one sends a batch a second, each on its own schedule (its
        # sends overlap when answers are slow, so the count sets no ceiling on the rate).
        return max(2, min(64, math.ceil(self.rate / self.batch_size)))

    def probe_ids(self, prefix: str) -> list[str]:
        return [f"{prefix}-p{i}" for i in range(self.probes)]
