"""Epoch-aligned tumbling windows, including the seeded off-by-one bug."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from qoe import bugs
from qoe.windows import window_start


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.mark.parametrize(
    ("ts", "seconds", "expected"),
    [
        (utc(2024, 5, 1, 12, 0, 0), 60, utc(2024, 5, 1, 12, 0, 0)),  # on the boundary
        (utc(2024, 5, 1, 12, 0, 59, 999999), 60, utc(2024, 5, 1, 12, 0, 0)),
        (utc(2024, 5, 1, 12, 1, 0), 60, utc(2024, 5, 1, 12, 1, 0)),
        (utc(2024, 5, 1, 12, 0, 0, 1), 60, utc(2024, 5, 1, 12, 0, 0)),
        (utc(2024, 5, 1, 12, 7, 30), 300, utc(2024, 5, 1, 12, 5, 0)),
        (utc(2024, 5, 1, 12, 7, 30), 7, utc(2024, 5, 1, 12, 7, 24)),  # 1714565250 % 7 == 6
        (utc(1970, 1, 1), 60, utc(1970, 1, 1)),
        (utc(1969, 12, 31, 23, 59, 30), 60, utc(1969, 12, 31, 23, 59, 0)),  # floor, not trunc
    ],
)
def test_window_start(ts: datetime, seconds: int, expected: datetime) -> None:
    assert window_start(ts, seconds) == expected


def test_aligned_to_the_epoch_not_the_hour() -> None:
    ts = utc(2024, 5, 1, 12, 7, 30)
    start = window_start(ts, 7)
    assert (start - utc(1970, 1, 1)).total_seconds() % 7 == 0
    assert start <= ts < start + timedelta(seconds=7)


def test_offsets_are_converted_to_utc() -> None:
    # 14:00:30+02:00 is 12:00:30Z; the result is in UTC.
    ts = datetime(2024, 5, 1, 14, 0, 30, tzinfo=timezone(timedelta(hours=2)))
    start = window_start(ts, 60)
    assert start == utc(2024, 5, 1, 12, 0, 0)
    assert start.utcoffset() == timedelta(0)


def test_negative_half_hour_offset() -> None:
    ts = datetime(2024, 5, 1, 8, 30, 0, tzinfo=timezone(-timedelta(hours=3, minutes=30)))
    assert window_start(ts, 3600) == utc(2024, 5, 1, 12, 0, 0)


def test_off_by_one_bug_moves_only_boundary_events() -> None:
    bugs.reset(frozenset({"window_off_by_one"}))
    assert window_start(utc(2024, 5, 1, 12, 0, 0), 60) == utc(2024, 5, 1, 11, 59, 0)
    assert window_start(utc(2024, 5, 1, 12, 0, 0, 1), 60) == utc(2024, 5, 1, 12, 0, 0)
    assert window_start(utc(2024, 5, 1, 12, 0, 0), 60, off_by_one=False) == utc(2024, 5, 1, 12)


def test_naive_and_nonpositive_inputs_are_errors() -> None:
    with pytest.raises(ValueError, match="naive"):
        window_start(datetime(2024, 5, 1), 60)
    with pytest.raises(ValueError, match="positive"):
        window_start(utc(2024, 5, 1), 0)
