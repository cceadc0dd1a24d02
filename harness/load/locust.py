"""Locust as subprocesses (it monkey-patches the standard library, so never in the harness's
process), and the outcome files its workers write, read back as a History."""

from __future__ import annotations

import csv
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import checker
from harness.columnar import ColumnarHistory, OutcomeSource, outcome_files, outcome_rows
from harness.history import Event, History, Operation, Outcome
from harness.load import outcomes, settings
from harness.load.spec import LoadSpec
from harness.polling import wait_until
from harness.stack import ROOT

LOCUSTFILE = ROOT / "scenarios" / "load" / "locustfile.py"
REMOTE_WORKER_WAIT_S = 300  # how long a master waits for workers started by hand elsewhere

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
        self.env = _locust_environment() | settings.environment(
            urls=",".join(urls),
            token=token,
            prefix=prefix,
            out=self.out_dir,
            run_until=self.out_dir / "run-until",
            rate=spec.rate,
            users=self.users,
            duration=spec.duration_s,
            batch=spec.batch_size,
            probes=spec.probes,
            targets=spec.targets,
            degraded=spec.degraded,
            timeout=spec.timeout_s,
            resends=spec.resends,
            seeded_bugs=",".join(spec.seeded_bugs),
        )
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
            str(math.ceil(self.spec.timeout_s) + 2),
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
        # nsenter of the network namespace alone execs the worker (no fork): the pid is the
        # worker's own, and the filesystem is this one (the outcome files land in out_dir).
        # Not `ip netns exec`, which remounts /sys for the namespace.
        enter = ["nsenter", f"--net={self.spec.worker_netns}"] if self.spec.worker_netns else []
        worker = [
            *enter,
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
        target = Path(self.env[settings.BY_NAME["run_until"].env])
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
    env = _locust_environment() | settings.environment(out=out_dir, ship=1, worker_urls=ingest_urls)
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
        invocations: dict[int, outcomes.Invocation] = {}
        completions: dict[int, outcomes.Completion] = {}
        for lineno, row in enumerate(outcome_rows(path), start=1):
            try:
                record = outcomes.decode(row)
            except ValueError as exc:
                raise ValueError(
                    f"{path}: object {lineno}: {exc}; the outcome file is damaged"
                ) from exc
            if isinstance(record, outcomes.Invocation):
                invocations[record.n] = record
            elif isinstance(record, outcomes.Completion):
                completions[record.n] = record
        last = ended_at if ended_at is not None else path.stat().st_mtime
        ops.extend(_operation(inv, completions.get(n), last) for n, inv in invocations.items())
    ops.sort(key=lambda op: op.invoked_at)
    return History(ops)


def _operation(
    inv: outcomes.Invocation, done: outcomes.Completion | None, ended_at: float
) -> Operation:
    events = tuple(Event.from_wire(e) for e in inv.events)
    if done is None:
        outcome, status, error, completed = (
            Outcome.UNKNOWN,
            None,
            outcomes.MISSING_COMPLETION,
            ended_at,
        )
    else:
        outcome, status, error = Outcome(done.outcome), done.status, done.error
        completed = done.completed
    return Operation(
        process=inv.process,
        endpoint=inv.url,
        invoked_at=inv.sent,
        completed_at=completed,
        outcome=outcome,
        events=events,
        status=status,
        error=error,
        intended_at=inv.intended,
    )


@dataclass(frozen=True)
class LoadHistory:
    """A load run's history read back: the operations without their events, the oracle (given
    a window length) and the sends the users never made."""

    history: History
    expected: checker.Expectation | None
    dropped: tuple[outcomes.Dropped, ...]


def read_history(
    sources: Sequence[OutcomeSource],
    in_memory: History | None = None,
    window_seconds: int | None = None,
) -> LoadHistory:
    """A load run's history, as ``History.merge(read_outcomes(...), in_memory)`` orders it,
    without the events of the outcome files' batches (``Operation.events_omitted``), and,
    given a window length, its oracle: both read in bounded memory (harness.columnar)."""
    kept = in_memory.operations() if in_memory is not None else ()
    with ColumnarHistory.read(sources, kept) as store:
        history = store.headers()
        expected = store.expectation(window_seconds) if window_seconds is not None else None
        return LoadHistory(history, expected, store.dropped)


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
