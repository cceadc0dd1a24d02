"""What scenarios share: the `Scenario` they work with (built by the `scenario` fixture in
scenarios/conftest.py), the steady workload, and the checks and waits several scenarios use."""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from harness.checker import Verdict
from harness.history import History, Mark, Operation
from harness.nemesis import Fault, Nemesis
from harness.polling import DeadlineExceeded, wait_until
from harness.stack import Endpoints, StackSettings
from harness.workload import EventGenerator, IngestClient

if TYPE_CHECKING:
    from harness.pytest_plugin import Verifier


@dataclass(frozen=True)
class Scenario:
    """One scenario's working set: the stack's endpoints, the harness's ingest client and the
    events it sends, the nemesis, the verifier, the history every operation and fault goes
    into, and the details the report shows. Scenarios take this one fixture (`scenario`)
    instead of seven, and the helpers below take it instead of their loose parts."""

    endpoints: Endpoints
    client: IngestClient
    generator: EventGenerator
    nemesis: Nemesis
    verifier: Verifier
    history: History
    details: dict[str, Any]

    @property
    def probe_ids(self) -> list[str]:
        return list(self.generator.probes)

    def reporting_into(self, details: dict[str, Any]) -> Scenario:
        """The same scenario with `details` for its report: a part of the scenario's details
        (one of several faults it runs), which the helpers below fill instead."""
        return replace(self, details=details)

    def workload(
        self, batch_size: int = 100, batches_per_s: float = 5.0
    ) -> AbstractContextManager[Workload]:
        """The steady workload of the harness's client (`workload`)."""
        return workload(self.client, self.generator, batch_size, batches_per_s)

    def verify_recovery(self, timeout_s: float = 60.0) -> Verdict:
        """The exactly-once verdict over this scenario's probes, and the recovery time
        (`verify_recovery`)."""
        return verify_recovery(self.verifier, self.history, self.probe_ids, self.details, timeout_s)

    def observe(self, timeout_s: float = 30.0) -> Verdict:
        """The verdict over this scenario's probes without asserting it (a meta-test asserts
        that it is invalid); recorded for the report."""
        return self.verifier.observe(self.history, self.probe_ids, timeout_s)

    def assert_caught(self, verdict: Verdict, passed: str = "a stack with a seeded bug") -> str:
        """The verdict is invalid and its message names at least one of this scenario's
        probes (it points at their wrong windows); returns the message. `passed` says what
        the harness would have passed otherwise."""
        message = verdict.summary()
        assert not verdict.valid, f"the harness passed {passed}"
        assert any(probe in message for probe in self.probe_ids), message
        return message

    def refused_after_effect(self, load: Workload, fault: Fault) -> dict[str, Any]:
        """`refused_after_effect` over this scenario's history."""
        return refused_after_effect(load, fault, self.history)

    def recover_after_refusals(
        self, services: Sequence[str], verify_timeout_s: float = 60.0
    ) -> Verdict:
        """After a fault healed (one ingest refused batches for, or any that left batches
        unknown): the services ready again, the unknown batches (503, no answer) resent like
        a probe would, then the exactly-once verdict and recovery time."""
        _, ready_s = wait_until(
            lambda: all_ready(self.endpoints, *services),
            timeout_s=60,
            what=f"{', '.join(services)} ready again",
        )
        self.details["ready_again_s"] = round(ready_s, 3)
        self.client.settle(deadline_s=60)
        return self.verify_recovery(verify_timeout_s)


def with_settings(settings: StackSettings, name: str) -> pytest.MarkDecorator:
    """The test runs on the stack reconfigured with `settings` (the `reconfigured_stack`
    fixture, restored afterwards), shown in its id as `name`."""
    return pytest.mark.parametrize("reconfigured_stack", [settings], indirect=True, ids=[name])


def seeded_bug(name: str) -> pytest.MarkDecorator:
    """The test runs on the stack with the seeded bug `name` on (QOE_SEEDED_BUGS)."""
    return with_settings(StackSettings(seeded_bugs=(name,)), name)


# The failover meta-tests' stack: commits acknowledged without the standby's confirmation.
ASYNCHRONOUS_REPLICATION = with_settings(
    StackSettings(sync_replication=False), "asynchronous_replication"
)


@contextmanager
def background_sender(
    client: IngestClient, generator: EventGenerator, batch_size: int = 200
) -> Iterator[list[Operation]]:
    """Send batches back to back on a thread for the body; yields the growing list of operations."""
    sent: list[Operation] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            sent.append(client.send(generator.batch(batch_size)))

    thread = threading.Thread(target=loop, name="background-sender", daemon=True)
    thread.start()
    try:
        yield sent
    finally:
        stop.set()
        thread.join(timeout=30)


class Workload:
    """A steady sender on a thread: `sent` grows; `stop()` ends it (idempotent), so a scenario
    can stop the workload at the moment a fault heals and time the recovery from there."""

    def __init__(
        self,
        client: IngestClient,
        generator: EventGenerator,
        batch_size: int,
        batches_per_s: float = 5.0,
    ) -> None:
        self.sent: list[Operation] = []
        self._stop = threading.Event()
        self._period = 1.0 / batches_per_s
        self._thread = threading.Thread(
            target=self._loop, args=(client, generator, batch_size), name="workload", daemon=True
        )

    def _loop(self, client: IngestClient, generator: EventGenerator, batch_size: int) -> None:
        # A steady pace (like a probe's rate), not as fast as possible: on a small machine an
        # unpaced sender starves the services the faults are about.
        next_at = time.monotonic()
        while not self._stop.is_set():
            self.sent.append(client.send(generator.batch(batch_size)))
            next_at = max(next_at + self._period, time.monotonic() - self._period)
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def progress(self, more: int = 3, timeout_s: float = 30.0) -> float:
        return wait_for_progress(self.sent, more=more, timeout_s=timeout_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


@contextmanager
def workload(
    client: IngestClient,
    generator: EventGenerator,
    batch_size: int = 100,
    batches_per_s: float = 5.0,
) -> Iterator[Workload]:
    """A Workload for the body; stopped at the end of the body at the latest."""
    running = Workload(client, generator, batch_size, batches_per_s)
    running._thread.start()
    try:
        yield running
    finally:
        running.stop()


def wait_for_progress(sent: list[Operation], more: int = 3, timeout_s: float = 30.0) -> float:
    """Wait until the background sender has completed `more` operations; returns seconds waited."""
    before = len(sent)
    return wait_until(
        lambda: len(sent) >= before + more, timeout_s=timeout_s, what=f"{more} more batches sent"
    )[1]


# -- observing the stack during faults (added for the nemesis scenarios) ---------------------


def readiness(endpoints: Endpoints, service: str) -> int | None:
    """The HTTP status of a service's /readyz (None when it does not answer, or publishes no
    port at the moment: stopped, or off its network)."""
    if service not in endpoints.services:
        return None
    try:
        return httpx.get(f"{endpoints.services[service]}/readyz", timeout=2).status_code
    except httpx.HTTPError:
        return None


def all_unready(endpoints: Endpoints, *services: str) -> bool:
    return all(readiness(endpoints, s) not in (200, None) for s in services)


def all_ready(endpoints: Endpoints, *services: str) -> bool:
    return all(readiness(endpoints, s) == 200 for s in services)


def each_commits(endpoints: Endpoints, *aggregators: str, timeout_s: float = 30.0) -> float:
    """Wait until each aggregator has committed a batch from now on; returns seconds waited.

    Then each holds a live database connection. A fault that makes connecting impossible (heavy
    latency: a handshake takes more round trips than connect_timeout allows) would otherwise
    strand an aggregator still due to reconnect after an earlier fault, and the batch it holds
    would pin the consumer's ack floor.
    """

    def batches(service: str) -> float:
        return metric(endpoints, service, "qoe_aggregator_batches_total")

    before = {service: batches(service) for service in aggregators}
    _, waited = wait_until(
        lambda: all(batches(service) > before[service] for service in aggregators),
        timeout_s=timeout_s,
        what=f"each of {', '.join(aggregators)} committing a batch",
    )
    return waited


def metric(endpoints: Endpoints, service: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus metric's samples (matching `labels`) from a service's /metrics."""
    text = httpx.get(f"{endpoints.services[service]}/metrics", timeout=3).text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        sample, _, label_text = head.partition("{")
        if sample != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', label_text))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total


def consumer_state(endpoints: Endpoints, consumer: str = "aggregator") -> dict[str, int]:
    """The events stream and its durable consumer as the consumer's raft leader reports them
    (NATS monitoring /jsz): messages, last_seq, num_pending, num_ack_pending, num_redelivered,
    ack_floor, delivered, redeliveries. Raises when no node answers."""

    def read(url: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
        body = httpx.get(f"{url}/jsz?consumers=true", timeout=2).json()
        for account in body.get("account_details", []):
            for stream in account.get("stream_detail", []):
                if stream["name"] != "QOE_EVENTS":
                    continue
                for c in stream.get("consumer_detail", []):
                    if c["name"] == consumer:
                        return stream, c
        return None

    errors: list[str] = []
    for node, url in endpoints.nats_monitors.items():
        try:
            found = read(url)
            if found is None:
                continue
            leader = (found[1].get("cluster") or {}).get("leader")
            if leader and leader != node and leader in endpoints.nats_monitors:
                found = read(endpoints.nats_monitors[leader]) or found
            stream, c = found
            return {
                "messages": stream["state"]["messages"],
                "last_seq": stream["state"]["last_seq"],
                "num_pending": c["num_pending"],
                "num_ack_pending": c["num_ack_pending"],
                "num_redelivered": c["num_redelivered"],
                "ack_floor": c["ack_floor"]["stream_seq"],
                "delivered": c["delivered"]["stream_seq"],
                # Every delivery takes a consumer sequence; the stream holds only the consumer's
                # subject, so deliveries beyond the stream sequence are redeliveries (cumulative;
                # num_redelivered only counts those still unacknowledged).
                "redeliveries": c["delivered"]["consumer_seq"] - c["delivered"]["stream_seq"],
            }
        except (httpx.HTTPError, KeyError, ValueError) as error:
            errors.append(f"{node}: {error!r}")
    raise AssertionError(f"no NATS node reported consumer {consumer!r}: {errors or 'not found'}")


def client_view(history: History, start: float, end: float) -> dict[str, Any]:
    """What the harness's clients saw between two instants: outcomes, statuses, slowest answer."""
    ops = [op for op in history.operations() if start <= op.completed_at <= end]
    outcomes = Counter(op.outcome.value for op in ops)
    statuses = Counter(str(op.status) if op.status is not None else "no answer" for op in ops)
    return {
        "operations": len(ops),
        "outcomes": dict(outcomes),
        "statuses": dict(statuses),
        "slowest_s": round(max((op.completed_at - op.invoked_at for op in ops), default=0.0), 3),
        "errors": sorted({op.error[:120] for op in ops if op.error})[:5],
    }


def verify_recovery(
    verifier: Any,
    history: History,
    probe_ids: list[str],
    details: dict[str, Any],
    timeout_s: float = 60.0,
) -> Verdict:
    """The exactly-once verdict after the history's faults healed, and the recovery time (the
    history's: from the start of the last heal to the database matching the oracle). Both go
    into the scenario's details; the recovery also into the timeline."""
    verdict = verifier.verify(history, probe_ids, timeout_s=timeout_s)
    recovery_s = history.recovery_s(verdict.convergence_s)
    details["recovery_s"] = recovery_s
    details["convergence_s"] = verdict.convergence_s
    details["counts"] = dict(verdict.counts)
    if (healed_at := history.last_healed_at()) is not None:
        verifier.run.timeline.append(
            Mark(healed_at, "checker", "recovered", verifier.node.name, duration_s=recovery_s)
        )
    return verdict


def refused_after_effect(load: Workload, fault: Fault, history: History) -> dict[str, Any]:
    """Send on under a fault that ingest must refuse: every batch begun once the fault took
    effect is answered 503. Stops the workload; returns what the clients saw meanwhile."""
    effective = fault.started_at + (fault.effect_s or 0)
    load.progress(more=5)
    load.stop()
    late = [op for op in load.sent if op.invoked_at > effective]
    assert late and all(op.status == 503 for op in late), [op.error for op in late]
    return client_view(history, effective, time.time())


def assert_lost_without_the_standby(scenario: Scenario, verdict: Verdict, passed: str) -> None:
    """The asynchronous-replication meta-tests' check (a failover, a primary's host crash):
    events really were committed and acknowledged while the standby was cut off (the
    scenario's details["during_cut"]), and the harness names the windows that lost them."""
    cut = scenario.details["during_cut"]
    assert cut["acked_after"] > cut["acked_before"] and cut["stored_on_primary"] > 0, cut
    message = scenario.assert_caught(verdict, passed)
    assert any(w.observed is None or w.problem for w in verdict.wrong()), message


def other_aggregator_carries_on(
    scenario: Scenario,
    db: Any,
    load: Workload,
    fault: Fault,
    *,
    ack_wait_s: float,
    progressed: Callable[[dict[str, int], dict[str, int]], bool],
    what: str,
    key: str,
) -> DeadlineExceeded | None:
    """While one aggregator is held mid-transaction by `fault`, wait (ack wait + 15 s) until
    the consumer state shows `progressed(before, now)`; the seconds it took go to
    the scenario's details[key]. Stops the workload. Returns the deadline error instead of
    raising it, so that the scenario measures the recovery before it reports the stall."""
    scenario.details["caught_mid_transaction_attempt"] = fault.notes[
        "caught_mid_transaction_attempt"
    ]
    before = consumer_state(scenario.endpoints)
    try:
        _, took = wait_until(
            lambda: progressed(before, consumer_state(scenario.endpoints)),
            timeout_s=ack_wait_s + 15,
            what=f"{what} (ack wait {ack_wait_s} s)",
            describe=lambda: (
                f"consumer {consumer_state(scenario.endpoints)}; database sessions {sessions(db)}"
            ),
        )
        scenario.details[key] = round(took, 3)
        return None
    except DeadlineExceeded as error:
        return error
    finally:
        load.stop()
        scenario.details["during_fault"] = {
            "consumer_before": before,
            "consumer": consumer_state(scenario.endpoints),
            "database_sessions": sessions(db),
            **client_view(scenario.history, fault.started_at, time.time()),
        }


def writing_transactions(db: Any, application: str = "aggregator", older_than_s: float = 0) -> int:
    """Open transactions of `application` that have written (hold row locks), at least
    `older_than_s` old, on the database the harness reads (pg_stat_activity)."""
    return db.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
        "AND backend_xid IS NOT NULL AND now() - xact_start >= make_interval(secs => %s)",
        (application, older_than_s),
    ).fetchone()[0]


def sessions(db: Any) -> list[str]:
    """The platform's database sessions: application/state/wait event, transaction age."""
    rows = db.execute(
        "SELECT application_name, state, coalesce(wait_event, '-'), backend_xid IS NOT NULL, "
        "round(extract(epoch FROM now() - xact_start)::numeric, 1) FROM pg_stat_activity "
        "WHERE datname = 'qoe' AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
    ).fetchall()
    return [f"{a}/{s}/{w}{' writing' if x else ''} xact {age}s" for a, s, w, x, age in rows]


@contextmanager
def caught_mid_transaction(
    nemesis: Any,
    db: Any,
    service: str,
    then: Callable[[], AbstractContextManager[Fault]] | None = None,
    attempts: int = 16,
) -> Iterator[Fault]:
    """Freeze `service` (an aggregator) at a moment it is inside its batch transaction,
    holding row locks, and yield that pause; or, with `then`, enter the fault `then()` (a hard
    partition, say) while it is frozen, unfreeze it, and yield that fault instead.

    Both aggregators share one database role, so whose transaction is open shows only once
    one is frozen: with slow database answers (a latency toxic, removed once caught) a
    healthy transaction waits ~1 s for each answer, and one left idle for 1.8 s is the
    frozen one's. A miss is unfrozen within ~3.5 s, before the server's 5 s idle-in-
    transaction timeout ends its session (it could not reconnect through the toxic) and well
    inside the ack wait, so it leaves no trace but a short pause, recorded as a fault like
    any other; the next attempt aims again."""
    misses: list[str] = []
    for attempt in range(1, attempts + 1):
        with ExitStack() as held:
            with ExitStack() as aim:
                with nemesis.latency("aggregator-postgres", 1000, stream="downstream"):
                    wait_until(
                        lambda: writing_transactions(db) >= 1,
                        timeout_s=30,
                        what="an aggregator inside a batch transaction",
                        describe=lambda: f"database sessions {sessions(db)}",
                    )
                    freeze = aim.enter_context(nemesis.paused(service))
                    try:
                        wait_until(
                            lambda: idle_writing_transactions(db, idle_for_s=1.8) >= 1,
                            timeout_s=2,
                            what=f"{service}'s transaction left open",
                        )
                    except DeadlineExceeded:
                        misses.append(f"attempt {attempt}: {sessions(db)}")
                        continue  # not inside one: unfreeze and aim again
                if then is None:
                    fault = freeze
                    held.enter_context(aim.pop_all())
                else:
                    fault = held.enter_context(then())
            # `aim` has unfrozen the service unless the freeze is the fault
            fault.notes["caught_mid_transaction_attempt"] = attempt
            yield fault
            return
    raise AssertionError(
        f"could not catch {service} inside its batch transaction in {attempts} attempts; "
        "database sessions after each miss:\n  " + "\n  ".join(misses)
    )


def idle_writing_transactions(db: Any, idle_for_s: float) -> int:
    """Aggregator transactions that have written and then waited `idle_for_s` for the client."""
    return db.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'aggregator' "
        "AND state = 'idle in transaction' AND backend_xid IS NOT NULL "
        "AND now() - state_change >= make_interval(secs => %s)",
        (idle_for_s,),
    ).fetchone()[0]
