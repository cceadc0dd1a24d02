"""Chaos under load across hosts on the swarm backend (issue 14, scenario 6): the load
generator's workers on a host of their own, a host partition while they send, then the SLO
gates and the exactly-once verdict over every batch they sent.

- The load host is a network namespace with its own address on the hosts' bridge, without an
  engine and outside the swarm (`Hosts.bare`, the `load_host` fixture). Two locust workers run
  in it (`nsenter --net=…`, `LoadSpec.worker_netns`); the master runs in the harness's
  namespace, bound to the harness's address on the bridge. The workers post to the ingest
  replicas' own published ports, at their hosts' addresses (h2:8081, h3:8082), not through the
  edge host's proxy: every batch leaves the load host by its veth and crosses the bridge. The
  test shows it: the workers are the processes in that namespace, every batch's address is an
  ingest host's, and the load host's veth carried at least the batches' bytes.
- The partition: ingest-1's host cut from the edge host, both ways, for 20 s from 8 s into the
  load. Every link of ingest-1 to NATS passes Toxiproxy on the edge host, so ingest-1 can
  store nothing while the load host still reaches it: it must refuse (503, an unknown outcome
  that the users resend with the same ids) every batch begun in the cut. 20 s is longer than
  ingest's NATS client trusts a silent connection (a ping every 5 s, stale after two
  unanswered: 10-15 s), so ingest-1 also drops it and reconnects after the heal. ingest-2 is
  cut only where its NATS connection goes to nats-1 (the proxy on the edge host relays it to
  h2): then it refuses too until its client gives that connection up and takes another node
  (in the first run it acknowledged 26 of its 102 batches begun in the cut); that is reported,
  not asserted. Cutting the load host itself from h2 would only keep its batches from
  arriving: nothing the stack could get wrong (a seeded bug included) would then show.
- Then the chaos profile's SLO gates (scenarios/load/slo.toml, as the single-host chaos under
  load: relaxed during the cut and its 10 s grace, the steady thresholds before and after),
  and every event acknowledged to the load counted exactly once. Recovery: from the heal to
  ingest-1 acknowledging the load's batches again.

Meta-test: the same run with ingest acknowledging before JetStream has the events (seeded bug
`ingest_early_ack`): ingest-1 acknowledges through the cut what it then loses, and the verdict
must fail, naming the load's windows.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from harness.history import Fault, Operation, Outcome
from harness.hosts import Host
from harness.load import LoadResult, LoadSpec, load_slo, run_load
from harness.nemesis.hosts import MultiHost, complete
from harness.pytest_plugin import VERDICT_KEY, Run
from harness.stack import Endpoints, StackSettings

pytestmark = pytest.mark.multihost

LOAD = LoadSpec(rate=1000, duration_s=30, batch_size=100, probes=10, targets=4, workers=2)
CUT_AT_S, CUT_FOR_S = 8.0, 20.0
PUBLISH_TIMEOUT_S = 2.0  # ingest's PUBLISH_TIMEOUT_SECONDS: it answers 503 after this long
# An event in a batch is ~190 bytes of JSON; half of that is a floor no headers can make up.
MIN_BYTES_PER_EVENT = 100
INGEST = ("ingest-1", "ingest-2")


@dataclass(frozen=True)
class AcrossHosts:
    """A load run from the load host, and what showed where it ran."""

    result: LoadResult
    cut_hosts: tuple[str, str]
    load_host: Host
    master_bind: str
    in_load_host: Mapping[int, str]  # pid -> command line, while the cut held
    load_host_sent_bytes: int  # received by the bridge from the load host's veth

    @property
    def ops(self) -> list[Operation]:
        return [op for op in self.result.history if op.process != "freshness"]


def direct_ingest(endpoints: Endpoints) -> Endpoints:
    """The endpoints with the ingest replicas' own published ports as the ingest URLs."""
    return replace(endpoints, ingest_urls=tuple(endpoints.services[s] for s in INGEST))


def load_across_hosts(
    spread: MultiHost,
    load_host: Host,
    nemesis,
    endpoints: Endpoints,
    run: Run,
    out_dir: Path,
    prefix: str,
    convergence_timeout_s: float = 60.0,
) -> AcrossHosts:
    """The chaos run: workers on the load host, ingest-1's host cut from the edge host."""
    hosts = spread.hosts
    edge, ingest_host = spread.host_of("probe-1"), spread.host_of("ingest-1")
    spec = replace(
        LOAD,
        worker_netns=str(hosts.netns_path(load_host.name)),
        master_bind=hosts.bridge_address(),
    )
    seen: dict[int, str] = {}

    @contextmanager
    def cut() -> Iterator[Fault]:
        grudge = complete([[edge], [ingest_host]])
        with nemesis.host_partition(grudge, name=f"cut {ingest_host} from {edge}") as fault:
            seen.update(hosts.processes_in(load_host.name))
            yield fault

    counter = Path("/sys/class/net") / hosts.layout(load_host.name).veth / "statistics"
    received_before = int((counter / "rx_bytes").read_text())
    result = run_load(
        direct_ingest(endpoints),
        spec,
        out_dir,
        name=f"chaos across hosts: cut {ingest_host} from {edge}",
        prefix=prefix,
        slo=load_slo(profile="chaos"),
        fault_slo=load_slo(profile="chaos.fault"),
        fault=cut,
        fault_name=f"cut-{ingest_host}-from-{edge}",
        fault_at_s=CUT_AT_S,
        fault_for_s=CUT_FOR_S,
        convergence_timeout_s=convergence_timeout_s,
        timeline=run.timeline,
    )
    sent = int((counter / "rx_bytes").read_text()) - received_before
    return AcrossHosts(result, (edge, ingest_host), load_host, spec.master_bind, seen, sent)


def not_across_hosts(run: AcrossHosts, endpoints: Endpoints) -> list[str]:
    """What says the load did not go from the load host to the ingest hosts' own ports
    (empty: it did)."""
    problems = []
    commands = [c.split() for c in run.in_load_host.values()]
    workers = [c for c in commands if "--worker" in c]
    if len(workers) != run.result.spec.workers or any("--master" in c for c in commands):
        problems.append(
            f"the load host ran {len(workers)} locust workers (expected "
            f"{run.result.spec.workers}) and no master; its processes: {dict(run.in_load_host)}"
        )
    targets = Counter(urlsplit(op.endpoint).netloc for op in run.ops)
    ingest = {urlsplit(endpoints.services[s]).netloc for s in INGEST}
    if set(targets) != ingest:
        problems.append(f"the load's batches went to {dict(targets)}, not to each of {ingest}")
    events = sum(op.batch_size for op in run.ops)
    if run.load_host_sent_bytes < MIN_BYTES_PER_EVENT * events:
        problems.append(
            f"the load host's veth carried {run.load_host_sent_bytes} bytes to the bridge, "
            f"less than {MIN_BYTES_PER_EVENT} per event sent ({events} events)"
        )
    return problems


def through_the_cut(run: AcrossHosts, endpoints: Endpoints) -> dict[str, dict[str, int]]:
    """Outcomes of the load's batches begun while ingest-1 could store nothing (from the
    cut's effect until a publish timeout and a second before its heal), per ingest replica."""
    fault = run.result.fault
    assert fault is not None, "the run had no fault"
    start, end = fault["effect_at"], fault["healed_at"] - PUBLISH_TIMEOUT_S - 1
    view = {}
    for service in INGEST:
        url = endpoints.services[service]
        ops = [
            op for op in run.ops if op.endpoint.startswith(url) and start <= op.invoked_at <= end
        ]
        view[service] = dict(Counter(op.outcome.value for op in ops)) | {"batches": len(ops)}
    return view


def acknowledging_again_after_s(run: AcrossHosts, endpoints: Endpoints) -> float | None:
    """Seconds from the heal to ingest-1's first acknowledgement to the load after it."""
    fault = run.result.fault
    assert fault is not None, "the run had no fault"
    url = endpoints.services["ingest-1"]
    acked = [
        op.completed_at
        for op in run.ops
        if op.endpoint.startswith(url)
        and op.outcome is Outcome.OK
        and op.completed_at >= fault["healed_at"]
    ]
    return round(min(acked) - fault["healed_at"], 3) if acked else None


def details_of(run: AcrossHosts, endpoints: Endpoints) -> dict[str, Any]:
    """What the report says of the run: where the load ran, the cut, what the load saw."""
    result, fault = run.result, run.result.fault or {}
    return {
        "load_host": {
            "name": run.load_host.name,
            "address": run.load_host.address,
            "processes": sorted(run.in_load_host.values()),
            "sent_bytes": run.load_host_sent_bytes,
        },
        "master_bind": run.master_bind,
        "targets": dict(Counter(urlsplit(op.endpoint).netloc for op in run.ops)),
        "cut": {
            "hosts": list(run.cut_hosts),
            "in_effect_after_s": round(fault.get("effect_at", 0) - fault.get("start", 0), 3),
            "held_s": round(fault.get("healed_at", 0) - fault.get("effect_at", 0), 3),
        },
        "through_the_cut": through_the_cut(run, endpoints),
        "ingest_1_acknowledging_again_after_heal_s": acknowledging_again_after_s(run, endpoints),
        "phases": {
            name: {
                "batches": s.batches,
                "error_rate": round(s.error_rate, 4),
                "events_per_s": round(s.events_per_s, 1),
                "p95_ms": s.latency_ms["p95"],
                "p99_ms": s.latency_ms["p99"],
                "late": s.late,
            }
            for name, s in result.phases.items()
        },
        "breaches": [b.message() for b in result.breaches],
        "convergence_s": result.verdict.convergence_s if result.verdict else None,
        "verdict": result.verdict.summary().splitlines()[0] if result.verdict else None,
    }


def test_chaos_under_load_across_hosts(
    spread,
    load_host,
    nemesis,
    endpoints,
    run,
    scenario_dir,
    probe_prefix,
    request,
    scenario_details,
):
    """Workers on the load host, ingest-1's host cut from the edge host for 20 s: ingest-1
    refuses every batch it cannot store; the SLO gates hold before and after the cut, ingest-1
    acknowledges again after the heal, and every acknowledged event is counted exactly once."""
    started = time.monotonic()
    across = load_across_hosts(
        spread, load_host, nemesis, endpoints, run, scenario_dir / "load", f"{probe_prefix}L"
    )
    result = across.result
    scenario_details.update(details_of(across, endpoints))
    scenario_details["recovery_s"] = scenario_details["ingest_1_acknowledging_again_after_heal_s"]
    scenario_details["duration_s"] = round(time.monotonic() - started, 1)
    request.getfixturevalue("plot_history")(result.history)
    if result.verdict is not None:
        request.node.stash[VERDICT_KEY] = result.verdict
    problems = not_across_hosts(across, endpoints)
    assert not problems, "\n".join(problems)
    cut = scenario_details["through_the_cut"]
    assert cut["ingest-1"]["batches"] > 0 and cut["ingest-1"].get("ok", 0) == 0, (
        f"ingest-1 was cut from NATS, yet of the load's batches begun meanwhile it acknowledged "
        f"{cut['ingest-1'].get('ok', 0)} of {cut['ingest-1']['batches']}: {cut}"
    )
    assert scenario_details["recovery_s"] is not None, (
        "ingest-1 acknowledged nothing after the heal"
    )
    assert result.ok, result.summary()


@pytest.mark.meta
@pytest.mark.parametrize(
    "reconfigured_stack",
    [StackSettings(seeded_bugs=("ingest_early_ack",))],
    indirect=True,
    ids=["ingest_early_ack"],
)
def test_ingest_acking_early_fails_the_load_across_hosts(
    spread,  # first: elsewhere the test is skipped before the stack is reconfigured
    reconfigured_stack,
    load_host,
    nemesis,
    run,
    scenario_dir,
    probe_prefix,
    request,
    scenario_details,
):
    """Ingest answering 202 before JetStream has the events: through the same cut ingest-1
    acknowledges batches it then loses (its NATS connection silent, then dropped), and the
    exactly-once verdict over the load fails, naming the load's windows."""
    across = load_across_hosts(
        spread,
        load_host,
        nemesis,
        reconfigured_stack,
        run,
        scenario_dir / "load",
        f"{probe_prefix}L",
        # A correct stack matches within seconds; lost events never come back.
        convergence_timeout_s=20,
    )
    result = across.result
    scenario_details.update(details_of(across, reconfigured_stack))
    request.getfixturevalue("plot_history")(result.history)
    assert not not_across_hosts(across, reconfigured_stack), not_across_hosts(
        across, reconfigured_stack
    )
    cut = scenario_details["through_the_cut"]
    assert cut["ingest-1"].get("ok", 0) > 0, f"the seeded ingest-1 acknowledged nothing: {cut}"
    verdict = result.verdict
    assert verdict is not None and not verdict.valid, (
        f"the harness passed an ingest that acknowledged events it could not store: "
        f"{result.summary()}"
    )
    message = verdict.summary()
    assert any(probe in message for probe in result.probe_ids), message
    scenario_details["wrong_windows"] = len(verdict.wrong())
