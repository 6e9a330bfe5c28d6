"""The columnar decoder gives exactly fastavro's values, and flags every payload it cannot decode."""

from __future__ import annotations

import io
import random
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import fastavro
import pyarrow as pa
import pytest

from services.kit.avro import AvroDeserializer, AvroSerializer, Decoded, Schema, SchemaRepository
from services.kit.avro_columnar import ColumnarDecoder, FastPathUnsupported
from services.testing.samples import encoded_events, processed_transactions

EVERYTHING = {
    "type": "record",
    "name": "Everything",
    "namespace": "test",
    "fields": [
        {"name": "b", "type": "boolean"},
        {"name": "i", "type": "int"},
        {"name": "l", "type": "long"},
        {"name": "f", "type": "float"},
        {"name": "d", "type": "double"},
        {"name": "s", "type": "string"},
        {"name": "raw", "type": "bytes"},
        {"name": "null_first", "type": ["null", "long"], "default": None},
        {"name": "null_second", "type": ["string", "null"], "default": ""},
        {"name": "opt_bool", "type": ["null", "boolean"], "default": None},
        {"name": "opt_double", "type": ["null", "double"], "default": None},
        {"name": "opt_bytes", "type": ["null", "bytes"], "default": None},
        {"name": "color", "type": {"type": "enum", "name": "Color", "symbols": ["RED", "GREEN", "BLUE"]}},
        {"name": "opt_color", "type": ["null", "Color"], "default": None},
        {"name": "hash", "type": {"type": "fixed", "name": "Hash", "size": 4}},
        {"name": "day", "type": {"type": "int", "logicalType": "date"}},
        {"name": "ts_ms", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "ts_us", "type": ["null", {"type": "long", "logicalType": "timestamp-micros"}], "default": None},
        {"name": "money", "type": {"type": "bytes", "logicalType": "decimal", "precision": 12, "scale": 2}},
        {
            "name": "opt_money",
            "type": ["null", {"type": "bytes", "logicalType": "decimal", "precision": 20, "scale": 4}],
            "default": None,
        },
        {"name": "tags", "type": {"type": "array", "items": "string"}},
        {"name": "scores", "type": {"type": "map", "values": "long"}},
        {"name": "opt_props", "type": ["null", {"type": "map", "values": "string"}], "default": None},
        {
            "name": "points",
            "type": {
                "type": "array",
                "items": {
                    "type": "record",
                    "name": "Point",
                    "fields": [{"name": "x", "type": "int"}, {"name": "label", "type": ["null", "string"]}],
                },
            },
        },
        {"name": "origin", "type": ["null", "Point"], "default": None},
        {"name": "matrix", "type": {"type": "array", "items": {"type": "array", "items": "int"}}},
    ],
}


def _text(rng: random.Random) -> str:
    alphabet = "abcxyz 0123456789-äöü€😀"
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))


def _maybe(rng: random.Random, value: Any) -> Any:
    return None if rng.random() < 0.3 else value


def everything_record(rng: random.Random) -> dict[str, Any]:
    big = rng.choice([0, 1, -1, 63, -64, 64, 2**31 - 1, -(2**31), 2**62, -(2**63), 2**63 - 1])
    return {
        "b": rng.random() < 0.5,
        "i": rng.choice([0, -1, 1, 2**31 - 1, -(2**31), rng.randrange(-1000, 1000)]),
        "l": rng.choice([big, rng.randrange(-(10**15), 10**15)]),
        "f": rng.choice([0.0, -1.5, 3.25, float("inf")]),
        "d": rng.uniform(-1e9, 1e9),
        "s": _text(rng),
        "raw": rng.randbytes(rng.randrange(0, 20)),
        "null_first": _maybe(rng, rng.randrange(-(2**40), 2**40)),
        "null_second": _maybe(rng, _text(rng)),
        "opt_bool": _maybe(rng, rng.random() < 0.5),
        "opt_double": _maybe(rng, rng.random()),
        "opt_bytes": _maybe(rng, rng.randbytes(rng.randrange(0, 5))),
        "color": rng.choice(["RED", "GREEN", "BLUE"]),
        "opt_color": _maybe(rng, "BLUE"),
        "hash": rng.randbytes(4),
        "day": date(2020, 1, 1) + timedelta(days=rng.randrange(-5000, 5000)),
        "ts_ms": datetime(2026, 1, 1, tzinfo=UTC) + timedelta(milliseconds=rng.randrange(-(10**12), 10**12)),
        "ts_us": _maybe(rng, datetime(2026, 1, 1, tzinfo=UTC) + timedelta(microseconds=rng.randrange(10**12))),
        "money": Decimal(rng.randrange(-(10**11), 10**11)) / 100,
        "opt_money": _maybe(rng, Decimal(rng.randrange(-(10**19), 10**19)) / 10_000),
        "tags": [_text(rng) for _ in range(rng.randrange(0, 4))],
        "scores": {_text(rng): rng.randrange(-(2**40), 2**40) for _ in range(rng.randrange(0, 4))},
        "opt_props": _maybe(rng, {_text(rng): _text(rng) for _ in range(rng.randrange(0, 3))}),
        "points": [{"x": rng.randrange(-100, 100), "label": _maybe(rng, _text(rng))} for _ in range(rng.randrange(3))],
        "origin": _maybe(rng, {"x": 7, "label": None}),
        "matrix": [[rng.randrange(-5, 5) for _ in range(rng.randrange(3))] for _ in range(rng.randrange(3))],
    }


def encode(schema: Schema, record: dict[str, Any]) -> bytes:
    """Single-object bytes, as fastavro writes them."""
    buffer = io.BytesIO()
    buffer.write(schema.header)
    fastavro.schemaless_writer(buffer, schema.parsed, record)
    return buffer.getvalue()


def normalize(value: Any) -> Any:
    """Arrow's Python values -> fastavro's (maps come back as pairs, tz-aware datetimes, ...)."""
    if isinstance(value, list) and value and all(isinstance(v, tuple) and len(v) == 2 for v in value):
        return {k: normalize(v) for k, v in value}
    if isinstance(value, list):
        return [normalize(v) for v in value]
    if isinstance(value, dict):
        return {k: normalize(v) for k, v in value.items()}
    return value


def as_python(column: pa.Array, row: int) -> Any:
    return normalize(column[row].as_py())


def assert_same(schema: Schema, payloads: list[bytes], reference: list[dict[str, Any]]) -> None:
    decoded = ColumnarDecoder(schema).decode(payloads)
    assert decoded.bad.tolist() == []
    assert decoded.good.tolist() == list(range(len(payloads)))
    for row, expected in enumerate(reference):
        for name, value in expected.items():
            got = as_python(decoded.columns[name], row)
            if isinstance(value, dict) and got == []:
                got = {}  # an empty map comes back as an empty list
            if isinstance(value, float) and isinstance(got, float) and name == "f":
                assert got == pytest.approx(value, rel=1e-6), name
            else:
                assert got == value, (row, name)


@pytest.fixture(scope="module")
def everything() -> Schema:
    return Schema.from_definition("everything", EVERYTHING)


def test_every_supported_type_decodes_as_fastavro_does(everything: Schema) -> None:
    rng = random.Random(11)
    payloads = [encode(everything, everything_record(rng)) for _ in range(600)]
    reference = [fastavro.schemaless_reader(io.BytesIO(p[10:]), everything.parsed, None) for p in payloads]
    assert_same(everything, payloads, reference)


def test_processed_events_decode_as_the_kit_does() -> None:
    repository = SchemaRepository.load()
    payloads = [payload for _, payload, _ in encoded_events(2_000)]
    deserialize = AvroDeserializer(repository, "processed_event")
    reference = []
    for payload in payloads:
        result = deserialize(payload)
        assert isinstance(result, Decoded)
        reference.append(result.record)
    assert_same(repository["processed_event"], payloads, reference)


def test_processed_transactions_with_decimals_decode_as_the_kit_does() -> None:
    repository = SchemaRepository.load()
    schema = repository["processed_transaction"]
    serialize = AvroSerializer(schema)
    records = list(processed_transactions(400))
    records[3]["unit_price"] = Decimal("-0.01")
    records[5]["total"] = Decimal("9999999999.99")
    payloads = [serialize(r) for r in records]
    reference = [fastavro.schemaless_reader(io.BytesIO(p[10:]), schema.parsed, None) for p in payloads]
    assert_same(schema, payloads, reference)


def test_arrays_and_maps_written_in_several_blocks_decode(everything: Schema) -> None:
    # Avro allows a negative block count followed by the block's byte size; fastavro never writes it, so it
    # is built by hand here: tags = ["ab", "c"] as one block of -2 items (size 5), then the end marker.
    rng = random.Random(3)
    record = everything_record(rng) | {"tags": ["x"]}
    plain = encode(everything, record)
    one_block = b"\x02" + b"\x02x" + b"\x00"  # count 1, "x", end
    assert one_block in plain
    split = b"\x03" + b"\x0a" + b"\x04ab" + b"\x02c" + b"\x00"  # count -2, size 5, "ab", "c", end
    payload = plain.replace(one_block, split, 1)
    decoded = ColumnarDecoder(everything).decode([payload])
    assert decoded.bad.tolist() == []
    assert decoded.columns["tags"][0].as_py() == ["ab", "c"]


def test_broken_payloads_are_flagged_and_the_others_decode(everything: Schema) -> None:
    rng = random.Random(5)
    good = [encode(everything, everything_record(rng) | {"i": 0, "l": 0}) for _ in range(20)]
    s_length = 10 + 1 + 1 + 1 + 4 + 8  # header, b, i, l, f, d: then the length of s (one byte: < 64 chars)
    other_schema = Schema.from_definition("other", {"type": "record", "name": "O", "fields": []})
    broken = {
        1: good[1][:-1],  # truncated
        3: good[3] + b"\x00",  # trailing byte
        5: b"",  # empty
        7: b"garbage",  # not single-object
        9: other_schema.header + good[9][10:],  # another writer schema
        11: good[11][:10] + b"\xff" * 30,  # varints that never end
        13: good[13][:s_length] + b"\xfe\xff\xff\x0f" + good[13][s_length + 1 :],  # a huge string length
        17: good[17][:s_length] + b"\x01" + good[17][s_length + 1 :],  # a negative string length
        15: good[15][:10] + b"\x04" + good[15][11:],  # boolean byte 4
    }
    payloads = [broken.get(i, p) for i, p in enumerate(good)]
    decoded = ColumnarDecoder(everything).decode(payloads)
    assert set(decoded.bad.tolist()) == set(broken)
    assert decoded.good.tolist() == [i for i in range(20) if i not in broken]
    reference = fastavro.schemaless_reader(io.BytesIO(good[2][10:]), everything.parsed, None)
    assert as_python(decoded.columns["s"], decoded.good.tolist().index(2)) == reference["s"]


def test_invalid_utf8_in_a_string_flags_only_that_record(everything: Schema) -> None:
    rng = random.Random(8)
    records = [everything_record(rng) | {"s": "hello"} for _ in range(3)]
    payloads = [encode(everything, r) for r in records]
    payloads[1] = payloads[1].replace(b"\x0ahello", b"\x0ahell\xff", 1)
    decoded = ColumnarDecoder(everything).decode(payloads)
    assert decoded.bad.tolist() == [1]
    assert decoded.columns["s"].to_pylist() == ["hello", "hello"]


def test_an_empty_batch_decodes_to_empty_columns(everything: Schema) -> None:
    decoded = ColumnarDecoder(everything).decode([])
    assert decoded.good.size == 0 and decoded.bad.size == 0
    assert all(len(column) == 0 for column in decoded.columns.values())


def test_unions_of_two_types_are_not_taken() -> None:
    schema = Schema.from_definition(
        "u", {"type": "record", "name": "U", "fields": [{"name": "x", "type": ["null", "string", "long"]}]}
    )
    with pytest.raises(FastPathUnsupported, match="union"):
        ColumnarDecoder(schema)


def test_ends_of_gives_each_field_end_within_its_payload() -> None:
    """`ends_of` reports where a top-level field's encoding ends: the bytes after it are the rest of the record as
    written, so a caller can copy them unchanged."""
    from services.kit.avro import SchemaRepository

    schema = SchemaRepository.load()["raw_event"]
    records = [
        {"event_id": "a" * n, "event_type": "x", "event_time": None, "user_id": None, "source": "s", "properties": {}}
        for n in (0, 1, 200)
    ]
    parsed = fastavro.parse_schema(schema.definition)
    payloads = []
    for record in records:
        body = io.BytesIO()
        fastavro.schemaless_writer(body, parsed, record)
        payloads.append(schema.header + body.getvalue())
    batch = ColumnarDecoder(schema).decode(payloads, ends_of=("event_type", "properties"))
    assert batch.good.tolist() == [0, 1, 2]
    for row, payload in enumerate(payloads):
        assert batch.ends["properties"][row] == len(payload)
        event_id_length = len(records[row]["event_id"])
        header_union_and_length = 10 + 1 + (1 if event_id_length < 64 else 2)
        assert batch.ends["event_type"][row] == header_union_and_length + event_id_length + 1 + 1 + 1
