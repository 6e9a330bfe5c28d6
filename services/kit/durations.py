"""Durations written by people: `500ms`, `30s`, `5m`, `2h`, `1d`, `1w`, or a number of seconds."""

from __future__ import annotations

import re
from datetime import timedelta

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_SECONDS_PER_UNIT = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}


def parse_duration(value: str | int | float | timedelta, *, unitless_seconds: bool = False) -> timedelta:
    """A non-negative duration; numbers are seconds.

    A string without a unit ("90") is seconds only with `unitless_seconds` (command-line flags); elsewhere, such
    as rule files, a bare number in quotes is more likely a mistake than a choice, so it is refused.
    """
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        return timedelta(seconds=value)
    match = _DURATION.match(value)
    if not match or (match.group(2) is None and not unitless_seconds):
        raise ValueError(f"not a duration: {value!r} (use e.g. 500ms, 30s, 5m, 2h, 1d)")
    return timedelta(seconds=float(match.group(1)) * _SECONDS_PER_UNIT[match.group(2) or "s"])
