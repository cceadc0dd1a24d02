"""Load runs: locust in its own processes, every batch's outcome merged into a History, SLO gates.

Locust monkey-patches the standard library with gevent, so it never runs inside the harness's
process: ``LocustProcesses`` starts ``locust --headless`` (or a master and N workers, the same
command lines work across machines) on scenarios/load/locustfile.py, with the ingest URLs and the
token in its environment. Each locust worker writes an outcome file (see the locustfile);
``read_history`` reads them in bounded memory (harness.columnar: the operations without their
events, and the oracle), so the checker proves the aggregates exact after a load run like after
any scenario (``read_outcomes`` is the in-memory reader, for small runs and comparisons).
While the load runs, ``FreshnessMonitor`` sends one sentinel event at a time and polls
``qoe_window_aggregates`` until it is visible: the end-to-end freshness lag (event time ->
visible). ``run_load`` ties it together, optionally with
a fault in the middle (chaos under load), and ``evaluate`` gates the measurements on an
``Slo``; profiles: steady, step (raise the rate until an SLO breaks), soak and chaos.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from harness import checker
from harness.columnar import ColumnarHistory, OutcomeSource, outcome_files, outcome_rows
from harness.history import Event, History, Operation, Outcome, Timeline
from harness.nemesis.registry import FAULTS
from harness.polling import wait_until
from harness.stack import ROOT, Endpoints, StackError, StackOptions, new_run_id, open_stack

__all__ = [
    "LOCUSTFILE",
    "Breach",
    "FreshnessMonitor",
    "LoadResult",
    "LoadSpec",
    "LoadStats",
    "LocustProcesses",
    "Slo",
    "StepResult",
    "evaluate",
    "load_slo",
    "percentile",
    "read_history",
    "read_locust_history",
    "read_outcomes",
    "run_load",
    "run_step",
    "stats_of",
]

LOCUSTFILE = ROOT / "scenarios" / "load" / "locustfile.py"
REMOTE_WORKER_WAIT_S = 300  # how long a master waits for workers started by hand elsewhere
DEFAULT_SLO_FILE = ROOT / "scenarios" / "load" / "slo.toml"
SENTINEL_TARGET = "freshness"


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


# --- locust as subprocesses -------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class LocustRun:
    """What the locust processes did: exit codes, their CPU time, where their files are."""

    out_dir: Path
    returncodes: tuple[int, ...]
    cpu_s: float  # user + system CPU of every locust process
    started_at: float
    ended_at: float
    users: int

    @property
    def wall_s(self) -> float:
        return self.ended_at - self.started_at


class LocustProcesses:
    """``locust --headless`` (or a master and ``workers`` workers) for one LoadSpec.

    A context manager: leaving it stops whatever is still running. ``wait`` returns a LocustRun.
    """

    def __init__(
        self,
        spec: LoadSpec,
        urls: Sequence[str],
        token: str,
        prefix: str,
        out_dir: Path,
        *,
        python: str = sys.executable,
    ) -> None:
        if not urls:
            raise ValueError("a load run needs at least one ingest URL, got none")
        self.spec = spec
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.users = spec.user_count()
        self.env = {
            **_locust_environment(),
            "QOE_LOAD_URLS": ",".join(urls),
            "QOE_LOAD_TOKEN": token,
            "QOE_LOAD_PREFIX": prefix,
            "QOE_LOAD_OUT": str(self.out_dir),
            "QOE_LOAD_RUN_UNTIL": str(self.out_dir / "run-until"),
            "QOE_LOAD_RATE": str(spec.rate),
            "QOE_LOAD_USERS": str(self.users),
            "QOE_LOAD_DURATION": str(spec.duration_s),
            "QOE_LOAD_BATCH": str(spec.batch_size),
            "QOE_LOAD_PROBES": str(spec.probes),
            "QOE_LOAD_TARGETS": str(spec.targets),
            "QOE_LOAD_DEGRADED": str(spec.degraded),
            "QOE_LOAD_TIMEOUT": str(spec.timeout_s),
            "QOE_LOAD_RESENDS": str(spec.resends),
        }
        self.host = urls[0]
        self.python = python
        self.procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[Any] = []
        self._rusage: dict[int, float] = {}
        self.started_at = 0.0
        self.until = 0.0

    def commands(self, master_port: int | None = None) -> list[list[str]]:
        """The command lines: [locust] or [master, worker, ...]."""
        base = [self.python, "-m", "locust", "-f", str(LOCUSTFILE), "--loglevel", "WARNING"]
        # Users and duration come from the locustfile's shape (QOE_LOAD_USERS, _DURATION).
        run = [
            "--headless",
            "--host",
            self.host,
            "--stop-timeout",
            str(math.ceil(self.spec.timeout_s) + 1),
            "--csv",
            str(self.out_dir / "locust"),
            "--csv-full-history",
            "--only-summary",
            "--exit-code-on-error",
            "0",
        ]
        if not self.spec.distributed:
            return [base + run]
        assert master_port is not None
        master = [
            *base,
            *run,
            "--master",
            "--master-bind-host",
            self.spec.master_bind,
            "--master-bind-port",
            str(master_port),
            "--expect-workers",
            str(self.spec.workers + self.spec.remote_workers),
            "--expect-workers-max-wait",
            str(REMOTE_WORKER_WAIT_S if self.spec.remote_workers else 60),
        ]
        # Workers on this machine reach a master bound to every interface on the loopback.
        reach = "127.0.0.1" if self.spec.master_bind in ("0.0.0.0", "*") else self.spec.master_bind
        worker = [
            *base,
            "--worker",
            "--master-host",
            reach,
            "--master-port",
            str(master_port),
        ]
        return [master] + [worker] * self.spec.workers

    def start(self) -> LocustProcesses:
        port = None
        if self.spec.distributed:
            port = self.spec.master_port or _free_port()
        self.started_at = time.time()
        for i, command in enumerate(self.commands(port)):
            log = (self.out_dir / f"locust-{i}.log").open("wb")
            self._logs.append(log)
            self.procs.append(
                subprocess.Popen(command, env=self.env, cwd=ROOT, stdout=log, stderr=log)
            )
        return self

    def _reap(self, proc: subprocess.Popen[bytes]) -> bool:
        """Collect an exited process with its CPU time (os.wait4); True once it has exited."""
        if proc.returncode is not None:
            return True
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == 0:
            return False
        proc.returncode = os.waitstatus_to_exitcode(status)
        self._rusage[proc.pid] = usage.ru_utime + usage.ru_stime
        return True

    def running(self) -> bool:
        return not all(self._reap(p) for p in self.procs)

    def run_until(self, at: float) -> None:
        """Keep the load going at least until the epoch time ``at`` (never shortens it): the
        locustfile's shape reads the file each second."""
        self.until = max(self.until, at)
        target = Path(self.env["QOE_LOAD_RUN_UNTIL"])
        partial = target.with_suffix(".partial")
        partial.write_text(f"{self.until}\n")
        partial.replace(target)  # the shape never reads half a number

    def wait(self, timeout_s: float | None = None) -> LocustRun:
        planned = max(self.spec.duration_s, self.until - self.started_at)
        limit = timeout_s if timeout_s is not None else planned + 60
        if self.spec.remote_workers and timeout_s is None:
            limit += REMOTE_WORKER_WAIT_S
        try:
            wait_until(
                lambda: not self.running(),
                timeout_s=limit,
                what="the locust processes to finish",
                interval_s=0.1,
                describe=lambda: self.log_tail(),
            )
        finally:
            self.stop()
        codes = tuple(p.returncode if p.returncode is not None else -9 for p in self.procs)
        return LocustRun(
            out_dir=self.out_dir,
            returncodes=codes,
            cpu_s=sum(self._rusage.values()),
            started_at=self.started_at,
            ended_at=time.time(),
            users=self.users,
        )

    def stop(self) -> None:
        """Terminate what still runs (only our own processes, by pid), then kill."""
        for p in self.procs:
            if not self._reap(p):
                p.terminate()
        try:
            wait_until(lambda: not self.running(), timeout_s=10, what="locust to stop")
        except AssertionError:
            for p in self.procs:
                if not self._reap(p):
                    p.kill()
                    p.wait()
        for log in self._logs:
            log.close()
        self._logs.clear()

    def sending(self) -> bool:
        """Whether some worker has sent its first batch (its outcome file is not empty)."""
        return any(p.stat().st_size > 0 for p in self.out_dir.glob("outcomes-*.jsonl"))

    def log_tail(self, chars: int = 1500) -> str:
        tails = []
        for i in range(len(self.procs)):
            path = self.out_dir / f"locust-{i}.log"
            if path.exists():
                tails.append(f"{path.name}: {path.read_text(errors='replace')[-chars:]}")
        return " | ".join(tails)

    def __enter__(self) -> LocustProcesses:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _locust_environment() -> dict[str, str]:
    """This environment, with the repository importable (the locustfile imports harness)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


def run_worker(
    master: str, out_dir: Path, ingest_urls: str = "", python: str = sys.executable
) -> int:
    """One locust worker for a master elsewhere (``load ... --remote-workers``), in the foreground.

    It takes the run's settings from the master, keeps its outcome file in ``out_dir`` and ships
    it to the master as it grows. ``ingest_urls``: the ingest as this machine reaches it, when
    that differs from the master's URLs. Returns locust's exit status.
    """
    host, _, port = master.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--master must be HOST:PORT (the master's --master-bind), got {master!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **_locust_environment(),
        "QOE_LOAD_OUT": str(out_dir),
        "QOE_LOAD_SHIP": "1",
        "QOE_LOAD_WORKER_URLS": ingest_urls,
    }
    command = [python, "-m", "locust", "-f", str(LOCUSTFILE), "--worker"]
    command += ["--master-host", host, "--master-port", port, "--loglevel", "INFO"]
    print(f"locust worker for the master at {master}; outcome file in {out_dir}", flush=True)
    proc = subprocess.Popen(command, env=env, cwd=ROOT)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        return proc.wait()


def read_outcomes(out_dir: Path, ended_at: float | None = None) -> History:
    """Merge every worker's outcome file into one History, every event a Python object.

    An invocation without a completion (a worker stopped mid-request) is an unknown outcome.
    A truncated last line is skipped (``outcome_rows``). For a whole load run use
    ``read_history``, which holds the events in columns instead.
    """
    ops: list[Operation] = []
    for path in outcome_files(Path(out_dir)):
        invocations: dict[int, dict[str, Any]] = {}
        completions: dict[int, dict[str, Any]] = {}
        for row in outcome_rows(path):
            if "i" in row:
                invocations[int(row["i"])] = row
            elif "c" in row:
                completions[int(row["c"])] = row
        last = ended_at if ended_at is not None else path.stat().st_mtime
        for n, inv in invocations.items():
            done = completions.get(n)
            evs = tuple(Event.from_wire(e) for e in inv["b"]["events"])
            if done is None:
                outcome, status, error, completed = (
                    Outcome.UNKNOWN,
                    None,
                    "no completion recorded (the worker stopped mid-request)",
                    last,
                )
            else:
                outcome = Outcome(done["o"])
                status = None if done.get("s") is None else int(done["s"])
                error, completed = str(done.get("x") or ""), float(done["t"])
            ops.append(
                Operation(
                    process=str(inv["p"]),
                    endpoint=str(inv["u"]),
                    invoked_at=float(inv["t"]),
                    completed_at=completed,
                    outcome=outcome,
                    events=evs,
                    status=status,
                    error=error,
                )
            )
    ops.sort(key=lambda op: op.invoked_at)
    return History(ops)


def read_history(
    sources: Sequence[OutcomeSource],
    in_memory: History | None = None,
    window_seconds: int | None = None,
) -> tuple[History, checker.Expectation | None]:
    """A load run's history, as ``History.merge(read_outcomes(...), in_memory)`` orders it,
    without the events of the outcome files' batches (``Operation.events_omitted``), and,
    given a window length, its oracle: both read in bounded memory (harness.columnar)."""
    kept = in_memory.operations() if in_memory is not None else ()
    with ColumnarHistory.read(sources, kept) as store:
        history = store.headers()
        expected = store.expectation(window_seconds) if window_seconds is not None else None
    return history, expected


def read_locust_history(out_dir: Path) -> list[dict[str, float]]:
    """Locust's per-second stats history (the Aggregated rows of locust_stats_history.csv)."""
    path = Path(out_dir) / "locust_stats_history.csv"
    if not path.exists():
        return []
    rows: list[dict[str, float]] = []
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            if row.get("Name") != "Aggregated":
                continue

            def num(key: str, r: Mapping[str, str] = row) -> float:
                value = r.get(key, "")
                try:
                    return float(value)
                except ValueError:
                    return math.nan

            rows.append(
                {
                    "t": num("Timestamp"),
                    "users": num("User Count"),
                    "rps": num("Requests/s"),
                    "fps": num("Failures/s"),
                    "p50_ms": num("50%"),
                    "p95_ms": num("95%"),
                    "p99_ms": num("99%"),
                }
            )
    return rows


# --- freshness: event time -> visible in qoe_window_aggregates --------------------------------


@dataclass(frozen=True)
class FreshnessSample:
    sent_at: float  # the event's ts
    lag_s: float  # until a poll first saw it in qoe_window_aggregates


class FreshnessMonitor:
    """Measures end-to-end freshness while load runs.

    One sentinel event at a time (probe ``probe_id``, a target of its own per sentinel, ts =
    now) goes through ingest; a second thread polls qoe_window_aggregates for the sentinels'
    targets and records, for each, the time from its ts to the first poll that shows it. Every
    sentinel is recorded in ``history`` like any other operation, so the check covers them.
    """

    def __init__(
        self,
        endpoints: Endpoints,
        probe_id: str,
        *,
        interval_s: float = 0.5,
        poll_s: float = 0.05,
    ) -> None:
        self.endpoints = endpoints
        self.probe_id = probe_id
        self.interval_s = interval_s
        self.poll_s = poll_s
        self.history = History()
        self.samples: list[FreshnessSample] = []
        self._sent: dict[str, float] = {}  # target -> ts of sentinels that may be stored
        self._acked: set[str] = set()
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self._stop_sending = threading.Event()
        self._stop_polling = threading.Event()
        self._threads: list[threading.Thread] = []
        self.errors: list[str] = []

    def start(self) -> FreshnessMonitor:
        for target, name in ((self._send_loop, "fresh-send"), (self._poll_loop, "fresh-poll")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _send_loop(self) -> None:
        from harness.workload import IngestClient

        k = 0
        with IngestClient(
            self.endpoints.ingest_urls,
            self.endpoints.ingest_token,
            self.history,
            process="freshness",
            timeout=5.0,
        ) as client:
            while not self._stop_sending.is_set():
                k += 1
                target = f"{SENTINEL_TARGET}-{k}"
                now = time.time()
                event = Event(
                    event_id=f"{self.probe_id}.{k}",
                    probe_id=self.probe_id,
                    target=target,
                    ts=datetime.fromtimestamp(now, UTC),
                    rtt_ms=20.0,
                    jitter_ms=1.0,
                    loss_pct=0.0,
                    throughput_kbps=50_000.0,
                )
                with self._lock:  # before sending: it may be visible before the 202 arrives
                    self._sent[target] = now
                op = client.send([event])
                with self._lock:
                    if op.outcome is Outcome.FAIL:
                        del self._sent[target]  # definitely not stored
                    elif op.outcome is Outcome.OK:
                        self._acked.add(target)
                self._stop_sending.wait(max(0.0, self.interval_s - (time.time() - now)))

    def _poll_loop(self) -> None:
        import psycopg

        conn = None
        while not self._stop_polling.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(
                        self.endpoints.database_dsn, autocommit=True, connect_timeout=3
                    )
                rows = conn.execute(
                    "SELECT target FROM qoe_window_aggregates WHERE probe_id = %s",
                    (self.probe_id,),
                ).fetchall()
                now = time.time()
                with self._lock:
                    for (target,) in rows:
                        if target not in self._seen and target in self._sent:
                            self._seen.add(target)
                            self.samples.append(
                                FreshnessSample(self._sent[target], now - self._sent[target])
                            )
            except Exception as exc:  # the database may be the fault under test
                self.errors.append(f"{type(exc).__name__}: {exc}")
                if conn is not None:
                    conn.close()
                conn = None
            self._stop_polling.wait(self.poll_s)
        if conn is not None:
            conn.close()

    def visible(self) -> int:
        with self._lock:
            return len(self.samples)

    def stop(self, drain_timeout_s: float = 30.0) -> list[FreshnessSample]:
        """Stop sending; wait (up to the timeout) until every acknowledged sentinel is seen."""
        self._stop_sending.set()
        self._threads[0].join(timeout=10)

        def drained() -> bool:
            with self._lock:
                return self._acked <= self._seen

        with contextlib.suppress(AssertionError):  # the missing ones show up in `missing()`
            wait_until(drained, timeout_s=drain_timeout_s, what="acknowledged sentinels visible")
        self._stop_polling.set()
        self._threads[1].join(timeout=10)
        return self.result()

    def result(self) -> list[FreshnessSample]:
        with self._lock:
            return sorted(self.samples, key=lambda s: s.sent_at)

    def missing(self) -> int:
        """Acknowledged sentinels never seen (lag beyond the drain timeout)."""
        with self._lock:
            return len(self._acked - self._seen)

    def __enter__(self) -> FreshnessMonitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if not self._stop_polling.is_set():
            self.stop(drain_timeout_s=0)


# --- measurements -----------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of the values; None when there are none."""
    xs = sorted(values)
    if not xs:
        return None
    rank = max(1, math.ceil(q / 100 * len(xs)))
    return xs[min(rank, len(xs)) - 1]


@dataclass(frozen=True)
class LoadStats:
    """What one phase of a load run measured (operations invoked within [start, end))."""

    start: float
    end: float
    batches: int
    ok: int
    failed: int
    unknown: int
    events_acked: int
    events_per_s: float
    error_rate: float  # batches not ok / batches
    latency_ms: Mapping[str, float | None]  # p50, p95, p99, max of answered requests
    freshness_s: Mapping[str, float | None]  # p50, p95, max
    freshness_samples: int
    freshness_missing: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def stats_of(
    history: History | Iterable[Operation],
    start: float,
    end: float,
    freshness: Sequence[FreshnessSample] = (),
    *,
    exclude_process: str = "freshness",
    freshness_missing: int = 0,
    overlapping: bool = False,
) -> LoadStats:
    """Stats of the load's operations (not the sentinels) that ran inside [start, end], or,
    with `overlapping`, that were in flight at any moment of it: a batch invoked just before a
    fault and cut by it belongs to the fault window, not to the phase before.

    Throughput counts the events acknowledged inside the window, whenever their batch began:
    batches still in flight at `end` are answered in the next window and counted there, so a
    phase's rate does not read low by the batches its end cut off."""

    def selected(op: Operation) -> bool:
        if overlapping:
            return op.invoked_at < end and op.completed_at >= start
        return start <= op.invoked_at and op.completed_at <= end

    def acked_inside(op: Operation) -> bool:
        if overlapping:
            return selected(op)
        return start <= op.completed_at <= end

    load = [
        op
        for op in (history.operations() if isinstance(history, History) else history)
        if op.process != exclude_process
    ]
    ops = [op for op in load if selected(op)]
    ok = [op for op in ops if op.outcome is Outcome.OK]
    answered = [(op.completed_at - op.invoked_at) * 1000 for op in ops if op.status is not None]
    fresh = [s.lag_s for s in freshness if start <= s.sent_at < end]
    acked = sum(op.batch_size for op in load if op.outcome is Outcome.OK and acked_inside(op))
    span = max(end - start, 1e-9)
    return LoadStats(
        start=start,
        end=end,
        batches=len(ops),
        ok=len(ok),
        failed=sum(op.outcome is Outcome.FAIL for op in ops),
        unknown=sum(op.outcome is Outcome.UNKNOWN for op in ops),
        events_acked=acked,
        events_per_s=acked / span,
        error_rate=(len(ops) - len(ok)) / len(ops) if ops else 0.0,
        latency_ms={
            "p50": percentile(answered, 50),
            "p95": percentile(answered, 95),
            "p99": percentile(answered, 99),
            "max": max(answered, default=None),
        },
        freshness_s={
            "p50": percentile(fresh, 50),
            "p95": percentile(fresh, 95),
            "max": max(fresh, default=None),
        },
        freshness_samples=len(fresh),
        freshness_missing=freshness_missing,
    )


# --- SLO gates --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slo:
    """Thresholds a load run must meet; None switches a threshold off."""

    max_error_rate: float | None = 0.01
    max_p95_ms: float | None = None
    max_p99_ms: float | None = None
    min_events_per_s: float | None = None
    min_rate_fraction: float | None = 0.9  # events/s >= fraction x offered rate
    max_freshness_p95_s: float | None = None
    max_convergence_s: float | None = None
    recovery_grace_s: float = 5.0  # chaos: the after-fault phase starts this long after healing
    # Chaos: the load goes on at least this long after the grace, however late the fault
    # healed (a killed service's restart counts), so the after-recovery phase is measured.
    after_recovery_s: float = 10.0
    # The first seconds are not gated: every user opens its connections at once (in CI the
    # batches of the first 0.6 s took 0.4-0.9 s, none after).
    warmup_s: float = 0.0

    def overridden(self, **values: float | None) -> Slo:
        """A copy with the given thresholds replaced (None values are ignored)."""
        return replace(self, **{k: v for k, v in values.items() if v is not None})


_SLO_KEYS = frozenset(f.name for f in fields(Slo))


def load_slo(path: Path | None = None, profile: str = "steady") -> Slo:
    """The SLO of a profile from a TOML file: [default] overlaid with [<profile>].

    Profiles may nest, e.g. ``chaos.fault`` (chaos under load, during the fault window):
    [default], then [chaos], then [chaos.fault]. Unknown keys are an error.
    """
    path = path or DEFAULT_SLO_FILE
    try:
        doc = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"cannot read the SLO file {path}: {exc}") from exc
    merged: dict[str, Any] = {}
    sections = [doc.get("default", {})]
    node: Mapping[str, Any] = doc
    for part in profile.split("."):
        node = node.get(part, {}) if isinstance(node, Mapping) else {}
        sections.append(node)
    for section in sections:
        for key, value in section.items():
            if isinstance(value, Mapping):
                continue  # a nested profile, not a threshold
            if key not in _SLO_KEYS:
                raise ValueError(
                    f"{path}: unknown SLO key {key!r} in a [{profile}] section; "
                    f"known keys are {sorted(_SLO_KEYS)}"
                )
            merged[key] = value
    return Slo(**merged)


@dataclass(frozen=True)
class Breach:
    """One SLO threshold a phase did not meet."""

    threshold: str
    limit: float
    measured: float | None
    phase: str = "run"
    unit: str = ""

    def message(self) -> str:
        seen = "nothing measured" if self.measured is None else f"{self.measured:.6g}{self.unit}"
        op = ">=" if self.threshold.startswith("min_") else "<="
        return (
            f"SLO breached ({self.phase}): {self.threshold} measured {seen}, "
            f"limit {op} {self.limit:g}{self.unit}"
        )


def evaluate(
    slo: Slo,
    stats: LoadStats,
    *,
    offered_rate: float,
    convergence_s: float | None = None,
    phase: str = "run",
) -> list[Breach]:
    """Every threshold of ``slo`` that ``stats`` breaks (empty when all hold)."""
    out: list[Breach] = []

    def above(name: str, limit: float | None, value: float | None, unit: str = "") -> None:
        if limit is not None and (value is None or value > limit):
            out.append(Breach(name, limit, value, phase, unit))

    def below(name: str, limit: float | None, value: float | None, unit: str = "") -> None:
        if limit is not None and (value is None or value < limit):
            out.append(Breach(name, limit, value, phase, unit))

    above("max_error_rate", slo.max_error_rate, stats.error_rate if stats.batches else None)
    above("max_p95_ms", slo.max_p95_ms, stats.latency_ms.get("p95"), " ms")
    above("max_p99_ms", slo.max_p99_ms, stats.latency_ms.get("p99"), " ms")
    below("min_events_per_s", slo.min_events_per_s, stats.events_per_s, " events/s")
    if slo.min_rate_fraction is not None and offered_rate > 0:
        below(
            "min_events_per_s",
            slo.min_rate_fraction * offered_rate,
            stats.events_per_s,
            f" events/s ({slo.min_rate_fraction:g} x offered {offered_rate:g})",
        )
    if slo.max_freshness_p95_s is not None:
        p95 = stats.freshness_s.get("p95")
        if stats.freshness_missing:
            p95 = math.inf  # an acknowledged sentinel that never showed up
        above("max_freshness_p95_s", slo.max_freshness_p95_s, p95, " s")
    if convergence_s is not None or slo.max_convergence_s is None:
        above("max_convergence_s", slo.max_convergence_s, convergence_s, " s")
    else:
        out.append(Breach("max_convergence_s", slo.max_convergence_s, None, phase, " s"))
    return out


# --- a load run -------------------------------------------------------------------------------


Fault = Callable[[], AbstractContextManager[Any]]


@dataclass
class LoadResult:
    """Everything one load run produced: stats per phase, breaches, the exactly-once verdict."""

    name: str
    spec: LoadSpec
    out_dir: Path
    prefix: str
    probe_ids: list[str]
    locust: LocustRun
    history: History
    freshness: list[FreshnessSample]
    phases: dict[str, LoadStats]
    breaches: list[Breach] = field(default_factory=list)
    verdict: checker.Verdict | None = None
    fault: Mapping[str, Any] | None = None
    locust_history: list[dict[str, float]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.breaches and (self.verdict is None or self.verdict.valid)

    @property
    def events_acknowledged(self) -> int:
        return sum(op.batch_size for op in self.history if op.outcome is Outcome.OK)

    def events_per_cpu_s(self) -> float | None:
        """The load generator's cost: events acknowledged per CPU-second of locust."""
        cpu = self.locust.cpu_s
        return self.events_acknowledged / cpu if cpu > 0 else None

    def summary(self) -> str:
        whole = self.phases["run"]
        lat, fresh = whole.latency_ms, whole.freshness_s
        lines = [
            f"load {self.name}: offered {self.spec.rate:g} events/s for {self.spec.duration_s:g}s "
            f"({self.locust.users} users, batch {self.spec.batch_size}); acknowledged "
            f"{whole.events_per_s:.0f} events/s, error rate {whole.error_rate:.2%}, latency p50/"
            f"p95/p99 {_ms(lat['p50'])}/{_ms(lat['p95'])}/{_ms(lat['p99'])} ms, freshness p50/p95 "
            f"{_s(fresh['p50'])}/{_s(fresh['p95'])} s ({whole.freshness_samples} samples)",
        ]
        if self.verdict is not None:
            lines.append(f"exactly-once: {self.verdict.summary()}")
        lines.extend(b.message() for b in self.breaches)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "spec": asdict(self.spec),
            "prefix": self.prefix,
            "ok": self.ok,
            "users": self.locust.users,
            "locust_cpu_s": self.locust.cpu_s,
            "locust_returncodes": list(self.locust.returncodes),
            "events_per_locust_cpu_s": self.events_per_cpu_s(),
            "phases": {k: v.to_dict() for k, v in self.phases.items()},
            "breaches": [asdict(b) | {"message": b.message()} for b in self.breaches],
            "verdict": self.verdict.to_dict() if self.verdict else None,
            "fault": dict(self.fault) if self.fault else None,
            "freshness": [asdict(s) for s in self.freshness],
            "locust_history": self.locust_history,
        }

    def save(self) -> Path:
        path = self.out_dir / "load.json"
        path.write_text(json.dumps(self.to_dict(), indent=1, default=str, allow_nan=True))
        return path


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def new_prefix() -> str:
    """A load-run prefix: probe ids and event ids of this run start with it."""
    return f"L{time.strftime('%H%M%S')}{secrets.token_hex(3)}"


def run_load(
    endpoints: Endpoints,
    spec: LoadSpec,
    out_dir: Path,
    *,
    name: str = "steady",
    prefix: str | None = None,
    sentinel_probe: str | None = None,
    slo: Slo | None = None,
    fault_slo: Slo | None = None,
    fault: Fault | None = None,
    fault_name: str = "",
    fault_at_s: float = 0.0,
    fault_for_s: float = 0.0,
    check: bool = True,
    rules: checker.Rules | None = None,
    convergence_timeout_s: float = 60.0,
    timeline: Timeline | None = None,
    log: Callable[[str], None] | None = None,
) -> LoadResult:
    """Run locust for ``spec`` with the freshness monitor; optionally a fault in the middle.

    With a fault the run has three phases: before (from the start to the fault), fault (the
    fault window plus ``recovery_grace_s``, gated by the relaxed ``fault_slo``) and after (the
    rest, gated by ``slo`` again). Then, if ``check``, the exactly-once check over the merged
    history (locust workers and sentinels), with its convergence time gated too.
    """
    slo = slo or Slo()
    prefix = prefix or new_prefix()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    say = log or (
        lambda message: print(
            f"[load {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True
        )
    )
    sentinel_probe = sentinel_probe or f"{prefix}-fresh"
    fault_info: dict[str, Any] | None = None
    monitor = FreshnessMonitor(endpoints, sentinel_probe)
    say(
        f"{name}: {spec.rate:g} events/s for {spec.duration_s:g}s, prefix {prefix}, "
        f"files in {out_dir}"
    )
    with (
        monitor,
        LocustProcesses(
            spec, endpoints.ingest_urls, endpoints.ingest_token, prefix, out_dir
        ) as locust,
    ):
        if timeline is not None:
            timeline.mark("workload", f"load {name} start", f"{spec.rate:g} events/s")
        if fault is not None:
            fault_info = _inject(locust, fault, fault_name, fault_at_s, fault_for_s, say)
            locust.run_until(fault_info["end"] + slo.recovery_grace_s + slo.after_recovery_s)
        run = locust.wait()
        fresh = monitor.stop(drain_timeout_s=convergence_timeout_s / 2)
        missing = monitor.missing()
    if any(code != 0 for code in run.returncodes):
        raise RuntimeError(
            f"locust exited with {run.returncodes} (expected 0); its log: {locust.log_tail()}"
        )
    history, expected = read_history(
        [OutcomeSource(out_dir, run.ended_at)],
        monitor.history,
        endpoints.window_seconds if check else None,
    )
    if timeline is not None:
        timeline.mark(
            "workload",
            f"load {name}",
            f"{len(history)} batches",
            duration_s=run.ended_at - run.started_at,
            at=run.started_at,
        )
    # The load's own span: locust spends a while importing before its first batch.
    load_ops = [op for op in history.operations() if op.process != "freshness"]
    start = min((op.invoked_at for op in load_ops), default=run.started_at)
    end = max((op.completed_at for op in load_ops), default=run.ended_at)
    gated = start + slo.warmup_s
    phases = {"run": stats_of(history, gated, end, fresh, freshness_missing=missing)}
    if fault_info is not None:
        grace_end = fault_info["end"] + slo.recovery_grace_s
        phases["before"] = stats_of(history, gated, fault_info["start"], fresh)
        phases["fault"] = stats_of(history, fault_info["start"], grace_end, fresh, overlapping=True)
        phases["after"] = stats_of(history, grace_end, end, fresh, freshness_missing=missing)
    probe_ids = [*spec.probe_ids(prefix), sentinel_probe]
    verdict = None
    if expected is not None:
        verdict = verify(
            endpoints, expected, history.last_ok_at(), probe_ids, rules, convergence_timeout_s
        )
        say(verdict.summary().splitlines()[0])
    convergence = verdict.convergence_s if verdict else None
    breaches: list[Breach] = []
    if fault_info is None:
        breaches += evaluate(slo, phases["run"], offered_rate=spec.rate, convergence_s=convergence)
    else:
        no_convergence = replace(slo, max_convergence_s=None)
        relaxed = replace(
            fault_slo or Slo(max_error_rate=None, min_rate_fraction=None), max_convergence_s=None
        )
        breaches += evaluate(
            no_convergence, phases["before"], offered_rate=spec.rate, phase="before fault"
        )
        breaches += evaluate(relaxed, phases["fault"], offered_rate=spec.rate, phase="fault window")
        breaches += evaluate(
            slo,
            phases["after"],
            offered_rate=spec.rate,
            convergence_s=convergence,
            phase="after recovery",
        )
    result = LoadResult(
        name=name,
        spec=spec,
        out_dir=out_dir,
        prefix=prefix,
        probe_ids=probe_ids,
        locust=run,
        history=history,
        freshness=fresh,
        phases=phases,
        breaches=breaches,
        verdict=verdict,
        fault=fault_info,
        locust_history=read_locust_history(out_dir),
    )
    result.save()
    history.save(out_dir / "history.jsonl")
    return result


def _inject(
    locust: LocustProcesses,
    fault: Fault,
    fault_name: str,
    at_s: float,
    for_s: float,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Wait until ``at_s`` into the load, hold the fault for ``for_s``, heal; return its window."""
    wait_until(
        lambda: locust.sending() or not locust.running(),
        timeout_s=60 + (REMOTE_WORKER_WAIT_S if locust.spec.remote_workers else 0),
        what="the first batch of the load",
        describe=locust.log_tail,
    )
    begin = time.time()
    wait_until(
        lambda: time.time() >= begin + at_s or not locust.running(),
        timeout_s=at_s + 30,
        what=f"{at_s:g}s of load before the fault",
        interval_s=0.05,
    )
    started = time.time()
    say(f"fault {fault_name or 'fault'} for {for_s:g}s")
    with fault():
        wait_until(
            lambda: time.time() >= started + for_s,
            timeout_s=for_s + 60,
            what=f"the fault window of {for_s:g}s",
            interval_s=0.05,
        )
    ended = time.time()
    say(f"fault {fault_name or 'fault'} healed after {ended - started:.1f}s")
    return {"name": fault_name, "start": started, "end": ended}


def verify(
    endpoints: Endpoints,
    expected: checker.Expectation,
    last_ok_at: float | None,
    probe_ids: Sequence[str],
    rules: checker.Rules | None = None,
    timeout_s: float = 60.0,
) -> checker.Verdict:
    """The exactly-once check of a load run: poll the views (streamed: a long run has many
    windows) until they equal the oracle; convergence is timed from the last acknowledgement."""
    return checker.converge_on_database(
        expected,
        last_ok_at or time.time(),
        endpoints.database_dsn,
        probe_ids,
        rules or checker.Rules(),
        timeout_s,
        interval_s=0.2,
        read=checker.stream_observed,
    )


# --- step: raise the rate until an SLO breaks -------------------------------------------------


@dataclass
class StepResult:
    """The stages of a step run and the highest offered rate that held every SLO."""

    stages: list[LoadResult]
    held_rate: float | None  # highest offered rate whose stage met the SLO
    held_events_per_s: float | None  # what that stage actually sustained
    verdict: checker.Verdict | None

    @property
    def ok(self) -> bool:
        return self.verdict is None or self.verdict.valid

    def to_dict(self) -> dict[str, Any]:
        return {
            "held_rate": self.held_rate,
            "held_events_per_s": self.held_events_per_s,
            "verdict": self.verdict.to_dict() if self.verdict else None,
            "stages": [stage_summary(s) for s in self.stages],
        }


def stage_summary(stage: LoadResult) -> dict[str, Any]:
    """One stage of a rate search: offered rate, whether it held, and what it measured."""
    return {
        "rate": stage.spec.rate,
        "held": not stage.breaches,
        "breaches": [b.message() for b in stage.breaches],
        "run": stage.phases["run"].to_dict(),
        "users": stage.locust.users,
        "locust_cpu_s": stage.locust.cpu_s,
        "events_per_locust_cpu_s": stage.events_per_cpu_s(),
    }


def run_step(
    endpoints: Endpoints,
    base: LoadSpec,
    rates: Sequence[float],
    out_dir: Path,
    *,
    slo: Slo,
    prefix: str | None = None,
    check: bool = True,
    rules: checker.Rules | None = None,
    timeline: Timeline | None = None,
    log: Callable[[str], None] | None = None,
) -> StepResult:
    """One stage per rate (``base`` with that rate), stopping at the first stage that breaks
    an SLO; then one exactly-once check over every stage's history."""
    prefix = prefix or new_prefix()
    stages: list[LoadResult] = []
    held: LoadResult | None = None
    for i, rate in enumerate(rates):
        spec = replace(base, rate=rate)
        stage = run_load(
            endpoints,
            spec,
            Path(out_dir) / f"stage-{rate:g}",
            name=f"step {rate:g}",
            prefix=prefix,
            sentinel_probe=f"{prefix}-f{i}",
            slo=replace(slo, max_convergence_s=None),
            check=False,
            timeline=timeline,
            log=log,
        )
        stages.append(stage)
        if stage.breaches:
            break
        held = stage
    verdict = None
    if check:
        # The stages' histories hold the sentinels' events; the batches' are in their files.
        sentinels = History([op for s in stages for op in s.history if op.events])
        sources = [OutcomeSource(s.out_dir, s.locust.ended_at) for s in stages]
        merged, expected = read_history(sources, sentinels, endpoints.window_seconds)
        assert expected is not None
        probe_ids = sorted({p for s in stages for p in s.probe_ids})
        verdict = verify(endpoints, expected, merged.last_ok_at(), probe_ids, rules)
    return StepResult(
        stages=stages,
        held_rate=held.spec.rate if held else None,
        held_events_per_s=held.phases["run"].events_per_s if held else None,
        verdict=verdict,
    )


# Load runs measure the platform, not Docker: on a small machine 1 s healthchecks (one
# `docker exec` per container per second) take most of a core and set the latency tail.
LOAD_HEALTH_INTERVAL_S = 10

# --- `python -m harness load PROFILE` ---------------------------------------------------------


def step_rates(start: float, factor: float, maximum: float) -> list[float]:
    """start, start*factor, ... up to maximum (rounded to 100 events/s)."""
    if start <= 0 or factor <= 1:
        raise ValueError(f"step needs --rate > 0 and --step-factor > 1, got {start} and {factor}")
    rates: list[float] = []
    rate = start
    while rate <= maximum * 1.0001:
        rates.append(float(round(rate / 100) * 100 or rate))
        rate *= factor
    return rates


def command(args: Any, options: StackOptions) -> int:
    """The `load` subcommand: bring up (or attach to) the stack `options` describe, run the
    profile, gate, report.

    Exit status 0 when every SLO held and the exactly-once check passed, 1 otherwise (each
    breach is printed with its threshold, limit and measured value), 2 for usage errors.
    """
    from harness.report import RunReport

    profile = args.profile
    if profile == "worker":
        if not args.master:
            print("load worker needs --master HOST:PORT (the master's address)", file=sys.stderr)
            return 2
        out = args.out or Path(args.report_dir) / f"worker-{time.strftime('%Y%m%d-%H%M%S')}"
        try:
            return run_worker(args.master, out, args.ingest or "")
        except ValueError as exc:
            print(exc, file=sys.stderr)
            return 2
    slo = load_slo(args.slo, "chaos" if profile == "chaos" else profile).overridden(
        max_error_rate=args.max_error_rate,
        max_p95_ms=args.max_p95_ms,
        max_p99_ms=args.max_p99_ms,
        min_events_per_s=args.min_events_per_s,
        max_freshness_p95_s=args.max_freshness_p95_s,
        max_convergence_s=args.max_convergence_s,
    )
    fault_slo = load_slo(args.slo, "chaos.fault") if profile == "chaos" else None
    if profile == "chaos" and args.fault not in FAULTS:
        print(f"unknown fault {args.fault!r}; faults are {', '.join(FAULTS)}", file=sys.stderr)
        return 2
    duration = args.duration if args.duration is not None else (600 if profile == "soak" else 30)
    spec = LoadSpec(
        rate=args.rate,
        duration_s=duration,
        users=args.users,
        batch_size=args.batch,
        probes=args.probes,
        targets=args.targets,
        degraded=args.degraded,
        workers=args.workers,
        remote_workers=args.remote_workers,
        master_bind=args.master_bind or ("0.0.0.0" if args.remote_workers else "127.0.0.1"),
        master_port=args.master_port or (5557 if args.remote_workers else 0),
    )
    if spec.remote_workers:
        print(
            f"the master waits up to {REMOTE_WORKER_WAIT_S} s for {spec.remote_workers} remote "
            f"worker(s): on each machine run `python -m harness load worker --master "
            f"<this host>:{spec.master_port}` (add --ingest URL when it reaches the ingest at "
            "another address than this machine does)",
            flush=True,
        )
    # The run's id names its report folder and, unless it uses the kept stack, its stack.
    run_id = new_run_id() if options.keep else options.run_id
    run_dir = Path(args.report_dir) / run_id
    out_dir = run_dir / "load"
    timeline = Timeline()
    faults = History()  # the nemesis's operations (the load's own are in its outcome files)
    try:
        stack = open_stack(options)
    except StackError as exc:
        print(exc, file=sys.stderr)
        return 2
    report = RunReport(
        run_dir,
        run_id,
        seed=None,
        stack_info={"stack": stack.name, "stream_replicas": options.settings.stream_replicas},
        command="python -m harness " + " ".join(sys.argv[1:]),
    )

    started = time.time()
    ok = False
    verdict: checker.Verdict | None = None
    details: dict[str, Any] = {}
    text = ""
    try:
        endpoints = stack.up()
        if profile == "step":
            rates = step_rates(args.rate, args.step_factor, args.max_rate)
            step = run_step(endpoints, spec, rates, out_dir, slo=slo, timeline=timeline)
            verdict = step.verdict
            details = {"step": step.to_dict()}
            (out_dir / "step.json").write_text(json.dumps(details, indent=1, default=str))
            held = "none" if step.held_rate is None else f"{step.held_rate:g} offered"
            sustained = step.held_events_per_s
            text = "\n".join(
                [
                    *(stage.summary() for stage in step.stages),
                    f"step: highest rate that held every SLO: {held}"
                    + (f" ({sustained:.0f} events/s acknowledged)" if sustained else ""),
                    step.verdict.summary() if step.verdict else "",
                ]
            )
            print(text)
            ok = step.ok and step.held_rate is not None
        else:
            fault = None
            if profile == "chaos":
                from harness.nemesis import Nemesis

                named = FAULTS[args.fault]
                if missing := named.missing(stack):
                    print(
                        f"chaos under load with {named.name} needs {', '.join(missing)}, "
                        f"which {stack.name} lacks",
                        file=sys.stderr,
                    )
                    return 2
                nemesis = Nemesis(stack, endpoints, faults)
                fault = lambda: named.start(nemesis)  # noqa: E731
            result = run_load(
                endpoints,
                spec,
                out_dir,
                name=profile,
                slo=slo,
                fault_slo=fault_slo,
                fault=fault,
                fault_name=args.fault if fault else "",
                fault_at_s=args.fault_at if args.fault_at is not None else duration / 3,
                fault_for_s=args.fault_for,
                timeline=timeline,
            )
            verdict = result.verdict
            details = {
                "load": {k: v for k, v in result.to_dict().items() if k != "freshness"},
                "faults": [f.to_dict() for f in faults.faults()],
            }
            text = result.summary()
            print(text)
            ok = result.ok
    except KeyboardInterrupt:
        print("interrupted: tearing the stack down", file=sys.stderr)
        return 130
    except (RuntimeError, ValueError) as exc:  # locust failed, or its outcomes are incomplete
        text = f"load {profile} could not be checked: {exc}"
        print(text, file=sys.stderr)
        return 1
    finally:
        stack.down()
        report.add_scenario(
            nodeid=f"load {profile}",
            outcome="passed" if ok else "failed",
            duration_s=time.time() - started,
            verdict=verdict.to_dict() if verdict else None,
            details={"longrepr": "" if ok else text, **details},
        )
        report.add_timeline(timeline)
        page = report.write()
        print(f"load report: {page} (locust CSV and outcome files in {out_dir})")
    if verdict is not None and not verdict.valid:
        print("FAILED: the aggregates are not exactly what the acknowledged events imply")
    print("PASSED" if ok else "FAILED")
    return 0 if ok else 1
