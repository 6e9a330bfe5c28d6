"""The ClickHouse sink's pure parts: migrations, type mapping, the Avro container, errors, tokens, clients."""

from __future__ import annotations

import io
from decimal import Decimal
from typing import Any

import fastavro
import pyarrow as pa
import pytest

from services.clickhouse_sink.decode import (
    HEADER_FIELD,
    SENTINEL,
    SENTINEL_FIELD,
    container,
    container_header,
    error_code,
    is_engine_unavailable,
)
from services.clickhouse_sink.migrations import Migration, MigrationError, apply_migrations, load_migrations, render
from services.clickhouse_sink.sink import group_token, insert_settings
from services.clickhouse_sink.tables import EVENTS, TRANSACTIONS, clickhouse_type, structure
from services.kit.avro import AvroSerializer, SchemaRepository
from services.kit.sink import PartitionBatch
from services.stores import clickhouse_queries as queries
from services.stores.clickhouse import NativeClient
from services.testing.samples import ProcessedSamples


@pytest.fixture(scope="module")
def schemas() -> SchemaRepository:
    return SchemaRepository.load()


# --- migrations ----------------------------------------------------------------------------------------------
def test_migrations_are_ordered_and_render_for_one_engine_or_a_cluster():
    migrations = load_migrations()
    assert [m.version for m in migrations] == list(range(1, len(migrations) + 1))
    local = "\n".join(s for m in migrations for s in m.statements("lp", None))
    assert "{" not in local.replace("{}", "")  # every placeholder rendered
    assert "ON CLUSTER" not in local and "Replicated" not in local
    assert "ENGINE = ReplacingMergeTree" in local
    clustered = "\n".join(s for m in migrations for s in m.statements("lp", "main"))
    assert "ENGINE = ReplicatedReplacingMergeTree(version, is_deleted)" in clustered
    assert clustered.count("ON CLUSTER 'main'") == local.count("CREATE ")
    with pytest.raises(MigrationError):
        render("x", "bad-name", None)
    with pytest.raises(MigrationError):
        render("x", "lp", "a'; DROP")


def test_apply_migrations_records_versions_and_refuses_an_edited_one():
    executed: list[str] = []
    applied: list[tuple[int, str]] = []

    def execute(sql: str) -> None:
        executed.append(sql)
        if sql.startswith("INSERT INTO lp.schema_migrations"):
            values = sql.split("VALUES (", 1)[1].rstrip(")").split(", ")
            applied.append((int(values[0]), values[2].strip("'")))

    migrations = [Migration(1, "one", "CREATE TABLE IF NOT EXISTS {db}.a {on_cluster} (x UInt8) ENGINE = Log;")]
    assert apply_migrations(execute, lambda _sql: applied, "lp", migrations=migrations) == [1]
    assert any("CREATE TABLE IF NOT EXISTS lp.a" in s for s in executed)
    executed.clear()
    assert apply_migrations(execute, lambda _sql: applied, "lp", migrations=migrations) == []
    assert not any("lp.a" in s for s in executed)  # applied once
    edited = [Migration(1, "one", "CREATE TABLE IF NOT EXISTS {db}.a (x UInt16) ENGINE = Log;")]
    with pytest.raises(MigrationError, match="changed after it was applied"):
        apply_migrations(execute, lambda _sql: applied, "lp", migrations=edited)


# --- types and statements ------------------------------------------------------------------------------------
def test_avro_types_map_to_what_clickhouse_reads(schemas):
    assert clickhouse_type(["null", {"type": "long", "logicalType": "timestamp-micros"}]) == (
        "Nullable(DateTime64(6, 'UTC'))"
    )
    assert clickhouse_type({"type": "bytes", "logicalType": "decimal", "precision": 12, "scale": 2}) == (
        "Decimal(12, 2)"
    )
    assert clickhouse_type({"type": "map", "values": "string"}) == "Map(String, String)"
    with pytest.raises(ValueError):
        clickhouse_type(["null", "string", "long"])
    events = structure(schemas["processed_event"].definition)
    assert "`event_time` DateTime64(3, 'UTC')" in events and "`user_registration_date` Nullable(Date32)" in events
    assert "`unit_price` Nullable(Decimal(12, 2))" in structure(schemas["processed_transaction"].definition)


def test_insert_statement_converts_in_clickhouse_and_names_the_kafka_columns():
    sql = EVENTS.insert_sql("lp", ["event_id", "ip_address", "country"], "{source}", "AbC+/", "tok")
    assert sql.startswith("INSERT INTO lp.user_events_realtime (`event_id`, `ip_address`, `country`, `kafka_topic_id`")
    assert "toUUID(event_id), toIPv4OrNull(ip_address), `country`, 'AbC+/', 'tok', _kafka_partition" in sql
    assert sql.endswith("FROM {source}")
    transactions = TRANSACTIONS.insert_sql("lp", ["transaction_id", "op"], "{source}", None, "t")
    assert "toUInt8(op = 'd')" in transactions and "`version`, `is_deleted`" in transactions
    assert EVENTS.reject_sql().startswith("multiIf(NOT (isNotNull(toUUIDOrNull(`event_id`))), 'event_id'")


def test_tokens_name_the_batches_whatever_their_order():
    a = PartitionBatch("events", 0, [], 0, 99, "id1")
    b = PartitionBatch("events", 1, [], 5, 7, "id1")
    assert group_token([a, b]) == group_token([b, a]) != group_token([a])
    assert group_token([a]) != group_token([PartitionBatch("events", 0, [], 0, 99, "id2")])  # re-created topic
    settings = insert_settings("tok")
    assert settings["insert_deduplication_token"] == "tok"
    assert settings["deduplicate_blocks_in_dependent_materialized_views"] == 1
    assert settings["async_insert"] == 0


# --- the Avro container ----------------------------------------------------------------------------------------
def test_container_is_a_valid_avro_file_wrapping_each_payload(schemas):
    schema = schemas["processed_event"]
    serialize = AvroSerializer(schema)
    events = list(ProcessedSamples(3).events(5))
    blob = container(container_header(schema), [serialize(e) for e in events])
    read = list(fastavro.reader(io.BytesIO(blob)))
    assert len(read) == 5
    for record, event in zip(read, events, strict=True):
        assert record[HEADER_FIELD] == schema.header and record[SENTINEL_FIELD] == SENTINEL
        assert record["event_id"] == event["event_id"] and record["properties"] == event["properties"]


# --- errors ------------------------------------------------------------------------------------------------------
class ServerError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"server said {code}")
        self.code = code


def test_errors_are_told_apart_by_clickhouse_code():
    too_many = RuntimeError("Code: 252. DB::Exception: Too many parts (300). (TOO_MANY_PARTS)")
    bad_uuid = RuntimeError("Code: 376. DB::Exception: Cannot parse uuid x. (CANNOT_PARSE_UUID)")
    assert error_code(too_many) == 252 and error_code(ServerError(60)) == 60
    assert is_engine_unavailable(too_many) and is_engine_unavailable(ConnectionError("refused"))
    assert is_engine_unavailable(RuntimeError("no code at all"))  # unknown: the store, never the data
    assert not is_engine_unavailable(bad_uuid)


# --- the server client, with a stand-in driver ----------------------------------------------------------------
class FakeDriver:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, dict[str, Any]]] = []

    def execute(self, sql: str, data: Any = None, columnar: bool = False, settings: Any = None) -> list[tuple]:
        self.calls.append((sql, data, {"columnar": columnar, "settings": settings}))
        return [(1, "a")]

    def disconnect(self) -> None:
        pass


def test_native_client_sends_columns_to_input_with_the_settings():
    driver = FakeDriver()
    client = NativeClient("h", driver=driver)
    table = pa.table(
        {
            "id": ["a", "b"],
            "props": pa.array([[("k", "v")], None], pa.map_(pa.string(), pa.string())),
            "price": pa.array([Decimal("1.50"), None], pa.decimal128(12, 2)),
        }
    )
    client.insert_arrow("INSERT INTO t SELECT * FROM {source}", table, {"insert_deduplication_token": "x"}, "id String")
    sql, data, options = driver.calls[-1]
    assert sql == "INSERT INTO t SELECT * FROM input('id String')"
    assert data == [["a", "b"], [{"k": "v"}, {}], [Decimal("1.50"), None]]
    assert options == {"columnar": True, "settings": {"insert_deduplication_token": "x"}}
    assert client.rows("SELECT 1") == [(1, "a")]


# --- the live views' presentation -------------------------------------------------------------------------------
def test_funnel_turns_sums_into_steps_and_conversion():
    def rows(_sql: str) -> list[tuple]:
        return [(100, 50, 20, 10, 5, 40, 30, 15, 8, 4)]

    result = queries.funnel(rows, "lp")
    assert result.rows[0] == ["page view", 100, 40, None]
    assert result.rows[1] == ["product view", 50, 30, 75.0]
    assert result.rows[4] == ["purchase", 5, 4, 50.0]
    text = queries.render_text(result)
    assert "Conversion funnel today" in text and "purchase" in text
    assert queries.counts_dict(queries.Result("counts", "", ["t", "n"], [["a", 1]])) == {"a": 1}
    with pytest.raises(KeyError):
        queries.run("nope", rows, "lp")
