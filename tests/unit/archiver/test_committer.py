"""Rows and offsets land together; a second committer for the same partitions is fenced, never duplicates."""

from __future__ import annotations

import os
import sys
import threading

import pyarrow as pa
import pytest

import services.archiver.committer as committer_module
from services.archiver.catalog import COMMIT_RETRIES, ensure_table
from services.archiver.committer import CommitError, Fenced, TableCommitter, lower_thread_priority
from services.archiver.rows import AvroRowBuilder, RecordColumns
from services.archiver.schemas import arrow_schema, default_tables
from services.stores.iceberg_offsets import OFFSETS_PROPERTY, decode_offsets, encode_offsets, snapshot_offsets
from services.testing.samples import encoded_events

TOPIC = "events.processed"
PAYLOADS = [payload for _, payload, _ in encoded_events(200)]


@pytest.fixture
def table(catalog, catalog_settings, repository):
    table, _ = ensure_table(catalog, catalog_settings, default_tables()[0], repository)
    return table


@pytest.fixture
def builder(table, repository) -> AvroRowBuilder:
    return AvroRowBuilder(repository, "processed_event", arrow_schema(table.schema()))


def batch(builder: AvroRowBuilder, partition: int, first: int, count: int) -> tuple[pa.Table, dict, int]:
    columns = RecordColumns()
    for offset in range(first, first + count):
        columns.append(TOPIC, partition, offset, None, None, PAYLOADS[offset % len(PAYLOADS)], None)
    rows, rejected = builder.build(columns)
    assert not rejected
    return rows, columns.consumed(), columns.payload_bytes


def offsets_in_table(table) -> list[tuple[int, int]]:
    table.refresh()
    data = table.scan(selected_fields=("_kafka_partition", "_kafka_offset")).to_arrow()
    return sorted(
        zip(data.column("_kafka_partition").to_pylist(), data.column("_kafka_offset").to_pylist(), strict=True)
    )


def test_offsets_encode_round_trip() -> None:
    offsets = {("a.b:c", 0): 5, ("t", 11): 0}
    assert decode_offsets(encode_offsets(offsets)) == offsets


def test_rows_and_offsets_commit_together_and_a_new_committer_resumes_there(table, builder) -> None:
    first = TableCommitter(table, committer_id="one")
    assert first.claim([(TOPIC, 0), (TOPIC, 1)]) == {(TOPIC, 0): None, (TOPIC, 1): None}
    assert first.commit() is None  # nothing consumed
    first.add(*batch(builder, 0, 0, 30))
    first.add(*batch(builder, 1, 0, 10))
    result = first.commit()
    assert result is not None and result.rows == 40
    assert result.offsets == {(TOPIC, 0): 30, (TOPIC, 1): 10}
    summary = table.current_snapshot().summary.additional_properties
    assert decode_offsets(summary[OFFSETS_PROPERTY]) == {(TOPIC, 0): 30, (TOPIC, 1): 10}
    assert summary["lp.committer"] == "one"

    second = TableCommitter(table, committer_id="two")  # a restart
    assert second.claim([(TOPIC, 0), (TOPIC, 1)]) == {(TOPIC, 0): 30, (TOPIC, 1): 10}
    # The consumer delivers 20..39 of partition 0 (it had not sought yet): 20..29 are in the table already.
    kept = second.add(*batch(builder, 0, 20, 20))
    assert kept == 10
    second.commit()
    assert offsets_in_table(table) == sorted([(0, o) for o in range(40)] + [(1, o) for o in range(10)])
    assert snapshot_offsets(table) == {(TOPIC, 0): 40, (TOPIC, 1): 10}  # offsets_in_table refreshed it


def test_a_second_committer_of_the_same_partition_is_fenced(table, builder) -> None:
    a = TableCommitter(table.catalog.load_table(table.name()), committer_id="a")
    b = TableCommitter(table.catalog.load_table(table.name()), committer_id="b")
    a.claim([(TOPIC, 0)])
    b.claim([(TOPIC, 0)])  # both believe nothing is stored
    a.add(*batch(builder, 0, 0, 25))
    b.add(*batch(builder, 0, 0, 25))
    a.commit()
    with pytest.raises(Fenced) as fenced:
        b.commit()
    assert fenced.value.partitions == {(TOPIC, 0): (None, 25)}
    assert b.buffered_rows == 0 and b.expected[(TOPIC, 0)] == 25  # b resumes after a's rows
    assert offsets_in_table(table) == [(0, o) for o in range(25)]  # a's rows, once
    b.add(*batch(builder, 0, 25, 5))
    b.commit()
    assert offsets_in_table(table) == [(0, o) for o in range(30)]


def test_losing_the_race_to_the_catalog_re_reads_the_offsets(table, builder, monkeypatch) -> None:
    """B reads the stored offsets, A commits before B does: the catalog refuses B's commit (optimistic
    concurrency), B reads again. A touched another partition: B retries on top. A touched B's: B is fenced."""
    a = TableCommitter(table.catalog.load_table(table.name()), committer_id="a")
    b = TableCommitter(table.catalog.load_table(table.name()), committer_id="b")
    a.claim([(TOPIC, 0), (TOPIC, 2)])
    b.claim([(TOPIC, 1), (TOPIC, 2)])
    interleave = {"partition": 0}
    original = b.stored_offsets

    def read_then_let_a_commit(refresh: bool = True):
        stored = original(refresh)
        if interleave["partition"] is not None:
            a.add(*batch(builder, interleave["partition"], 0, 10))
            a.commit()
            interleave["partition"] = None
        return stored

    monkeypatch.setattr(b, "stored_offsets", read_then_let_a_commit)
    conflicts = []
    commit_files = committer_module.commit_files

    def counting(*args, **kwargs):
        try:
            return commit_files(*args, **kwargs)
        except committer_module.CommitFailedException:
            conflicts.append(1)
            raise

    monkeypatch.setattr(committer_module, "commit_files", counting)
    b.add(*batch(builder, 1, 0, 10))
    result = b.commit()
    assert conflicts == [1] and result is not None and result.attempts == 2
    table.refresh()
    assert snapshot_offsets(table) == {(TOPIC, 0): 10, (TOPIC, 1): 10}

    interleave["partition"] = 2  # now A writes a partition B holds rows of
    b.add(*batch(builder, 2, 0, 10))
    with pytest.raises(Fenced):
        b.commit()
    assert offsets_in_table(table) == sorted(
        [(0, o) for o in range(10)] + [(1, o) for o in range(10)] + [(2, o) for o in range(10)]
    )


def test_commits_in_flight_keep_offsets_in_order(table, builder) -> None:
    committer = TableCommitter(table)
    committer.claim([(TOPIC, 0)])
    committer.add(*batch(builder, 0, 0, 50))
    assert committer.commit_async()
    assert not committer.commit_async()  # one in flight at a time
    committer.add(*batch(builder, 0, 50, 20))  # consumption goes on meanwhile
    assert committer.buffered_rows == 70
    first = committer.poll(wait=True)
    assert first is not None and first.rows == 50 and first.offsets == {(TOPIC, 0): 50}
    second = committer.commit()
    assert second is not None and second.rows == 20 and second.offsets == {(TOPIC, 0): 70}
    assert offsets_in_table(table) == [(0, o) for o in range(70)]
    committer.close()


def fail_the_first_commit(monkeypatch) -> None:
    """The catalog unreachable for the next commit only."""
    real = committer_module.commit_files
    calls = []

    def failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OSError("catalog unreachable")
        return real(*args, **kwargs)

    monkeypatch.setattr(committer_module, "commit_files", failing_once)


def test_a_failed_commit_keeps_its_rows_for_the_next_one(table, builder, monkeypatch) -> None:
    committer = TableCommitter(table)
    committer.claim([(TOPIC, 0)])
    committer.add(*batch(builder, 0, 0, 40))
    fail_the_first_commit(monkeypatch)
    with pytest.raises(CommitError, match="catalog unreachable"):
        committer.commit()
    assert committer.buffered_rows == 40
    committer.add(*batch(builder, 0, 40, 10))
    result = committer.commit()
    assert result is not None and result.rows == 50
    assert offsets_in_table(table) == [(0, o) for o in range(50)]


def test_released_partitions_leave_the_buffer(table, builder) -> None:
    committer = TableCommitter(table)
    committer.claim([(TOPIC, 0), (TOPIC, 1)])
    committer.add(*batch(builder, 0, 0, 10))
    committer.add(*batch(builder, 1, 0, 10))
    committer.release([(TOPIC, 1)])
    assert committer.buffered_rows == 10
    result = committer.commit()
    assert result is not None and result.offsets == {(TOPIC, 0): 10}
    with pytest.raises(ValueError, match="not claimed"):
        committer.add(*batch(builder, 1, 10, 1))


def test_pyiceberg_retries_must_stay_off(table, builder) -> None:
    with table.transaction() as tx:
        tx.set_properties({COMMIT_RETRIES: "4"})
    committer = TableCommitter(table)
    committer.claim([(TOPIC, 0)])
    committer.add(*batch(builder, 0, 0, 5))
    with pytest.raises(CommitError, match=r"commit\.retry\.num-retries must be 0"):
        committer.commit()


def test_a_re_created_topic_is_archived_again_from_its_start(table, builder) -> None:
    old = TableCommitter(table)
    old.topic_ids = {TOPIC: "id-one"}
    old.claim([(TOPIC, 0)])
    old.add(*batch(builder, 0, 0, 30))
    old.commit()
    new = TableCommitter(table.catalog.load_table(table.name()))
    new.topic_ids = {TOPIC: "id-two"}  # deleted and created again: offsets restart at 0
    assert new.claim([(TOPIC, 0)]) == {(TOPIC, 0): None}
    new.add(*batch(builder, 0, 0, 5))
    result = new.commit()
    assert result is not None and result.offsets == {(TOPIC, 0): 5}
    again = TableCommitter(table.catalog.load_table(table.name()))
    again.topic_ids = {TOPIC: "id-two"}
    assert again.claim([(TOPIC, 0)]) == {(TOPIC, 0): 5}


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread niceness is Linux's")
def test_commit_threads_yield_the_cpu_and_the_threads_they_start_inherit_it():
    seen: dict[str, int] = {}

    def child() -> None:
        seen["child"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def worker() -> None:
        lower_thread_priority(7)
        seen["worker"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        started = threading.Thread(target=child)  # as pyiceberg's Parquet writers, started from the worker
        started.start()
        started.join()

    base = os.getpriority(os.PRIO_PROCESS, 0)
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == {"worker": min(base + 7, 19), "child": min(base + 7, 19)}
    assert os.getpriority(os.PRIO_PROCESS, 0) == base  # the process (its main thread) keeps its priority


def test_a_commit_reports_its_oldest_and_newest_record_time_per_topic_also_after_a_failure(
    table, builder, monkeypatch
) -> None:
    """What the archiver observes as event-to-visible when the snapshot is committed."""
    committer = TableCommitter(table)
    committer.claim([(TOPIC, 0)])
    rows, consumed, size = batch(builder, 0, 0, 20)
    committer.add(rows, consumed, size, {TOPIC: (1_000, 2_000)})
    fail_the_first_commit(monkeypatch)
    with pytest.raises(CommitError):
        committer.commit()
    rows, consumed, size = batch(builder, 0, 20, 5)
    committer.add(rows, consumed, size, {TOPIC: (2_500, 3_000)})
    result = committer.commit()
    assert result is not None and result.event_ms == {TOPIC: (1_000, 3_000)}  # the failed commit's rows included
    rows, consumed, size = batch(builder, 0, 25, 5)
    committer.add(rows, consumed, size, {TOPIC: (4_000, 4_100)})
    assert committer.commit().event_ms == {TOPIC: (4_000, 4_100)}  # type: ignore[union-attr]
