"""Oversized raw events around the producer's limit: PAYLOAD_TOO_LARGE in every case, the original bytes kept
while the dead letter fits, cut (and said so) only above it; never the runtime's PROCESSOR_OUTPUT_INVALID."""

from __future__ import annotations

import hashlib
import os
from datetime import UTC, datetime

import pytest

from services.contracts.deadletter import DeadLetter, parse_dead_letter
from services.contracts.headers import DLQ_VALUE_SHA256, DLQ_VALUE_TRUNCATED_FROM
from services.kit.avro import SchemaRepository
from services.kit.config import load_settings
from services.validator.processor import (
    DEAD_LETTER_HEADROOM_BYTES,
    ValidatorProcessor,
    ValidatorSettings,
    dead_letter_budget,
)
from services.validator.references import ReferenceStore
from services.validator.rulebook import RuleBook
from services.validator.runtime import Output, Record, run_processor

NOW = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
RUNTIME_REQUEST_OVERHEAD = 1024  # what stream_app keeps off PRODUCER_MAX_REQUEST_BYTES for the request framing


@pytest.fixture(scope="module")
def validator_settings() -> ValidatorSettings:
    return load_settings(ValidatorSettings, kafka_bootstrap_servers="localhost:9092")


@pytest.fixture(scope="module")
def processor(validator_settings: ValidatorSettings) -> ValidatorProcessor:
    return ValidatorProcessor(
        RuleBook(),
        SchemaRepository.load(),
        references=ReferenceStore(),
        max_event_bytes=validator_settings.validator_max_event_bytes,
        max_record_bytes=dead_letter_budget(validator_settings),
    )


def raw(size: int) -> Record:
    # `traceparent`-less on purpose: the runtime then adds its batch span's context after the size check
    return Record("events.raw", 3, 17, b"k" * 36, b"\xc3\x01" + os.urandom(size - 2), [("x-producer", b"hostile")])


def dead_size(output: Output) -> int:
    return len(output.key or b"") + len(output.value or b"") + sum(len(k) + len(v) for k, v in output.headers)


def run(
    processor: ValidatorProcessor, validator_settings: ValidatorSettings, record: Record
) -> tuple[Output, DeadLetter]:
    max_record_bytes = validator_settings.producer_max_request_bytes - RUNTIME_REQUEST_OVERHEAD
    result = run_processor(processor, [record], max_record_bytes, now=lambda: NOW)
    assert result.dead_letters == 0 and not result.batch_failed  # the runtime never had to replace it
    (output,) = result.outputs
    assert output.topic == "events.raw.dlq" and dead_size(output) + 120 <= max_record_bytes  # + a traceparent
    return output, parse_dead_letter(output.key, output.value, output.headers)


def largest_whole(processor: ValidatorProcessor, validator_settings: ValidatorSettings) -> int:
    """The largest value whose dead letter keeps it whole (found by bisection on the processor itself)."""
    low, high = 65_537, validator_settings.producer_max_request_bytes
    while low < high:
        middle = (low + high + 1) // 2
        _output, dead = run(processor, validator_settings, raw(middle))
        low, high = (middle, high) if dead.value_truncated_from is None else (low, middle - 1)
    return low


def test_the_default_limit_is_the_brokers_and_covers_every_1_mb_record(validator_settings: ValidatorSettings) -> None:
    assert (
        validator_settings.producer_max_request_bytes == 1_048_588
    )  # Kafka's message.max.bytes, inherited by the topics
    assert validator_settings.producer_max_request_bytes - DEAD_LETTER_HEADROOM_BYTES > 1_000_000 + 2048


def test_payloads_just_below_at_and_above_the_limit(
    processor: ValidatorProcessor, validator_settings: ValidatorSettings
) -> None:
    limit = largest_whole(processor, validator_settings)
    budget = validator_settings.producer_max_request_bytes - DEAD_LETTER_HEADROOM_BYTES
    assert budget - 2048 < limit < budget  # the dead letter's own headers, and nothing else, sit between
    for size in (65_537, 998_000, 1_000_000, limit - 1, limit):
        record = raw(size)
        _output, dead = run(processor, validator_settings, record)
        assert (dead.error_code, str(dead.stage), dead.value, dead.value_truncated_from) == (
            "PAYLOAD_TOO_LARGE",
            "decode",
            record.value,
            None,
        ), size
    for size in (limit + 1, 2 * 1024 * 1024):
        record = raw(size)
        output, dead = run(processor, validator_settings, record)
        headers = dict(output.headers)
        assert dead.error_code == "PAYLOAD_TOO_LARGE", size  # the code stays, only the value is cut
        assert record.value.startswith(dead.value) and len(dead.value) > limit - 1024
        assert headers[DLQ_VALUE_TRUNCATED_FROM] == str(size).encode()
        assert headers[DLQ_VALUE_SHA256] == hashlib.sha256(record.value).hexdigest().encode()
        assert dead.original_headers == [("x-producer", b"hostile")] and dead.key == record.key
