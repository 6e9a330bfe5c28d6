"""The archiver as a kit Sink: buffering across partition batches, one commit per table, rebalances, fencing."""

from __future__ import annotations

from pathlib import Path

import pytest
from confluent_kafka import Message

from services.archiver.archive import ArchiverSink
from services.archiver.maintenance import history, read
from services.archiver.schemas import default_tables
from services.archiver.settings import ArchiverSettings
from services.kit.sink import LazyRecords, PartitionBatch, TopicPartition
from services.stores.iceberg import open_catalog
from services.testing.samples import dead_letter, encoded_events

EVENTS, DLQ = "events.processed", "events.raw.dlq"
PAYLOADS = [payload for _, payload, _ in encoded_events(300)]


@pytest.fixture
def settings(tmp_path: Path) -> ArchiverSettings:
    return ArchiverSettings(
        kafka_bootstrap_servers="127.0.0.1:1",
        iceberg_sql_uri=f"sqlite:///{tmp_path}/catalog.db",
        iceberg_warehouse=f"file://{tmp_path}/warehouse",
        iceberg_namespace="sink",
        archiver_commit_rows=100,
        archiver_commit_interval_s=3600,
        archiver_dead_letter_topics=DLQ,
    )


def make_sink(settings: ArchiverSettings, repository, **kwargs) -> ArchiverSink:
    specs = default_tables(dead_letter_topics=(DLQ,))
    return ArchiverSink(open_catalog(settings), settings, specs, repository, **kwargs)


def batch(topic: str, partition: int, first: int, values: list[bytes | None], headers=None) -> PartitionBatch:
    messages = [
        Message(topic=topic, partition=partition, offset=first + i, key=b"k", value=v, headers=headers)
        for i, v in enumerate(values)
    ]
    return PartitionBatch(topic, partition, LazyRecords(messages), first, first + len(values) - 1)  # type: ignore[arg-type]


def rows(sink: ArchiverSink, table: str = "user_events") -> list[tuple[int, int]]:
    data = read(sink.tables[table].table, columns=("_kafka_partition", "_kafka_offset"))
    return sorted(
        zip(data.column("_kafka_partition").to_pylist(), data.column("_kafka_offset").to_pylist(), strict=True)
    )


def test_batches_of_all_partitions_go_into_one_commit_per_table(settings, repository) -> None:
    sink = make_sink(settings, repository)
    tps = [TopicPartition(EVENTS, 0), TopicPartition(EVENTS, 1), TopicPartition(DLQ, 0)]
    assert sink.stored_offsets(tps) == dict.fromkeys(tps, 0)  # never archived: from the beginning
    result = sink.write(batch(EVENTS, 0, 0, [*PAYLOADS[:40], b"garbage"]))
    assert result.written == 40 and [(r.code, r.record.offset) for r in result.rejected] == [
        ("NOT_AVRO_SINGLE_OBJECT", 40)
    ]
    sink.write(batch(EVENTS, 1, 0, PAYLOADS[40:80]))
    sink.write(batch(DLQ, 0, 0, [dead_letter(b"x")[1]], headers=dead_letter(b"x")[2]))
    assert rows(sink) == []  # 80 rows buffered: below ARCHIVER_COMMIT_ROWS, nothing committed yet
    sink.write(batch(EVENTS, 0, 41, PAYLOADS[80:110]))  # 110 >= 100: due, committed in the background
    sink.tables["user_events"].committer.poll(wait=True)
    sink.commit_due()
    assert len(rows(sink)) == 110
    assert [e["added_rows"] for e in history(sink.tables["user_events"].table)] == [110]
    sink.close()  # commits the rest (the dead letter)
    assert rows(sink, "dead_letters") == [(0, 0)]
    again = make_sink(settings, repository)
    assert again.stored_offsets(tps) == {tps[0]: 71, tps[1]: 40, tps[2]: 1}  # past the dead-lettered record


def test_revoked_partitions_are_committed_before_they_are_handed_over(settings, repository) -> None:
    sink = make_sink(settings, repository)
    sink.stored_offsets([TopicPartition(EVENTS, 0), TopicPartition(EVENTS, 1)])
    sink.write(batch(EVENTS, 0, 0, PAYLOADS[:10]))
    sink.write(batch(EVENTS, 1, 0, PAYLOADS[10:15]))
    sink.revoked([TopicPartition(EVENTS, 1)])
    assert len(rows(sink)) == 15
    assert set(sink.tables["user_events"].committer.expected) == {(EVENTS, 0)}
    sink.lost([TopicPartition(EVENTS, 0)])
    assert sink.tables["user_events"].committer.buffered_rows == 0


def test_a_fenced_sink_drops_its_buffer_and_asks_to_be_sought_again(settings, repository) -> None:
    resyncs: list[list[TopicPartition]] = []
    first = make_sink(settings, repository)
    second = make_sink(settings, repository, on_fenced=resyncs.append)
    tp = TopicPartition(EVENTS, 0)
    first.stored_offsets([tp])
    second.stored_offsets([tp])  # a zombie: both think they own partition 0
    first.write(batch(EVENTS, 0, 0, PAYLOADS[:20]))
    second.write(batch(EVENTS, 0, 0, PAYLOADS[:20]))
    assert first.commit_all()
    assert not second.commit_all()
    assert resyncs == [[tp]]
    assert rows(first) == [(0, o) for o in range(20)]  # once
    result = second.write(batch(EVENTS, 0, 20, PAYLOADS[20:25]))  # until it has sought: not buffered
    assert result.written == 0 and second.tables["user_events"].committer.buffered_rows == 0
    assert second.stored_offsets([tp]) == {tp: 20}  # the runner seeks here
    second.write(batch(EVENTS, 0, 20, PAYLOADS[20:25]))
    assert second.commit_all()
    assert rows(first) == [(0, o) for o in range(25)]
