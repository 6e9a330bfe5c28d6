"""The archiver as a `services.kit.sink.Sink`: partition batches in, one Iceberg commit per table out.

The kit's runner hands over one topic-partition's batch at a time; `write` decodes it (columnar) into the
table's `TableCommitter` buffer and returns at once. A table is committed when its buffer is due (rows, bytes
or age; `commit_due`, also called from the service's loop) or when partitions are revoked, and on shutdown.
The runner's Kafka commits therefore run ahead of the archive: they are informational only. On assignment the
runner asks `stored_offsets`, which answers from the table's current snapshot (a partition never archived: 0,
its beginning), and seeks there: a crash at any moment replays exactly the records the tables do not hold.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram
from pyiceberg.catalog import Catalog
from pyiceberg.table import Table

from services.kit.avro import SchemaRepository
from services.kit.metrics import EVENT_TO_VISIBLE
from services.kit.sink import (
    PartitionBatch,
    Rejection,
    RejectionStage,
    Sink,
    SinkBackpressure,
    TopicPartition,
    WriteResult,
)

from .catalog import ensure_table
from .committer import CommitError, CommitResult, Fenced, TableCommitter
from .rows import AvroRowBuilder, DeadLetterRowBuilder, RecordColumns
from .schemas import TableSpec, arrow_schema
from .settings import ArchiverSettings

log = logging.getLogger(__name__)

ROWS_COMMITTED = Counter("lp_archiver_rows_committed_total", "Rows committed to the archive", ["table"])
SNAPSHOTS = Counter("lp_archiver_snapshots_total", "Snapshots the archiver committed", ["table"])
LAST_SNAPSHOT = Gauge(
    "lp_archiver_last_snapshot_timestamp_seconds", "When the archiver last committed a snapshot (Unix time)", ["table"]
)
FENCED = Counter(
    "lp_archiver_fenced_total", "Commits refused because another committer wrote the partitions", ["table"]
)
COMMIT_FAILURES = Counter("lp_archiver_commit_failures_total", "Commits that failed (retried later)", ["table"])
COMMIT_SECONDS = Histogram(
    "lp_archiver_commit_seconds",
    "Writing the data files and committing one snapshot",
    ["table"],
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
)
BUFFERED_ROWS = Gauge("lp_archiver_buffered_rows", "Rows decoded, not committed yet", ["table"])
DECODE_PATH = Counter("lp_archiver_decoded_rows_total", "Rows decoded, by path (columnar or reference)", ["path"])
FIRST_BATCH = Gauge("lp_archiver_first_batch_timestamp_seconds", "When the first batch was handed over (unix time)")


@dataclass
class ArchiveTable:
    spec: TableSpec
    table: Table
    committer: TableCommitter
    builder: AvroRowBuilder | DeadLetterRowBuilder
    last_error: str | None = None
    failures: int = 0
    retry_at: float = 0.0  # after a failed commit: not before (monotonic)


def _event_span(topic: str, timestamps: Sequence[int | None]) -> dict[str, tuple[int, int]] | None:
    """The first and last record's timestamps (records are in offset order: no pass over the batch)."""
    first = next((t for t in timestamps if t is not None and t > 0), None)
    last = next((t for t in reversed(timestamps) if t is not None and t > 0), None)
    if first is None or last is None:
        return None
    return {topic: (min(first, last), max(first, last))}


class ArchiverSink(Sink):
    name = "archiver"
    visible_on_write = False  # rows are visible at the snapshot commit, observed there (`_reap`)
    decode_mode = "none"  # the columnar decoder checks every header and body itself, in `write`

    def __init__(
        self,
        catalog: Catalog,
        settings: ArchiverSettings,
        specs: Sequence[TableSpec],
        repository: SchemaRepository,
        *,
        committer_id: str | None = None,
        on_fenced: Callable[[list[TopicPartition]], None] | None = None,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.on_fenced = on_fenced
        self.tables: dict[str, ArchiveTable] = {}
        self.by_topic: dict[str, ArchiveTable] = {}
        for spec in specs:
            table, evolution = ensure_table(
                catalog, settings, spec, repository, settings.archiver_target_file_size_bytes
            )
            if evolution.changes:
                log.info("schema of %s evolved: %s", spec.name, "; ".join(evolution.describe()))
            target = arrow_schema(table.schema())
            builder: AvroRowBuilder | DeadLetterRowBuilder
            if spec.subject is None:
                builder = DeadLetterRowBuilder(target)
            else:
                builder = AvroRowBuilder(repository, spec.subject, target)
            committer = TableCommitter(table, committer_id=committer_id, nice=settings.archiver_commit_nice)
            entry = ArchiveTable(spec, table, committer, builder)
            self.tables[spec.name] = entry
            for topic in spec.topics:
                if topic in self.by_topic:
                    raise ValueError(f"topic {topic} is archived into two tables")
                self.by_topic[topic] = entry
        self._resyncing: set[TopicPartition] = set()
        self.results: list[CommitResult] = []
        self._started = False

    def set_topic_ids(self, topic_ids: Mapping[str, str | None]) -> None:
        """The input topics' Kafka ids: offsets stored for another incarnation of a topic are not resumed."""
        for entry in self.tables.values():
            entry.committer.topic_ids.update({t: i for t, i in topic_ids.items() if t in entry.spec.topics and i})

    # --- positions ---------------------------------------------------------------------------------------------
    def stored_offsets(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        out: dict[TopicPartition, int] = {}
        for entry in self.tables.values():
            mine = [tp for tp in partitions if tp.topic in entry.spec.topics]
            if not mine:
                continue
            self._reap(entry, wait=True)
            try:
                positions = entry.committer.claim([(tp.topic, tp.partition) for tp in mine])
            except Exception as error:  # catalog or S3 unreachable: the runner retries with backoff
                raise SinkBackpressure(f"{entry.spec.name}: cannot read stored offsets: {error}") from error
            for tp in mine:
                stored = positions[(tp.topic, tp.partition)]
                out[tp] = 0 if stored is None else stored  # never archived: from the beginning
                self._resyncing.discard(tp)
        return out

    # --- writing -----------------------------------------------------------------------------------------------
    def write(self, batch: PartitionBatch) -> WriteResult:
        if not self._started:
            self._started = True
            FIRST_BATCH.set_to_current_time()
        entry = self.by_topic[batch.topic]
        tp = TopicPartition(batch.topic, batch.partition)
        committer = entry.committer
        self._reap(entry)
        if tp in self._resyncing:
            # Fenced earlier: these records are consumed again once the runner has sought to the stored offset.
            return WriteResult(written=0)
        limit = 2 * self.settings.archiver_commit_rows
        if committer.buffered_rows >= limit:  # commits lag behind consumption: wait for them (backpressure)
            self._reap(entry, wait=True)
            if committer.buffered_rows >= limit and self._commit_now(entry) is False:
                raise SinkBackpressure(f"{entry.spec.name}: archive commits failing: {entry.last_error}", 5.0)
            if tp in self._resyncing:
                return WriteResult(written=0)
        records = batch.records
        messages = records.messages if hasattr(records, "messages") else [r.message for r in records]
        columns = RecordColumns.from_messages(
            batch.topic, batch.partition, messages, headers=isinstance(entry.builder, DeadLetterRowBuilder)
        )
        rows, rejected = entry.builder.build(columns)
        if isinstance(entry.builder, AvroRowBuilder):
            DECODE_PATH.labels("columnar").inc(entry.builder.fast_rows)
            DECODE_PATH.labels("reference").inc(entry.builder.reference_rows)
            entry.builder.fast_rows = entry.builder.reference_rows = 0
        committer.add(
            rows,
            {(batch.topic, batch.partition): (batch.first_offset, batch.last_offset + 1)},
            columns.payload_bytes,
            _event_span(batch.topic, columns.timestamps),
        )
        BUFFERED_ROWS.labels(entry.spec.name).set(committer.buffered_rows)
        rejections = [
            Rejection(batch.records[r.index], r.code, r.message, stage=RejectionStage.DECODE) for r in rejected
        ]
        if self._due(entry):
            self._start_commit(entry)
        # Rows below the stored offsets (already in the table) count as written: the store holds them.
        return WriteResult(written=rows.num_rows, rejected=rejections)

    def _due(self, entry: ArchiveTable) -> bool:
        s = self.settings
        return entry.committer.due(s.archiver_commit_rows, s.archiver_commit_bytes, s.archiver_commit_interval_s)

    def commit_due(self) -> None:
        """Apply finished commits and start the due ones (called from the service loop: time-based commits)."""
        for entry in self.tables.values():
            self._reap(entry)
            if self._due(entry):
                self._start_commit(entry)

    def commit_all(self) -> bool:
        """Commit every table's buffer now, waiting; False if any failed."""
        return all([self._commit_now(entry) for entry in self.tables.values()])

    def _start_commit(self, entry: ArchiveTable) -> None:
        if time.monotonic() >= entry.retry_at:
            entry.committer.commit_async()

    def _commit_now(self, entry: ArchiveTable) -> bool:
        if not self._reap(entry, wait=True):
            return False
        entry.committer.commit_async(background=False)
        return self._reap(entry, wait=True)

    def _reap(self, entry: ArchiveTable, wait: bool = False) -> bool:
        """Apply the outcome of the table's commit in flight once it is done; False if it failed."""
        name = entry.spec.name
        try:
            result = entry.committer.poll(wait=wait)
        except Fenced as fenced:
            FENCED.labels(name).inc()
            log.error("%s", fenced)
            partitions = [TopicPartition(t, p) for t, p in entry.committer.expected]
            self._resyncing.update(partitions)
            if self.on_fenced is not None:
                self.on_fenced(partitions)
            return False
        except CommitError as error:
            COMMIT_FAILURES.labels(name).inc()
            entry.last_error = str(error)
            entry.failures += 1
            entry.retry_at = time.monotonic() + min(30.0, 0.5 * 2**entry.failures)
            log.warning("%s: commit failed, rows kept for the next attempt: %s", name, error)
            return False
        BUFFERED_ROWS.labels(name).set(entry.committer.buffered_rows)
        if result is None:
            return True
        entry.last_error, entry.failures, entry.retry_at = None, 0, 0.0
        self.results.append(result)
        del self.results[:-100]
        ROWS_COMMITTED.labels(name).inc(result.rows)
        SNAPSHOTS.labels(name).inc()
        LAST_SNAPSHOT.labels(name).set_to_current_time()
        now_ms = time.time() * 1000  # visible once the snapshot is committed: its oldest and newest record per topic
        for topic, span in result.event_ms.items():
            visible = EVENT_TO_VISIBLE.labels(self.name, topic)
            for timestamp_ms in set(span):
                visible.observe(max(0.0, (now_ms - timestamp_ms) / 1000))
        COMMIT_SECONDS.labels(name).observe(result.seconds)
        log.info(
            "committed %d rows to %s (snapshot %s, %.2fs)",
            result.rows,
            name,
            result.snapshot_id,
            result.seconds,
            extra={"table": name, "rows": result.rows, "snapshot_id": result.snapshot_id},
        )
        return True

    # --- rebalances and shutdown -------------------------------------------------------------------------------
    def revoked(self, partitions: Sequence[TopicPartition]) -> None:
        """The runner drained these partitions into our buffers and hands them over when this returns: commit
        the tables that hold them now, so the next owner starts where we stopped (else it would fence us)."""
        tps = {(tp.topic, tp.partition) for tp in partitions}
        for entry in self.tables.values():
            mine = tps & set(entry.committer.expected)
            if not mine:
                continue
            self._commit_now(entry)  # if it fails, the next owner consumes these partitions again
            self._reap(entry, wait=True)
            entry.committer.release(mine)
        self._resyncing.difference_update(partitions)

    def lost(self, partitions: Sequence[TopicPartition]) -> None:
        """Another member may own these already: drop their buffered rows, store nothing of them."""
        tps = {(tp.topic, tp.partition) for tp in partitions}
        for entry in self.tables.values():
            mine = tps & set(entry.committer.expected)
            if mine:
                self._reap(entry, wait=True)
                entry.committer.release(mine)
        self._resyncing.difference_update(partitions)

    def close(self) -> None:
        try:
            self.commit_all()
        finally:
            for entry in self.tables.values():
                entry.committer.close()

    # --- reporting ----------------------------------------------------------------------------------------------
    def readiness(self) -> str | None:
        failing = {name: e.last_error for name, e in self.tables.items() if e.last_error}
        return f"commits failing: {failing}" if failing else None
