"""`ClickHouseSink`: the due batches of all partitions -> one columnar insert per topic, exactly once.

Per flush (`write_group`: the batches of several topic-partitions, see `services.kit.sink`), per topic:

1. decode the payloads in ClickHouse into one Arrow table (`decode.BatchDecoder`); undecodable records and
   rows failing a column check come back as rejections (dead letters with the reason);
2. insert it with `insert_deduplication_token` = a digest of the batches' `<topic>@<id>:<partition>:<first>-
   <last offset>` (one insert per month of event time, the tables' partitions, so each insert is one part:
   all or nothing), with `deduplicate_blocks_in_dependent_materialized_views` so the views skip a replayed
   block too;
3. a data error ClickHouse raises anyway splits the insert in halves (each with a token derived from the
   group's) until the refused rows are isolated; an error of the store (down, too many parts, read-only,
   timeouts, unknown) raises `SinkBackpressure`: the runner pauses the partitions and retries the same group;
4. after the insert, measures event time -> visible for a sample of the rows.

Rows keep `kafka_partition`, `kafka_offset`, `kafka_batch_last` and `kafka_insert` (the token), so
`written_batch_ends` can tell a restarted runner which batches, grouped how, the store holds but Kafka never
saw committed: re-formed and regrouped exactly, they carry the same token and ClickHouse ignores them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from prometheus_client import Counter, Histogram

from services.clickhouse_sink.decode import (
    DATA_CODES,
    OFFSET_COLUMN,
    BatchDecoder,
    DecodeBackpressure,
    error_code,
    first_line,
)
from services.clickhouse_sink.migrations import apply_migrations
from services.clickhouse_sink.tables import TableSpec, sql_string, structure
from services.kit.avro import AvroDeserializer, SchemaRepository
from services.kit.metrics import LatencyRecorder
from services.kit.sink import (
    LazyRecords,
    PartitionBatch,
    Rejection,
    Sink,
    SinkBackpressure,
    SinkRecord,
    TopicPartition,
    WriteResult,
    WrittenBatch,
    messages_of,
)
from services.stores.clickhouse import ClickHouseClient

log = logging.getLogger(__name__)

VISIBLE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60, 300)
EVENT_TO_VISIBLE = Histogram(
    "lp_clickhouse_event_to_visible_seconds",
    "Event time to the row being queryable in ClickHouse (sampled rows)",
    ["table"],
    buckets=VISIBLE_BUCKETS,
)
INSERTS = Counter("lp_clickhouse_inserts_total", "INSERT statements that succeeded", ["table"])
INSERT_ERRORS = Counter("lp_clickhouse_insert_errors_total", "INSERT statements ClickHouse refused", ["table", "kind"])
STORE_REJECTED = "STORE_REJECTED"
MAX_LATENCY_SAMPLES = 1000


def group_token(batches: Sequence[PartitionBatch]) -> str:
    """The insert's deduplication token: a digest of its batches' tokens (topic id, partition, offset range)."""
    joined = ";".join(sorted(batch.dedup_token for batch in batches))
    return hashlib.sha256(joined.encode()).hexdigest()[:32]


def insert_settings(token: str) -> dict[str, Any]:
    return {
        "insert_deduplicate": 1,
        "insert_deduplication_token": token,
        "deduplicate_blocks_in_dependent_materialized_views": 1,
        "async_insert": 0,
        # One thread, one block: the insert becomes one part per partition, always the same for the same rows.
        "max_threads": 1,
        "max_insert_threads": 1,
    }


@dataclass
class _Table:
    spec: TableSpec
    decoder: BatchDecoder
    fields: list[str]
    structure: str  # ClickHouse types of the decoded Arrow table's columns (for a server's input())
    latency: LatencyRecorder
    deserializer: AvroDeserializer  # for the odd record: an older writer version, a rejection


class ClickHouseSink(Sink):
    name = "clickhouse"
    decode_mode = "header"  # the runner checks headers; ClickHouse decodes the bodies (see decode.py)
    group_writes = True  # every insert costs a part per table and view: one insert per flush, not per partition

    def __init__(
        self,
        client: ClickHouseClient,
        database: str,
        topics: Mapping[str, TableSpec],
        *,
        schemas: SchemaRepository | None = None,
        cluster: str | None = None,
        scratch_dir: Path | None = None,
        latency_sample_every: int = 8,
        fault_file: Path | None = None,
        kill_after_inserts: int | None = None,
        migrate: bool = True,
    ) -> None:
        self.client = client
        self.database = database
        self.sample_every = latency_sample_every
        self.faults = _FaultSwitch(client, database, [spec.table for spec in topics.values()], fault_file)
        self.kill_after_inserts = kill_after_inserts  # tests only: crash between an insert and its commit
        self.inserts = 0
        if migrate:
            applied = apply_migrations(client.execute, client.rows, database, cluster)
            if applied:
                log.info("ClickHouse schema migrated", extra={"versions": applied, "database": database})
        schemas = schemas or SchemaRepository.load()
        self.tables: dict[str, _Table] = {}
        for topic, spec in topics.items():
            schema = schemas[spec.subject]
            self.tables[topic] = _Table(
                spec,
                BatchDecoder(client.decode_arrow, spec, schema, scratch_dir),
                [f["name"] for f in schema.definition["fields"]],
                f"{structure(schema.definition)}, `{OFFSET_COLUMN}` Int64, `_kafka_partition` UInt32, "
                "`_kafka_batch_last` UInt64",
                LatencyRecorder(EVENT_TO_VISIBLE.labels(spec.table)),
                AvroDeserializer(schemas, spec.subject),
            )

    # -- the Sink interface -------------------------------------------------------------------------------------
    def write(self, batch: PartitionBatch) -> WriteResult:
        return self.write_group([batch])[0]

    def write_group(self, batches: Sequence[PartitionBatch]) -> list[WriteResult]:
        """One insert per topic (and month) for all the batches; idempotent per group token."""
        self.faults.apply()
        results: dict[int, WriteResult] = {id(b): WriteResult() for b in batches}
        by_topic: dict[str, list[PartitionBatch]] = {}
        for batch in batches:
            by_topic.setdefault(batch.topic, []).append(batch)
        for topic, members in by_topic.items():
            self._write_topic(self.tables[topic], sorted(members, key=lambda b: b.partition), results)
        return [results[id(b)] for b in batches]

    def written_batch_ends(
        self, starts: Mapping[TopicPartition, int], topic_ids: Mapping[str, str | None]
    ) -> dict[TopicPartition, list[WrittenBatch]]:
        self.faults.apply()
        ends: dict[TopicPartition, list[WrittenBatch]] = {}
        for topic, table in self.tables.items():
            mine = {tp.partition: start for tp, start in starts.items() if tp.topic == topic}
            if not mine:
                continue
            partitions = ", ".join(str(p) for p in sorted(mine))
            sql = (
                f"SELECT kafka_partition, kafka_batch_last, any(kafka_insert) FROM {self.database}.{table.spec.table} "
                f"WHERE kafka_topic_id = {sql_string(topic_ids.get(topic) or '')} "
                f"AND kafka_partition IN ({partitions}) AND kafka_batch_last >= {min(mine.values())} "
                "GROUP BY kafka_partition, kafka_batch_last"
            )
            try:
                rows = self.client.rows(sql)
            except Exception as error:
                raise SinkBackpressure(f"ClickHouse: {first_line(error)}") from error
            for partition, last, insert in rows:
                if int(last) >= mine[int(partition)]:
                    ends.setdefault(TopicPartition(topic, int(partition)), []).append(WrittenBatch(int(last), insert))
        return ends

    def close(self) -> None:
        self.client.close()

    # -- inserting ------------------------------------------------------------------------------------------------
    def _write_topic(self, table: _Table, members: list[PartitionBatch], results: dict[int, WriteResult]) -> None:
        token = group_token(members)
        messages = [message for batch in members for message in messages_of(batch.records)]
        records = cast(list[SinkRecord], LazyRecords(messages, table.deserializer))
        try:
            decoded = table.decoder.decode(records)
        except DecodeBackpressure as error:
            raise SinkBackpressure(f"ClickHouse cannot decode now: {error}") from error
        batch_of = {b.partition: b for b in members}
        rejected = list(decoded.rejected)
        if decoded.table is not None:
            arrow = self._with_kafka_columns(decoded.table, decoded.records, batch_of)
            sql = table.spec.insert_sql(self.database, table.fields, "{source}", members[0].topic_id, token)
            for part_token, part, part_records in self._by_month(table.spec, arrow, decoded.records, token):
                rejected += self._insert(table, sql, part, part_records, part_token)
            self._observe_latency(table, decoded.table)
        for batch in members:
            results[id(batch)].written = len(batch.records)
        for rejection in rejected:  # each refused record once: by the decoder or by ClickHouse
            result = results[id(batch_of[rejection.record.partition])]
            result.written -= 1
            result.rejected.append(rejection)

    @staticmethod
    def _with_kafka_columns(
        table: pa.Table, records: Sequence[SinkRecord], batch_of: Mapping[int, PartitionBatch]
    ) -> pa.Table:
        partitions = np.fromiter((m.partition() for m in messages_of(records)), np.uint32, len(records))
        last_of = np.zeros(max(batch_of) + 1, np.uint64)
        for partition, batch in batch_of.items():
            last_of[partition] = batch.last_offset
        table = table.append_column("_kafka_partition", pa.array(partitions))
        return table.append_column("_kafka_batch_last", pa.array(last_of[partitions]))

    def _by_month(
        self, spec: TableSpec, table: pa.Table, records: Sequence[SinkRecord], token: str
    ) -> list[tuple[str, pa.Table, Sequence[SinkRecord]]]:
        """One insert per partition of a monthly table (a multi-partition insert is not atomic)."""
        if not spec.monthly:
            return [(token, table, records)]
        times = table.column(spec.time_field)
        months = pc.add(pc.multiply(pc.year(times), 100), pc.month(times))
        distinct = pc.unique(months).to_pylist()
        if len(distinct) == 1:
            return [(token, table, records)]
        parts = []
        for month in sorted(distinct):
            mask = pc.equal(months, month)
            chosen = [r for r, keep in zip(records, mask.to_pylist(), strict=True) if keep]
            parts.append((f"{token}/{month}", table.filter(mask), chosen))
        return parts

    def _insert(
        self, table: _Table, sql: str, part: pa.Table, records: Sequence[SinkRecord], token: str
    ) -> list[Rejection]:
        """Insert `part`; returns the rows ClickHouse refused (isolated by halving), raises on store errors."""
        try:
            self.client.insert_arrow(sql, part, insert_settings(token), table.structure)
            INSERTS.labels(table.spec.table).inc()
            self.inserts += 1
            if self.kill_after_inserts is not None and self.inserts >= self.kill_after_inserts:
                log.warning("CLICKHOUSE_SINK_KILL_AFTER_INSERTS: SIGKILL after insert %s", token)
                os.kill(os.getpid(), signal.SIGKILL)
            return []
        except Exception as error:
            code = error_code(error)
            if code not in DATA_CODES:
                INSERT_ERRORS.labels(table.spec.table, "store").inc()
                raise SinkBackpressure(f"ClickHouse refused the insert: {first_line(error)}") from error
            INSERT_ERRORS.labels(table.spec.table, "data").inc()
            if part.num_rows == 1:
                return [Rejection(records[0], STORE_REJECTED, f"ClickHouse refused the row: {first_line(error)}")]
            log.warning("insert %s refused a value (%s): splitting the batch", token, first_line(error))
        middle = part.num_rows // 2
        refused: list[Rejection] = []
        for start, stop in ((0, middle), (middle, part.num_rows)):
            chosen = records[start:stop]
            # Derived from the group's token and the rows' positions: a replay splits the same way, same tokens.
            sub = f"{token}/{start}-{stop}"
            refused += self._insert(table, sql, part.slice(start, stop - start), chosen, sub)
        return refused

    def _observe_latency(self, table: _Table, decoded: pa.Table) -> None:
        """Event time -> now for one row in `sample_every` (at most MAX_LATENCY_SAMPLES per insert: each
        observation costs a Python call, and a 50k-row insert needs no 6k of them)."""
        now_ms = time.time() * 1000
        times = decoded.column(table.spec.time_field).combine_chunks()
        per_ms = {"s": 0.001, "ms": 1, "us": 1_000, "ns": 1_000_000}[times.type.unit]
        stride = max(self.sample_every, -(-len(times) // MAX_LATENCY_SAMPLES))
        sample = times.cast(pa.int64()).to_numpy(zero_copy_only=False)[::stride]
        for value in sample.tolist():
            table.latency.observe(max(0.0, (now_ms - value / per_ms) / 1000))

    # -- reporting ----------------------------------------------------------------------------------------------
    def latency_percentiles(self) -> dict[str, dict[str, float] | None]:
        return {t.spec.table: t.latency.percentiles_ms() for t in self.tables.values()}

    def latency_counts(self) -> dict[str, int]:
        return {t.spec.table: t.latency.count for t in self.tables.values()}


class _FaultSwitch:
    """Tests only: while `path` exists the tables are detached, so ClickHouse itself refuses every write
    (UNKNOWN_TABLE, as a server whose table is gone or not yet attached), then attached again."""

    def __init__(self, client: ClickHouseClient, database: str, tables: Sequence[str], path: Path | None) -> None:
        self.client, self.database, self.tables, self.path = client, database, list(tables), path
        self.detached = False

    def apply(self) -> None:
        if self.path is None:
            return
        wanted = self.path.exists()
        if wanted == self.detached:
            return
        verb = "DETACH" if wanted else "ATTACH"
        for table in self.tables:
            self.client.execute(f"{verb} TABLE {self.database}.{table}")
        self.detached = wanted
        log.warning("fault switch: tables %s", "detached" if wanted else "attached again")
