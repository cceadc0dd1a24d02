"""Tumbling windows aligned to the Unix epoch in UTC."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from qoe import bugs

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def window_start(ts: datetime, seconds: int, *, off_by_one: bool | None = None) -> datetime:
    """The start of the window holding `ts`: floor(epoch(ts) / seconds) * seconds, in UTC.

    Integer microseconds keep the floor exact (float epoch seconds would round events near a
    boundary into the wrong window). An event exactly on a boundary opens that window, unless
    the seeded bug `window_off_by_one` is on (or `off_by_one` is passed True), in which case it
    lands in the previous one.
    """
    if ts.tzinfo is None:
        raise ValueError(f"window_start needs an aware datetime, got naive {ts.isoformat()}")
    if seconds <= 0:
        raise ValueError(f"window length must be positive, got {seconds}")
    if off_by_one is None:
        off_by_one = bugs.enabled("window_off_by_one")
    micros = (ts - EPOCH) // _MICROSECOND
    length = seconds * 1_000_000
    start = micros // length * length
    if off_by_one and micros == start:
        start -= length
    return EPOCH + timedelta(microseconds=start)
