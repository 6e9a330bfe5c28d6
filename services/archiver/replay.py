"""Replay and backfill: rows of an archive table, for an event-time range and an optional filter, back to Kafka.

Beyond Kafka's retention the archive is the only copy, so a fixed rule or a new sink reprocesses history from
here. The rows are read from ONE snapshot (current, or chosen by id / time), so a replay is repeatable and
unaffected by the archiver committing meanwhile. The range is half-open: `since <= event time < until`.

- Avro tables: each row is encoded again with the current contract (`AvroSerializer`), with its original
  Kafka key; by default into the topic it came from, to its original partition when the target topic has it
  (so a key's records stay in one partition, in their original order).
- dead_letters: the stored payload and headers exactly as they were dead-lettered, by default to the
  record's original topic (the validator's replay of a dead-letter topic, beyond its retention).

Every replayed record carries `lp-replay-id` (this run), `lp-replay-source`
(`iceberg:<table>@<snapshot>:<topic>:<partition>:<offset>`) and `lp-replay-snapshot`. Downstream sinks are
idempotent on the record's key (event_id, ...), so a replayed row already there changes nothing.

Rows are read and sent one event-time day at a time, in original (topic, partition, offset) order per day.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
from pyiceberg.expressions import AlwaysTrue, And, BooleanExpression, GreaterThanOrEqual, LessThan
from pyiceberg.table import Table

from services.contracts.headers import REPLAY_ID, REPLAY_PREFIX, REPLAY_SNAPSHOT, REPLAY_SOURCE
from services.kit.avro import AvroSerializer, SchemaRepository
from services.kit.kafka import Headers, KafkaProducer

from .maintenance import check_filter, resolve_snapshot
from .schemas import KAFKA_KEY, KAFKA_OFFSET, KAFKA_PARTITION, KAFKA_TOPIC, TableSpec


class ReplayError(ValueError):
    """The replay cannot run as asked (named in the message); nothing was produced."""


@dataclass
class ReplayReport:
    table: str
    snapshot_id: int | None
    replay_id: str
    since: str
    until: str
    where: str | None
    rows: int = 0
    produced: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def time_filter(column: str, since: datetime, until: datetime) -> BooleanExpression:
    return And(GreaterThanOrEqual(column, _iso(since)), LessThan(column, _iso(until)))


def _iso(value: datetime) -> str:
    aware = value if value.tzinfo else value.replace(tzinfo=UTC)
    return aware.astimezone(UTC).isoformat()


def _days(since: datetime, until: datetime) -> Iterator[tuple[datetime, datetime]]:
    start = since
    while start < until:
        midnight = datetime(start.year, start.month, start.day, tzinfo=UTC) + timedelta(days=1)
        end = min(midnight, until)
        yield start, end
        start = end


def read_range(
    table: Table,
    spec: TableSpec,
    since: datetime,
    until: datetime,
    *,
    where: str | None = None,
    snapshot_id: int | None = None,
) -> Iterator[pa.Table]:
    """The rows in [since, until) (and matching `where`), one event-time day at a time, in Kafka order."""
    extra = check_filter(table, where) if where else AlwaysTrue()
    for start, end in _days(since, until):
        rows = table.scan(row_filter=And(time_filter(spec.event_time, start, end), extra), snapshot_id=snapshot_id)
        data = rows.to_arrow()
        if data.num_rows:
            yield data.sort_by(
                [(KAFKA_TOPIC, "ascending"), (KAFKA_PARTITION, "ascending"), (KAFKA_OFFSET, "ascending")]
            )


def _avro_records(data: pa.Table, serializer: AvroSerializer) -> Iterator[tuple[bytes, dict[str, Any]]]:
    fields = [f["name"] for f in serializer.schema.definition["fields"]]
    map_fields = {f["name"] for f in serializer.schema.definition["fields"] if _is_map(f["type"])}
    columns = [name for name in fields if name in data.column_names]
    for row in data.select(columns).to_pylist():
        for name in map_fields:
            if isinstance(row.get(name), list):
                row[name] = dict(row[name])  # Arrow maps come back as (key, value) pairs
        yield serializer(row), row


def _is_map(avro_type: Any) -> bool:
    if isinstance(avro_type, list):
        return any(_is_map(t) for t in avro_type)
    return isinstance(avro_type, dict) and avro_type.get("type") == "map"


def replay(
    table: Table,
    spec: TableSpec,
    since: datetime,
    until: datetime,
    *,
    producer: KafkaProducer | None,
    repository: SchemaRepository,
    partitions_of: Callable[[str], int | None],
    into: str | None = None,
    where: str | None = None,
    snapshot_id: int | None = None,
    as_of: datetime | None = None,
    replay_id: str | None = None,
) -> ReplayReport:
    """Produce the range to Kafka (see the module docstring); `producer=None` counts only (dry run).

    `partitions_of(topic)`: the partition count of a topic, None if it does not exist.
    """
    if since >= until:
        raise ReplayError(f"empty range: since {since.isoformat()} is not before until {until.isoformat()}")
    table.refresh()
    sid = resolve_snapshot(table, snapshot_id, as_of)
    name = ".".join(table.name())
    report = ReplayReport(name, sid, replay_id or uuid.uuid4().hex, _iso(since), _iso(until), where)
    report.dry_run = producer is None
    if sid is None:
        return report
    if into is not None and partitions_of(into) is None:
        raise ReplayError(f"topic {into!r} does not exist")
    if where:
        check_filter(table, where)  # refuse a bad filter before producing anything
    serializer = AvroSerializer(repository[spec.subject]) if spec.subject else None
    produced: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    partition_counts: dict[str, int | None] = {}
    for data in read_range(table, spec, since, until, where=where, snapshot_id=sid):
        report.rows += data.num_rows
        meta = data.select([KAFKA_TOPIC, KAFKA_PARTITION, KAFKA_OFFSET, KAFKA_KEY]).to_pylist()
        if serializer is not None:
            payloads: Iterator[tuple[bytes | None, Headers]] = (
                (value, []) for value, _ in _avro_records(data, serializer)
            )
            targets = [into or m[KAFKA_TOPIC] for m in meta]
        else:
            originals = data.select(["payload", "headers", "original_topic"]).to_pylist()
            payloads = ((o["payload"], [(h["key"], h["value"] or b"") for h in o["headers"]]) for o in originals)
            targets = [into or o["original_topic"] for o in originals]
        for m, (value, headers), target in zip(meta, payloads, targets, strict=True):
            if not target:
                skipped["no target topic"] += 1
                continue
            if target not in partition_counts:
                partition_counts[target] = partitions_of(target)
            count = partition_counts[target]
            if count is None:
                skipped[f"topic {target} does not exist"] += 1
                continue
            source = f"iceberg:{name}@{sid}:{m[KAFKA_TOPIC]}:{m[KAFKA_PARTITION]}:{m[KAFKA_OFFSET]}"
            headers = [
                *[(k, v) for k, v in headers if not k.startswith(REPLAY_PREFIX)],
                (REPLAY_ID, report.replay_id.encode()),  # the validator processes each replay source once
                (REPLAY_SOURCE, source.encode()),
                (REPLAY_SNAPSHOT, str(sid).encode()),
            ]
            # Same topic and a partition it has: keep the original partition (key order); else hash the key.
            same = target == m[KAFKA_TOPIC] and m[KAFKA_PARTITION] < count
            if producer is not None:
                producer.produce(
                    target, value, key=m[KAFKA_KEY], headers=headers, partition=m[KAFKA_PARTITION] if same else None
                )
            produced[target] += 1
        if producer is not None:
            producer.flush(120)
    report.produced = dict(produced)
    report.skipped = dict(skipped)
    return report


def count_range(table: Table, spec: TableSpec, since: datetime, until: datetime, where: str | None = None) -> int:
    """Rows in the range (for checks)."""
    total = 0
    for data in read_range(table, spec, since, until, where=where):
        total += data.num_rows
    return total
