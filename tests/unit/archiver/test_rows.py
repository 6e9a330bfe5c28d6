"""Kafka records -> archive rows: columnar and reference paths agree, bad records are rejected with a reason."""

from __future__ import annotations

import copy
from datetime import UTC, datetime

import pyarrow as pa
import pytest

from services.archiver.catalog import ensure_table
from services.archiver.rows import MISSING_DLQ_HEADERS, AvroRowBuilder, DeadLetterRowBuilder, RecordColumns
from services.archiver.schemas import arrow_schema, default_tables
from services.kit.avro import AvroSerializer, Schema, SchemaRepository
from services.testing.samples import dead_letter, encoded_events


def columns_of(payloads: list[bytes | None], topic: str = "events.processed", partition: int = 0) -> RecordColumns:
    batch = RecordColumns()
    for offset, payload in enumerate(payloads):
        batch.append(topic, partition, 100 + offset, 1_700_000_000_000 + offset, f"k{offset}".encode(), payload, None)
    return batch


@pytest.fixture
def events_table(catalog, catalog_settings, repository):
    table, _ = ensure_table(catalog, catalog_settings, default_tables()[0], repository)
    return table


def test_rows_hold_the_records_and_where_they_came_from(events_table, repository) -> None:
    samples = list(encoded_events(50))
    builder = AvroRowBuilder(repository, "processed_event", arrow_schema(events_table.schema()))
    rows, rejected = builder.build(columns_of([payload for _, payload, _ in samples]))
    assert rejected == []
    assert rows.num_rows == 50 and builder.fast_rows == 50 and builder.reference_rows == 0
    assert rows.column("event_id").to_pylist() == [record["event_id"] for _, _, record in samples]
    assert rows.column("_kafka_offset").to_pylist() == list(range(100, 150))
    assert rows.column("_kafka_key").to_pylist()[:2] == [b"k0", b"k1"]
    stamp = rows.column("_kafka_timestamp")[0].as_py()
    assert stamp == datetime.fromtimestamp(1_700_000_000, UTC)
    assert rows.schema == arrow_schema(events_table.schema())


def test_undecodable_records_are_rejected_with_the_decoder_reason(events_table, repository) -> None:
    good = [payload for _, payload, _ in encoded_events(5)]
    other = Schema.from_definition("x", {"type": "record", "name": "X", "fields": []})
    payloads = [good[0], b"junk", good[1], other.header + b"", None, good[2][:-3], good[3]]
    builder = AvroRowBuilder(repository, "processed_event", arrow_schema(events_table.schema()))
    rows, rejected = builder.build(columns_of(payloads))
    assert rows.num_rows == 3
    assert sorted(rows.column("_kafka_offset").to_pylist()) == [100, 102, 106]
    codes = {r.index: r.code for r in rejected}
    assert codes == {
        1: "NOT_AVRO_SINGLE_OBJECT",
        3: "UNKNOWN_WRITER_SCHEMA",
        4: "EMPTY_PAYLOAD",
        5: "CORRUPT_OR_TRUNCATED",
    }


def test_records_of_an_older_writer_get_the_new_fields_defaults(events_table, repository) -> None:
    current = repository["processed_event"].definition
    old = copy.deepcopy(current)
    old["fields"] = [f for f in old["fields"] if f["name"] not in ("rules_version", "user_city")]
    old_schema = Schema.from_definition("processed_event", old)
    mixed = SchemaRepository(list(repository.current.values()))
    mixed.add_writer_version("processed_event", old)
    samples = list(encoded_events(4))
    old_serialize = AvroSerializer(old_schema)
    payloads = [
        samples[0][1],
        old_serialize({k: v for k, v in samples[1][2].items() if k not in ("rules_version", "user_city")}),
        samples[2][1],
    ]
    builder = AvroRowBuilder(mixed, "processed_event", arrow_schema(events_table.schema()))
    rows, rejected = builder.build(columns_of(payloads))
    assert rejected == []
    by_offset = {r["_kafka_offset"]: r for r in rows.to_pylist()}
    assert by_offset[101]["rules_version"] == ""  # the contract's default
    assert by_offset[101]["user_city"] is None
    assert by_offset[101]["event_id"] == samples[1][2]["event_id"]
    assert by_offset[100]["rules_version"] == "samples"


def test_dead_letters_keep_payload_reason_and_headers(catalog, catalog_settings, repository) -> None:
    table, _ = ensure_table(catalog, catalog_settings, default_tables()[2], repository)
    key, value, headers = dead_letter(b"\x00not avro", code="OUT_OF_RANGE", offset=42)
    batch = RecordColumns()
    batch.append("events.raw.dlq", 1, 7, 1_700_000_000_000, key, value, headers)
    batch.append("events.raw.dlq", 1, 8, 1_700_000_001_000, None, b"no headers", [("x", b"y")])
    rows, rejected = DeadLetterRowBuilder(arrow_schema(table.schema())).build(batch)
    assert rejected == []
    first, second = rows.to_pylist()
    assert first["payload"] == b"\x00not avro"
    assert (first["error_code"], first["rule"], first["stage"]) == ("OUT_OF_RANGE", "amount_not_negative", "validate")
    assert (first["original_topic"], first["original_partition"], first["original_offset"]) == ("events.raw", 0, 42)
    assert [h["key"] for h in first["headers"]] == ["traceparent"]
    assert first["trace_id"] == "1" * 32
    assert second["error_code"] == MISSING_DLQ_HEADERS
    assert second["dead_lettered_at"] == datetime.fromtimestamp(1_700_000_001, UTC)
    assert second["headers"] == [{"key": "x", "value": b"y"}]
    assert rows.column("_kafka_offset").to_pylist() == [7, 8]


def test_from_messages_matches_append() -> None:
    class Message:
        def __init__(self, offset: int) -> None:
            self._offset = offset

        def offset(self) -> int:
            return self._offset

        def timestamp(self) -> tuple[int, int]:
            return (1, 5) if self._offset % 2 else (0, 0)

        def key(self) -> bytes:
            return b"k"

        def value(self) -> bytes:
            return b"v" * self._offset

        def headers(self) -> list[tuple[str, bytes]]:
            return [("h", b"1")]

    batch = RecordColumns.from_messages("t", 3, [Message(1), Message(2)])
    assert batch.timestamps == [5, None]
    assert batch.consumed() == {("t", 3): (1, 3)}
    assert batch.payload_bytes == 3
    assert RecordColumns.from_messages("t", 3, [Message(1)], headers=False).headers == [None]
    assert pa.array(batch.offsets).to_pylist() == [1, 2]


def test_transaction_changes_keep_exact_money(catalog, catalog_settings, repository) -> None:
    from services.testing.samples import processed_transactions

    table, _ = ensure_table(catalog, catalog_settings, default_tables()[1], repository)
    serialize = AvroSerializer(repository["processed_transaction"])
    records = list(processed_transactions(40))
    builder = AvroRowBuilder(repository, "processed_transaction", arrow_schema(table.schema()))
    rows, rejected = builder.build(columns_of([serialize(r) for r in records], topic="transactions.processed"))
    assert rejected == [] and builder.fast_rows == 40
    for record, row in zip(records, rows.to_pylist(), strict=True):
        assert {k: row[k] for k in record} == record  # decimals, timestamps, ops: as the validator wrote them
    assert [r["op"] for r in records[:4]] == ["c", "u", "u", "d"]
