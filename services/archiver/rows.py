"""Kafka records to Arrow rows of an archive table, and the records that cannot become rows.

Avro tables: payloads written with the current contract go through the columnar decoder; payloads of an
older writer version of the same subject through a columnar decoder of that version, then conformed to the
table (new fields get the contract's default or null, promoted types are cast); anything the fast path
flags goes through the kit's `AvroDeserializer`, which decodes it (one record at a time) or says why not:
that record is rejected with its `DecodeError` and the caller dead-letters it.

Dead letters: the payload is stored as is (it may not even be Avro); the `lp-dlq-*` headers become columns
and the other headers are kept in order. A record without the headers is archived all the same, with
error_code MISSING_DLQ_HEADERS: the archive keeps everything the platform saw.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from services.contracts.deadletter import NotADeadLetter, parse_dead_letter
from services.kit.avro import AvroDeserializer, Decoded, DecodeError, SchemaRepository
from services.kit.avro_columnar import ColumnarDecoder, FastPathUnsupported

from .schemas import KAFKA_COLUMN_NAMES, KAFKA_KEY, KAFKA_OFFSET, KAFKA_PARTITION, KAFKA_TIMESTAMP, KAFKA_TOPIC

MISSING_DLQ_HEADERS = "MISSING_DLQ_HEADERS"
Headers = Sequence[tuple[str, bytes | None]]


@dataclass
class RecordColumns:
    """A batch of consumed records of one table, column-wise (what the consumer hands over)."""

    topics: list[str] = field(default_factory=list)
    partitions: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    timestamps: list[int | None] = field(default_factory=list)  # ms since epoch
    keys: list[bytes | None] = field(default_factory=list)
    values: list[bytes | None] = field(default_factory=list)
    headers: list[Headers | None] = field(default_factory=list)
    single_partition: bool = False  # every record of one topic-partition (cheaper _kafka_* columns)

    @classmethod
    def from_messages(cls, topic: str, partition: int, messages: Sequence[Any], headers: bool = True) -> RecordColumns:
        """From confluent-kafka messages of one topic-partition (list comprehensions: ~1 us a record).
        `headers=False` leaves them out (the Avro tables do not store them)."""
        n = len(messages)
        stamps = [m.timestamp() for m in messages]
        return cls(
            topics=[topic] * n,
            partitions=[partition] * n,
            offsets=[m.offset() for m in messages],
            timestamps=[value if kind else None for kind, value in stamps],
            keys=[m.key() for m in messages],
            values=[m.value() for m in messages],
            headers=[m.headers() for m in messages] if headers else [None] * n,
            single_partition=True,
        )

    def __len__(self) -> int:
        return len(self.offsets)

    def append(
        self,
        topic: str,
        partition: int,
        offset: int,
        timestamp_ms: int | None,
        key: bytes | None,
        value: bytes | None,
        headers: Headers | None,
    ) -> None:
        self.topics.append(topic)
        self.partitions.append(partition)
        self.offsets.append(offset)
        self.timestamps.append(timestamp_ms)
        self.keys.append(key)
        self.values.append(value)
        self.headers.append(headers)

    @property
    def payload_bytes(self) -> int:
        return sum(map(len, filter(None, self.values)))

    def consumed(self) -> dict[tuple[str, int], tuple[int, int]]:
        """{(topic, partition): (first offset, last offset + 1)} of the batch."""
        if self.single_partition and self.offsets:
            return {(self.topics[0], self.partitions[0]): (min(self.offsets), max(self.offsets) + 1)}
        out: dict[tuple[str, int], tuple[int, int]] = {}
        for topic, partition, offset in zip(self.topics, self.partitions, self.offsets, strict=True):
            tp = (topic, partition)
            first, nxt = out.get(tp, (offset, offset + 1))
            out[tp] = (min(first, offset), max(nxt, offset + 1))
        return out


@dataclass
class Rejected:
    """A record that yields no row; the caller dead-letters it (code and message from the decoder)."""

    index: int
    code: str
    message: str


def kafka_columns(batch: RecordColumns, rows: np.ndarray, schema: pa.Schema) -> dict[str, pa.Array]:
    """The `_kafka_*` columns for the records at `rows`."""
    everything = rows.size == len(batch) and bool((rows == np.arange(rows.size)).all())
    index = None if everything else pa.array(rows)

    def pick(values: list[Any], kind: pa.DataType) -> pa.Array:
        array = pa.array(values, kind)
        return array if index is None else array.take(index)

    n = rows.size
    if batch.single_partition and len(batch):
        topic = pa.repeat(pa.scalar(batch.topics[0], schema.field(KAFKA_TOPIC).type), n)
        partition = pa.repeat(pa.scalar(batch.partitions[0], schema.field(KAFKA_PARTITION).type), n)
    else:
        topic = pick(batch.topics, schema.field(KAFKA_TOPIC).type)
        partition = pick(batch.partitions, schema.field(KAFKA_PARTITION).type)
    millis = pick(batch.timestamps, pa.int64())
    micros = pc.multiply(pc.if_else(pc.less(millis, 0), pa.scalar(None, pa.int64()), millis), 1000)
    return {
        KAFKA_TOPIC: topic,
        KAFKA_PARTITION: partition,
        KAFKA_OFFSET: pick(batch.offsets, schema.field(KAFKA_OFFSET).type),
        KAFKA_TIMESTAMP: micros.cast(schema.field(KAFKA_TIMESTAMP).type),
        KAFKA_KEY: pick(batch.keys, schema.field(KAFKA_KEY).type),
    }


def _default_array(avro_field: dict[str, Any] | None, target: pa.Field, n: int) -> pa.Array:
    if avro_field is None or "default" not in avro_field or avro_field["default"] is None:
        return pa.nulls(n, target.type)
    return pa.array([avro_field["default"]] * n, target.type)


def conform(columns: dict[str, pa.Array], n: int, target: pa.Schema, reader_fields: dict[str, Any]) -> list[pa.Array]:
    """Columns in the table's order and types: cast where the writer's type differs (promotions, ms -> us,
    map/list field names), the reader's default (or null) where the writer did not have the field."""
    out = []
    for target_field in target:
        array = columns.get(target_field.name)
        if array is None:
            array = _default_array(reader_fields.get(target_field.name), target_field, n)
        elif array.type != target_field.type:
            array = array.cast(target_field.type)
        out.append(array)
    return out


class AvroRowBuilder:
    """Rows of an Avro-contract table (user_events, transactions) from a batch of records."""

    def __init__(self, repository: SchemaRepository, subject: str, target: pa.Schema) -> None:
        self.repository = repository
        self.subject = subject
        self.target = target
        self.reader = repository[subject]
        self.reader_fields = {f["name"]: f for f in self.reader.definition["fields"]}
        self.reference = AvroDeserializer(repository, subject)
        self._decoders: dict[int, ColumnarDecoder | None] = {}
        self.fast_rows = 0
        self.reference_rows = 0

    def set_target(self, target: pa.Schema) -> None:
        self.target = target

    def _decoder(self, fingerprint: int) -> ColumnarDecoder | None:
        if fingerprint not in self._decoders:
            writer = self.repository.by_fingerprint.get(fingerprint)
            try:
                ok = writer is not None and writer.name == self.subject
                self._decoders[fingerprint] = ColumnarDecoder(writer) if ok else None  # type: ignore[arg-type]
            except FastPathUnsupported:
                self._decoders[fingerprint] = None
        return self._decoders[fingerprint]

    def build(self, batch: RecordColumns) -> tuple[pa.Table, list[Rejected]]:
        parts: list[tuple[np.ndarray, list[pa.Array]]] = []
        data_fields = [f for f in self.target if f.name not in KAFKA_COLUMN_NAMES]
        data_schema = pa.schema(data_fields)
        pending = np.arange(len(batch))
        values = batch.values
        current = self._decoder(self.reader.fingerprint)
        tried: set[int] = set()
        # Columnar first: the current writer, then each older writer found among the leftovers.
        while pending.size:
            if current is None:
                break
            tried.add(current.writer.fingerprint)
            decoded = current.decode(values if pending.size == len(values) else [values[i] for i in pending.tolist()])
            if decoded.good.size:
                rows = pending[decoded.good]
                parts.append((rows, conform(decoded.columns, rows.size, data_schema, self.reader_fields)))
                self.fast_rows += rows.size
            pending = pending[decoded.bad]
            current = None
            for i in pending.tolist():
                fingerprint = _fingerprint(values[i])
                if fingerprint is not None and fingerprint not in tried:
                    current = self._decoder(fingerprint)
                    if current is not None:
                        break
                    tried.add(fingerprint)
        rejected: list[Rejected] = []
        slow_rows: list[int] = []
        slow_records: list[dict[str, Any]] = []
        for i in pending.tolist():
            result = self.reference(values[i])
            if isinstance(result, Decoded):
                slow_rows.append(i)
                slow_records.append(result.record)
            else:
                assert isinstance(result, DecodeError)
                rejected.append(Rejected(i, str(result.code), result.message))
        if slow_records:
            try:
                table = pa.Table.from_pylist(slow_records, schema=data_schema)
                parts.append((np.asarray(slow_rows, np.int64), table.columns))
                self.reference_rows += len(slow_rows)
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as error:
                rejected.extend(Rejected(i, "ARCHIVE_CONVERSION", str(error)) for i in slow_rows)
        if not parts:
            return self.target.empty_table(), rejected
        rows = np.concatenate([r for r, _ in parts])
        columns = [
            pa.chunked_array([c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c for c in chunk])
            for chunk in zip(*(cols for _, cols in parts), strict=True)
        ]
        data = dict(zip(data_schema.names, columns, strict=True))
        data.update(kafka_columns(batch, rows, self.target))
        table = pa.Table.from_arrays([data[f.name] for f in self.target], schema=self.target)
        return table, rejected


def _fingerprint(payload: bytes | None) -> int | None:
    if payload is None or len(payload) < 10 or payload[:2] != b"\xc3\x01":
        return None
    return int.from_bytes(payload[2:10], "little")


class DeadLetterRowBuilder:
    """Rows of the dead_letters table: payload bytes, the reason columns, the other headers."""

    def __init__(self, target: pa.Schema) -> None:
        self.target = target

    def set_target(self, target: pa.Schema) -> None:
        self.target = target

    def build(self, batch: RecordColumns) -> tuple[pa.Table, list[Rejected]]:
        n = len(batch)
        columns: dict[str, list[Any]] = {
            name: []
            for name in (
                "error_code", "stage", "rule", "field", "message", "original_topic", "original_partition",
                "original_offset", "dead_lettered_at", "trace_id", "attempt", "payload", "headers",
            )
        }  # fmt: skip
        for i in range(n):
            headers = batch.headers[i] or ()
            kafka_time = batch.timestamps[i]
            fallback = datetime.fromtimestamp(kafka_time / 1000, UTC) if kafka_time and kafka_time > 0 else None
            try:
                dead = parse_dead_letter(batch.keys[i], batch.values[i], headers)
            except NotADeadLetter:
                row: dict[str, Any] = dict.fromkeys(columns)
                row.update(
                    error_code=MISSING_DLQ_HEADERS,
                    headers=[{"key": k, "value": v} for k, v in headers],
                    dead_lettered_at=fallback,
                )
            else:
                when = dead.time if dead.time is not None and dead.time.tzinfo is not None else fallback
                row = {
                    "error_code": dead.error_code,
                    "stage": str(dead.stage) or None,
                    "rule": dead.rule,
                    "field": dead.field,
                    "message": dead.message,
                    "original_topic": dead.original_topic,
                    "original_partition": dead.original_partition if dead.original_partition >= 0 else None,
                    "original_offset": dead.original_offset if dead.original_offset >= 0 else None,
                    "dead_lettered_at": when,
                    "trace_id": dead.trace_id,
                    "attempt": dead.attempt,
                    "headers": [{"key": k, "value": v} for k, v in dead.original_headers],
                }
            row["payload"] = batch.values[i]
            if row["dead_lettered_at"] is None:
                row["dead_lettered_at"] = datetime.now(UTC)  # no usable time at all: when we archived it
            for name in columns:
                columns[name].append(row[name])
        arrays = {name: pa.array(values, self.target.field(name).type) for name, values in columns.items()}
        arrays.update(kafka_columns(batch, np.arange(n), self.target))
        table = pa.Table.from_arrays([arrays[f.name] for f in self.target], schema=self.target)
        return table, []
