"""Locust users that behave like QoE probes, and record the outcome of every batch they send.

Run by the harness (harness/load.py) in its own process(es), never inside pytest: locust
monkey-patches the standard library with gevent. Configured through environment variables
(the harness sets them; the token never goes on a command line):

    QOE_LOAD_URLS        comma list of ingest base URLs (users are spread over them)
    QOE_LOAD_TOKEN       bearer token
    QOE_LOAD_PREFIX      run prefix: event ids <prefix>.<worker>.<user>.<n>, probes <prefix>-p<k>
    QOE_LOAD_OUT         folder for this worker's outcome file (outcomes-<worker>.jsonl)
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

The outcome file is JSON lines, written and flushed as it happens, so a killed worker loses
nothing it sent: an invocation line {"i": n, "t": time, "u": url, "p": process, "b": body}
before the request, a completion line {"c": n, "t": time, "o": ok|fail|unknown, "s": status,
"x": error} after it. An invocation without a completion is an unknown outcome.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import socket
import time
from datetime import UTC, datetime

from locust import FastHttpUser, LoadTestShape, constant, constant_throughput, events, task

from harness.workload import classify_status


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default).strip() or default


URLS = [u.rstrip("/") + "/v1/events" for u in _env("QOE_LOAD_URLS", "").split(",") if u.strip()]
TOKEN = os.environ.get("QOE_LOAD_TOKEN", "")
PREFIX = _env("QOE_LOAD_PREFIX", "load")
OUT_DIR = _env("QOE_LOAD_OUT", ".")
RATE = float(_env("QOE_LOAD_RATE", "0"))
USERS = max(1, int(_env("QOE_LOAD_USERS", "1")))
DURATION = float(_env("QOE_LOAD_DURATION", "30"))
BATCH = max(1, int(_env("QOE_LOAD_BATCH", "200")))
PROBES = max(1, int(_env("QOE_LOAD_PROBES", "20")))
TARGETS = max(1, int(_env("QOE_LOAD_TARGETS", "5")))
DEGRADED = float(_env("QOE_LOAD_DEGRADED", "0.2"))
TIMEOUT = float(_env("QOE_LOAD_TIMEOUT", "5"))
RESENDS = int(_env("QOE_LOAD_RESENDS", "3"))

WORKER = f"w{os.getpid()}{secrets.token_hex(2)}"
HEADERS = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}

# Value ranges (rtt_ms, jitter_ms, loss_pct, throughput_kbps) as in harness.workload: a degraded
# link trips high_latency, high_jitter and low_throughput (CONTRACT.md rules).
HEALTHY = ((5.0, 80.0), (0.1, 8.0), (0.0, 0.5), (5_000.0, 100_000.0))
DEGRADED_RANGES = ((160.0, 600.0), (31.0, 120.0), (0.0, 1.5), (50.0, 950.0))


def _pair_profiles() -> dict[tuple[str, str], tuple[tuple[float, float], ...]]:
    """Every worker derives the same (probe, target) -> profile map from the prefix."""
    rng = random.Random(PREFIX)
    pairs = [(f"{PREFIX}-p{p}", f"t{t}.example.net") for p in range(PROBES) for t in range(TARGETS)]
    degraded = set(rng.sample(range(len(pairs)), round(DEGRADED * len(pairs))))
    return {pair: DEGRADED_RANGES if i in degraded else HEALTHY for i, pair in enumerate(pairs)}


PAIRS = _pair_profiles()
PAIR_LIST = list(PAIRS)


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


LOG: OutcomeLog | None = None


@events.init.add_listener
def _open_log(environment, **_kwargs) -> None:
    global LOG
    # The master of a distributed run sends nothing; only workers and local runs record.
    if not URLS or environment.parsed_options is None or environment.parsed_options.master:
        return
    LOG = OutcomeLog(OUT_DIR)


STOPPING = False


@events.test_stopping.add_listener
def _stopping(environment, **_kwargs) -> None:
    # No new batch once the test stops: users woken from their wait would otherwise start one
    # that locust then kills mid-request (an unknown outcome the run did not need).
    global STOPPING
    STOPPING = True


@events.quitting.add_listener
def _close_log(environment, **_kwargs) -> None:
    if LOG is not None:
        LOG.close()


def classify_exception(error: BaseException | None) -> str:
    """A refused connection sent nothing (fail); anything later may have landed (unknown)."""
    if isinstance(error, ConnectionRefusedError | socket.gaierror):
        return "fail"
    return "unknown"


def _tails(rng: random.Random, count: int = 4096) -> list[str]:
    """JSON fragments with everything but the id and ts: a pool the batches draw from, so a
    generated event costs a few microseconds (the load generator must stay cheap)."""
    tails = []
    for _ in range(count):
        probe, target = PAIR_LIST[rng.randrange(len(PAIR_LIST))]
        (r0, r1), (j0, j1), (l0, l1), (t0, t1) = PAIRS[(probe, target)]
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

    network_timeout = TIMEOUT
    connection_timeout = TIMEOUT
    max_retries = 0
    wait_time = constant_throughput(RATE / BATCH / USERS) if RATE > 0 else constant(0)
    host = URLS[0].removesuffix("/v1/events") if URLS else None
    _instances = 0

    def on_start(self) -> None:
        ProbeUser._instances += 1
        self.index = ProbeUser._instances
        self.url = URLS[self.index % len(URLS)]
        self.process = f"{WORKER}.u{self.index}"
        self.rng = random.Random(f"{PREFIX}.{self.process}")
        self.tails = _tails(self.rng)
        self.sent = 0
        self.pending: str | None = None  # body of an unknown batch still to resend
        self.resends = 0

    def _body(self) -> str:
        stamps = _stamps(time.time())
        tails, ids = self.tails, f"{PREFIX}.{self.process}"
        rand = self.rng.randrange
        first = self.sent + 1
        self.sent += BATCH
        events = ",".join(
            f'{{"event_id":"{ids}.{n}","ts":"{stamps[n % 16]}",{tails[rand(4096)]}}}'
            for n in range(first, first + BATCH)
        )
        return f'{{"events":[{events}]}}'

    @task
    def post_batch(self) -> None:
        if STOPPING:
            return
        if self.pending is not None and self.resends < RESENDS:
            body, self.resends = self.pending, self.resends + 1
        else:
            body, self.pending, self.resends = self._body(), None, 0
        assert LOG is not None, "QOE_LOAD_URLS is not set: run this locustfile through harness.load"
        n = LOG.invoke(self.url, self.process, body)
        with self.client.post(
            self.url, data=body, headers=HEADERS, name="POST /v1/events", catch_response=True
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


class FixedDuration(LoadTestShape):
    """Every user at once, for QOE_LOAD_DURATION seconds from the start of the test."""

    def tick(self) -> tuple[int, float] | None:
        if self.get_run_time() >= DURATION:
            return None
        return USERS, float(USERS * 4)
