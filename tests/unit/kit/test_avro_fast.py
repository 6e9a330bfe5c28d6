"""The compiled Avro encoder writes exactly fastavro's bytes, and defers to fastavro for everything else."""

from __future__ import annotations

import random
from datetime import UTC, date, datetime

import pytest

from services.generator.model import Simulation
from services.kit.avro import AvroDeserializer, AvroSerializer, Decoded, Schema, SchemaRepository
from services.kit.avro_fast import compile_plan, zigzag_varint


def pair(schema: Schema):
    """The serializer under test (compiled fast path) and fastavro alone, the reference."""
    serializer = AvroSerializer(schema)
    return serializer, serializer.encode_with_fastavro


@pytest.fixture(scope="module")
def raw_event() -> Schema:
    return SchemaRepository.load()["raw_event"]


def as_ingested(record: dict) -> dict:
    stamp = record["event_time"]
    return record | {"event_time": int(stamp.timestamp() * 1000), "source": "ingest-api"}


def test_zigzag_varint_matches_the_spec():
    assert zigzag_varint(0) == b"\x00"
    assert zigzag_varint(-1) == b"\x01"
    assert zigzag_varint(1) == b"\x02"
    assert zigzag_varint(-64) == b"\x7f"
    assert zigzag_varint(64) == b"\x80\x01"
    assert zigzag_varint(2**63 - 1) == b"\xfe" + b"\xff" * 8 + b"\x01"


def test_raw_event_compiles_to_the_fast_path(raw_event):
    assert AvroSerializer(raw_event).plan is not None


def test_same_bytes_as_fastavro_for_generator_events(raw_event):
    fast, reference = pair(raw_event)
    simulation = Simulation(11, 100, 50)
    for _ in range(2000):
        record = simulation.next_event(datetime(2026, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)).to_record()
        assert fast(record) == reference(record)  # aware datetime: the generator's form
        assert fast(as_ingested(record)) == reference(as_ingested(record))  # int millis: the ingest API's form


def test_same_bytes_as_fastavro_for_edge_values(raw_event):
    fast, reference = pair(raw_event)
    rng = random.Random(3)
    base = {f["name"]: None for f in raw_event.definition["fields"]} | {"source": "ingest-api", "properties": {}}
    cases = [
        base,
        base | {"event_id": "", "quantity": 0, "price": 0.0, "properties": {"": ""}},
        base | {"event_id": "ü€😀" * 50, "search_query": "x" * 20_000, "quantity": -(2**31), "amount": -1e308},
        base | {"event_time": -62_135_596_800_000, "quantity": 2**31 - 1, "price": float("inf")},  # year 1
        base | {"event_time": 253_402_300_799_999, "properties": {f"k{i}": "v" * i for i in range(300)}},  # 9999
    ]
    for _ in range(500):
        cases.append(
            base
            | {
                "event_time": rng.randint(-(2**40), 2**40),
                "quantity": rng.randint(-(2**31), 2**31 - 1),
                "price": rng.uniform(-1e6, 1e6),
                "user_id": "".join(chr(rng.randint(32, 0x2FFF)) for _ in range(rng.randint(0, 40))),
            }
        )
    decode = AvroDeserializer(SchemaRepository.load(), "raw_event")
    for record in cases:
        payload = fast(record)
        assert payload == reference(record)
        assert isinstance(decode(payload), Decoded)
    # Longs beyond what a datetime holds encode the same too (the door never sends them: it bounds event_time).
    for extreme in (-(2**63), 2**63 - 1):
        assert fast(base | {"event_time": extreme}) == reference(base | {"event_time": extreme})


def test_other_python_types_go_to_fastavro(raw_event):
    fast, reference = pair(raw_event)
    base = {f["name"]: None for f in raw_event.definition["fields"]} | {"source": "ingest-api", "properties": {}}
    converted = base | {"event_time": datetime(2026, 1, 1), "price": 3}  # naive datetime, int for double
    assert fast(converted) == reference(converted)
    partial = {"event_id": "only-this"}  # missing fields take their defaults
    assert fast(partial) == reference(partial)
    for wrong in (base | {"quantity": "3"}, base | {"quantity": 2**31}, base | {"properties": {"k": 1}}):
        with pytest.raises((ValueError, TypeError)):
            reference(wrong)
        with pytest.raises((ValueError, TypeError)):
            fast(wrong)


def test_arrays_and_dates_encode_as_fastavro_does():
    definition = {
        "type": "record",
        "name": "AD",
        "fields": [
            {"name": "flags", "type": {"type": "array", "items": "string"}},
            {"name": "counts", "type": {"type": "array", "items": "long"}},
            {"name": "day", "type": {"type": "int", "logicalType": "date"}},
            {"name": "maybe_day", "type": ["null", {"type": "int", "logicalType": "date"}]},
        ],
    }
    fast, reference = pair(Schema.from_definition("ad", definition))
    assert fast.plan is not None
    for record in (
        {"flags": [], "counts": [], "day": date(1970, 1, 1), "maybe_day": None},
        {"flags": ["a", "ü€"] * 100, "counts": [0, -1, 2**40], "day": date(2026, 11, 22), "maybe_day": 20_000},
        {"flags": ["x"], "counts": [1], "day": date(1, 1, 1), "maybe_day": date(9999, 12, 31)},
        {"flags": ["x"], "counts": [1], "day": 19_000, "maybe_day": datetime(2026, 1, 1, tzinfo=UTC)},  # fallback
    ):
        assert fast(record) == reference(record)


def test_schemas_of_other_shapes_use_fastavro_only():
    nested = {
        "type": "record",
        "name": "Outer",
        "fields": [{"name": "inner", "type": {"type": "record", "name": "Inner", "fields": []}}],
    }
    assert compile_plan(nested) is None
    assert compile_plan({"type": "record", "name": "U", "fields": [{"name": "u", "type": ["int", "string"]}]}) is None
    records = {"type": "array", "items": {"type": "record", "name": "I", "fields": []}}
    assert compile_plan({"type": "record", "name": "A", "fields": [{"name": "a", "type": records}]}) is None
    decimal = {"type": "bytes", "logicalType": "decimal", "precision": 12, "scale": 2}
    assert compile_plan({"type": "record", "name": "D", "fields": [{"name": "d", "type": decimal}]}) is None
    flat = {
        "type": "record",
        "name": "F",
        "fields": [
            {"name": "b", "type": "boolean"},
            {"name": "f", "type": "float"},
            {"name": "y", "type": ["bytes", "null"]},
        ],
    }
    schema = Schema.from_definition("flat", flat)
    fast, reference = pair(schema)
    assert fast.plan is not None
    for record in ({"b": True, "f": 1.5, "y": b"\x00\xff"}, {"b": False, "f": -0.25, "y": None}):
        assert fast(record) == reference(record)


def fastavro_only(repo: SchemaRepository, subject: str) -> AvroDeserializer:
    reference = AvroDeserializer(repo, subject)
    reference.fast = None  # the fastavro path, the referee
    return reference


def test_compiled_reader_decodes_what_fastavro_decodes(raw_event):
    repo = SchemaRepository.load()
    fast, reference = AvroDeserializer(repo, "raw_event"), fastavro_only(repo, "raw_event")
    assert fast.fast is not None
    serialize = AvroSerializer(raw_event)
    simulation = Simulation(5, 100, 50)
    for _ in range(1000):
        payload = serialize(simulation.next_event(datetime(2026, 5, 1, 12, tzinfo=UTC)).to_record())
        ours, theirs = fast(payload), reference(payload)
        assert isinstance(ours, Decoded) and isinstance(theirs, Decoded)
        assert ours.record == theirs.record


def test_compiled_reader_fails_where_fastavro_fails(raw_event):
    """Corrupted, truncated and random bodies: the same record or an error from both, never an exception."""
    repo = SchemaRepository.load()
    fast, reference = AvroDeserializer(repo, "raw_event"), fastavro_only(repo, "raw_event")
    serialize = AvroSerializer(raw_event)
    simulation = Simulation(6, 100, 50)
    rng = random.Random(9)
    for _ in range(3000):
        payload = bytearray(serialize(simulation.next_event(datetime(2026, 5, 1, tzinfo=UTC)).to_record()))
        for _flip in range(rng.randint(1, 4)):
            payload[rng.randrange(10, len(payload))] = rng.getrandbits(8)
        data = bytes(payload[: rng.randint(10, len(payload))] if rng.random() < 0.3 else payload)
        ours, theirs = fast(data), reference(data)
        if isinstance(theirs, Decoded):
            assert isinstance(ours, Decoded) and ours.record == theirs.record, data
        else:
            assert not isinstance(ours, Decoded) or ours.record is not None  # ours may be stricter, never wrong
