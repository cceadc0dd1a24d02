"""Locust users that behave like QoE probes, on an open model, and record the outcome of every
batch they send.

Run by the harness (harness/load/locust.py) in its own process(es), never inside pytest: locust
monkey-patches the standard library with gevent.

Settings: every QOE_LOAD_* setting, its default and what it means is in harness.load.settings
(here they are locust options ``--qoe-*`` that default to those environment variables, which
locust forwards from the master to every worker); the outcome lines are harness.load.outcomes.
Both are standard library only: this file must not import the harness's heavier parts.

Open model: each user has a schedule of intended send times, one per period (users x batch /
offered rate), from a random phase of the period that it keeps. Probes are not in step, and
users in step turn an average rate into bursts. Constant spacing rather than Poisson arrivals:
the random phases already spread the users, the offered rate over any second is the rate asked
for, and what a stall does to the response times follows from the run's shape (the stall test
in scenarios/load/test_load.py derives its bound from it). The schedule never waits for an
answer: the user's scheduler spawns a greenlet per send into a pool of as many as its rate
needs in flight within the timeout (``in_flight_bound``), so a slow answer does not delay the
next send. When every one is still busy the send waits for one and goes out late; its outcome
line says when it was meant to go ("d") and when it went ("t"), so the lateness is measured,
not hidden. Sends the schedule held when the load stopped but that never went are counted in a
dropped line. A resend takes the schedule's next send instead of a fresh batch: an unknown
batch is sent again with the same ids (as a probe would), up to QOE_LOAD_RESENDS times, once
its attempt has ended (two attempts at the same ids are never in flight together), and the
offered request rate stays the schedule's.

QOE_LOAD_RATE=0 has no schedule: each user sends its next batch when the last is answered.
The seeded bug ``closed_model`` (QOE_LOAD_SEEDED_BUGS) brings back the closed model this file
had before the open one, for the meta-test that shows the stall test fails on it.

A shipped file (a worker on another machine, QOE_LOAD_SHIP=1) arrives at the master in chunks
of whole lines, at least once a second; the master keeps beside it
outcomes-<worker>.shipped.json, which says where it came from and whether its last chunk came.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import secrets
import socket
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import gevent
from gevent.event import Event
from gevent.pool import Pool
from locust import FastHttpUser, LoadTestShape, constant, events, task
from locust.runners import MasterRunner, WorkerRunner

from harness.load import outcomes
from harness.load import settings as table
from harness.workload import classify_status

WORKER = f"w{os.getpid()}{secrets.token_hex(2)}"


def _own(name: str) -> str:
    """One of this process's own settings (never forwarded by locust)."""
    return os.environ.get(table.BY_NAME[name].env, "").strip() or table.default(name)


OUT_DIR = _own("out")
SHIP = _own("ship") == "1"
WORKER_URLS = _own("worker_urls")
RUN_UNTIL = _own("run_until")
SHIP_INTERVAL_S = 1.0
SHIP_MESSAGE = "qoe_outcomes"

# Value ranges (rtt_ms, jitter_ms, loss_pct, throughput_kbps) as in harness.workload: a degraded
# link trips high_latency, high_jitter and low_throughput (CONTRACT.md rules).
HEALTHY = ((5.0, 80.0), (0.1, 8.0), (0.0, 0.5), (5_000.0, 100_000.0))
DEGRADED_RANGES = ((160.0, 600.0), (31.0, 120.0), (0.0, 1.5), (50.0, 950.0))


@events.init_command_line_parser.add_listener
def _add_options(parser: Any) -> None:
    for s in table.RUN:
        parser.add_argument(
            f"--qoe-{s.name.replace('_', '-')}",
            env_var=s.env,
            default=s.default,
            include_in_web_ui=False,
            help=s.meaning,
        )


@dataclass(frozen=True)
class Settings:
    """The run's settings, as the master has them (a worker gets them with its first spawn)."""

    urls: tuple[str, ...]
    token: str
    prefix: str
    rate: float
    users: int
    duration: float
    batch: int
    probes: int
    targets: int
    degraded: float
    timeout: float
    resends: int
    seeded_bugs: frozenset[str]

    @classmethod
    def of(cls, options: Any) -> Settings:
        def opt(name: str) -> str:  # an empty value (QOE_LOAD_BATCH="") means the default
            return str(getattr(options, f"qoe_{name}", "") or "").strip() or table.default(name)

        urls = WORKER_URLS or opt("urls")
        return cls(
            urls=tuple(u.rstrip("/") + "/v1/events" for u in urls.split(",") if u.strip()),
            token=opt("token"),
            prefix=opt("prefix"),
            rate=float(opt("rate")),
            users=max(1, int(opt("users"))),
            duration=float(opt("duration")),
            batch=max(1, int(opt("batch"))),
            probes=max(1, int(opt("probes"))),
            targets=max(1, int(opt("targets"))),
            degraded=float(opt("degraded")),
            timeout=float(opt("timeout")),
            resends=int(opt("resends")),
            seeded_bugs=table.seeded_bugs(str(getattr(options, "qoe_seeded_bugs", "") or "")),
        )

    @property
    def period(self) -> float:
        """Seconds between one user's intended sends; 0: no schedule."""
        return self.users * self.batch / self.rate if self.rate > 0 else 0.0

    @property
    def closed(self) -> bool:
        """Whether users send a batch at a time, the next after the answer."""
        return self.period == 0 or "closed_model" in self.seeded_bugs

    def in_flight_bound(self) -> int:
        """Sends one user may have in flight: what its rate puts in flight within the timeout,
        plus one for the send going out as another times out."""
        if self.closed:
            return 1
        return math.ceil(self.timeout / self.period) + 1

    def pair_profiles(self) -> dict[tuple[str, str], tuple[tuple[float, float], ...]]:
        """Every worker derives the same (probe, target) -> profile map from the prefix."""
        rng = random.Random(self.prefix)
        pairs = [
            (f"{self.prefix}-p{p}", f"t{t}.example.net")
            for p in range(self.probes)
            for t in range(self.targets)
        ]
        degraded = set(rng.sample(range(len(pairs)), round(self.degraded * len(pairs))))
        return {pair: DEGRADED_RANGES if i in degraded else HEALTHY for i, pair in enumerate(pairs)}


SETTINGS: Settings | None = None
TAILS: list[str] = []  # this process's payload pool (_tails), made once at test start


def settings() -> Settings:
    assert SETTINGS is not None, "the test has not started: settings come with it"
    return SETTINGS


class OutcomeLog:
    """This worker's outcome file: one invocation and one completion line per request."""

    def __init__(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, f"outcomes-{WORKER}.jsonl")
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed on quit
        self._next = 0

    def _write(self, line: str) -> None:
        self._file.write(line)
        self._file.flush()

    def invoke(self, intended: float, url: str, process: str, body: str) -> int:
        self._next += 1
        self._write(outcomes.invocation_line(self._next, intended, time.time(), url, process, body))
        return self._next

    def complete(self, n: int, outcome: str, status: int | None, error: str = "") -> None:
        self._write(outcomes.completion_line(n, time.time(), outcome, status, error))

    def dropped(self, count: int, first_intended: float, process: str) -> None:
        self._write(outcomes.dropped_line(count, first_intended, time.time(), process))

    def close(self) -> None:
        self._file.close()


class Shipper:
    """Sends a worker's outcome file to the master, in whole lines, as it grows."""

    def __init__(self, runner: WorkerRunner, path: str) -> None:
        self.runner = runner
        self.path = path
        self.offset = 0
        self.origin = f"{socket.gethostname()}:{os.getpid()}"
        self.loop: gevent.Greenlet | None = None

    def start(self) -> None:
        self.send(end=False)  # announces this worker, so a silent death is noticed
        self.loop = gevent.spawn(self._every_interval)

    def _every_interval(self) -> None:
        while True:
            gevent.sleep(SHIP_INTERVAL_S)
            self.send(end=False)

    def send(self, end: bool) -> None:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            tail = f.read()
        whole = tail if end else tail[: tail.rfind(b"\n") + 1]
        self.offset += len(whole)
        lines = whole.decode("utf-8")
        data = {"worker": WORKER, "origin": self.origin, "lines": lines, "end": end}
        self.runner.send_message(SHIP_MESSAGE, data)

    def finish(self) -> None:
        if self.loop is not None:
            self.loop.kill(block=True)
        self.send(end=True)


def receive_shipped(environment: Any, msg: Any, **_kwargs: Any) -> None:
    """On the master: append a worker's lines to its outcome file in QOE_LOAD_OUT."""
    data = msg.data
    worker = str(data["worker"])
    if not worker.isalnum():
        raise ValueError(f"a worker name is letters and digits, got {worker!r}")
    os.makedirs(OUT_DIR, exist_ok=True)
    with open(os.path.join(OUT_DIR, f"outcomes-{worker}.jsonl"), "a", encoding="utf-8") as f:
        f.write(data["lines"])
    marker = {"origin": data["origin"], "complete": bool(data["end"]), "at": time.time()}
    with open(os.path.join(OUT_DIR, f"outcomes-{worker}.shipped.json"), "w") as f:
        json.dump(marker, f)


LOG: OutcomeLog | None = None
SHIPPER: Shipper | None = None
STOPPING = Event()  # set when the test stops: no send after it
STOPPED_AT = 0.0  # when it was set (users wake to it later: 0.15-0.3 s on a busy machine)


@events.init.add_listener
def _on_init(environment: Any, **_kwargs: Any) -> None:
    global LOG
    if isinstance(environment.runner, MasterRunner):
        # The master sends nothing; it receives what remote workers ship.
        environment.runner.register_message(SHIP_MESSAGE, receive_shipped)
        return
    LOG = OutcomeLog(OUT_DIR)


@events.test_start.add_listener
def _on_test_start(environment: Any, **_kwargs: Any) -> None:
    global SETTINGS, SHIPPER
    SETTINGS = Settings.of(environment.parsed_options)
    for bug in sorted(SETTINGS.seeded_bugs):
        logging.warning(
            "SEEDED BUG ACTIVE: %s - this load generator deliberately measures wrongly", bug
        )
    if isinstance(environment.runner, MasterRunner):
        return
    if not SETTINGS.urls:
        raise RuntimeError(
            "no ingest URL: set QOE_LOAD_URLS (run this locustfile through harness.load)"
        )
    # Made once, before any user's schedule starts: 4096 payloads per user, made as each user
    # started, held up the other users' sends by seconds at 20 users.
    TAILS[:] = _tails(random.Random(f"{SETTINGS.prefix}.{WORKER}"), SETTINGS)
    ProbeUser.network_timeout = ProbeUser.connection_timeout = SETTINGS.timeout
    ProbeUser.concurrency = SETTINGS.in_flight_bound()
    if SHIP and isinstance(environment.runner, WorkerRunner) and LOG is not None:
        SHIPPER = Shipper(environment.runner, LOG.path)
        SHIPPER.start()


@events.test_stopping.add_listener
def _stopping(environment: Any, **_kwargs: Any) -> None:
    # No new batch once the test stops: locust would kill it mid-request (an unknown outcome
    # the run did not need). Sends in flight end, within the timeout, before users stop.
    global STOPPED_AT
    STOPPED_AT = time.time()
    STOPPING.set()


@events.test_stop.add_listener
def _on_test_stop(environment: Any, **_kwargs: Any) -> None:
    # On a worker this runs after its users stopped and before it tells the master so; the
    # master handles one worker's messages in order, so it has every line before it quits.
    if SHIPPER is not None:
        SHIPPER.finish()


@events.quitting.add_listener
def _close_log(environment: Any, **_kwargs: Any) -> None:
    if LOG is not None:
        LOG.close()


def classify_exception(error: BaseException | None) -> str:
    """A refused connection sent nothing (fail); anything later may have landed (unknown)."""
    if isinstance(error, ConnectionRefusedError | socket.gaierror):
        return "fail"
    return "unknown"


def _tails(rng: random.Random, s: Settings, count: int = 4096) -> list[str]:
    """JSON fragments with everything but the id and ts: a pool the batches draw from (each
    user at random), so a generated event costs a few microseconds (the load generator must
    stay cheap)."""
    profiles = s.pair_profiles()
    pairs = list(profiles)
    tails = []
    for _ in range(count):
        probe, target = pairs[rng.randrange(len(pairs))]
        (r0, r1), (j0, j1), (l0, l1), (t0, t1) = profiles[(probe, target)]
        loss = round(rng.uniform(l0, l1), 3) if rng.random() < 0.4 else 0.0
        values = {
            "probe_id": probe,
            "target": target,
            "rtt_ms": round(rng.uniform(r0, r1), 3),
            "jitter_ms": round(rng.uniform(j0, j1), 3),
            "loss_pct": loss,
            "throughput_kbps": round(rng.uniform(t0, t1), 3),
        }
        tails.append(json.dumps(values, separators=(",", ":"))[1:-1])
    return tails


def _stamps(now: float, count: int = 16) -> list[str]:
    """A batch's timestamps: the last half second, in RFC 3339 with microseconds."""
    return [
        datetime.fromtimestamp(now - i * 0.5 / count, UTC).isoformat(timespec="microseconds")
        for i in range(count)
    ]


class ProbeUser(FastHttpUser):
    """Posts batches like a probe, on its schedule: fresh ids each batch, the same batch again
    after an unknown outcome."""

    network_timeout = 5.0  # set from the settings when the test starts
    connection_timeout = 5.0
    concurrency = 1  # the session's connections: Settings.in_flight_bound, set at test start
    max_retries = 0
    host = "http://ingest.invalid"  # every request names its full URL
    # Only between runs of the task, which returns when the test stops (then locust stops the
    # user during this wait).
    wait_time = constant(0.1)
    _instances = 0

    def on_start(self) -> None:
        s = settings()
        ProbeUser._instances += 1
        self.index = ProbeUser._instances
        self.url = s.urls[self.index % len(s.urls)]
        self.process = f"{WORKER}.u{self.index}"
        self.ids = f"{s.prefix}.{self.process}"  # event ids: <ids>.<n>
        self.rng = random.Random(f"{s.prefix}.{self.process}")
        self.batch = s.batch
        self.resend_limit = s.resends
        self.headers = {"Content-Type": "application/json", "Authorization": f"Bearer {s.token}"}
        self.period = s.period
        self.sent = 0
        self.to_resend: deque[tuple[str, int]] = deque()  # (body, resends so far) of unknowns
        self.in_flight = Pool(s.in_flight_bound())
        # Real probes are not in step: each user starts at a random phase of its period and
        # keeps it (users in step send in one burst per period).
        self.first_due = time.time() + self.rng.uniform(0, self.period)

    @task
    def send_on_schedule(self) -> None:
        """The user's sends until the test stops."""
        if settings().closed:
            self._closed_loop()
        else:
            self._open_schedule()

    def _open_schedule(self) -> None:
        """A send per period whatever the answers, each in a greenlet of its own; then the
        sends the schedule held at the stop but never made, and waiting for those in flight."""
        due = self.first_due
        while not STOPPING.wait(max(0.0, due - time.time())):
            while self.in_flight.full() and not STOPPING.is_set():
                self.in_flight.wait_available(timeout=0.05)  # late: every connection is busy
            if STOPPING.is_set():
                break
            self.in_flight.spawn(self._post, due)
            due += self.period
        missed = math.floor((STOPPED_AT - outcomes.LATE_AFTER_S - due) / self.period) + 1
        if missed > 0:
            assert LOG is not None, "no outcome log: this process is a master"
            LOG.dropped(missed, due, self.process)
        self.in_flight.join()

    def _closed_loop(self) -> None:
        """A batch at a time, the next only after the answer: no schedule (rate 0), or the
        seeded bug closed_model, the user model this file had before the open one, whose
        schedule slides past a slow answer (no catching up) and so records the time it then
        sends as the intended one: a stall never enters its response times."""
        due = self.first_due
        while not STOPPING.wait(max(0.0, due - time.time())):
            self._post(due)
            due = max(due + self.period, time.time())

    def _next_body(self) -> tuple[str, int]:
        """An unknown batch to resend (the oldest) with its resends so far, or a fresh one."""
        if self.to_resend:
            return self.to_resend.popleft()
        stamps = _stamps(time.time())
        tails, ids = TAILS, self.ids
        rand = self.rng.randrange
        first = self.sent + 1
        self.sent += self.batch
        events = ",".join(
            f'{{"event_id":"{ids}.{n}","ts":"{stamps[n % 16]}",{tails[rand(4096)]}}}'
            for n in range(first, first + self.batch)
        )
        return f'{{"events":[{events}]}}', 0

    def _post(self, intended: float) -> None:
        body, resends = self._next_body()
        assert LOG is not None, "no outcome log: this process is a master"
        n = LOG.invoke(intended, self.url, self.process, body)
        with self.client.post(
            self.url, data=body, headers=self.headers, name="POST /v1/events", catch_response=True
        ) as resp:
            if resp.status_code:
                outcome = classify_status(resp.status_code).value
                error = "" if outcome == "ok" else f"HTTP {resp.status_code}: {resp.text[:150]}"
            else:  # no answer: connection error or timeout
                outcome = classify_exception(resp.error)
                error = f"{type(resp.error).__name__}: {resp.error}"
            LOG.complete(n, outcome, resp.status_code or None, error)
            if outcome == "ok":
                resp.success()
            else:
                resp.failure(error)
        if outcome == "unknown" and resends < self.resend_limit:
            self.to_resend.append((body, resends + 1))


def run_until() -> float:
    """The epoch time the harness asked the load to last until (0: none asked)."""
    try:
        with open(RUN_UNTIL, encoding="utf-8") as f:
            return float(f.read())
    except (OSError, ValueError):  # no file (nothing asked) or none configured
        return 0.0


class FixedDuration(LoadTestShape):
    """Every user at once, for QOE_LOAD_DURATION seconds from the start of the test, or until
    the time in QOE_LOAD_RUN_UNTIL when that is later."""

    def tick(self) -> tuple[int, float] | None:
        assert self.runner is not None, "locust sets the runner before the first tick"
        # Read here, not from settings(): the first tick comes before test_start.
        s = Settings.of(self.runner.environment.parsed_options)
        if self.get_run_time() >= s.duration and time.time() >= run_until():
            return None
        return s.users, float(s.users * 4)
