"""Batch files into raw_event records: CSV, JSON Lines and Parquet, malformed rows as BATCH_PARSE_ERROR."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from pathlib import Path

import fastavro
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastavro.validation import validate

from services.contracts.deadletter import Stage, parse_dead_letter
from services.kit.avro import avro_schema_dir
from services.validator.batch import BatchError, BatchRow, BatchStats, read_csv, read_file, read_jsonl, read_parquet

RAW_SCHEMA = fastavro.parse_schema(json.loads((avro_schema_dir() / "raw_event.avsc").read_text()))
EVENT_TIME = datetime(2026, 1, 5, 12, 0, 0, 123000, tzinfo=UTC)
NOW = datetime(2026, 1, 6, tzinfo=UTC)

CSV_TEXT = (
    "event_id,event_type,event_time,user_id,product_id,quantity,price,amount,country,properties,extra\n"
    'e1,purchase,2026-01-05T12:00:00.123456Z,u1,p1,2,19.99,39.98,GB,"{""payment_method"": ""paypal""}",x\n'
    "e2,page_view,1767614400123,u1,,,,,,,\n"
    "e3,purchase,2026-01-05T12:00:00Z,u1,p1,two,19.99,39.98,GB,,\n"
    "\n"
    'e4,search,2026-01-05T12:00:00Z,u1,,,,,US,"{""q"":\n""multi-line""}",\n'
    "e5,search,not-a-time,u1,,,,,US,,\n"
    "e6,search\n"
    'e7,search,2026-01-05T12:00:00Z,u1,,,,,US,"{""q"":\n""unclosed""",\n'
)


def rows(items: list) -> list[BatchRow]:
    return [item for item in items if isinstance(item, BatchRow)]


def errors(items: list) -> list[BatchError]:
    return [item for item in items if isinstance(item, BatchError)]


def assert_like_kafka_decode(record: dict) -> None:
    """Exactly what decoding an events.raw payload yields: validates and survives an Avro round trip."""
    assert validate(record, RAW_SCHEMA, raise_errors=True)
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, RAW_SCHEMA, record)
    buffer.seek(0)
    assert fastavro.schemaless_reader(buffer, RAW_SCHEMA, None) == record


def test_csv(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_text(CSV_TEXT)
    stats = BatchStats()
    items = list(read_csv(path, stats=stats))
    good, bad = rows(items), errors(items)
    assert [r.record["event_id"] for r in good] == ["e1", "e2", "e4"]
    first = good[0].record
    assert first["event_time"] == EVENT_TIME  # truncated to milliseconds, aware UTC
    assert (first["quantity"], first["price"], first["amount"]) == (2, 19.99, 39.98)
    assert first["properties"] == {"payment_method": "paypal"}
    assert first["source"] == "batch-file"
    assert first["referrer"] is None and first["product_id"] == "p1"
    assert good[1].record["event_time"] == EVENT_TIME  # epoch milliseconds
    assert good[1].record["product_id"] is None and good[1].record["properties"] == {}
    assert good[2].record["properties"] == {"q": "multi-line"}
    for row in good:
        assert_like_kafka_decode(row.record)
    assert [row.position for row in good] == [2, 3, 6]  # the line a row starts on, multi-line rows counted
    assert good[0].origin == f"file:{path}"

    assert [(e.position, e.field) for e in bad] == [(4, "quantity"), (8, "event_time"), (9, None), (10, "properties")]
    assert bad[0].message == "quantity: expected an integer, got 'two'"
    assert bad[0].raw == b"e3,purchase,2026-01-05T12:00:00Z,u1,p1,two,19.99,39.98,GB,,"  # the row's own text
    assert bad[2].message == "2 cells, the header has 11"
    assert bad[3].raw == b'e7,search,2026-01-05T12:00:00Z,u1,,,,,US,"{""q"":\n""unclosed""",'
    assert bad[3].message.startswith("properties: not a JSON object")
    assert (stats.rows, stats.errors, stats.unknown_columns) == (7, 4, {"extra": 1})


def test_batch_error_to_dead_letter(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_text(CSV_TEXT)
    error = errors(list(read_csv(path)))[0]
    record = error.to_dead_letter(NOW)
    assert record.topic == "events.raw.dlq" and record.value == error.raw
    parsed = parse_dead_letter(record.key, record.value, record.headers)
    assert (parsed.error_code, parsed.stage, parsed.field) == ("BATCH_PARSE_ERROR", Stage.DECODE, "quantity")
    assert (parsed.original_topic, parsed.original_partition, parsed.original_offset) == (f"file:{path}", -1, 4)


def test_jsonl(tmp_path: Path) -> None:
    lines = [
        {"event_id": "e1", "event_type": "purchase", "event_time": "2026-01-05T12:00:00.123Z", "user_id": "u1",
         "quantity": 2.0, "price": 20, "properties": {"payment_method": "card", "items": 2}},
        "not json at all",
        [1, 2],
        {"event_id": "e2", "event_type": "login", "event_time": 1767614400123, "user_id": "u1", "quantity": 3.5},
        {"event_id": "e3", "event_type": "login", "event_time": 1767614400123, "user_id": "u1", "price": True},
        {"event_id": "e4", "event_type": "login", "event_time": 1767614400123, "user_id": "u1", "quantity": 2**40},
        {"event_id": "e5", "event_type": "login", "event_time": 1767614400123, "user_id": "u1", "price": "NaN"},
    ]  # fmt: skip
    path = tmp_path / "events.jsonl"
    path.write_bytes(
        b"\n".join(line.encode() if isinstance(line, str) else json.dumps(line).encode() for line in lines)
        + b"\n\n\xff\xfe\n"
    )
    items = list(read_jsonl(path))
    good, bad = rows(items), errors(items)
    assert len(good) == 1
    record = good[0].record
    assert (record["quantity"], record["price"], record["event_time"]) == (2, 20.0, EVENT_TIME)
    assert record["properties"] == {"payment_method": "card", "items": "2"}
    assert_like_kafka_decode(record)
    assert [(e.position, e.field) for e in bad] == [(2, None), (3, None), (4, "quantity"), (5, "price"),
                                                     (6, "quantity"), (7, "price"), (9, None)]  # fmt: skip
    assert bad[0].raw == b"not json at all" and bad[0].message.startswith("JSON: ")
    assert bad[4].message == f"quantity: {2**40} is out of range"


def test_parquet_streams_in_batches(tmp_path: Path) -> None:
    n = 2_500
    table = pa.table(
        {
            "event_id": [f"e{i}" for i in range(n)],
            "event_type": ["purchase"] * n,
            "event_time": pa.array([EVENT_TIME.replace(tzinfo=None)] * n, pa.timestamp("us")),  # naive: UTC
            "user_id": ["u1"] * n,
            "quantity": pa.array([1] * (n - 1) + [None], pa.int64()),
            "price": [9.99] * n,
            "properties": pa.array([[("k", "v")]] * n, pa.map_(pa.string(), pa.string())),
            "ignored": [0] * n,
        }
    )
    path = tmp_path / "events.parquet"
    pq.write_table(table, path, row_group_size=1_000)
    stats = BatchStats()
    items = list(read_parquet(path, batch_size=700, stats=stats))
    assert len(items) == n and not errors(items)
    assert [items[0].position, items[-1].position] == [1, n]
    record = items[0].record  # type: ignore[union-attr]
    assert record["event_time"] == EVENT_TIME and record["properties"] == {"k": "v"}
    assert items[-1].record["quantity"] is None  # type: ignore[union-attr]
    assert_like_kafka_decode(record)
    assert stats.unknown_columns == {"ignored": 1}


def test_parquet_malformed_row(tmp_path: Path) -> None:
    table = pa.table(
        {
            "event_id": ["ok", "bad"],
            "event_type": ["login", "login"],
            "event_time": ["2026-01-05T12:00:00Z", "31/12/2025"],
            "user_id": ["u1", "u1"],
            "quantity": pa.array([1, 2**33], pa.int64()),
        }
    )
    path = tmp_path / "events.parquet"
    pq.write_table(table, path)
    items = list(read_file(path))
    assert isinstance(items[0], BatchRow)
    bad = items[1]
    assert isinstance(bad, BatchError)
    assert bad.field == "event_time" and bad.position == 2
    assert json.loads(bad.raw)["event_time"] == "31/12/2025"  # the row as JSON


def test_read_file_dispatch(tmp_path: Path) -> None:
    path = tmp_path / "x.ndjson"
    path.write_text('{"event_id": "e", "event_type": "login", "event_time": 0, "user_id": "u"}\n')
    assert isinstance(next(iter(read_file(path))), BatchRow)
    assert isinstance(next(iter(read_file(path, file_format="jsonl"))), BatchRow)
    with pytest.raises(ValueError, match="unknown batch format"):
        read_file(tmp_path / "x.xml")


def test_empty_csv(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_text("")
    assert list(read_csv(path)) == []


def test_csv_with_undecodable_bytes(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"event_id,event_type,event_time,user_id\ne1,login,2026-01-05T12:00:00Z,J\xf6rg\n")
    (error,) = list(read_csv(path))
    assert isinstance(error, BatchError) and error.field == "user_id"
    assert error.raw == b"e1,login,2026-01-05T12:00:00Z,J\xf6rg"  # the original bytes, not a re-encoding
