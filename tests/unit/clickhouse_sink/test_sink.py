"""ClickHouseSink on chDB: exactly once per token, views in step, refusals with reasons, replays, outages.

chDB allows one data folder per process, so every test shares one folder and takes a database of its own.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from services.clickhouse_sink.sink import ClickHouseSink, group_token
from services.clickhouse_sink.tables import EVENTS, TRANSACTIONS
from services.kit.avro import AvroDeserializer, AvroSerializer, Schema, SchemaRepository
from services.kit.sink import PartitionBatch, SinkBackpressure, SinkRecord, TopicPartition, WrittenBatch
from services.stores.clickhouse import ChdbClient, ClickHouseClient
from services.testing.samples import ProcessedSamples

EVENTS_TOPIC, TRANSACTIONS_TOPIC = "events.processed", "transactions.processed"


@pytest.fixture(scope="session")
def chdb_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChdbClient]:
    client = ChdbClient(tmp_path_factory.mktemp("chdb"))
    yield client
    client.close()


class _Shared(ChdbClient):
    """The session's chDB, not closed by the sink under test."""

    def __init__(self, inner: ChdbClient) -> None:
        self.session, self.path = inner.session, inner.path

    def close(self) -> None:
        pass


@pytest.fixture
def schemas() -> SchemaRepository:
    return SchemaRepository.load()


@pytest.fixture
def make_sink(chdb_client: ChdbClient, schemas: SchemaRepository, tmp_path: Path):
    def make(**kwargs: Any) -> ClickHouseSink:
        database = f"t_{uuid.uuid4().hex[:10]}"
        topics = {EVENTS_TOPIC: EVENTS, TRANSACTIONS_TOPIC: TRANSACTIONS}
        return ClickHouseSink(_Shared(chdb_client), database, topics, schemas=schemas, scratch_dir=tmp_path, **kwargs)

    return make


class Batches:
    """Processed events and transactions as partition batches of consumed records."""

    def __init__(self, schemas: SchemaRepository, seed: int = 5) -> None:
        self.samples = ProcessedSamples(seed)
        self.event_bytes = AvroSerializer(schemas["processed_event"])
        self.transaction_bytes = AvroSerializer(schemas["processed_transaction"])
        self.event_decoder = AvroDeserializer(schemas, "processed_event")
        self.transaction_decoder = AvroDeserializer(schemas, "processed_transaction")

    def events(self, partition: int, first: int, payloads: Sequence[bytes], topic_id: str = "tid") -> PartitionBatch:
        records = [
            SinkRecord.of(EVENTS_TOPIC, partition, first + i, p, decoder=self.event_decoder)
            for i, p in enumerate(payloads)
        ]
        return PartitionBatch(EVENTS_TOPIC, partition, records, first, first + len(payloads) - 1, topic_id)

    def event_payloads(self, count: int, **overrides: Any) -> list[bytes]:
        return [self.event_bytes({**e, **overrides}) for e in self.samples.events(count)]


def count(sink: ClickHouseSink, sql: str) -> int:
    ((value,),) = sink.client.rows(sql.format(db=sink.database))
    return int(value or 0)


def test_a_group_is_stored_once_whatever_the_retries_and_views_follow(make_sink, schemas):
    sink = make_sink()
    make = Batches(schemas)
    group = [make.events(0, 0, make.event_payloads(300)), make.events(3, 100, make.event_payloads(200))]
    results = sink.write_group(group)
    assert [r.written for r in results] == [300, 200] and all(not r.rejected for r in results)
    sink.write_group(group)  # the runner retries the same group after an ambiguous failure: ignored
    sink.write_group(list(reversed(group)))
    assert count(sink, "SELECT count() FROM {db}.user_events_realtime") == 500
    assert count(sink, "SELECT uniqExact(event_id) FROM {db}.user_events_realtime") == 500
    assert count(sink, "SELECT sum(event_count) FROM {db}.user_activity_summary") == 500
    funnel = count(
        sink,
        "SELECT sum(page_views + product_views + add_to_carts + checkout_starts + purchases) "
        "FROM {db}.conversion_funnel",
    )
    expected = count(
        sink,
        "SELECT countIf(event_type IN ('page_view','product_view','add_to_cart','checkout_start','purchase')) "
        "FROM {db}.user_events_realtime",
    )
    assert funnel == expected > 0
    rows = sink.client.rows(
        f"SELECT DISTINCT kafka_partition, kafka_batch_last, kafka_insert, kafka_topic_id "
        f"FROM {sink.database}.user_events_realtime ORDER BY 1"
    )
    token = group_token(group)
    assert rows == [(0, 299, token, "tid"), (3, 299, token, "tid")]
    latency = sink.latency_percentiles()["user_events_realtime"]
    assert latency is not None and set(latency) == {"p50", "p95", "p99"}


def test_written_batches_are_reported_for_the_current_topic_only(make_sink, schemas):
    sink = make_sink()
    make = Batches(schemas)
    group = [make.events(1, 10, make.event_payloads(5)), make.events(2, 0, make.event_payloads(5))]
    sink.write_group(group)
    sink.write_group([make.events(1, 15, make.event_payloads(5))])
    tp1, tp2 = TopicPartition(EVENTS_TOPIC, 1), TopicPartition(EVENTS_TOPIC, 2)
    ends = sink.written_batch_ends({tp1: 0, tp2: 0}, {EVENTS_TOPIC: "tid"})
    token = group_token(group)
    assert sorted(ends[tp1], key=lambda e: e.last_offset) == [
        WrittenBatch(14, token),
        WrittenBatch(19, group_token([make.events(1, 15, [b"x"] * 5)])),
    ]
    assert ends[tp2] == [WrittenBatch(4, token)]
    assert sink.written_batch_ends({tp1: 15}, {EVENTS_TOPIC: "tid"})[tp1][0].last_offset == 19  # from the start on
    assert sink.written_batch_ends({tp1: 0}, {EVENTS_TOPIC: "another-topic-id"}) == {}  # a re-created topic


def test_refused_records_come_back_with_code_field_and_message(make_sink, schemas):
    sink = make_sink()
    make = Batches(schemas)
    good = make.event_payloads(20)
    bad_id = make.event_payloads(1, event_id="order-17")[0]
    bad_session = make.event_payloads(1, session_id="s-1")[0]
    truncated = good[3][:-4]
    batch = make.events(0, 0, [*good[:5], bad_id, truncated, bad_session, *good[5:]])
    (result,) = sink.write_group([batch])
    refused = {r.record.offset: (r.code, r.field, str(r.stage)) for r in result.rejected}
    assert refused == {
        5: ("STORE_TYPE_MISMATCH", "event_id", "store"),
        6: ("CORRUPT_OR_TRUNCATED", None, "decode"),
        7: ("STORE_TYPE_MISMATCH", "session_id", "store"),
    }
    message = next(r.message for r in result.rejected if r.field == "event_id")
    assert "order-17" in message and "UUID" in message
    assert result.written == 20
    assert count(sink, "SELECT count() FROM {db}.user_events_realtime") == 20


def test_an_older_writer_version_is_resolved_and_stored(make_sink, schemas):
    definition = dict(schemas["processed_event"].definition)
    definition["fields"] = [f for f in definition["fields"] if f["name"] != "rules_version"]
    schemas.add_writer_version("processed_event", definition)
    old = AvroSerializer(Schema.from_definition("processed_event", definition))
    sink = make_sink()
    make = Batches(schemas)
    events = list(make.samples.events(3))
    payloads = [make.event_bytes(events[0]), old({k: v for k, v in events[1].items() if k != "rules_version"})]
    (result,) = sink.write_group([make.events(0, 0, payloads)])
    assert result.written == 2 and not result.rejected
    rows = sink.client.rows(f"SELECT toString(event_id), rules_version FROM {sink.database}.user_events_realtime")
    assert sorted(rows) == sorted([(events[0]["event_id"], "samples"), (events[1]["event_id"], "")])


def test_a_batch_across_months_is_inserted_per_month_and_still_once(make_sink, schemas):
    sink = make_sink()
    make = Batches(schemas)
    november = list(make.samples.events(4, start=datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC), spacing_ms=500))
    batch = make.events(0, 0, [make.event_bytes(e) for e in november])
    sink.write_group([batch])
    sink.write_group([batch])
    months = sink.client.rows(
        f"SELECT toYYYYMM(event_time), count() FROM {sink.database}.user_events_realtime GROUP BY 1 ORDER BY 1"
    )
    assert months == [(202611, 2), (202612, 2)]


def test_transactions_keep_their_latest_change_and_hide_deletes(make_sink, schemas):
    sink = make_sink()
    make = Batches(schemas)
    transaction = next(t for _, t in make.samples.events_with_transactions(3000) if t is not None)
    paid = {**transaction, "status": "paid", "source_lsn": transaction["source_lsn"] + 10}
    deleted = {**transaction, "op": "d", "source_lsn": transaction["source_lsn"] + 20}
    records = [
        SinkRecord.of(TRANSACTIONS_TOPIC, 0, i, make.transaction_bytes(t), decoder=make.transaction_decoder)
        for i, t in enumerate([transaction, paid])
    ]
    sink.write_group([PartitionBatch(TRANSACTIONS_TOPIC, 0, records, 0, 1, "tx")])
    current = sink.client.rows(f"SELECT status, total FROM {sink.database}.transactions_realtime FINAL")
    assert current == [("paid", transaction["total"])]
    delete = SinkRecord.of(TRANSACTIONS_TOPIC, 0, 2, make.transaction_bytes(deleted), decoder=make.transaction_decoder)
    sink.write_group([PartitionBatch(TRANSACTIONS_TOPIC, 0, [delete], 2, 2, "tx")])
    assert count(sink, "SELECT count() FROM {db}.transactions_realtime FINAL") == 0


def test_an_unavailable_table_is_backpressure_and_the_batch_goes_in_later(make_sink, schemas, tmp_path: Path):
    fault = tmp_path / "down"
    sink = make_sink(fault_file=fault)
    make = Batches(schemas)
    batch = make.events(0, 0, make.event_payloads(10))
    fault.touch()
    with pytest.raises(SinkBackpressure, match="UNKNOWN_TABLE"):
        sink.write_group([batch])
    with pytest.raises(SinkBackpressure):
        sink.written_batch_ends({TopicPartition(EVENTS_TOPIC, 0): 0}, {EVENTS_TOPIC: "tid"})
    fault.unlink()
    assert sink.write_group([batch])[0].written == 10
    assert count(sink, "SELECT count() FROM {db}.user_events_realtime") == 10


class RefusingClient(ClickHouseClient):
    """Inserts into nothing; refuses (as ClickHouse would, code 27) any insert holding a marked row."""

    kind = "fake"

    def __init__(self, marked: set[int]) -> None:
        self.marked = marked
        self.tokens: list[str] = []
        self.inserted: list[int] = []

    def execute(self, sql: str) -> None:
        pass

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        return []

    def insert_arrow(self, sql: str, table: pa.Table, settings: Any, structure: str) -> None:
        offsets = set(table.column("_kafka_offset").to_pylist())
        if offsets & self.marked:
            raise RuntimeError("Code: 27. DB::Exception: Cannot parse input. (CANNOT_PARSE_INPUT_ASSERTION_FAILED)")
        self.tokens.append(settings["insert_deduplication_token"])
        self.inserted += sorted(offsets)

    def decode_arrow(self, sql: str) -> pa.Table:
        raise AssertionError("not used")

    def close(self) -> None:
        pass


def test_rows_clickhouse_refuses_are_isolated_by_halving_with_repeatable_tokens(schemas, tmp_path: Path):
    client = RefusingClient({3, 6})
    sink = ClickHouseSink(client, "lp", {EVENTS_TOPIC: EVENTS}, schemas=schemas, scratch_dir=tmp_path, migrate=False)
    table = sink.tables[EVENTS_TOPIC]
    records = [SinkRecord.of(EVENTS_TOPIC, 0, i, b"") for i in range(8)]
    part = pa.table({"_kafka_offset": list(range(8))})
    refused = sink._insert(table, "INSERT ... {source}", part, records, "T")
    assert [(r.record.offset, r.code) for r in refused] == [(3, "STORE_REJECTED"), (6, "STORE_REJECTED")]
    assert "Cannot parse input" in refused[0].message
    assert client.inserted == [0, 1, 2, 4, 5, 7]  # every other row, once
    first = list(client.tokens)
    assert all(token.startswith("T/") for token in first)
    client.tokens.clear()
    sink._insert(table, "INSERT ... {source}", part, records, "T")
    assert client.tokens == first  # a replay splits the same way: the same tokens, deduplicated

    down = RefusingClient(set())
    down.insert_arrow = lambda *args: (_ for _ in ()).throw(RuntimeError("Code: 252. Too many parts"))  # type: ignore[method-assign]
    sink.client = down
    with pytest.raises(SinkBackpressure, match="Too many parts"):
        sink._insert(table, "INSERT ... {source}", part, records, "T")
