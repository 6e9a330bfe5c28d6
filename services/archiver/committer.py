"""One committer per table: buffered Arrow rows go into the table together with the Kafka offsets they end at.

Exactly once, without Kafka transactions: each snapshot the archiver commits carries, in its summary,
`lp.offsets` = {"topic:partition": next offset} for every partition ever archived into the table. Rows and
offsets land in one atomic catalog commit, so after any crash the table's current snapshot says exactly where
to resume: rows before those offsets are in the table, rows from there on are not. The consumer seeks there on
assignment (the Kafka group's own committed offsets are informational only).

Fencing (a second committer for the same partitions: a zombie after a rebalance, a second deployment): a
committer remembers, per partition it writes, the offset it believes is stored (`expected`). Every commit
re-reads the table first and goes ahead only if the stored offsets of its partitions are still exactly the
expected ones; the catalog's optimistic concurrency (the commit asserts the snapshot it was based on is still
the table's current one) makes that check and the append one atomic step. So:

- another writer committed in between -> the catalog refuses ours with CommitFailedException; we re-read.
  If the other writer advanced any of *our* partitions, those rows may be in the table already: we are
  fenced (`Fenced`), drop the buffer and never write it; the caller re-seeks to the stored offsets.
  If it only touched other partitions (two archivers splitting the topic, a compaction), we retry on top.
- pyiceberg's own commit retry is disabled on these tables (`commit.retry.num-retries=0`, enforced here
  too), because it would re-apply our append on top of the other writer's snapshot without this check.
- a commit whose outcome is unknown (connection lost after sending) is resolved by looking for its
  `lp.commit-id` in the table before trying again.

Commits overlap consumption: `commit_async` seals the buffer and a worker thread writes its data files and
commits them while new rows go into a fresh buffer; `poll` applies the outcome on the caller's thread (all
bookkeeping happens there). One commit per table is in flight at a time, so snapshots keep offset order. A
failed commit puts its rows back in front of the new buffer; a fenced one drops both (the new rows continue
the fenced ones). The worker runs at a lower CPU priority (`nice`): measured on two cores, the commit's
Parquet threads took half a core from the consume-and-decode loop, ~10% of the archiver's throughput.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.exceptions import CommitFailedException
from pyiceberg.manifest import DataFile
from pyiceberg.table import Table

from services.stores.iceberg_offsets import (
    COMMIT_ID_PROPERTY,
    COMMITTER_PROPERTY,
    OFFSETS_PROPERTY,
    ROWS_PROPERTY,
    TOPIC_IDS_PROPERTY,
    TopicPartition,
    encode_offsets,
    snapshot_offsets,
    snapshot_topic_ids,
)

from .catalog import COMMIT_RETRIES
from .schemas import KAFKA_OFFSET, KAFKA_PARTITION, KAFKA_TOPIC
from .writer import commit_files, delete_files, write_data_files

log = logging.getLogger(__name__)


class Fenced(RuntimeError):
    """Another committer advanced partitions this one was writing: its buffered rows must not be written."""

    def __init__(self, table: str, partitions: Mapping[TopicPartition, tuple[int | None, int | None]]) -> None:
        self.table = table
        self.partitions = dict(partitions)  # tp -> (expected, found)
        detail = ", ".join(f"{t}:{p} expected {e} found {f}" for (t, p), (e, f) in sorted(self.partitions.items()))
        super().__init__(f"{table}: fenced by another committer ({detail}); buffered rows dropped, re-seek")


class CommitError(RuntimeError):
    """The commit did not succeed after the allowed attempts (the buffer is kept; the caller may retry)."""


@dataclass
class CommitResult:
    table: str
    rows: int
    snapshot_id: int | None
    offsets: dict[TopicPartition, int]
    attempts: int
    seconds: float
    event_ms: dict[str, tuple[int, int]] = field(default_factory=dict)  # topic -> oldest, newest record time (ms)


EventSpans = dict[str, tuple[int, int]]


def _merge_spans(*spans: EventSpans) -> EventSpans:
    """Per topic, the oldest and the newest of the spans' record timestamps."""
    out: EventSpans = {}
    for span in spans:
        for topic, (first, last) in span.items():
            known = out.get(topic)
            out[topic] = (min(first, known[0]), max(last, known[1])) if known else (first, last)
    return out


@dataclass
class _Buffer:
    batches: list[pa.Table] = field(default_factory=list)  # not written to data files yet
    files: list[DataFile] = field(default_factory=list)  # written, not committed yet (kept across attempts)
    written: list[pa.Table] = field(default_factory=list)  # the rows of `files`, if they must be written again
    rows: int = 0
    payload_bytes: int = 0
    ranges: dict[TopicPartition, tuple[int, int]] = field(default_factory=dict)  # tp -> (first, next)
    oldest: float | None = None
    event_ms: EventSpans = field(default_factory=dict)  # per topic, oldest and newest record time (event-to-visible)

    def then(self, later: _Buffer) -> _Buffer:
        """This buffer followed by `later` (a failed commit's rows back in front of the newer ones)."""
        ranges = dict(self.ranges)
        for tp, (first, nxt) in later.ranges.items():
            ranges[tp] = (ranges[tp][0] if tp in ranges else first, nxt)
        oldest = [t for t in (self.oldest, later.oldest) if t is not None]
        return _Buffer(
            batches=self.batches + later.batches,
            files=self.files + later.files,
            written=self.written + later.written,
            rows=self.rows + later.rows,
            payload_bytes=self.payload_bytes + later.payload_bytes,
            ranges=ranges,
            oldest=min(oldest) if oldest else None,
            event_ms=_merge_spans(self.event_ms, later.event_ms),
        )


@dataclass
class _InFlight:
    buffer: _Buffer
    base: dict[TopicPartition, int | None]  # the stored offsets the commit expects
    future: Future[tuple[int | None, dict[TopicPartition, int], int, float]]


class TableCommitter:
    """Buffers Arrow batches for one table and commits them with their offsets (see the module docstring)."""

    def __init__(
        self,
        table: Table,
        *,
        committer_id: str | None = None,
        max_attempts: int = 8,
        nice: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.table = table
        self.name = ".".join(table.name())
        self.committer_id = committer_id or f"archiver-{uuid.uuid4().hex[:12]}"
        self.max_attempts = max_attempts
        self.nice = nice
        self.clock = clock
        self.expected: dict[TopicPartition, int | None] = {}
        self.topic_ids: dict[str, str] = {}  # of the input topics, when the broker has them (KIP-516)
        self._buffer = _Buffer()
        self._inflight: _InFlight | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.snapshots_committed = 0
        self.rows_committed = 0

    # --- positions -------------------------------------------------------------------------------------------
    def stored_offsets(self, refresh: bool = True) -> dict[TopicPartition, int]:
        if refresh:
            self.table.refresh()
        return snapshot_offsets(self.table)

    def claim(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int | None]:
        """Start writing `partitions`: where to resume each (None: nothing stored, start at the beginning).

        Call with no commit in flight (`poll(wait=True)` first)."""
        self._require_idle()
        stored = self.stored_offsets()
        stored_ids = self._stored_topic_ids()
        positions: dict[TopicPartition, int | None] = {}
        for tp in partitions:
            position = stored.get(tp)
            old, new = stored_ids.get(tp[0]), self.topic_ids.get(tp[0])
            if position is not None and old and new and old != new:
                log.warning(
                    "%s: topic %s was re-created (id %s, offsets stored for %s): archiving it from its start",
                    self.name, tp[0], new, old,
                )  # fmt: skip
                position = None
            positions[tp] = position
        self.expected.update(positions)
        return positions

    def _stored_topic_ids(self) -> dict[str, str]:
        return snapshot_topic_ids(self.table)

    def release(self, partitions: Iterable[TopicPartition]) -> None:
        """Stop writing `partitions` (revoked): forget their buffered rows; commit first to keep them."""
        self._require_idle()
        gone = set(partitions)
        for tp in gone:
            self.expected.pop(tp, None)
        if gone & set(self._buffer.ranges):
            self._drop_partitions(gone)

    def _require_idle(self) -> None:
        if self._inflight is not None:
            raise RuntimeError(f"{self.name}: a commit is in flight; poll(wait=True) first")

    # --- buffering ---------------------------------------------------------------------------------------------
    @property
    def buffered_rows(self) -> int:
        """Rows not committed yet, including a commit in flight."""
        return self._buffer.rows + (self._inflight.buffer.rows if self._inflight else 0)

    @property
    def buffered_ranges(self) -> dict[TopicPartition, tuple[int, int]]:
        return dict(self._buffer.ranges)

    @property
    def in_flight(self) -> bool:
        return self._inflight is not None

    def buffer_age(self) -> float:
        return 0.0 if self._buffer.oldest is None else self.clock() - self._buffer.oldest

    def add(
        self,
        rows: pa.Table,
        consumed: Mapping[TopicPartition, tuple[int, int]],
        payload_bytes: int = 0,
        event_ms: EventSpans | None = None,
    ) -> int:
        """Buffer `rows` (with `_kafka_*` columns) that stand for the records `consumed` = {tp: (first, next)};
        `event_ms`: per topic, the timestamps of their oldest and newest record (event-to-visible at commit).

        `consumed` also covers records that yielded no row (dead-lettered), so the stored offsets move past them.
        Rows at offsets below what is stored (a consumer that did not seek yet) are dropped here: they are in
        the table already. Returns the rows kept.
        """
        for tp, (first, nxt) in consumed.items():
            if tp not in self.expected:
                raise ValueError(f"{self.name}: partition {tp} was not claimed by this committer")
            floor = self._next_position(tp)
            if floor is not None and nxt <= floor:
                rows = _drop_partition_rows(rows, tp)
                continue
            if floor is not None and first < floor:
                rows = _drop_below(rows, tp, floor)
                first = floor
            if tp in self._buffer.ranges:
                first = self._buffer.ranges[tp][0]
            self._buffer.ranges[tp] = (first, nxt)
        if rows.num_rows:
            self._buffer.batches.append(rows)
            self._buffer.rows += rows.num_rows
        self._buffer.payload_bytes += payload_bytes
        if self._buffer.oldest is None and consumed:
            self._buffer.oldest = self.clock()
        if rows.num_rows and event_ms:
            self._buffer.event_ms = _merge_spans(self._buffer.event_ms, event_ms)
        return rows.num_rows

    def _next_position(self, tp: TopicPartition) -> int | None:
        if tp in self._buffer.ranges:
            return self._buffer.ranges[tp][1]
        if self._inflight is not None and tp in self._inflight.buffer.ranges:
            return self._inflight.buffer.ranges[tp][1]
        return self.expected.get(tp)

    def due(self, max_rows: int, max_bytes: int, max_age_s: float) -> bool:
        """The buffer should be committed (and no commit is in flight)."""
        if not self._buffer.ranges or self._inflight is not None:
            return False
        return (
            self._buffer.rows >= max_rows or self._buffer.payload_bytes >= max_bytes or self.buffer_age() >= max_age_s
        )

    def _drop_partitions(self, gone: set[TopicPartition]) -> None:
        buffer = self._buffer
        if buffer.files:  # written files mix partitions: forget them, their rows are written again
            delete_files(self.table, buffer.files)
            buffer.batches = buffer.written + buffer.batches
            buffer.files, buffer.written = [], []
        keep = _Buffer(oldest=buffer.oldest, event_ms=buffer.event_ms)
        for batch in buffer.batches:
            for tp in gone:
                batch = _drop_partition_rows(batch, tp)
            if batch.num_rows:
                keep.batches.append(batch)
                keep.rows += batch.num_rows
        keep.ranges = {tp: r for tp, r in buffer.ranges.items() if tp not in gone}
        keep.payload_bytes = buffer.payload_bytes if keep.ranges else 0
        if not keep.ranges:
            keep.oldest = None
        self._buffer = keep

    def discard(self) -> None:
        """Drop the buffer (not a commit in flight)."""
        delete_files(self.table, self._buffer.files)
        self._buffer = _Buffer()

    # --- committing --------------------------------------------------------------------------------------------
    def commit(self) -> CommitResult | None:
        """Commit everything buffered now, on this thread; None if nothing was consumed since the last commit.

        Raises `Fenced` (buffer dropped) or `CommitError` (buffer kept, with its data files: a later commit
        reuses them). A commit in flight is finished first (and its failure raised)."""
        self.poll(wait=True)
        if not self._buffer.ranges:
            return None
        self.commit_async(background=False)
        return self.poll(wait=True)

    def commit_async(self, background: bool = True) -> bool:
        """Seal the buffer and commit it on the worker thread; False if one is in flight or nothing to commit."""
        if self._inflight is not None or not self._buffer.ranges:
            return False
        buffer, self._buffer = self._buffer, _Buffer()
        base = {tp: self.expected.get(tp) for tp in buffer.ranges}
        if background:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    1, f"commit-{self.name}", initializer=lower_thread_priority, initargs=(self.nice,)
                )
            future = self._executor.submit(self._commit_buffer, buffer, base)
        else:
            future = Future()
            try:
                future.set_result(self._commit_buffer(buffer, base))
            except BaseException as error:
                future.set_exception(error)
        self._inflight = _InFlight(buffer, base, future)
        return True

    def poll(self, wait: bool = False) -> CommitResult | None:
        """Apply the outcome of the commit in flight, if it is done (or once done, with `wait`).

        Returns its result; raises `Fenced` (its rows and the newer buffered ones are dropped) or `CommitError`
        (its rows go back in front of the buffer)."""
        inflight = self._inflight
        if inflight is None or not (wait or inflight.future.done()):
            return None
        self._inflight = None
        buffer = inflight.buffer
        try:
            snapshot_id, offsets, attempts, seconds = inflight.future.result()
        except Fenced as fenced:
            delete_files(self.table, buffer.files)
            self.discard()  # the newer rows follow the fenced ones: the re-seek brings them again
            for tp, (_, found) in fenced.partitions.items():
                self.expected[tp] = found
            raise
        except Exception as error:
            self._buffer = buffer.then(self._buffer)
            if isinstance(error, CommitError):
                raise
            raise CommitError(f"{self.name}: {type(error).__name__}: {error}") from error
        for tp, (_, nxt) in buffer.ranges.items():
            if tp in self.expected:  # not released meanwhile
                self.expected[tp] = nxt
        self.snapshots_committed += 1
        self.rows_committed += buffer.rows
        return CommitResult(self.name, buffer.rows, snapshot_id, offsets, attempts, seconds, buffer.event_ms)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def _commit_buffer(
        self, buffer: _Buffer, base: dict[TopicPartition, int | None]
    ) -> tuple[int | None, dict[TopicPartition, int], int, float]:
        """Write the data files of `buffer` and commit them with their offsets (on the worker thread: touches
        only `buffer` and the table, never the committer's bookkeeping)."""
        started = self.clock()
        if buffer.batches:
            data = pa.concat_tables(buffer.batches)
            buffer.files.extend(write_data_files(self.table, data))
            buffer.written.extend(buffer.batches)
            buffer.batches = []
        commit_id = uuid.uuid4().hex
        for attempt in range(1, self.max_attempts + 1):
            stored = self.stored_offsets()
            if self.table.properties.get(COMMIT_RETRIES) != "0":
                raise CommitError(
                    f"{self.name}: table property {COMMIT_RETRIES} must be 0 (pyiceberg would retry a conflicting "
                    "append without the offset check); the archiver sets it on start"
                )
            # A partition claimed as "re-created topic, from the start" is expected at None, not at the old offset.
            stale = {tp: (base[tp], stored.get(tp)) for tp in buffer.ranges if stored.get(tp) != base[tp]}
            stale = {tp: v for tp, v in stale.items() if not (base[tp] is None and self._recreated(tp[0]))}
            if stale:
                raise Fenced(self.name, stale)
            offsets = {**stored, **{tp: nxt for tp, (_, nxt) in buffer.ranges.items()}}
            properties = {
                OFFSETS_PROPERTY: encode_offsets(offsets),
                TOPIC_IDS_PROPERTY: json.dumps({**self._stored_topic_ids(), **self.topic_ids}, sort_keys=True),
                COMMITTER_PROPERTY: self.committer_id,
                COMMIT_ID_PROPERTY: commit_id,
                ROWS_PROPERTY: str(buffer.rows),
            }
            try:
                commit_files(self.table, buffer.files, properties)
            except CommitFailedException as error:
                log.info("%s: commit conflict (attempt %d): %s", self.name, attempt, error)
                time.sleep(random.uniform(0.01, 0.05 * attempt))
                continue
            except Exception as error:
                if not self._landed(commit_id):
                    raise CommitError(f"{self.name}: commit failed: {type(error).__name__}: {error}") from error
                log.warning("%s: commit reported %s but it landed", self.name, type(error).__name__)
            self.table.refresh()
            snapshot = self.table.current_snapshot()
            buffer.written = []
            return (snapshot.snapshot_id if snapshot else None, offsets, attempt, self.clock() - started)
        raise CommitError(f"{self.name}: still conflicting after {self.max_attempts} attempts")

    def _recreated(self, topic: str) -> bool:
        old, new = self._stored_topic_ids().get(topic), self.topic_ids.get(topic)
        return bool(old and new and old != new)

    def _landed(self, commit_id: str) -> bool:
        try:
            self.table.refresh()
        except Exception:
            return False
        return any(
            s.summary is not None and s.summary.additional_properties.get(COMMIT_ID_PROPERTY) == commit_id
            for s in self.table.snapshots()
        )


def lower_thread_priority(nice: int) -> None:
    """Lower the calling thread's scheduling priority by `nice` (Linux: per thread; the threads it starts, such
    as pyiceberg's Parquet writers, inherit it). Elsewhere, or if refused, it stays as it is."""
    if nice > 0:
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + nice)


def _partition_mask(rows: pa.Table, tp: TopicPartition) -> pa.ChunkedArray:
    return pc.and_(pc.equal(rows[KAFKA_TOPIC], tp[0]), pc.equal(rows[KAFKA_PARTITION], tp[1]))


def _drop_partition_rows(rows: pa.Table, tp: TopicPartition) -> pa.Table:
    if rows.num_rows == 0:
        return rows
    return rows.filter(pc.invert(_partition_mask(rows, tp)))


def _drop_below(rows: pa.Table, tp: TopicPartition, floor: int) -> pa.Table:
    if rows.num_rows == 0:
        return rows
    stale = pc.and_(_partition_mask(rows, tp), pc.less(rows[KAFKA_OFFSET], floor))
    return rows.filter(pc.invert(stale))
