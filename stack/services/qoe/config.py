"""Typed environment-variable getters shared by every service.

Every getter takes an optional mapping so tests need not touch os.environ, and every bad
value raises ConfigError naming the variable, what was expected and what was seen.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

Env = Mapping[str, str]


class ConfigError(ValueError):
    """A variable is missing or malformed; the message names it."""


def _env(env: Env | None) -> Env:
    return os.environ if env is None else env


def _raw(name: str, env: Env | None) -> str | None:
    """The variable's value, stripped; None when unset or blank (blank means 'use the default')."""
    value = _env(env).get(name)
    if value is None or not value.strip():
        return None
    return value.strip()


def get_str(name: str, default: str | None = None, env: Env | None = None) -> str:
    """A string variable; without a default, the variable is required."""
    value = _raw(name, env)
    if value is not None:
        return value
    if default is None:
        raise ConfigError(f"{name} is required but not set")
    return default


def get_int(
    name: str,
    default: int,
    env: Env | None = None,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
) -> int:
    """An integer variable within [minimum, maximum] when those are given."""
    value = _raw(name, env)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None
    _check_range(name, number, minimum, maximum)
    return number


def get_optional_int(name: str, env: Env | None = None) -> int | None:
    """An integer variable, or None when unset (e.g. SEED: unset means 'random')."""
    if _raw(name, env) is None:
        return None
    return get_int(name, 0, env)


def get_float(
    name: str,
    default: float,
    env: Env | None = None,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
) -> float:
    """A finite float variable within [minimum, maximum] when those are given."""
    value = _raw(name, env)
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    _check_range(name, number, minimum, maximum)
    return number


def _check_range(name: str, number: float, minimum: float | None, maximum: float | None) -> None:
    if minimum is not None and number < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {number}")
    if maximum is not None and number > maximum:
        raise ConfigError(f"{name} must be <= {maximum}, got {number}")


def get_list(name: str, default: list[str] | None = None, env: Env | None = None) -> list[str]:
    """A comma list with blanks dropped; without a default, at least one item is required."""
    value = _raw(name, env)
    items = [] if value is None else [item.strip() for item in value.split(",") if item.strip()]
    if items:
        return items
    if default is None:
        raise ConfigError(f"{name} is required: a comma-separated list, got {value!r}")
    return list(default)


def get_choice(name: str, default: str, choices: tuple[str, ...], env: Env | None = None) -> str:
    """One of a fixed set of words."""
    value = get_str(name, default, env)
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def parse_tokens(raw: str, name: str = "PROBE_TOKENS") -> dict[str, str]:
    """Parse `name:token,name:token` into {name: token}.

    Tokens may contain ':' (only the first one separates); empty names or tokens and repeated
    names are errors, because a silently ignored token would lock a probe out.
    """
    tokens: dict[str, str] = {}
    for position, item in enumerate(part.strip() for part in raw.split(",")):
        if not item:
            continue
        probe, sep, token = item.partition(":")
        probe, token = probe.strip(), token.strip()
        if not sep or not probe or not token:
            # Never echo the item: it may hold a secret.
            raise ConfigError(f"{name} item {position} must look like name:token")
        if probe in tokens:
            raise ConfigError(f"{name} names {probe!r} twice")
        tokens[probe] = token
    if not tokens:
        raise ConfigError(f"{name} is required: name:token,name:token")
    return tokens
