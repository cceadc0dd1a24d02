"""Seeded bugs: deliberate faults the harness must be able to detect.

`QOE_SEEDED_BUGS` is a comma list of names. An unknown name stops the service at startup, so a
typo can never make a run silently test the honest stack.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from qoe.config import ConfigError

log = logging.getLogger("qoe.bugs")

KNOWN: tuple[str, ...] = (
    "aggregator_no_dedup",
    "aggregator_ack_before_commit",
    "ingest_early_ack",
    "window_off_by_one",
    "probe_drop_after_503",
    "ingest_offset_sign_ignored",
    "ingest_ts_bounds_in_whole_minutes",
    "diagnoser_threshold_inclusive",
)

_active: frozenset[str] | None = None


def parse(raw: str | None) -> frozenset[str]:
    """The set of bug names in a comma list; raises ConfigError listing the valid names."""
    names = {name.strip() for name in (raw or "").split(",") if name.strip()}
    unknown = sorted(names - set(KNOWN))
    if unknown:
        raise ConfigError(
            f"QOE_SEEDED_BUGS names unknown bug(s) {', '.join(unknown)}; "
            f"valid names: {', '.join(KNOWN)}"
        )
    return frozenset(names)


def load(env: Mapping[str, str] | None = None) -> frozenset[str]:
    """Read QOE_SEEDED_BUGS, remember the result and warn loudly about each active bug."""
    global _active
    _active = parse((os.environ if env is None else env).get("QOE_SEEDED_BUGS"))
    for name in sorted(_active):
        log.warning(
            "SEEDED BUG ACTIVE: %s - this service is deliberately broken", name, extra={"bug": name}
        )
    return _active


def enabled(name: str) -> bool:
    """Whether a seeded bug is on. Loads the environment on first use if load() was not called."""
    if name not in KNOWN:
        raise ValueError(f"unknown seeded bug {name!r}; valid names: {', '.join(KNOWN)}")
    active = _active if _active is not None else load()
    return name in active


def reset(names: frozenset[str] | None = None) -> None:
    """Set the active bugs directly (for tests); None forgets them so the next call reloads."""
    global _active
    _active = names
