from datetime import timedelta

import pytest

from services.kit.durations import parse_duration


def test_units_and_numbers():
    assert parse_duration("250ms") == timedelta(milliseconds=250)
    assert parse_duration("1w") == timedelta(weeks=1)
    assert parse_duration(2.5) == timedelta(seconds=2.5)
    assert parse_duration(timedelta(minutes=3)) == timedelta(minutes=3)


def test_a_bare_string_number_is_seconds_only_when_asked():
    assert parse_duration("90", unitless_seconds=True) == timedelta(seconds=90)
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("90")
