"""What is new in the lake since the last load, and those rows shaped for Snowflake's RAW tables.

Every snapshot the archiver commits carries `lp.offsets` ({"topic:partition": next Kafka offset}) and every row
its `_kafka_topic/_kafka_partition/_kafka_offset`. The loader remembers, with the last loaded snapshot id, the
offsets of that snapshot; the rows new since then are exactly the rows of the current snapshot at or past those
offsets. So:

- a compaction (`replace` snapshot) carries the offsets forward unchanged: it yields no rows, nothing is loaded
  twice, and the rows it rewrote are read from whichever files hold them now;
- the last loaded snapshot may be expired meanwhile: only its offsets are needed, and they are in Snowflake;
- a snapshot without offsets (a table some other writer made), offsets that went backwards, or a topic whose
  Kafka id changed (re-created, or a new local broker: its offsets start at 0 again) fall back to reading
  everything of those partitions;
- and rows of an older incarnation of a topic stay in the lake at offsets the new one reaches only later: while
  the new incarnation's offsets are below where those rows end (`older_rows_until`, measured on the rows each
  batch reads and kept with the offsets in CONTROL.LOADS), "at or past the offsets" reads some of them again.

Such a batch re-reads rows earlier loads put in RAW (`Plan.rereads`): the loader lands it in a scratch table
and moves into RAW only the archived rows RAW does not hold yet (identity: ARCHIVE_POSITION and the business
key, `sql.RAW_IDENTITY`), so RAW, like STAGING and MARTS, holds each archived row once. Other batches take the
plain COPY. The lake's rows do not carry the topic id, so incarnations are not told apart row by row: a
re-created topic's rows at offsets the old one used differ in their key, and the old incarnation's rows
archived after the last load are loaded like any row RAW lacks.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime

import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.expressions import (
    AlwaysTrue,
    And,
    BooleanExpression,
    EqualTo,
    GreaterThanOrEqual,
    Or,
)
from pyiceberg.table import Table

from services.stores.iceberg_offsets import TopicPartition, snapshot_offsets, snapshot_topic_ids

Offsets = dict[TopicPartition, int]


TOPIC_IDS_KEY = "@topic-ids"  # beside the offsets: which incarnation of each topic they count in
OLDER_ROWS_KEY = "@older-rows-until"  # and below which offsets the lake also holds an older incarnation's rows


def _encode(offsets: Mapping[TopicPartition, int]) -> dict[str, int]:
    return {f"{t}:{p}": o for (t, p), o in sorted(offsets.items())}


def _decode(body: Mapping[str, object]) -> Offsets:
    out: Offsets = {}
    for key, offset in body.items():
        if key.startswith("@"):
            continue
        topic, _, partition = key.rpartition(":")
        out[(topic, int(partition))] = int(str(offset))
    return out


def encode_offsets(
    offsets: Mapping[TopicPartition, int],
    topic_ids: Mapping[str, str] | None = None,
    older_rows_until: Mapping[TopicPartition, int] | None = None,
) -> str:
    body: dict[str, object] = dict(_encode(offsets))
    if topic_ids:
        body[TOPIC_IDS_KEY] = dict(sorted(topic_ids.items()))
    if older_rows_until:
        body[OLDER_ROWS_KEY] = _encode(older_rows_until)
    return json.dumps(body, sort_keys=True)


def decode_offsets(text: str | None) -> Offsets | None:
    return None if text is None else _decode(json.loads(text))


def decode_topic_ids(text: str | None) -> dict[str, str]:
    return dict(json.loads(text).get(TOPIC_IDS_KEY, {})) if text else {}


def decode_older_rows_until(text: str | None) -> Offsets:
    return _decode(json.loads(text).get(OLDER_ROWS_KEY, {})) if text else {}


@dataclass(frozen=True)
class Plan:
    """The rows of one batch: those of `snapshot_id` at or past `since` (None: all rows)."""

    table: str
    snapshot_id: int
    offsets: Offsets  # of the snapshot: where the next batch starts
    since: Offsets | None
    row_filter: BooleanExpression
    topic_ids: Mapping[str, str] = field(default_factory=dict)  # the incarnation of each topic `offsets` count in
    rereads: bool = False  # the batch may hold rows earlier loads put in RAW (see the module's docstring)
    older_rows_until: Offsets = field(default_factory=dict)  # carried from the last load, still past `offsets`

    @property
    def batch_id(self) -> str:
        return f"{self.table}-{self.snapshot_id}"

    def older_rows_after(self, read_ends: Mapping[TopicPartition, int]) -> Offsets:
        """Where older incarnations' rows end, per partition, for as long as that is past the snapshot's offsets:
        those rows sit at offsets the current incarnation has yet to reach, and the next batches' offset filter
        would read them again. `read_ends`: 1 + the highest offset the batch read, per partition."""
        out = dict(self.older_rows_until)
        for tp, end in read_ends.items():
            if end > self.offsets.get(tp, end):  # past the current incarnation's rows: an older one's
                out[tp] = max(out.get(tp, 0), end)
        return {tp: end for tp, end in sorted(out.items()) if end > self.offsets.get(tp, 0)}


def new_rows_filter(current: Mapping[TopicPartition, int], since: Mapping[TopicPartition, int]) -> BooleanExpression:
    """Rows past `since` for every partition that moved; AlwaysFalse-like empty Or when none moved."""
    parts: list[BooleanExpression] = []
    for (topic, partition), end in sorted(current.items()):
        start = since.get((topic, partition))
        where: BooleanExpression = And(EqualTo("_kafka_topic", topic), EqualTo("_kafka_partition", partition))
        if start is not None and start == end:
            continue
        if start is not None and start < end:
            where = And(where, GreaterThanOrEqual("_kafka_offset", start))
        # start > end: the topic was re-created and starts again at 0: read the partition whole.
        parts.append(where)
    if not parts:
        raise ValueError("no partition moved")
    expression = parts[0]
    for part in parts[1:]:
        expression = Or(expression, part)
    return expression


def plan(
    table: Table,
    name: str,
    last_snapshot_id: int | None,
    last_offsets: Offsets | None,
    last_topic_ids: Mapping[str, str] | None = None,
    last_older_rows_until: Mapping[TopicPartition, int] | None = None,
) -> Plan | None:
    """The batch to load now, or None when the table has nothing new (or no snapshot at all)."""
    table.refresh()
    snapshot = table.current_snapshot()
    if snapshot is None or snapshot.snapshot_id == last_snapshot_id:
        return None
    current = snapshot_offsets(table, snapshot)
    ids = snapshot_topic_ids(table, snapshot)
    loaded_before = last_snapshot_id is not None
    if not current:  # not written by the archiver: read it whole again, RAW keeps the rows it lacks
        return Plan(name, snapshot.snapshot_id, {}, None, AlwaysTrue(), ids, rereads=loaded_before)
    older = {tp: end for tp, end in (last_older_rows_until or {}).items() if end > current.get(tp, 0)}
    if last_offsets is None:  # the first load, or the last one read a snapshot without offsets
        return Plan(name, snapshot.snapshot_id, current, None, AlwaysTrue(), ids, loaded_before, older)
    # A topic re-created since the last load (a new id: a new cluster, or deleted and created again) counts its
    # offsets from 0 again, so its old offsets say nothing: its partitions are read whole.
    recreated = {t for t, old in (last_topic_ids or {}).items() if ids.get(t) not in (None, old)}
    since = {tp: offset for tp, offset in last_offsets.items() if tp[0] not in recreated}
    moved = {tp for tp, end in current.items() if tp[0] in recreated or last_offsets.get(tp) != end}
    if not moved:
        return None  # only compactions (or other rewrites) since: no new rows
    # Read whole (no start, or a start past the end) although an earlier load read from it, or read from a start
    # below where an older incarnation's rows end: rows loaded before come again.
    rereads = any(
        (tp in last_offsets and since.get(tp, current[tp] + 1) > current[tp])
        or since.get(tp, 0) < (last_older_rows_until or {}).get(tp, 0)
        for tp in moved
    )
    filter_ = new_rows_filter(current, since)
    return Plan(name, snapshot.snapshot_id, current, since, filter_, ids, rereads, older)


def read_batches(table: Table, batch: Plan) -> Iterator[pa.RecordBatch]:
    scan = table.scan(row_filter=batch.row_filter, snapshot_id=batch.snapshot_id)
    yield from scan.to_arrow_batch_reader()


def read_ends(batch: pa.RecordBatch) -> Offsets:
    """1 + the highest `_kafka_offset` per (topic, partition) of some rows read."""
    if batch.num_rows == 0:
        return {}
    keys = ["_kafka_topic", "_kafka_partition"]
    grouped = pa.table(batch.select([*keys, "_kafka_offset"])).group_by(keys).aggregate([("_kafka_offset", "max")])
    topics, partitions, highs = (grouped.column(c).to_pylist() for c in [*keys, "_kafka_offset_max"])
    return {(str(t), int(p)): int(h) + 1 for t, p, h in zip(topics, partitions, highs, strict=True)}


# --- shaping -------------------------------------------------------------------------------------------------------
def _naive_utc(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """timestamptz -> timestamp (µs, no zone) holding the UTC wall time: TIMESTAMP_NTZ, whatever the session zone."""
    return pc.cast(column, pa.timestamp("us", tz="UTC")).cast(pa.timestamp("us"))


def _json_text(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Maps and lists as JSON text (a map is a list of (key, value) pairs in Arrow)."""
    values = column.to_pylist()
    if pa.types.is_map(column.type):
        return pa.array([None if v is None else json.dumps(dict(v), sort_keys=True) for v in values], pa.string())
    return pa.array([None if v is None else json.dumps(v) for v in values], pa.string())


def archive_position(batch: pa.RecordBatch) -> pa.Array:
    """`topic:partition:offset`, zero-padded, so string order is the archive's order."""
    partition = pc.utf8_lpad(pc.cast(batch.column("_kafka_partition"), pa.string()), 6, "0")
    offset = pc.utf8_lpad(pc.cast(batch.column("_kafka_offset"), pa.string()), 20, "0")
    topic = pc.cast(batch.column("_kafka_topic"), pa.string())
    return pc.binary_join_element_wise(topic, partition, offset, ":")


def change_key(batch: pa.RecordBatch) -> pa.Array:
    """SOURCE_LSN as text, or `nolsn:<changed_at µs>:<op>` for a change without an LSN."""
    lsn = batch.column("source_lsn")
    micros = pc.cast(pc.cast(batch.column("changed_at"), pa.timestamp("us", tz="UTC")), pa.int64())
    op = pc.cast(batch.column("op"), pa.string())
    fallback = pc.binary_join_element_wise(pa.scalar("nolsn"), pc.cast(micros, pa.string()), op, ":")
    return pc.if_else(pc.is_null(lsn), fallback, pc.cast(lsn, pa.string()))


def raw_rows(batch: pa.RecordBatch, table: str, batch_id: str, loaded_at: datetime, source_file: str) -> pa.Table:
    """The lake rows as RAW.<TABLE> rows: upper-case names, naive UTC timestamps, JSON text, provenance."""
    columns: dict[str, pa.Array] = {}
    for name in batch.schema.names:
        column = batch.column(name)
        kind = column.type
        if name == "_kafka_key" or name == "_kafka_timestamp":
            continue
        if pa.types.is_timestamp(kind):
            column = _naive_utc(column)
        elif pa.types.is_map(kind) or pa.types.is_list(kind) or pa.types.is_large_list(kind):
            column = _json_text(column)
        elif pa.types.is_large_string(kind):
            column = column.cast(pa.string())
        columns[name.removeprefix("_").upper()] = column
    if table == "transactions":
        columns["CHANGE_KEY"] = change_key(batch)
    columns["ARCHIVE_POSITION"] = archive_position(batch)
    n = batch.num_rows
    columns["BATCH_ID"] = pa.array([batch_id] * n, pa.string())
    columns["LOADED_AT"] = pa.array([loaded_at.replace(tzinfo=None)] * n, pa.timestamp("us"))
    columns["SOURCE_FILE"] = pa.array([source_file] * n, pa.string())
    return pa.table(columns)
