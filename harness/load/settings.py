"""Every QOE_LOAD_* setting of a load run and its default, defined once: the locustfile reads
them (as locust options that default to these environment variables), harness.load.locust sets
them from a LoadSpec, and LoadSpec takes its defaults from here.

Standard library only: every locust process imports this (scenarios/load/locustfile.py).

Locust forwards the run's settings (RUN) from the master to every worker, so a worker on
another machine needs only the master's address; the token never goes on a command line. Each
process's own settings (PROCESS) are never forwarded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Setting:
    name: str  # the locust option --qoe-<name>
    env: str
    default: str  # as the environment variable holds it
    meaning: str


RUN = (
    Setting(
        "urls", "QOE_LOAD_URLS", "", "comma list of ingest base URLs (users are spread over them)"
    ),
    Setting("token", "QOE_LOAD_TOKEN", "", "bearer token"),
    Setting(
        "prefix",
        "QOE_LOAD_PREFIX",
        "load",
        "run prefix: event ids <prefix>.<worker>.<user>.<n>, probes <prefix>-p<k>",
    ),
    Setting(
        "rate",
        "QOE_LOAD_RATE",
        "0",
        "offered events/s over all users and workers, a schedule kept whatever the answers "
        "(0: no schedule, each user sends its next batch when the last is answered)",
    ),
    Setting("users", "QOE_LOAD_USERS", "1", "total users (the rate is split between them)"),
    Setting(
        "duration",
        "QOE_LOAD_DURATION",
        "30",
        "seconds of load, counted from the first tick of the test (not from process start, "
        "which on a busy machine can take seconds of imports)",
    ),
    Setting("batch", "QOE_LOAD_BATCH", "200", "events per batch"),
    Setting("probes", "QOE_LOAD_PROBES", "20", "probe cardinality"),
    Setting("targets", "QOE_LOAD_TARGETS", "5", "targets per probe"),
    Setting(
        "degraded",
        "QOE_LOAD_DEGRADED",
        "0.2",
        "fraction of (probe, target) pairs on a degraded link",
    ),
    Setting("timeout", "QOE_LOAD_TIMEOUT", "5", "request timeout in seconds"),
    Setting(
        "resends",
        "QOE_LOAD_RESENDS",
        "3",
        "times an unknown batch is resent with the same ids (each resend takes a send of the "
        "schedule, so the offered rate stays the schedule's)",
    ),
    Setting(
        "seeded_bugs",
        "QOE_LOAD_SEEDED_BUGS",
        "",
        "comma list of the load generator's seeded bugs (SEEDED_BUGS), for meta-tests only",
    ),
)
PROCESS = (
    Setting(
        "out",
        "QOE_LOAD_OUT",
        ".",
        "folder for this process's outcome file (outcomes-<worker>.jsonl); on the master, the "
        "folder that receives shipped outcome files",
    ),
    Setting(
        "ship",
        "QOE_LOAD_SHIP",
        "",
        "1: also send the outcome file to the master as it grows (a worker on another machine, "
        "whose folder the harness cannot read)",
    ),
    Setting(
        "worker_urls",
        "QOE_LOAD_WORKER_URLS",
        "",
        "ingest URLs as this worker's machine reaches them (default: the master's)",
    ),
    Setting(
        "run_until",
        "QOE_LOAD_RUN_UNTIL",
        "",
        "on the master: a file that may hold an epoch time; the load goes on until then even "
        "past QOE_LOAD_DURATION (the harness writes it when a fault healed late)",
    ),
)
BY_NAME: Mapping[str, Setting] = {s.name: s for s in (*RUN, *PROCESS)}

# The load generator's seeded bugs: each makes it measure wrongly, so a meta-test can show
# the harness notices. closed_model: the user model before the open one, a batch at a time,
# the next only after the answer, its schedule sliding past a slow answer (no catching up),
# and the time it then sends recorded as the intended one (coordinated omission).
SEEDED_BUGS = ("closed_model",)


def default(name: str) -> str:
    return BY_NAME[name].default


def environment(**values: object) -> dict[str, str]:
    """The environment variables of these settings (by name), as strings."""
    unknown = sorted(set(values) - set(BY_NAME))
    if unknown:
        raise ValueError(f"unknown load settings {unknown}; the settings are {sorted(BY_NAME)}")
    return {BY_NAME[name].env: str(value) for name, value in values.items()}


def seeded_bugs(raw: str) -> frozenset[str]:
    """The seeded bugs a comma list names; an unknown name is an error, so a typo never makes
    a meta-test measure the honest generator."""
    names = {name.strip() for name in raw.split(",") if name.strip()}
    unknown = sorted(names - set(SEEDED_BUGS))
    if unknown:
        raise ValueError(
            f"QOE_LOAD_SEEDED_BUGS names unknown bug(s) {', '.join(unknown)}; "
            f"valid names: {', '.join(SEEDED_BUGS)}"
        )
    return frozenset(names)
