"""Dead-letter records: the original key and value bytes, unchanged, with the reason in `lp-dlq-*` headers.

The value is never re-encoded, so a dead letter can be replayed byte for byte once the cause is fixed. The
original record's own headers (traceparent, producer, ...) are kept; earlier `lp-dlq-*` and `lp-retry-*`
bookkeeping is replaced, so a replayed record carries no stale reason or retry count. `parse_dead_letter`
reads the headers back into a typed `DeadLetter` (for the replay CLI's filters).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from services.kit.avro import DecodeError
from services.validator.retry import REFERENCE_NOT_FOUND, RETRY_HEADERS, RetryState, SendToDeadLetter
from services.validator.rulebook import Failure

HEADER_ERROR_CODE = "lp-dlq-error-code"
HEADER_RULE = "lp-dlq-rule"
HEADER_FIELD = "lp-dlq-field"
HEADER_MESSAGE = "lp-dlq-message"
HEADER_STAGE = "lp-dlq-stage"
HEADER_ORIGINAL_TOPIC = "lp-dlq-original-topic"
HEADER_ORIGINAL_PARTITION = "lp-dlq-original-partition"
HEADER_ORIGINAL_OFFSET = "lp-dlq-original-offset"
HEADER_TIME = "lp-dlq-time"
HEADER_TRACE_ID = "lp-dlq-trace-id"
HEADER_ATTEMPT = "lp-dlq-attempt"
DLQ_HEADERS = (
    HEADER_ERROR_CODE,
    HEADER_RULE,
    HEADER_FIELD,
    HEADER_MESSAGE,
    HEADER_STAGE,
    HEADER_ORIGINAL_TOPIC,
    HEADER_ORIGINAL_PARTITION,
    HEADER_ORIGINAL_OFFSET,
    HEADER_TIME,
    HEADER_TRACE_ID,
    HEADER_ATTEMPT,
)
DLQ_TOPIC_SUFFIX = ".dlq"
MAX_MESSAGE_BYTES = 1024
BATCH_PARSE_ERROR = "BATCH_PARSE_ERROR"
OUTPUT_CONTRACT = "OUTPUT_CONTRACT"

Headers = list[tuple[str, bytes]]


class Stage(StrEnum):
    DECODE = "decode"  # the bytes are not a record of the topic's contract (kit DecodeError, bad CDC JSON, batch row)
    VALIDATE = "validate"  # an error-severity rule failed
    ENRICH = "enrich"  # the accepted record could not be turned into the output contract
    RETRY = "retry"  # the late-reference policy gave up


def dead_letter_topic(original_topic: str) -> str:
    """`events.raw` -> `events.raw.dlq` (a retried record's DLQ is that of its original topic)."""
    return original_topic + DLQ_TOPIC_SUFFIX


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


def trace_id_from_headers(headers: Sequence[tuple[str, bytes | None]] | None) -> str | None:
    """The trace id of a W3C `traceparent` header (`00-<32 hex trace id>-<16 hex span id>-<flags>`)."""
    for key, value in headers or ():
        if key == "traceparent" and value:
            parts = value.decode("latin-1").strip().split("-")
            if len(parts) >= 4 and len(parts[1]) == 32 and parts[1] != "0" * 32:
                return parts[1].lower()
    return None


def format_time(value: datetime) -> str:
    aware = value if value.tzinfo else value.replace(tzinfo=UTC)
    return aware.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _truncate(text: str) -> bytes:
    data = text.replace("\n", " ").encode("utf-8")
    if len(data) <= MAX_MESSAGE_BYTES:
        return data
    return data[: MAX_MESSAGE_BYTES - 3].decode("utf-8", "ignore").encode("utf-8") + b"..."


def build_dead_letter(
    original: OriginalMessage,
    *,
    code: str,
    stage: Stage,
    message: str,
    now: datetime,
    rule: str | None = None,
    field: str | None = None,
    attempt: int = 0,
    trace_id: str | None = None,
    original_topic: str | None = None,
    original_partition: int | None = None,
    original_offset: int | None = None,
    topic: str | None = None,
) -> DeadLetterRecord:
    """The dead-letter record for `original`, to `topic` (default: `<original topic>.dlq`). `original_*`
    override where it came from (a retried record names the topic it first arrived on)."""
    origin_topic = original_topic if original_topic is not None else original.topic
    partition = original_partition if original_partition is not None else original.partition
    offset = original_offset if original_offset is not None else original.offset
    own = [
        (k, v if v is not None else b"") for k, v in original.headers if k not in DLQ_HEADERS and k not in RETRY_HEADERS
    ]
    trace = trace_id or trace_id_from_headers(original.headers) or ""
    own += [
        (HEADER_ERROR_CODE, code.encode()),
        (HEADER_RULE, (rule or "").encode()),
        (HEADER_FIELD, (field or "").encode()),
        (HEADER_MESSAGE, _truncate(message)),
        (HEADER_STAGE, str(stage).encode()),
        (HEADER_ORIGINAL_TOPIC, origin_topic.encode()),
        (HEADER_ORIGINAL_PARTITION, str(partition).encode()),
        (HEADER_ORIGINAL_OFFSET, str(offset).encode()),
        (HEADER_TIME, format_time(now).encode()),
        (HEADER_TRACE_ID, trace.encode()),
        (HEADER_ATTEMPT, str(attempt).encode()),
    ]
    return DeadLetterRecord(topic or dead_letter_topic(origin_topic), original.key, original.value, own)


def _summary(failures: Sequence[Failure]) -> str:
    first = failures[0]
    text = first.message
    if len(failures) > 1:
        text += "; also: " + "; ".join(f"{f.rule_id}: {f.message}" for f in failures[1:5])
        if len(failures) > 5:
            text += f"; and {len(failures) - 5} more"
    return text


def _where(retry_state: RetryState | None) -> dict[str, Any]:
    """A retried record is dead-lettered as coming from where it first arrived, after its retries."""
    if retry_state is None:
        return {}
    return {
        "original_topic": retry_state.original_topic,
        "original_partition": retry_state.original_partition,
        "original_offset": retry_state.original_offset,
        "attempt": retry_state.attempt,
    }


def from_failures(
    original: OriginalMessage,
    failures: Sequence[Failure],
    *,
    now: datetime,
    topic: str | None = None,
    retry_state: RetryState | None = None,
) -> DeadLetterRecord:
    """A record rejected by the rules (stage validate): code, rule and field(s) of the first failing rule."""
    if not failures:
        raise ValueError("a rejected record has at least one failure")
    first = failures[0]
    fields = [f.field for f in failures if f.rule_id == first.rule_id and f.field]
    return build_dead_letter(
        original,
        code=first.code,
        stage=Stage.VALIDATE,
        message=_summary(failures),
        now=now,
        rule=first.rule_id,
        field=",".join(dict.fromkeys(fields)) or first.field,
        topic=topic,
        **_where(retry_state),
    )


def from_decode_error(
    original: OriginalMessage,
    error: DecodeError,
    *,
    now: datetime,
    topic: str | None = None,
    retry_state: RetryState | None = None,
) -> DeadLetterRecord:
    """A payload the kit's AvroDeserializer refused (stage decode; code = the DecodeErrorCode value)."""
    return build_dead_letter(
        original,
        code=str(error.code),
        stage=Stage.DECODE,
        message=error.message,
        now=now,
        topic=topic,
        **_where(retry_state),
    )


def from_exception(
    original: OriginalMessage,
    code: str,
    error: BaseException | str,
    *,
    stage: Stage,
    now: datetime,
    topic: str | None = None,
    retry_state: RetryState | None = None,
) -> DeadLetterRecord:
    """Any other refusal with a code (bad CDC envelope, output contract): the message is the error text."""
    return build_dead_letter(
        original,
        code=code,
        stage=stage,
        message=str(error) if isinstance(error, str) else f"{type(error).__name__}: {error}",
        now=now,
        field=getattr(error, "field", None),
        topic=topic,
        **_where(retry_state),
    )


def from_retry_exhausted(
    original: OriginalMessage,
    decision: SendToDeadLetter,
    retry_state: RetryState | None,
    failures: Sequence[Failure],
    *,
    now: datetime,
    topic: str | None = None,
) -> DeadLetterRecord:
    """The late-reference policy gave up (stage retry, code REFERENCE_NOT_FOUND)."""
    first = failures[0] if failures else None
    message = decision.message + (f": {_summary(failures)}" if failures else "")
    return build_dead_letter(
        original,
        code=REFERENCE_NOT_FOUND,
        stage=Stage.RETRY,
        message=message,
        now=now,
        rule=first.rule_id if first else (retry_state.rule if retry_state else None),
        field=first.field if first else None,
        topic=topic,
        **{**_where(retry_state), "attempt": decision.attempt - 1},  # the retries actually made
    )


# --- reading back ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A dead-letter record read back: the reason, where it came from, and the untouched original."""

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
    value: bytes | None
    original_headers: Headers = field(default_factory=list)  # without the lp-dlq-* ones: replay these

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


def parse_dead_letter(
    key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes | None]] | None
) -> DeadLetter:
    """Read a record of a `*.dlq` topic; raises `NotADeadLetter` when the lp-dlq headers are absent."""
    found: dict[str, str] = {}
    own: Headers = []
    for name, raw in headers or ():
        if name in DLQ_HEADERS:
            found[name] = (raw or b"").decode("utf-8", "replace")
        else:
            own.append((name, raw if raw is not None else b""))
    if HEADER_ERROR_CODE not in found or HEADER_ORIGINAL_TOPIC not in found:
        raise NotADeadLetter("missing lp-dlq-error-code / lp-dlq-original-topic headers")
    stage_text = found.get(HEADER_STAGE, "")
    stage: Stage | str = Stage(stage_text) if stage_text in Stage._value2member_map_ else stage_text
    time_text = found.get(HEADER_TIME, "")
    try:
        when: datetime | None = datetime.fromisoformat(time_text) if time_text else None
    except ValueError:
        when = None
    return DeadLetter(
        error_code=found[HEADER_ERROR_CODE],
        stage=stage,
        rule=found.get(HEADER_RULE) or None,
        field=found.get(HEADER_FIELD) or None,
        message=found.get(HEADER_MESSAGE, ""),
        original_topic=found[HEADER_ORIGINAL_TOPIC],
        original_partition=_int(found.get(HEADER_ORIGINAL_PARTITION, "-1"), -1),
        original_offset=_int(found.get(HEADER_ORIGINAL_OFFSET, "-1"), -1),
        time=when,
        trace_id=found.get(HEADER_TRACE_ID) or None,
        attempt=_int(found.get(HEADER_ATTEMPT, "0"), 0),
        key=key,
        value=value,
        original_headers=own,
    )


def as_dict(dead_letter: DeadLetter) -> dict[str, Any]:
    """Plain data (for `replay --list` as JSON lines); the value is summarised by its size."""
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
    }
