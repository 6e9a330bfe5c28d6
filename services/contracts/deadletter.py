"""Dead-letter records: the original key and value bytes, unchanged, with the reason in `lp-dlq-*` headers.

ONE builder (`build_dead_letter`) and ONE parser (`parse_dead_letter`) for every service that dead-letters
(the validator, its streaming runtime, the sinks), so one replay tool reads every dead-letter topic.

The value is never re-encoded, so a dead letter can be replayed byte for byte once the cause is fixed. The
original record's own headers (traceparent, producer, ...) are kept; every earlier `lp-dlq-*` and `lp-retry-*`
header is dropped, so a record dead-lettered again after a replay carries one, current, reason and no stale
retry count. Last resort only: a value that would make the dead letter too large for the broker is cut to fit,
and `lp-dlq-value-truncated-from` / `lp-dlq-value-sha256` say so.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol

from services.contracts.headers import (
    DLQ_ATTEMPT,
    DLQ_ERROR_CODE,
    DLQ_FIELD,
    DLQ_MESSAGE,
    DLQ_ORIGINAL_OFFSET,
    DLQ_ORIGINAL_PARTITION,
    DLQ_ORIGINAL_TOPIC,
    DLQ_PREFIX,
    DLQ_RULE,
    DLQ_STAGE,
    DLQ_TIME,
    DLQ_TRACE_ID,
    DLQ_VALUE_SHA256,
    DLQ_VALUE_TRUNCATED_FROM,
    STALE_ON_DEAD_LETTER,
    trace_id_from_headers,
)
from services.contracts.topics import dead_letter_topic
from services.kit.sink import Rejection

MAX_MESSAGE_BYTES = 1024  # lp-dlq-message is cut to this (a stack of rule messages can be long)
TRUNCATION_HEADERS_BYTES = 256  # room kept for the two truncation headers when a value is cut to fit

Headers = list[tuple[str, bytes]]


class Stage(StrEnum):
    """Where a record was refused (`lp-dlq-stage`)."""

    DECODE = "decode"  # the bytes are not a record of the topic's contract (kit DecodeError, bad CDC JSON, batch row)
    VALIDATE = "validate"  # an error-severity rule failed
    ENRICH = "enrich"  # the accepted record could not be turned into the output contract
    RETRY = "retry"  # the late-reference policy gave up
    PROCESS = "process"  # the streaming runtime: the processor raised for the record or returned a bad output
    STORE = "store"  # a sink's store refused the record (e.g. a value its column cannot hold)


class ConsumedRecord(Protocol):
    """A consumed record as any client hands it over (`OriginalMessage`, the runtime's records, aiokafka's)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes | None]]: ...


@dataclass(frozen=True, slots=True)
class OriginalMessage:
    """The consumed record, as the service got it from Kafka (or a batch file)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes | None]] = ()


@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    """What to produce to the dead-letter topic."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers


def format_time(value: datetime) -> str:
    """ISO 8601 UTC with milliseconds and `Z` (`2026-01-05T12:00:00.250Z`); naive means UTC."""
    aware = value if value.tzinfo else value.replace(tzinfo=UTC)
    return aware.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def bounded_message(text: str) -> bytes:
    """`text` on one line, at most MAX_MESSAGE_BYTES of UTF-8, never cut inside a character."""
    data = text.replace("\n", " ").encode("utf-8")
    if len(data) <= MAX_MESSAGE_BYTES:
        return data
    return data[: MAX_MESSAGE_BYTES - 3].decode("utf-8", "ignore").encode("utf-8") + b"..."


def build_dead_letter(
    original: ConsumedRecord,
    *,
    code: str,
    stage: Stage | str,
    message: str,
    now: datetime,
    rule: str | None = None,
    field: str | None = None,
    attempt: int = 0,
    fallback_trace_id: str | None = None,
    original_topic: str | None = None,
    original_partition: int | None = None,
    original_offset: int | None = None,
    topic: str | None = None,
    max_record_bytes: int | None = None,
) -> DeadLetterRecord:
    """The dead-letter record for `original`, to `topic` (default: `<original topic>.dlq`).

    `original_*` override where it came from (a retried record names the topic it first arrived on).
    `lp-dlq-trace-id` is the trace of the record's own traceparent, else `fallback_trace_id` (a batch's span).
    `max_record_bytes`: if the dead letter would exceed it (an input within a few hundred bytes of the broker's
    limit), the value is cut to fit, because a dead letter the broker refuses would stop its producer for good.
    """
    origin_topic = original_topic if original_topic is not None else original.topic
    partition = original_partition if original_partition is not None else original.partition
    offset = original_offset if original_offset is not None else original.offset
    headers: Headers = [
        (name, value if value is not None else b"")
        for name, value in original.headers or ()
        if not name.startswith(STALE_ON_DEAD_LETTER)
    ]
    trace = trace_id_from_headers(original.headers) or fallback_trace_id or ""
    headers += [
        (DLQ_ERROR_CODE, code.encode()),
        (DLQ_RULE, (rule or "").encode()),
        (DLQ_FIELD, (field or "").encode()),
        (DLQ_MESSAGE, bounded_message(message)),
        (DLQ_STAGE, str(stage).encode()),
        (DLQ_ORIGINAL_TOPIC, origin_topic.encode()),
        (DLQ_ORIGINAL_PARTITION, str(partition).encode()),
        (DLQ_ORIGINAL_OFFSET, str(offset).encode()),
        (DLQ_TIME, format_time(now).encode()),
        (DLQ_TRACE_ID, trace.encode()),
        (DLQ_ATTEMPT, str(attempt).encode()),
    ]
    value = original.value
    if max_record_bytes is not None and value is not None:
        overhead = len(original.key or b"") + sum(len(k) + len(v) for k, v in headers) + TRUNCATION_HEADERS_BYTES
        if overhead + len(value) > max_record_bytes:
            headers += [
                (DLQ_VALUE_TRUNCATED_FROM, str(len(value)).encode()),
                (DLQ_VALUE_SHA256, hashlib.sha256(value).hexdigest().encode()),
            ]
            value = value[: max(0, max_record_bytes - overhead)]
    return DeadLetterRecord(topic or dead_letter_topic(origin_topic), original.key, value, headers)


def from_sink_rejection(rejection: Rejection, *, now: datetime, sink: str) -> DeadLetterRecord:
    """A record a sink refused (the kit's `Rejection`), to `<topic>.<sink>.dlq`: the sinks' dead-letter route."""
    record = rejection.record
    return build_dead_letter(
        OriginalMessage(record.topic, record.partition, record.offset, record.key, record.raw, record.headers),
        code=rejection.code,
        stage=Stage(str(rejection.stage)),
        message=rejection.message,
        now=now,
        field=rejection.field,
        topic=dead_letter_topic(record.topic, sink),
    )


# --- reading back ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A dead-letter record read back: the reason, where it came from, and the original record."""

    error_code: str
    stage: Stage | str
    rule: str | None
    field: str | None
    message: str
    original_topic: str
    original_partition: int
    original_offset: int
    time: datetime | None
    trace_id: str | None
    attempt: int
    key: bytes | None
    value: bytes | None  # the original value, unless `value_truncated_from` says it was cut
    original_headers: Headers = field(default_factory=list)  # without any lp-dlq-* header: replay these
    value_truncated_from: int | None = None  # the original value's size when the dead letter holds a prefix
    value_sha256: str | None = None  # of the original value, when it was cut

    def matches(
        self,
        *,
        rule: str | None = None,
        code: str | None = None,
        stage: str | None = None,
        topic: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> bool:
        """Filter for the replay CLI: every given criterion must hold (`until` is exclusive)."""
        if rule is not None and self.rule != rule:
            return False
        if code is not None and self.error_code != code:
            return False
        if stage is not None and str(self.stage) != stage:
            return False
        if topic is not None and self.original_topic != topic:
            return False
        if since is not None and (self.time is None or self.time < since):
            return False
        return until is None or (self.time is not None and self.time < until)


class NotADeadLetter(ValueError):
    pass


def _int(value: str, default: int) -> int:
    try:
        return int(value)
    except ValueError:
        return default


def _optional_int(value: str | None) -> int | None:
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


def parse_dead_letter(
    key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes | None]] | None
) -> DeadLetter:
    """Read a record of a dead-letter topic; raises `NotADeadLetter` when the lp-dlq headers are absent.

    Every `lp-dlq-*` header is the dead letter's own (known or not): none is left in `original_headers`."""
    found: dict[str, str] = {}
    own: Headers = []
    for name, raw in headers or ():
        if name.startswith(DLQ_PREFIX):
            found[name] = (raw or b"").decode("utf-8", "replace")
        else:
            own.append((name, raw if raw is not None else b""))
    if DLQ_ERROR_CODE not in found or DLQ_ORIGINAL_TOPIC not in found:
        raise NotADeadLetter(f"missing {DLQ_ERROR_CODE} / {DLQ_ORIGINAL_TOPIC} headers")
    stage_text = found.get(DLQ_STAGE, "")
    stage: Stage | str = Stage(stage_text) if stage_text in Stage._value2member_map_ else stage_text
    time_text = found.get(DLQ_TIME, "")
    try:
        when: datetime | None = datetime.fromisoformat(time_text) if time_text else None
    except ValueError:
        when = None
    return DeadLetter(
        error_code=found[DLQ_ERROR_CODE],
        stage=stage,
        rule=found.get(DLQ_RULE) or None,
        field=found.get(DLQ_FIELD) or None,
        message=found.get(DLQ_MESSAGE, ""),
        original_topic=found[DLQ_ORIGINAL_TOPIC],
        original_partition=_int(found.get(DLQ_ORIGINAL_PARTITION, "-1"), -1),
        original_offset=_int(found.get(DLQ_ORIGINAL_OFFSET, "-1"), -1),
        time=when,
        trace_id=found.get(DLQ_TRACE_ID) or None,
        attempt=_int(found.get(DLQ_ATTEMPT, "0"), 0),
        key=key,
        value=value,
        original_headers=own,
        value_truncated_from=_optional_int(found.get(DLQ_VALUE_TRUNCATED_FROM)),
        value_sha256=found.get(DLQ_VALUE_SHA256) or None,
    )


def as_dict(dead_letter: DeadLetter) -> dict[str, Any]:
    """Plain data (JSON lines for tools); the value is summarised by its size."""
    return {
        "error_code": dead_letter.error_code,
        "stage": str(dead_letter.stage),
        "rule": dead_letter.rule,
        "field": dead_letter.field,
        "message": dead_letter.message,
        "original_topic": dead_letter.original_topic,
        "original_partition": dead_letter.original_partition,
        "original_offset": dead_letter.original_offset,
        "time": format_time(dead_letter.time) if dead_letter.time else None,
        "trace_id": dead_letter.trace_id,
        "attempt": dead_letter.attempt,
        "value_bytes": None if dead_letter.value is None else len(dead_letter.value),
        "value_truncated_from": dead_letter.value_truncated_from,
    }
