"""The validator's reasons for refusing a record, as dead letters (`services.contracts.deadletter` builds them).

Each constructor turns one of the validator's own outcomes (failed rules, an exhausted retry, an undecodable
payload, an output-contract error) into the code, stage, rule, field and message of the dead-letter format.
`max_record_bytes`: the largest record the producer may send; only a dead letter that would exceed it has its
value cut (last resort, `lp-dlq-value-truncated-from`), and it keeps its own code.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from services.contracts.deadletter import ConsumedRecord, DeadLetterRecord, Stage, build_dead_letter
from services.kit.avro import DecodeError
from services.validator.retry import REFERENCE_NOT_FOUND, RetryState, SendToDeadLetter
from services.validator.rulebook import Failure

BATCH_PARSE_ERROR = "BATCH_PARSE_ERROR"  # a batch-file row that cannot be read as a raw_event
OUTPUT_CONTRACT = "OUTPUT_CONTRACT"  # an accepted record that does not fit its output contract


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
    original: ConsumedRecord,
    failures: Sequence[Failure],
    *,
    now: datetime,
    topic: str | None = None,
    max_record_bytes: int | None = None,
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
        max_record_bytes=max_record_bytes,
        **_where(retry_state),
    )


def from_decode_error(
    original: ConsumedRecord,
    error: DecodeError,
    *,
    now: datetime,
    topic: str | None = None,
    max_record_bytes: int | None = None,
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
        max_record_bytes=max_record_bytes,
        **_where(retry_state),
    )


def from_exception(
    original: ConsumedRecord,
    code: str,
    error: BaseException | str,
    *,
    stage: Stage,
    now: datetime,
    topic: str | None = None,
    max_record_bytes: int | None = None,
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
        max_record_bytes=max_record_bytes,
        **_where(retry_state),
    )


def from_retry_exhausted(
    original: ConsumedRecord,
    decision: SendToDeadLetter,
    retry_state: RetryState | None,
    failures: Sequence[Failure],
    *,
    now: datetime,
    topic: str | None = None,
    max_record_bytes: int | None = None,
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
        max_record_bytes=max_record_bytes,
        **{**_where(retry_state), "attempt": decision.attempt - 1},  # the retries actually made
    )
