"""Replay re-emits exactly the rows of a time range (and filter), re-encoded, with lp-replay-* headers."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from services.archiver.catalog import ensure_table
from services.archiver.committer import TableCommitter
from services.archiver.replay import ReplayError, replay
from services.archiver.rows import AvroRowBuilder, DeadLetterRowBuilder, RecordColumns
from services.archiver.schemas import arrow_schema, default_tables
from services.kit.avro import AvroDeserializer, Decoded
from services.testing.samples import START, dead_letter, encoded_events

TOPIC = "events.processed"
STEP = timedelta(minutes=7)  # 600 events over ~70 hours: the range crosses day boundaries
SAMPLES = list(encoded_events(600, step=STEP))


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.flushes = 0

    def produce(self, topic, value, key=None, headers=None, partition=None) -> None:
        self.sent.append({"topic": topic, "value": value, "key": key, "headers": dict(headers), "partition": partition})

    def flush(self, timeout: float = 30.0) -> None:
        self.flushes += 1


@pytest.fixture
def events(catalog, catalog_settings, repository):
    spec = default_tables()[0]
    table, _ = ensure_table(catalog, catalog_settings, spec, repository)
    committer = TableCommitter(table)
    committer.claim([(TOPIC, p) for p in range(3)])
    columns = RecordColumns()
    for i, (key, payload, _) in enumerate(SAMPLES):
        columns.append(TOPIC, i % 3, i // 3, None, key, payload, None)
    rows, _ = AvroRowBuilder(repository, "processed_event", arrow_schema(table.schema())).build(columns)
    committer.add(rows, columns.consumed())
    committer.commit()
    return spec, table


def test_replay_emits_exactly_the_range_in_kafka_order(events, repository) -> None:
    spec, table = events
    since, until = START + timedelta(hours=20), START + timedelta(hours=50)
    producer = FakeProducer()
    report = replay(table, spec, since, until, producer=producer, repository=repository, partitions_of={TOPIC: 3}.get)
    expected = [(i, r) for i, (_, _, r) in enumerate(SAMPLES) if since <= r["event_time"] < until]
    assert report.rows == len(expected) == len(producer.sent) and report.produced == {TOPIC: len(expected)}
    decode = AvroDeserializer(repository, "processed_event")
    decoded = [decode(m["value"]) for m in producer.sent]
    assert all(isinstance(d, Decoded) for d in decoded)
    assert sorted(d.record["event_id"] for d in decoded) == sorted(r["event_id"] for _, r in expected)
    by_id = {r["event_id"]: r for _, r in expected}
    assert all(d.record == by_id[d.record["event_id"]] for d in decoded)  # every field round-trips
    for message, (_, record) in zip(
        [m for m in producer.sent if m["partition"] == 1], [e for e in expected if e[0] % 3 == 1], strict=True
    ):
        assert decode(message["value"]).record["event_id"] == record["event_id"]  # original order per partition
    first = producer.sent[0]
    assert first["headers"]["lp-replay-id"] == report.replay_id.encode()
    assert first["headers"]["lp-replay-snapshot"] == str(report.snapshot_id).encode()
    assert first["headers"]["lp-replay-source"].startswith(f"iceberg:test.user_events@{report.snapshot_id}:".encode())
    assert first["key"] == SAMPLES[next(i for i, _ in expected if i % 3 == first["partition"])][0]


def test_replay_with_a_filter_into_another_topic(events, repository) -> None:
    spec, table = events
    since, until = START, START + timedelta(days=5)
    producer = FakeProducer()
    report = replay(
        table,
        spec,
        since,
        until,
        producer=producer,
        repository=repository,
        partitions_of={TOPIC: 3, "backfill": 1}.get,
        into="backfill",
        where="event_type = 'purchase'",
    )
    purchases = [r for _, _, r in SAMPLES if r["event_type"] == "purchase"]
    assert report.rows == len(purchases) > 0
    assert {m["topic"] for m in producer.sent} == {"backfill"}
    assert {m["partition"] for m in producer.sent} == {None}  # another topic: partitioned by key


def test_a_dry_run_counts_and_sends_nothing(events, repository) -> None:
    spec, table = events
    report = replay(
        table, spec, START, START + timedelta(hours=1), producer=None, repository=repository, partitions_of=dict().get
    )
    assert report.dry_run and report.rows == len(
        [1 for _, _, r in SAMPLES if r["event_time"] < START + timedelta(hours=1)]
    )


def test_bad_requests_are_refused(events, repository) -> None:
    spec, table = events
    with pytest.raises(ReplayError, match="empty range"):
        replay(table, spec, START, START, producer=None, repository=repository, partitions_of=dict().get)
    with pytest.raises(ReplayError, match="'nope' does not exist"):
        replay(
            table,
            spec,
            START,
            START + timedelta(days=1),
            producer=FakeProducer(),
            repository=repository,
            partitions_of=dict().get,
            into="nope",
        )


def test_dead_letters_replay_byte_for_byte_to_their_original_topic(catalog, catalog_settings, repository) -> None:
    spec = default_tables()[2]
    table, _ = ensure_table(catalog, catalog_settings, spec, repository)
    committer = TableCommitter(table)
    committer.claim([("events.raw.dlq", 0)])
    columns = RecordColumns()
    key, value, headers = dead_letter(b"\xc3\x01raw-bytes", now=START + timedelta(minutes=5))
    columns.append("events.raw.dlq", 0, 0, None, key, value, headers)
    rows, _ = DeadLetterRowBuilder(arrow_schema(table.schema())).build(columns)
    committer.add(rows, columns.consumed())
    committer.commit()
    producer = FakeProducer()
    replay(
        table,
        spec,
        START,
        START + timedelta(hours=1),
        producer=producer,
        repository=repository,
        partitions_of={"events.raw": 4}.get,
    )
    (sent,) = producer.sent
    assert sent["topic"] == "events.raw" and sent["value"] == b"\xc3\x01raw-bytes" and sent["key"] == key
    assert sent["headers"]["traceparent"] == dict(headers)["traceparent"]
    assert not any(name.startswith("lp-dlq-") for name in sent["headers"])
