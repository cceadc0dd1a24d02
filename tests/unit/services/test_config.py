"""Environment parsing, token parsing and seeded-bug names."""

from __future__ import annotations

import logging

import pytest
from qoe import bugs
from qoe.config import (
    ConfigError,
    get_choice,
    get_float,
    get_int,
    get_list,
    get_str,
    parse_tokens,
)


def test_defaults_apply_when_unset_or_blank() -> None:
    assert get_int("N", 7, {}) == 7
    assert get_int("N", 7, {"N": "  "}) == 7
    assert get_float("F", 1.5, {}) == 1.5
    assert get_str("S", "x", {}) == "x"
    assert get_list("L", ["a"], {}) == ["a"]


def test_values_are_parsed() -> None:
    assert get_int("N", 7, {"N": " 12 "}) == 12
    assert get_float("F", 1.5, {"F": "0.25"}) == 0.25
    assert get_list("L", None, {"L": "a, b,,c "}) == ["a", "b", "c"]
    assert get_choice("P", "healthy", ("healthy", "lossy"), {"P": "lossy"}) == "lossy"


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (
            lambda: get_int("FETCH_BATCH", 1, {"FETCH_BATCH": "ten"}),
            "FETCH_BATCH must be an integer",
        ),
        (lambda: get_int("RATE", 1, {"RATE": "0"}, minimum=1), "RATE must be >= 1"),
        (lambda: get_int("RATE", 1, {"RATE": "9"}, maximum=5), "RATE must be <= 5"),
        (lambda: get_float("X_MS", 1.0, {"X_MS": "fast"}), "X_MS must be a number"),
        (lambda: get_float("X_MS", 1.0, {"X_MS": "nan"}), "X_MS must be a finite number"),
        (lambda: get_str("DATABASE_URL", None, {}), "DATABASE_URL is required"),
        (lambda: get_list("NATS_URLS", None, {"NATS_URLS": " , "}), "NATS_URLS is required"),
        (lambda: get_choice("PROFILE", "healthy", ("healthy",), {"PROFILE": "x"}), "PROFILE must"),
    ],
)
def test_bad_values_name_the_variable(call, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        call()


def test_tokens_parse() -> None:
    assert parse_tokens("probe-1:s3cret, probe-2:a:b") == {"probe-1": "s3cret", "probe-2": "a:b"}


@pytest.mark.parametrize("raw", ["", "probe-1", "probe-1:", ":tok", "a:x,a:y"])
def test_bad_tokens_are_errors_that_do_not_leak_secrets(raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_tokens(raw)
    assert "PROBE_TOKENS" in str(info.value)
    assert "x" not in str(info.value).replace("PROBE_TOKENS", "")


def test_seeded_bugs_parse_and_warn(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="qoe.bugs"):
        active = bugs.load({"QOE_SEEDED_BUGS": "window_off_by_one, ingest_early_ack"})
    assert active == {"window_off_by_one", "ingest_early_ack"}
    assert bugs.enabled("window_off_by_one")
    assert not bugs.enabled("aggregator_no_dedup")
    assert sum("SEEDED BUG ACTIVE" in r.getMessage() for r in caplog.records) == 2


def test_unknown_seeded_bug_is_a_startup_error_listing_valid_names() -> None:
    with pytest.raises(ConfigError, match="valid names: aggregator_no_dedup"):
        bugs.load({"QOE_SEEDED_BUGS": "aggregator_no_dedupe"})


def test_enabled_rejects_typos_in_code() -> None:
    with pytest.raises(ValueError):
        bugs.enabled("window_of_by_one")


def test_no_bugs_by_default() -> None:
    assert bugs.load({}) == frozenset()
