"""Locust users that behave like QoE probes, and record the outcome of every batch they send.

Run by the harness (harness/load/locust.py) in its own process(es), never inside pytest: locust
monkey-patches the standard library with gevent.

Settings are locust options (``--qoe-*``) that default to environment variables, so the token
never goes on a command line. Locust forwards them from the master to every worker, so a worker
on another machine needs only the master's address (``python -m harness load worker``):

    QOE_LOAD_URLS        comma list of ingest base URLs (users are spread over them)
    QOE_LOAD_TOKEN       bearer token
    QOE_LOAD_PREFIX      run prefix: event ids <prefix>.<worker>.<user>.<n>, probes <prefix>-p<k>
    QOE_LOAD_RATE        offered events/s over all users and workers (0: as fast as answered)
    QOE_LOAD_USERS       total users (to split the rate between them)
    QOE_LOAD_DURATION    seconds of load, counted from the first tick of the test (not from
                         process start, which on a busy machine can take seconds of imports)
    QOE_LOAD_BATCH       events per batch (default 200)
    QOE_LOAD_PROBES      probe cardinality (default 20)
    QOE_LOAD_TARGETS     targets per probe (default 5)
    QOE_LOAD_DEGRADED    fraction of (probe, target) pairs with a degraded link (default 0.2)
    QOE_LOAD_TIMEOUT     request timeout in seconds (default 5)
    QOE_LOAD_RESENDS     times an unknown batch is resent with the same ids (default 3)

Each process's own environment, never forwarded:

    QOE_LOAD_OUT         folder for this process's outcome file (outcomes-<worker>.jsonl); on
                         the master, the folder that receives shipped outcome files
    QOE_LOAD_SHIP        1: also send the outcome file to the master as it grows (a worker on
                         another machine, whose folder the harness cannot read)
    QOE_LOAD_WORKER_URLS ingest URLs as this worker's machine reaches them (default: the master's)
    QOE_LOAD_RUN_UNTIL   on the master: a file that may hold an epoch time; the load goes on
                         until then even past QOE_LOAD_DURATION (the harness writes it when a
                         fault healed late, so the after-recovery phase still gets its length)

The outcome file is JSON lines, written and flushed as it happens, so a killed worker loses
nothing it sent: an invocation line {"i": n, "t": time, "u": url, "p": process, "b": body}
before the request, a completion line {"c": n, "t": time, "o": ok|fail|unknown, "s": status,
"x": error} after it. An invocation without a completion is an unknown outcome. A shipped file
arrives in chunks of whole lines, at least once a second; the master keeps beside it
outcomes-<worker>.shipped.json, which says where it came from and whether its last chunk came.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import gevent
from locust import FastHttpUser, LoadTestShape, events, task
from locust.runners import MasterRunner, WorkerRunner

from harness.workload import classify_status

WORKER = f"w{os.getpid()}{secrets.token_hex(2)}"
OUT_DIR = os.environ.get("QOE_LOAD_OUT", "").strip() or "."
SHIP = os.environ.get("QOE_LOAD_SHIP", "") == "1"
WORKER_URLS = os.environ.get("QOE_LOAD_WORKER_URLS", "").strip()
RUN_UNTIL = os.environ.get("QOE_LOAD_RUN_UNTIL", "").strip()
SHIP_INTERVAL_S = 1.0
SHIP_MESSAGE = "qoe_outcomes"

# Value ranges (rtt_ms, jitter_ms, loss_pct, throughput_kbps) as in harness.workload: a degraded
# link trips high_latency, high_jitter and low_throughput (CONTRACT.md rules).
HEALTHY = ((5.0, 80.0), (0.1, 8.0), (0.0, 0.5), (5_000.0, 100_000.0))
DEGRADED_RANGES = ((160.0, 600.0), (31.0, 120.0), (0.0, 1.5), (50.0, 950.0))

OPTIONS = (  # (option, environment variable, default)
    ("urls", "QOE_LOAD_URLS", ""),
    ("token", "QOE_LOAD_TOKEN", ""),
    ("prefix", "QOE_LOAD_PREFIX", "load"),
    ("rate", "QOE_LOAD_RATE", "0"),
    ("users", "QOE_LOAD_USERS", "1"),
    ("duration", "QOE_LOAD_DURATION", "30"),
    ("batch", "QOE_LOAD_BATCH", "200"),
    ("probes", "QOE_LOAD_PROBES", "20"),
    ("targets", "QOE_LOAD_TARGETS", "5"),
    ("degraded", "QOE_LOAD_DEGRADED", "0.2"),
    ("timeout", "QOE_LOAD_TIMEOUT", "5"),
    ("resends", "QOE_LOAD_RESENDS", "3"),
)
DEFAULTS = {name: default for name, _, default in OPTIONS}


@events.init_command_line_parser.add_listener
def _add_options(parser: Any) -> None:
    for name, env, default in OPTIONS:
        parser.add_argument(f"--qoe-{name}", env_var=env, default=default, include_in_web_ui=False)


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

    @classmethod
    def of(cls, options: Any) -> Settings:
        def opt(name: str) -> str:  # an empty value (QOE_LOAD_BATCH="") means the default
            return str(getattr(options, f"qoe_{name}", "") or "").strip() or DEFAULTS[name]

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
        )

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

    def invoke(self, url: str, process: str, body: str) -> int:
        self._next += 1
        head = json.dumps({"i": self._next, "t": time.time(), "u": url, "p": process})
        self._file.write(f'{head[:-1]}, "b": {body}}}\n')
        self._file.flush()
        return self._next

    def complete(self, n: int, outcome: str, status: int | None, error: str = "") -> None:
        row = {"c": n, "t": time.time(), "o": outcome, "s": status, "x": error[:200]}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

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
STOPPING = False


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
    if isinstance(environment.runner, MasterRunner):
        return
    if not SETTINGS.urls:
        raise RuntimeError(
            "no ingest URL: set QOE_LOAD_URLS (run this locustfile through harness.load)"
        )
    ProbeUser.network_timeout = ProbeUser.connection_timeout = SETTINGS.timeout
    if SHIP and isinstance(environment.runner, WorkerRunner) and LOG is not None:
        SHIPPER = Shipper(environment.runner, LOG.path)
        SHIPPER.start()


@events.test_stopping.add_listener
def _stopping(environment: Any, **_kwargs: Any) -> None:
    # No new batch once the test stops: users woken from their wait would otherwise start one
    # that locust then kills mid-request (an unknown outcome the run did not need).
    global STOPPING
    STOPPING = True


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
    """JSON fragments with everything but the id and ts: a pool the batches draw from, so a
    generated event costs a few microseconds (the load generator must stay cheap)."""
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
    """Posts batches like a probe: fresh ids each batch, the same batch again after an unknown."""

    network_timeout = 5.0  # set from the settings when the test starts
    connection_timeout = 5.0
    max_retries = 0
    host = "http://ingest.invalid"  # every request names its full URL
    _instances = 0

    def on_start(self) -> None:
        s = settings()
        ProbeUser._instances += 1
        self.index = ProbeUser._instances
        self.url = s.urls[self.index % len(s.urls)]
        self.process = f"{WORKER}.u{self.index}"
        self.ids = f"{s.prefix}.{self.process}"  # event ids: <ids>.<n>
        self.rng = random.Random(f"{s.prefix}.{self.process}")
        self.tails = _tails(self.rng, s)
        self.batch = s.batch
        self.resend_limit = s.resends
        self.headers = {"Content-Type": "application/json", "Authorization": f"Bearer {s.token}"}
        pace = s.rate / s.batch / s.users  # batches/s for this user
        self.period = 1 / pace if pace > 0 else 0.0
        self.sent = 0
        self.pending: str | None = None  # body of an unknown batch still to resend
        self.resends = 0
        # Real probes are not in step. Users spawned within a quarter of a second and paced
        # from then on send in one burst per period: ingest would see several times the
        # offered rate for part of each second and nothing for the rest. So each user starts
        # at a random phase of its period and keeps it.
        self.due = time.monotonic() + self.rng.uniform(0, self.period)
        gevent.sleep(max(0.0, self.due - time.monotonic()))

    def wait_time(self) -> float:
        """Until the next slot of this user's period; no catching up after a slow answer."""
        now = time.monotonic()
        self.due = max(self.due + self.period, now)
        return self.due - now

    def _body(self) -> str:
        stamps = _stamps(time.time())
        tails, ids = self.tails, self.ids
        rand = self.rng.randrange
        first = self.sent + 1
        self.sent += self.batch
        events = ",".join(
            f'{{"event_id":"{ids}.{n}","ts":"{stamps[n % 16]}",{tails[rand(4096)]}}}'
            for n in range(first, first + self.batch)
        )
        return f'{{"events":[{events}]}}'

    @task
    def post_batch(self) -> None:
        if STOPPING:
            return
        if self.pending is not None and self.resends < self.resend_limit:
            body, self.resends = self.pending, self.resends + 1
        else:
            body, self.pending, self.resends = self._body(), None, 0
        assert LOG is not None, "no outcome log: this process is a master"
        n = LOG.invoke(self.url, self.process, body)
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
                self.pending = None
            else:
                resp.failure(error)
                self.pending = body if outcome == "unknown" else None


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
