"""Avro contracts -> Iceberg schemas and partitions; schema evolution without rewriting data."""

from __future__ import annotations

import copy
from typing import Any

import pyarrow as pa
import pytest
from pyiceberg.transforms import DayTransform, IdentityTransform
from pyiceberg.types import (
    BinaryType,
    DateType,
    DecimalType,
    DoubleType,
    IntegerType,
    ListType,
    LongType,
    MapType,
    StringType,
    TimestamptzType,
)

from services.archiver.catalog import COMMIT_RETRIES, ensure_table
from services.archiver.schemas import (
    KAFKA_COLUMN_NAMES,
    BreakingSchemaChange,
    UnsupportedSchema,
    default_tables,
    fields_with_default,
    iceberg_schema,
    plan_evolution,
)
from services.kit.avro import Schema, SchemaRepository


def contract(repository: SchemaRepository, name: str = "processed_event") -> dict[str, Any]:
    return copy.deepcopy(repository[name].definition)


def repo_with(definition: dict[str, Any], name: str = "processed_event") -> SchemaRepository:
    return SchemaRepository([Schema.from_definition(name, definition)])


def test_processed_event_maps_to_iceberg_types(repository: SchemaRepository) -> None:
    schema = iceberg_schema(repository["processed_event"].definition)
    field = schema.find_field
    assert field("event_id").field_type == StringType() and field("event_id").required
    assert field("session_id").field_type == StringType() and not field("session_id").required
    assert field("event_time").field_type == TimestamptzType() and field("event_time").required
    assert field("event_date").field_type == DateType()
    assert field("quantity").field_type == IntegerType() and not field("quantity").required
    assert field("price").field_type == DoubleType()
    properties = field("properties").field_type
    assert isinstance(properties, MapType) and properties.value_type == StringType() and properties.value_required
    flags = field("quality_flags").field_type
    assert isinstance(flags, ListType) and flags.element_required
    assert field("event_id").doc and "idempotency" in field("event_id").doc
    assert [f.name for f in schema.fields[-5:]] == [
        "_kafka_topic",
        "_kafka_partition",
        "_kafka_offset",
        "_kafka_timestamp",
        "_kafka_key",
    ]
    assert set(KAFKA_COLUMN_NAMES) == {f.name for f in schema.fields[-5:]}
    assert field("_kafka_offset").field_type == LongType() and field("_kafka_key").field_type == BinaryType()


def test_transactions_money_is_decimal(repository: SchemaRepository) -> None:
    schema = iceberg_schema(repository["processed_transaction"].definition)
    assert schema.find_field("total").field_type == DecimalType(12, 2)
    assert schema.find_field("created_at").field_type == TimestamptzType()


def test_tables_are_partitioned_by_day_of_event_time_and_event_type(repository: SchemaRepository) -> None:
    for spec in default_tables():
        schema = spec.schema(repository)
        partition = spec.partition_spec(schema)
        day, kind = partition.fields
        assert isinstance(day.transform, DayTransform) and day.source_id == schema.find_field(spec.event_time).field_id
        assert isinstance(kind.transform, IdentityTransform)
        assert kind.source_id == schema.find_field(spec.event_type).field_id


def test_unsupported_unions_are_refused_with_the_field_name() -> None:
    definition = {"type": "record", "name": "R", "fields": [{"name": "x", "type": ["null", "int", "string"]}]}
    with pytest.raises(UnsupportedSchema, match="x"):
        iceberg_schema(definition)


def test_a_field_named_like_the_archiver_columns_is_refused() -> None:
    definition = {"type": "record", "name": "R", "fields": [{"name": "_kafka_offset", "type": "long"}]}
    with pytest.raises(UnsupportedSchema, match="_kafka_offset"):
        iceberg_schema(definition)


# --- evolution -------------------------------------------------------------------------------------------------
def test_a_new_optional_field_is_added_as_a_column(repository: SchemaRepository) -> None:
    old = contract(repository)
    new = contract(repository)
    new["fields"].append({"name": "campaign", "type": ["null", "string"], "default": None})
    plan = plan_evolution(iceberg_schema(old), iceberg_schema(new), fields_with_default(new))
    assert not plan.problems
    assert [(f.name, f.required) for f in plan.add] == [("campaign", False)]


def test_a_new_field_with_a_default_is_added_optional(repository: SchemaRepository) -> None:
    new = contract(repository)
    new["fields"].append({"name": "channel", "type": "string", "default": "web"})
    plan = plan_evolution(iceberg_schema(contract(repository)), iceberg_schema(new), fields_with_default(new))
    assert not plan.problems and [(f.name, f.required) for f in plan.add] == [("channel", False)]


def test_breaking_changes_are_refused_naming_the_field(repository: SchemaRepository) -> None:
    old = contract(repository)
    new = contract(repository)
    new["fields"].append({"name": "tenant", "type": "string"})  # not nullable, no default
    for field in new["fields"]:
        if field["name"] == "event_hour":
            field["type"] = "string"  # int -> string
    new["fields"] = [f for f in new["fields"] if f["name"] != "user_id"]  # a required column dropped
    plan = plan_evolution(iceberg_schema(old), iceberg_schema(new), fields_with_default(new))
    text = " | ".join(plan.problems)
    assert "'tenant'" in text and "'event_hour'" in text and "'user_id'" in text
    assert len(plan.problems) == 3


def test_promotions_and_relaxing_are_accepted(repository: SchemaRepository) -> None:
    old = contract(repository)
    new = contract(repository)
    for field in new["fields"]:
        if field["name"] == "event_hour":
            field["type"] = "long"
        if field["name"] == "user_id":
            field["type"] = ["null", "string"]
            field["default"] = None
    new["fields"] = [f for f in new["fields"] if f["name"] != "referrer"]  # optional: kept as a column
    plan = plan_evolution(iceberg_schema(old), iceberg_schema(new), fields_with_default(new))
    assert not plan.problems
    assert plan.widen == [("event_hour", LongType())]
    assert plan.make_optional == ["user_id"]
    assert plan.retired == ["referrer"]


def test_ensure_table_evolves_without_rewriting_data(catalog, catalog_settings, repository) -> None:
    spec = default_tables()[0]
    old = contract(repository)
    old["fields"] = [f for f in old["fields"] if f["name"] not in ("rules_version", "user_city")]
    table, _ = ensure_table(catalog, catalog_settings, spec, repo_with(old))
    assert table.properties[COMMIT_RETRIES] == "0"
    rows = pa.Table.from_pylist(
        [
            {
                "event_id": "e1",
                "event_type": "page_view",
                "event_time": pa.scalar(0, pa.timestamp("us", "UTC")).as_py(),
                "user_id": "u1",
                "source": "generator",
                "properties": [],
                "event_date": pa.scalar(0, pa.date32()).as_py(),
                "event_hour": 0,
                "day_of_week": 4,
                "is_weekend": False,
                "quality_flags": [],
                "validated_at": pa.scalar(0, pa.timestamp("us", "UTC")).as_py(),
                "_kafka_topic": "t",
                "_kafka_partition": 0,
                "_kafka_offset": 0,
            }
        ],
        schema=_arrow(table),
    )
    from services.archiver.writer import commit_files, write_data_files

    commit_files(table, write_data_files(table, rows), {})
    files_before = sorted(t.file.file_path for t in table.scan().plan_files())

    table, plan = ensure_table(catalog, catalog_settings, spec, repository)
    assert sorted(f.name for f in plan.add) == ["rules_version", "user_city"]
    assert sorted(t.file.file_path for t in table.scan().plan_files()) == files_before  # nothing rewritten
    back = table.scan().to_arrow()
    assert back.column("rules_version").to_pylist() == [None]
    assert back.column("event_id").to_pylist() == ["e1"]

    broken = contract(repository)
    for field in broken["fields"]:
        if field["name"] == "quantity":
            field["type"] = ["null", "string"]
    with pytest.raises(BreakingSchemaChange, match="'quantity' changes type from int to string"):
        ensure_table(catalog, catalog_settings, spec, repo_with(broken))


def _arrow(table) -> pa.Schema:
    from services.archiver.schemas import arrow_schema

    return arrow_schema(table.schema())


def test_the_default_dead_letter_topics_are_every_declared_dead_letter_topic() -> None:
    from services.archiver.schemas import DEFAULT_DEAD_LETTER_TOPICS
    from services.declarations.resources import load_declarations
    from services.kit.paths import repo_root

    declared = {t.topic_name for t in load_declarations(repo_root() / "deploy" / "k8s").topics}
    assert {t for t in declared if t.endswith(".dlq")} == set(DEFAULT_DEAD_LETTER_TOPICS)
