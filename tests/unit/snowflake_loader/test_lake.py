"""Planning a batch from snapshot offsets, and shaping lake rows for RAW (a file:// Iceberg catalog)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest
from pyiceberg.expressions import AlwaysTrue

from services.archiver.catalog import ensure_table
from services.archiver.committer import TableCommitter
from services.archiver.maintenance import compact
from services.archiver.rows import AvroRowBuilder, RecordColumns
from services.archiver.schemas import arrow_schema, default_tables
from services.kit.avro import AvroSerializer, SchemaRepository
from services.snowflake_loader import lake
from services.stores.iceberg import CatalogSettings, open_catalog
from services.testing.samples import encoded_events, processed_transactions


@pytest.fixture
def table(tmp_path: Path):  # type: ignore[no-untyped-def]
    settings = CatalogSettings(
        iceberg_catalog="sql",
        iceberg_sql_uri=f"sqlite:///{tmp_path}/catalog.db",
        iceberg_warehouse=f"file://{tmp_path}/warehouse",
        iceberg_namespace="test",
    )
    table, _ = ensure_table(open_catalog(settings), settings, default_tables()[0], SchemaRepository.load())
    return table


def _append(table, payloads: list[bytes], partition: int, start: int, topic_id: str | None = None) -> None:  # type: ignore[no-untyped-def]
    committer = TableCommitter(table, committer_id="t")
    if topic_id is not None:
        committer.topic_ids = {"ev": topic_id}
    committer.claim([("ev", partition)])
    builder = AvroRowBuilder(SchemaRepository.load(), "processed_event", arrow_schema(table.schema()))
    columns = RecordColumns()
    for i, payload in enumerate(payloads):
        columns.append("ev", partition, start + i, None, None, payload, None)
    rows, _ = builder.build(columns)
    committer.add(rows, columns.consumed())
    committer.commit()


def _read(table, plan: lake.Plan) -> pa.Table:  # type: ignore[no-untyped-def]
    return pa.Table.from_batches(list(lake.read_batches(table, plan)))


def test_offsets_round_trip_and_the_filter_covers_only_moved_partitions() -> None:
    offsets = {("a.b:c", 0): 5, ("x", 3): 9}
    assert lake.decode_offsets(lake.encode_offsets(offsets)) == offsets and lake.decode_offsets(None) is None
    text = str(lake.new_rows_filter({("x", 0): 10, ("x", 1): 4, ("x", 2): 7}, {("x", 0): 10, ("x", 1): 2}))
    assert "GreaterThanOrEqual(term=Reference(name='_kafka_offset'), literal=LongLiteral(2))" in text
    assert "LongLiteral(10)" not in text  # partition 0 did not move
    with pytest.raises(ValueError):
        lake.new_rows_filter({("x", 0): 3}, {("x", 0): 3})


def test_plan_reads_only_new_rows_and_skips_compactions(table) -> None:  # type: ignore[no-untyped-def]
    payloads = [p for _, p, _ in encoded_events(60)]
    assert lake.plan(table, "user_events", None, None) is None  # no snapshot yet
    _append(table, payloads[:30], 0, 0)
    first = lake.plan(table, "user_events", None, None)
    assert first is not None and first.since is None and first.row_filter == AlwaysTrue() and not first.rereads
    assert _read(table, first).num_rows == 30
    assert first.batch_id == f"user_events-{first.snapshot_id}" and first.offsets == {("ev", 0): 30}
    assert lake.plan(table, "user_events", first.snapshot_id, first.offsets) is None

    _append(table, payloads[30:50], 0, 30)
    _append(table, payloads[50:], 1, 0)
    second = lake.plan(table, "user_events", first.snapshot_id, first.offsets)
    assert second is not None and second.since == {("ev", 0): 30} and not second.rereads  # partition 1 is new
    new = _read(table, second)
    partitions, positions = new.column("_kafka_partition").to_pylist(), new.column("_kafka_offset").to_pylist()
    offsets = sorted(zip(partitions, positions, strict=True))
    assert offsets == [(0, o) for o in range(30, 50)] + [(1, o) for o in range(10)]

    report = compact(table, small_file_bytes=64 * 1024 * 1024)
    assert report.snapshot_id is not None and report.snapshot_id != second.snapshot_id
    assert lake.plan(table, "user_events", second.snapshot_id, second.offsets) is None  # nothing new
    # The last loaded snapshot may be long expired: only its offsets matter.
    third = lake.plan(table, "user_events", 12345, {("ev", 0): 45, ("ev", 1): 10})
    assert third is not None and _read(table, third).num_rows == 5 and not third.rereads
    # Offsets past the snapshot's (they went backwards): that partition is read whole, rows loaded before again.
    backwards = lake.plan(table, "user_events", 12345, {("ev", 0): 70, ("ev", 1): 10})
    assert backwards is not None and backwards.rereads and _read(table, backwards).num_rows == 50


def test_a_recreated_topic_is_read_whole_since_its_offsets_start_again(table) -> None:  # type: ignore[no-untyped-def]
    events = list(encoded_events(40))
    _append(table, [p for _, p, _ in events[:10]], 0, 0, topic_id="id-1")
    first = lake.plan(table, "user_events", None, None)
    assert first is not None and first.topic_ids == {"ev": "id-1"}
    stored = lake.encode_offsets(first.offsets, first.topic_ids)  # what CONTROL.LOADS keeps
    assert lake.decode_offsets(stored) == {("ev", 0): 10} and lake.decode_topic_ids(stored) == {"ev": "id-1"}
    # A new local broker: the same topic with a new id, counting from 0 again, past the old end this time.
    _append(table, [p for _, p, _ in events[10:]], 0, 0, topic_id="id-2")
    second = lake.plan(
        table, "user_events", first.snapshot_id, lake.decode_offsets(stored), lake.decode_topic_ids(stored)
    )
    assert second is not None and second.since == {} and second.topic_ids == {"ev": "id-2"}
    assert second.rereads and not first.rereads  # offsets 0-9 of the old topic are read again: RAW has them
    read = set(_read(table, second).column("event_id").to_pylist())
    assert {str(record["event_id"]) for _, _, record in events[10:]} <= read  # offsets 0-9 of the new topic too
    # Without the ids, offset 10 onwards only: the first 10 events of the new incarnation would be missed.
    blind = lake.plan(table, "user_events", first.snapshot_id, lake.decode_offsets(stored))
    assert blind is not None and len(set(_read(table, blind).column("event_id").to_pylist())) == 20
    assert not blind.rereads


def test_an_older_incarnations_rows_past_the_new_offsets_make_batches_reread_until_passed(table) -> None:  # type: ignore[no-untyped-def]
    payloads = [p for _, p, _ in encoded_events(75)]
    _append(table, payloads[:30], 0, 0, topic_id="id-1")  # offsets 0-29 of the old topic

    def load(last: lake.Plan | None, stored: str | None) -> tuple[lake.Plan, str, int]:
        """Plan from what CONTROL.LOADS holds, read the batch, and what the loader would store for it."""
        batch = lake.plan(
            table, "user_events", last and last.snapshot_id, lake.decode_offsets(stored),
            lake.decode_topic_ids(stored), lake.decode_older_rows_until(stored),
        )  # fmt: skip
        assert batch is not None
        read = _read(table, batch)
        ends: lake.Offsets = {}
        for piece in read.to_batches():  # as the loader does, batch by batch
            for tp, end in lake.read_ends(piece).items():
                ends[tp] = max(ends.get(tp, 0), end)
        return batch, lake.encode_offsets(batch.offsets, batch.topic_ids, batch.older_rows_after(ends)), read.num_rows

    first, stored, rows = load(None, None)
    assert rows == 30 and not first.rereads and lake.decode_older_rows_until(stored) == {}
    _append(table, payloads[30:40], 0, 0, topic_id="id-2")  # the topic re-created: offsets 0-9 again
    second, stored, rows = load(first, stored)
    assert second.rereads and rows == 40  # read whole
    assert lake.decode_older_rows_until(stored) == {("ev", 0): 30}  # the old rows end at 30, the new at 10
    _append(table, payloads[40:50], 0, 10, topic_id="id-2")
    third, stored, rows = load(second, stored)
    assert third.rereads and rows == 20 + 10  # offsets >= 10: the old topic's 10-29 again, and the new 10-19
    assert lake.decode_older_rows_until(stored) == {("ev", 0): 30}
    _append(table, payloads[50:70], 0, 20, topic_id="id-2")
    fourth, stored, rows = load(third, stored)
    assert fourth.rereads and rows == 10 + 20 and lake.decode_older_rows_until(stored) == {}  # passed: 40 > 30
    _append(table, payloads[70:], 0, 40, topic_id="id-2")
    fifth, stored, rows = load(fourth, stored)
    assert not fifth.rereads and rows == 5


def test_raw_rows_shape_timestamps_json_and_provenance() -> None:
    repository = SchemaRepository.load()
    serialize = AvroSerializer(repository["processed_transaction"])
    changes = list(processed_transactions(3))
    changes[2] = {**changes[2], "source_lsn": None}
    schema = default_tables()[1].schema(repository)
    builder = AvroRowBuilder(repository, "processed_transaction", arrow_schema(schema))
    columns = RecordColumns()
    for i, change in enumerate(changes):
        columns.append("tx", 2, 7 + i, None, None, serialize(change), None)
    rows, rejected = builder.build(columns)
    assert not rejected
    loaded_at = datetime(2026, 11, 2, 9, tzinfo=UTC)
    shaped = lake.raw_rows(rows.to_batches()[0], "transactions", "transactions-1", loaded_at, "transactions/x.parquet")
    assert "KAFKA_KEY" not in shaped.column_names and "TRANSACTION_ID" in shaped.column_names
    assert shaped.schema.field("CHANGED_AT").type == pa.timestamp("us")  # naive UTC wall time
    assert shaped.column("CHANGED_AT")[0].as_py() == changes[0]["changed_at"].replace(tzinfo=None)
    assert shaped.column("QUALITY_FLAGS").to_pylist() == ["[]"] * 3
    keys = shaped.column("CHANGE_KEY").to_pylist()
    micros = int(changes[2]["changed_at"].timestamp() * 1_000_000)
    assert keys == [str(changes[0]["source_lsn"]), str(changes[1]["source_lsn"]), f"nolsn:{micros}:{changes[2]['op']}"]
    assert shaped.column("ARCHIVE_POSITION").to_pylist()[0] == "tx:000002:00000000000000000007"
    assert set(shaped.column("BATCH_ID").to_pylist()) == {"transactions-1"}
    assert shaped.column("LOADED_AT")[0].as_py() == datetime(2026, 11, 2, 9)
    # string order of the position is archive order, across partitions and offsets
    positions = {"_kafka_topic": ["t"] * 3, "_kafka_partition": [0, 0, 10], "_kafka_offset": [9, 10, 0]}
    a = lake.archive_position(pa.record_batch(positions))
    assert a.to_pylist() == sorted(a.to_pylist())
