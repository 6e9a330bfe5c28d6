import datetime as dt
import os

import pytest

from services.kit.avro import (
    AvroDeserializer,
    AvroSerializer,
    Decoded,
    DecodeError,
    DecodeErrorCode,
    Schema,
    SchemaRepository,
)


@pytest.fixture(scope="module")
def repo() -> SchemaRepository:
    return SchemaRepository.load()


def record(**overrides):
    base = {
        "event_id": "8b0f6f0e-2b8c-4a7e-9a57-5d0c0f6d2e11",
        "event_type": "purchase",
        "event_time": dt.datetime(2026, 11, 21, 12, 0, tzinfo=dt.UTC),
        "user_id": "u-1",
        "quantity": 2,
        "price": 9.99,
        "amount": 21.5,
        "properties": {"campaign": "black-friday"},
    }
    return base | overrides


def test_round_trip_keeps_every_field(repo):
    payload = AvroSerializer(repo["raw_event"])(record())
    result = AvroDeserializer(repo, "raw_event")(payload)
    assert isinstance(result, Decoded)
    assert result.record["event_type"] == "purchase"
    assert result.record["quantity"] == 2
    assert result.record["event_time"] == dt.datetime(2026, 11, 21, 12, 0, tzinfo=dt.UTC)
    assert result.record["properties"] == {"campaign": "black-friday"}
    assert result.record["source"] == "generator"  # schema default
    assert payload[:2] == b"\xc3\x01"


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"", DecodeErrorCode.EMPTY),
        (None, DecodeErrorCode.EMPTY),
        (b'{"event_id": "json is not avro"}', DecodeErrorCode.NOT_AVRO),
        (b"\xc3\x01" + b"\x00" * 8 + b"\x02", DecodeErrorCode.UNKNOWN_SCHEMA),
    ],
)
def test_bad_payloads_are_classified(repo, payload, code):
    result = AvroDeserializer(repo, "raw_event")(payload)
    assert isinstance(result, DecodeError)
    assert result.code == code


def test_truncated_and_trailing_bytes(repo):
    payload = AvroSerializer(repo["raw_event"])(record())
    decode = AvroDeserializer(repo, "raw_event")
    assert decode(payload[:-4]).code == DecodeErrorCode.CORRUPT
    assert decode(payload + b"\x00").code == DecodeErrorCode.TRAILING_BYTES


def test_random_garbage_never_raises(repo):
    decode = AvroDeserializer(repo, "raw_event")
    header = repo["raw_event"].header
    rng = __import__("random").Random(7)
    for _ in range(2000):
        body = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 60)))
        result = decode(header + body)
        assert isinstance(result, Decoded | DecodeError)
    assert isinstance(decode(os.urandom(500)), DecodeError)


def test_invalid_utf8_in_a_string_field_has_its_own_code(repo):
    payload = AvroSerializer(repo["raw_event"])(record(user_id="MARKER-user"))
    at = payload.index(b"MARKER")
    result = AvroDeserializer(repo, "raw_event")(payload[:at] + b"\xff\xfe" + payload[at + 2 :])
    assert isinstance(result, DecodeError)
    assert result.code == DecodeErrorCode.INVALID_UTF8


def test_oversized_payload_is_rejected_before_decoding(repo):
    decode = AvroDeserializer(repo, "raw_event", max_bytes=100)
    payload = AvroSerializer(repo["raw_event"])(record(properties={"blob": "x" * 500}))
    assert decode(payload).code == DecodeErrorCode.TOO_LARGE


def test_older_writer_version_resolves_to_current_reader(repo):
    current = repo["raw_event"].definition
    old = dict(current, fields=[f for f in current["fields"] if f["name"] != "country"])
    local = SchemaRepository(repo.current.values())
    local.add_writer_version("raw_event", old)
    payload = AvroSerializer(Schema.from_definition("raw_event", old))(record())
    result = AvroDeserializer(local, "raw_event")(payload)
    assert isinstance(result, Decoded)
    assert result.record["country"] is None  # filled from the reader's default
    # the same payload is unknown to a reader that never heard of the old version
    assert AvroDeserializer(repo, "raw_event")(payload).code == DecodeErrorCode.UNKNOWN_SCHEMA


def test_fingerprint_ignores_docs(repo):
    current = repo["raw_event"].definition
    undocumented = dict(
        current, doc="changed", fields=[{k: v for k, v in f.items() if k != "doc"} for f in current["fields"]]
    )
    assert Schema.from_definition("raw_event", undocumented).fingerprint == repo["raw_event"].fingerprint
