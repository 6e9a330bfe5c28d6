"""The validator's refusals as dead letters: code, stage, rule, field and origin of each kind of refusal."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.contracts.deadletter import DeadLetterRecord, OriginalMessage, Stage, as_dict, parse_dead_letter
from services.kit.avro import DecodeError, DecodeErrorCode
from services.validator.rejections import from_decode_error, from_exception, from_failures, from_retry_exhausted
from services.validator.retry import RetryState, SendToDeadLetter
from services.validator.rulebook import Failure, RuleType

NOW = datetime(2026, 1, 5, 12, 0, 0, 250_000, tzinfo=UTC)
TRACE = "0af7651916cd43dd8448eb211c80319c"
ORIGINAL = OriginalMessage(
    topic="events.raw",
    partition=7,
    offset=12345,
    key=b"user-1",
    value=b"\xc3\x01 original avro bytes",
    headers=[("traceparent", f"00-{TRACE}-b7ad6b7169203331-01".encode()), ("lp-injected-fault", b"null_ids")],
)


def test_validation_failure_round_trip() -> None:
    failures = [
        Failure("event_required_ids", RuleType.MANDATORY, "event_id", "MISSING_FIELD", "event_id is missing or empty"),
        Failure("event_required_ids", RuleType.MANDATORY, "user_id", "MISSING_FIELD", "user_id is missing or empty"),
    ]
    record = from_failures(ORIGINAL, failures, now=NOW)
    assert record.topic == "events.raw.dlq"
    assert record.key == ORIGINAL.key and record.value == ORIGINAL.value  # byte for byte
    assert record.headers[:2] == list(ORIGINAL.headers)  # the record's own headers first, kept
    headers = dict(record.headers)
    assert headers["lp-dlq-error-code"] == b"MISSING_FIELD"
    assert headers["lp-dlq-field"] == b"event_id,user_id"
    assert headers["lp-dlq-time"] == b"2026-01-05T12:00:00.250Z"
    assert headers["lp-dlq-trace-id"] == TRACE.encode()

    parsed = parse_dead_letter(record.key, record.value, record.headers)
    assert parsed.error_code == "MISSING_FIELD"
    assert parsed.stage is Stage.VALIDATE
    assert (parsed.rule, parsed.field) == ("event_required_ids", "event_id,user_id")
    assert parsed.message == "event_id is missing or empty; also: event_required_ids: user_id is missing or empty"
    assert (parsed.original_topic, parsed.original_partition, parsed.original_offset) == ("events.raw", 7, 12345)
    assert parsed.time == NOW.replace(microsecond=250_000)
    assert (parsed.trace_id, parsed.attempt) == (TRACE, 0)
    assert parsed.value == ORIGINAL.value
    assert parsed.original_headers == list(ORIGINAL.headers)
    assert as_dict(parsed)["value_bytes"] == len(ORIGINAL.value or b"")


def test_decode_errors_map_to_stage_decode() -> None:
    error = DecodeError(DecodeErrorCode.NOT_AVRO, "missing the Avro single-object marker C3 01")
    parsed = parse_dead_letter(*_kvh(from_decode_error(ORIGINAL, error, now=NOW)))
    assert (parsed.error_code, parsed.stage, parsed.rule, parsed.field) == (
        "NOT_AVRO_SINGLE_OBJECT",
        Stage.DECODE,
        None,
        None,
    )
    for code in DecodeErrorCode:
        dead = from_decode_error(ORIGINAL, DecodeError(code, "x"), now=NOW)
        assert dict(dead.headers)["lp-dlq-error-code"] == code.value.encode()


def test_exceptions_carry_their_field() -> None:
    class Broken(ValueError):
        field = "total"

    parsed = parse_dead_letter(
        *_kvh(from_exception(ORIGINAL, "OUTPUT_CONTRACT", Broken("no"), stage=Stage.ENRICH, now=NOW))
    )
    assert (parsed.error_code, parsed.stage, parsed.field, parsed.message) == (
        "OUTPUT_CONTRACT",
        Stage.ENRICH,
        "total",
        "Broken: no",
    )


def test_retry_exhausted_names_the_first_arrival() -> None:
    retried = OriginalMessage(
        "events.raw.retry",
        0,
        9,
        b"user-1",
        b"bytes",
        [("lp-retry-attempt", b"5"), ("lp-retry-rule", b"user_exists"), ("traceparent", b"x")],
    )
    state = RetryState(5, NOW, NOW - timedelta(minutes=1), "user_exists", "events.raw", 3, 77)
    failure = Failure(
        "user_exists", RuleType.LOOKUP, "user_id", "REFERENCE_NOT_FOUND", "user_id='u' not found", retryable=True
    )
    decision = SendToDeadLetter(6, "REFERENCE_NOT_FOUND", "reference still missing after 5 retries")
    record = from_retry_exhausted(retried, decision, state, [failure], now=NOW)
    assert record.topic == "events.raw.dlq"
    assert not any(k.startswith("lp-retry-") for k, _ in record.headers)  # a replay must start afresh
    parsed = parse_dead_letter(*_kvh(record))
    assert (parsed.error_code, parsed.stage, parsed.rule, parsed.field, parsed.attempt) == (
        "REFERENCE_NOT_FOUND",
        Stage.RETRY,
        "user_exists",
        "user_id",
        5,
    )
    assert (parsed.original_topic, parsed.original_partition, parsed.original_offset) == ("events.raw", 3, 77)
    assert parsed.message == "reference still missing after 5 retries: user_id='u' not found"


def _kvh(record: DeadLetterRecord) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]:
    return record.key, record.value, record.headers
