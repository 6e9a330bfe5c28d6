"""The late-reference policy: bounded, growing delays, then the dead-letter topic with REFERENCE_NOT_FOUND."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.validator.retry import (
    REFERENCE_NOT_FOUND,
    Retry,
    RetryPolicy,
    SendToDeadLetter,
    parse_retry_headers,
    retry_decision,
    retry_headers,
)

T0 = datetime(2026, 1, 5, 12, tzinfo=UTC)


def test_delays_grow_and_are_capped() -> None:
    policy = RetryPolicy(base_delay=timedelta(seconds=2), multiplier=2, max_delay=timedelta(seconds=10))
    assert [policy.delay(n).total_seconds() for n in range(1, 6)] == [2, 4, 8, 10, 10]


def test_retries_then_dead_letter_by_attempts() -> None:
    policy = RetryPolicy(max_attempts=3, max_age=timedelta(hours=1))
    now, schedule = T0, []
    for attempt in range(1, 4):
        decision = retry_decision(attempt, T0, now, policy)
        assert isinstance(decision, Retry)
        assert decision.attempt == attempt
        schedule.append((decision.not_before - now).total_seconds())
        now = decision.not_before  # the retry consumer holds the record until then
    assert schedule == [2, 4, 8]
    final = retry_decision(4, T0, now, policy)
    assert isinstance(final, SendToDeadLetter)
    assert final.reason == REFERENCE_NOT_FOUND
    assert final.message == "reference still missing after 3 retries"


def test_dead_letter_by_age() -> None:
    policy = RetryPolicy(max_attempts=100, max_age=timedelta(seconds=30))
    assert isinstance(retry_decision(2, T0, T0 + timedelta(seconds=20), policy), Retry)  # due at +24 s
    late = retry_decision(3, T0, T0 + timedelta(seconds=25), policy)  # would be due at +33 s
    assert isinstance(late, SendToDeadLetter) and late.reason == REFERENCE_NOT_FOUND


def test_no_retries_at_all() -> None:
    assert isinstance(retry_decision(1, T0, T0, RetryPolicy(max_attempts=0)), SendToDeadLetter)


def test_policy_is_validated() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(multiplier=0.5)
    with pytest.raises(ValueError):
        RetryPolicy(base_delay=timedelta(0))


def test_headers_round_trip_and_replace_older_ones() -> None:
    original = [("traceparent", b"00-abc-def-01"), ("lp-retry-attempt", b"1"), ("producer", None)]
    decision = Retry(2, T0 + timedelta(seconds=4))
    headers = retry_headers(
        original,
        decision,
        first_seen=T0,
        rule="user_exists",
        original_topic="events.raw",
        original_partition=3,
        original_offset=42,
    )
    assert headers[:2] == [("traceparent", b"00-abc-def-01"), ("producer", b"")]
    assert [k for k, _ in headers].count("lp-retry-attempt") == 1
    state = parse_retry_headers(headers)
    assert state is not None
    assert (state.attempt, state.not_before, state.first_seen) == (2, T0 + timedelta(seconds=4), T0)
    assert (state.rule, state.original_topic, state.original_partition, state.original_offset) == (
        "user_exists",
        "events.raw",
        3,
        42,
    )


def test_first_delivery_and_garbled_headers() -> None:
    assert parse_retry_headers(None) is None
    assert parse_retry_headers([("traceparent", b"x")]) is None
    assert parse_retry_headers([("lp-retry-attempt", b"two")]) is None
