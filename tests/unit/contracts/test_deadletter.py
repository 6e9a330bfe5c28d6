"""The one dead-letter format: original bytes unchanged, reason in headers, read back by the one parser, and
no stale bookkeeping when a replayed record is dead-lettered again."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pytest

from services.contracts.deadletter import (
    MAX_MESSAGE_BYTES,
    DeadLetterRecord,
    NotADeadLetter,
    OriginalMessage,
    Stage,
    as_dict,
    build_dead_letter,
    parse_dead_letter,
)
from services.contracts.headers import DLQ_HEADERS, DLQ_PREFIX, REPLAY_ID, REPLAY_SOURCE, RETRY_PREFIX
from services.validator.cli import replay_headers

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


def _kvh(record: DeadLetterRecord) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]:
    return record.key, record.value, record.headers


def test_round_trip() -> None:
    record = build_dead_letter(
        ORIGINAL, code="MISSING_FIELD", stage=Stage.VALIDATE, message="m", now=NOW, rule="r", field="event_id"
    )
    assert record.topic == "events.raw.dlq"
    assert record.key == ORIGINAL.key and record.value == ORIGINAL.value  # byte for byte
    assert record.headers[:2] == list(ORIGINAL.headers)  # the record's own headers first, kept
    assert [name for name, _ in record.headers[2:]] == list(DLQ_HEADERS)
    headers = dict(record.headers)
    assert headers["lp-dlq-time"] == b"2026-01-05T12:00:00.250Z"
    assert headers["lp-dlq-trace-id"] == TRACE.encode()

    parsed = parse_dead_letter(*_kvh(record))
    assert (parsed.error_code, parsed.stage, parsed.rule, parsed.field) == (
        "MISSING_FIELD",
        Stage.VALIDATE,
        "r",
        "event_id",
    )
    assert (parsed.original_topic, parsed.original_partition, parsed.original_offset) == ("events.raw", 7, 12345)
    assert (parsed.time, parsed.trace_id, parsed.attempt) == (NOW, TRACE, 0)
    assert (parsed.value, parsed.value_truncated_from, parsed.value_sha256) == (ORIGINAL.value, None, None)
    assert parsed.original_headers == list(ORIGINAL.headers)
    assert as_dict(parsed)["value_bytes"] == len(ORIGINAL.value or b"")


@pytest.mark.parametrize("stage", list(Stage))
def test_every_stage_reads_back_as_itself(stage: Stage) -> None:
    parsed = parse_dead_letter(*_kvh(build_dead_letter(ORIGINAL, code="X", stage=stage, message="", now=NOW)))
    assert parsed.stage is stage
    assert {str(s) for s in Stage} == {"decode", "validate", "enrich", "retry", "process", "store"}


def test_where_it_came_from_can_be_overridden() -> None:
    record = build_dead_letter(
        ORIGINAL,
        code="X",
        stage=Stage.RETRY,
        message="",
        now=NOW,
        attempt=5,
        original_topic="events.raw.first",
        original_partition=3,
        original_offset=77,
    )
    assert record.topic == "events.raw.first.dlq"
    parsed = parse_dead_letter(*_kvh(record))
    assert (parsed.original_topic, parsed.original_partition, parsed.original_offset, parsed.attempt) == (
        "events.raw.first",
        3,
        77,
        5,
    )


def test_the_records_own_trace_comes_before_the_fallback() -> None:
    own = build_dead_letter(ORIGINAL, code="X", stage=Stage.PROCESS, message="", now=NOW, fallback_trace_id="f" * 32)
    assert parse_dead_letter(*_kvh(own)).trace_id == TRACE
    bare = OriginalMessage("t", 0, 0, None, None)
    batch = build_dead_letter(bare, code="X", stage=Stage.PROCESS, message="", now=NOW, fallback_trace_id="f" * 32)
    assert parse_dead_letter(*_kvh(batch)).trace_id == "f" * 32
    untraced = build_dead_letter(bare, code="X", stage=Stage.DECODE, message="", now=NOW)
    assert parse_dead_letter(*_kvh(untraced)).trace_id is None


def test_stale_dead_letter_and_retry_headers_are_dropped() -> None:
    carrying = OriginalMessage(
        "events.raw.retry",
        0,
        9,
        b"k",
        b"v",
        [
            ("lp-retry-attempt", b"5"),
            ("lp-dlq-error-code", b"OLD"),
            ("lp-dlq-some-future-header", b"?"),
            ("traceparent", b"x"),
            ("producer", None),
        ],
    )
    record = build_dead_letter(carrying, code="NEW", stage=Stage.VALIDATE, message="", now=NOW)
    names = [name for name, _ in record.headers]
    assert names == ["traceparent", "producer", *DLQ_HEADERS]
    assert dict(record.headers)["producer"] == b""  # a null header value is kept, as empty bytes
    assert parse_dead_letter(*_kvh(record)).error_code == "NEW"


def test_long_messages_are_bounded_and_topics_overridable() -> None:
    record = build_dead_letter(ORIGINAL, code="X", stage=Stage.DECODE, message="é" * 5000, now=NOW, topic="x.dlq")
    assert record.topic == "x.dlq"
    message = dict(record.headers)["lp-dlq-message"]
    assert len(message) <= MAX_MESSAGE_BYTES and message.endswith(b"...")
    message.decode("utf-8")  # never cut inside a character
    one_line = build_dead_letter(ORIGINAL, code="X", stage=Stage.DECODE, message="a\nb", now=NOW)
    assert dict(one_line.headers)["lp-dlq-message"] == b"a b"


def test_a_value_too_large_for_the_broker_is_cut_to_fit_and_the_parser_says_so() -> None:
    value = bytes(range(256)) * 40  # 10 KiB
    big = OriginalMessage("events.raw", 1, 2, b"key", value, [("traceparent", b"x")])
    record = build_dead_letter(big, code="X", stage=Stage.PROCESS, message="m", now=NOW, max_record_bytes=4096)
    assert len(record.value or b"") + len(record.key or b"") + sum(len(k) + len(v) for k, v in record.headers) <= 4096
    assert record.value and value.startswith(record.value)
    parsed = parse_dead_letter(*_kvh(record))
    assert parsed.value_truncated_from == len(value)
    assert parsed.value_sha256 == hashlib.sha256(value).hexdigest()
    assert parsed.original_headers == [("traceparent", b"x")]  # the truncation headers are the dead letter's own
    assert as_dict(parsed)["value_truncated_from"] == len(value)

    fits = build_dead_letter(big, code="X", stage=Stage.PROCESS, message="m", now=NOW, max_record_bytes=1_000_000)
    assert fits.value == value and [name for name, _ in fits.headers] == ["traceparent", *DLQ_HEADERS]


def test_a_replayed_truncated_dead_letter_dead_lettered_again_carries_no_stale_header() -> None:
    """Truncated dead letter -> parsed -> replayed as the replay CLI builds it -> refused again: the new dead letter
    has exactly one reason, and none of the first one's headers (truncation ones included) survives."""
    value = b"\xc3\x01" + b"p" * 6000
    original = OriginalMessage(
        "events.raw", 3, 40, b"user-9", value, [("traceparent", b"00-t"), ("lp-retry-attempt", b"2")]
    )
    first = build_dead_letter(
        original, code="FIRST", stage=Stage.PROCESS, message="one", now=NOW, max_record_bytes=2048
    )
    first_names = {name for name, _ in first.headers}
    assert {"lp-dlq-value-truncated-from", "lp-dlq-value-sha256"} <= first_names  # the case under test

    dead = parse_dead_letter(*_kvh(first))
    replayed_headers = replay_headers(dead, "run-1", "events.raw.dlq:0:17")
    assert not any(name.startswith((DLQ_PREFIX, RETRY_PREFIX)) for name, _ in replayed_headers)
    replayed = OriginalMessage(dead.original_topic, dead.original_partition, 41, dead.key, dead.value, replayed_headers)
    second = build_dead_letter(replayed, code="SECOND", stage=Stage.VALIDATE, message="two", now=NOW + timedelta(1))

    dlq_names = [name for name, _ in second.headers if name.startswith(DLQ_PREFIX)]
    assert dlq_names == list(DLQ_HEADERS)  # one of each, and nothing else of the first dead letter
    headers = dict(second.headers)
    assert (headers["lp-dlq-error-code"], headers["lp-dlq-message"]) == (b"SECOND", b"two")
    assert (headers[REPLAY_ID], headers[REPLAY_SOURCE]) == (b"run-1", b"events.raw.dlq:0:17")
    assert headers["traceparent"] == b"00-t"
    again = parse_dead_letter(*_kvh(second))
    assert (again.value_truncated_from, again.value_sha256) == (None, None)

    # The builder alone also drops them: a replay that kept the first dead letter's headers verbatim (a tool
    # other than the CLI) is still dead-lettered with one current reason.
    verbatim = OriginalMessage("events.raw", 3, 42, first.key, first.value, first.headers)
    third = build_dead_letter(verbatim, code="THIRD", stage=Stage.VALIDATE, message="three", now=NOW)
    assert [name for name, _ in third.headers if name.startswith(DLQ_PREFIX)] == list(DLQ_HEADERS)


def test_filters_for_replay() -> None:
    parsed = parse_dead_letter(
        *_kvh(build_dead_letter(ORIGINAL, code="DUPLICATE", stage=Stage.VALIDATE, message="m", now=NOW, rule="uniq"))
    )
    assert parsed.matches(rule="uniq", code="DUPLICATE", topic="events.raw", stage="validate")
    assert parsed.matches(since=NOW - timedelta(seconds=1), until=NOW + timedelta(seconds=1))
    assert not parsed.matches(rule="user_exists")
    assert not parsed.matches(stage="decode")
    assert not parsed.matches(topic="cdc.postgres.users")
    assert not parsed.matches(since=NOW + timedelta(seconds=1))
    assert not parsed.matches(until=NOW)  # exclusive


def test_unknown_stages_and_unreadable_numbers_are_tolerated() -> None:
    headers = [
        ("lp-dlq-error-code", b"X"),
        ("lp-dlq-original-topic", b"t"),
        ("lp-dlq-stage", b"someday"),
        ("lp-dlq-original-offset", b"n/a"),
        ("lp-dlq-time", b"yesterday"),
        ("lp-dlq-value-truncated-from", b"lots"),
    ]
    parsed = parse_dead_letter(None, None, headers)
    assert (parsed.stage, parsed.original_offset, parsed.original_partition, parsed.time) == ("someday", -1, -1, None)
    assert parsed.value_truncated_from is None


def test_not_a_dead_letter() -> None:
    with pytest.raises(NotADeadLetter):
        parse_dead_letter(b"k", b"v", [("traceparent", b"x")])
    with pytest.raises(NotADeadLetter):
        parse_dead_letter(b"k", b"v", [("lp-dlq-error-code", b"X")])  # no original topic
