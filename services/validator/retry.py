"""The late-reference policy, as pure functions.

A LOOKUP failure may only mean that the referenced user or product has not arrived from CDC yet (Debezium
lag, a consumer restarting). Such a record is neither dropped nor rejected at once: the service parks it on a
retry topic with a not-before time, growing the delay (2 s, 4 s, 8 s, ...) up to `max_attempts` retries or
`max_age` since it was first seen, and only then dead-letters it with `REFERENCE_NOT_FOUND`.

The retry bookkeeping travels in the record's headers (`lp-retry-*`), so the retry topic needs no state and
a restarted service resumes exactly where it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from services.contracts.headers import (
    RETRY_ATTEMPT,
    RETRY_FIRST_SEEN,
    RETRY_HEADERS,
    RETRY_NOT_BEFORE,
    RETRY_ORIGINAL_OFFSET,
    RETRY_ORIGINAL_PARTITION,
    RETRY_ORIGINAL_TOPIC,
    RETRY_RULE,
)

REFERENCE_NOT_FOUND = "REFERENCE_NOT_FOUND"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    base_delay: timedelta = timedelta(seconds=2)
    multiplier: float = 2.0
    max_delay: timedelta = timedelta(seconds=60)
    max_attempts: int = 5  # with the defaults: retries after 2, 4, 8, 16, 32 s (about a minute in all)
    max_age: timedelta = timedelta(minutes=5)  # also bounded by time, whatever the attempt count

    def __post_init__(self) -> None:
        if self.max_attempts < 0 or self.multiplier < 1 or self.base_delay <= timedelta(0):
            raise ValueError("need max_attempts >= 0, multiplier >= 1 and a positive base_delay")

    def delay(self, attempt: int) -> timedelta:
        """Delay before retry number `attempt` (1-based)."""
        return min(self.base_delay * (self.multiplier ** (attempt - 1)), self.max_delay)


@dataclass(frozen=True, slots=True)
class Retry:
    attempt: int  # the number of this retry (1 = first)
    not_before: datetime


@dataclass(frozen=True, slots=True)
class SendToDeadLetter:
    attempt: int  # the retry that was refused
    reason: str
    message: str


DEFAULT_POLICY = RetryPolicy()


def retry_decision(
    attempt: int, first_seen: datetime, now: datetime, policy: RetryPolicy = DEFAULT_POLICY
) -> Retry | SendToDeadLetter:
    """Schedule retry number `attempt` (1-based, as in `Verdict.attempt`) or give up."""
    if attempt > policy.max_attempts:
        return SendToDeadLetter(
            attempt, REFERENCE_NOT_FOUND, f"reference still missing after {policy.max_attempts} retries"
        )
    not_before = now + policy.delay(attempt)
    if not_before - first_seen > policy.max_age:
        return SendToDeadLetter(
            attempt, REFERENCE_NOT_FOUND, f"reference still missing {now - first_seen} after first seen"
        )
    return Retry(attempt, not_before)


# --- header helpers ---------------------------------------------------------------------------------------------
def _millis(value: datetime) -> bytes:
    return str(int(value.timestamp() * 1000)).encode()


def _from_millis(value: bytes) -> datetime:
    return datetime.fromtimestamp(int(value) / 1000, tz=UTC)


@dataclass(frozen=True, slots=True)
class RetryState:
    """What a record on the retry topic carries about its own retries."""

    attempt: int
    not_before: datetime
    first_seen: datetime
    rule: str
    original_topic: str
    original_partition: int
    original_offset: int


def retry_headers(
    original_headers: Sequence[tuple[str, bytes | None]] | None,
    decision: Retry,
    *,
    first_seen: datetime,
    rule: str,
    original_topic: str,
    original_partition: int,
    original_offset: int,
) -> list[tuple[str, bytes]]:
    """The original headers (minus older `lp-retry-*`) plus this retry's state; the value is sent unchanged."""
    kept = [(k, v if v is not None else b"") for k, v in original_headers or () if k not in RETRY_HEADERS]
    kept += [
        (RETRY_ATTEMPT, str(decision.attempt).encode()),
        (RETRY_NOT_BEFORE, _millis(decision.not_before)),
        (RETRY_FIRST_SEEN, _millis(first_seen)),
        (RETRY_RULE, rule.encode()),
        (RETRY_ORIGINAL_TOPIC, original_topic.encode()),
        (RETRY_ORIGINAL_PARTITION, str(original_partition).encode()),
        (RETRY_ORIGINAL_OFFSET, str(original_offset).encode()),
    ]
    return kept


def parse_retry_headers(headers: Sequence[tuple[str, bytes | None]] | None) -> RetryState | None:
    """The retry state of a record, or None for a first delivery (no or unreadable `lp-retry-*` headers)."""
    found = {k: v for k, v in headers or () if k in RETRY_HEADERS and v is not None}
    if RETRY_ATTEMPT not in found:
        return None
    try:
        return RetryState(
            attempt=int(found[RETRY_ATTEMPT]),
            not_before=_from_millis(found[RETRY_NOT_BEFORE]),
            first_seen=_from_millis(found[RETRY_FIRST_SEEN]),
            rule=found.get(RETRY_RULE, b"").decode("utf-8", "replace"),
            original_topic=found.get(RETRY_ORIGINAL_TOPIC, b"").decode("utf-8", "replace"),
            original_partition=int(found.get(RETRY_ORIGINAL_PARTITION, b"-1")),
            original_offset=int(found.get(RETRY_ORIGINAL_OFFSET, b"-1")),
        )
    except (KeyError, ValueError):
        return None
