"""What a load run offers: rate, duration, batch, probes and targets, locust processes."""

from __future__ import annotations

import math
from dataclasses import dataclass

# --- what to run ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadSpec:
    """One load run: the offered rate and how the probes behave."""

    rate: float  # offered events/s over all users; 0: closed loop, as fast as answered
    duration_s: float
    users: int = 0  # 0: a user per batch/s of offered rate
    batch_size: int = 200
    probes: int = 20
    targets: int = 5  # per probe
    degraded: float = 0.2  # fraction of (probe, target) pairs on a degraded link
    workers: int = 0  # 0: one local locust process; N: a master and N worker processes
    remote_workers: int = 0  # workers the master waits for from other machines
    master_bind: str = "127.0.0.1"  # the master's address (all interfaces: 0.0.0.0)
    master_port: int = 0  # 0: a free port
    timeout_s: float = 5.0
    resends: int = 3  # an unknown batch is resent with the same ids (as a probe would)

    @property
    def distributed(self) -> bool:
        return self.workers + self.remote_workers > 0

    def user_count(self) -> int:
        if self.users > 0:
            return self.users
        if self.rate <= 0:
            return 16
        # A user waits for each answer: at 1 batch/s it keeps pace up to ~1 s of latency.
        return max(2, min(64, math.ceil(self.rate / self.batch_size)))

    def probe_ids(self, prefix: str) -> list[str]:
        return [f"{prefix}-p{i}" for i in range(self.probes)]
