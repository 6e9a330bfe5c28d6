"""The archive's tables: Iceberg schemas derived from the Avro contracts, partition specs, schema evolution.

Every table holds the contract's fields plus where each row came from in Kafka (`_kafka_topic`,
`_kafka_partition`, `_kafka_offset`, `_kafka_timestamp`, `_kafka_key`): with them a row is unique even when
the contract has no unique key (a transaction's changes), and a replay can reproduce the original key and
order. Avro maps to Iceberg as follows: non-null fields are `required`, `["null", X]` unions are optional X,
`timestamp-millis`/`-micros` are `timestamptz`, `date` is `date`, `decimal` is `decimal(p, s)`, enums are
strings, maps of strings are `map<string, V>` and arrays are `list<V>`.

Schema evolution (`plan_evolution`) compares the table with the current contract. Accepted without rewriting
a data file: a new field (added as an optional column; existing rows read as null), a type Iceberg can promote
(int -> long, float -> double, a wider decimal), a required field becoming optional, and a field dropped from
the contract whose column is optional (kept, null from now on). Anything else is refused with a message that
names the field: a type Iceberg cannot promote, a dropped required column, a new field without a default that
is not nullable (old rows could not have it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from pyiceberg.io.pyarrow import schema_to_pyarrow
from pyiceberg.partitioning import PartitionField, PartitionSpec
from pyiceberg.schema import Schema as IcebergSchema
from pyiceberg.transforms import DayTransform, IdentityTransform
from pyiceberg.types import (
    BinaryType,
    BooleanType,
    DateType,
    DecimalType,
    DoubleType,
    FixedType,
    FloatType,
    IcebergType,
    IntegerType,
    ListType,
    LongType,
    MapType,
    NestedField,
    PrimitiveType,
    StringType,
    StructType,
    TimestampType,
    TimestamptzType,
    TimeType,
)

from services.contracts.topics import (
    CDC_TOPICS,
    EVENTS_PROCESSED,
    EVENTS_RAW,
    EVENTS_RAW_RETRY,
    TRANSACTIONS_PROCESSED,
    dead_letter_topic,
)
from services.kit.avro import SchemaRepository

KAFKA_TOPIC = "_kafka_topic"
KAFKA_PARTITION = "_kafka_partition"
KAFKA_OFFSET = "_kafka_offset"
KAFKA_TIMESTAMP = "_kafka_timestamp"
KAFKA_KEY = "_kafka_key"
KAFKA_COLUMNS: tuple[tuple[str, IcebergType, bool, str], ...] = (
    (KAFKA_TOPIC, StringType(), True, "Topic the record was consumed from."),
    (KAFKA_PARTITION, IntegerType(), True, "Its partition."),
    (KAFKA_OFFSET, LongType(), True, "Its offset: (topic, partition, offset) is unique in the table."),
    (KAFKA_TIMESTAMP, TimestamptzType(), False, "The Kafka record timestamp."),
    (KAFKA_KEY, BinaryType(), False, "The Kafka record key, as produced (replays reuse it)."),
)
KAFKA_COLUMN_NAMES = frozenset(name for name, *_ in KAFKA_COLUMNS)

PARTITION_FIELD_ID_START = 1000


class UnsupportedSchema(ValueError):
    """The Avro contract has a shape the archiver cannot store (named in the message)."""


# --- Avro -> Iceberg -------------------------------------------------------------------------------------------
class _Ids:
    def __init__(self) -> None:
        self.next = 0

    def __call__(self) -> int:
        self.next += 1
        return self.next


def _strip_null(avro_type: Any, where: str) -> tuple[Any, bool]:
    """(the non-null type, required?) of a field type; only `[null, X]` unions are supported."""
    if isinstance(avro_type, list):
        branches = [b for b in avro_type if b != "null"]
        if len(branches) != 1 or len(avro_type) > 2:
            raise UnsupportedSchema(f'{where}: union {avro_type!r} (only ["null", X] unions are supported)')
        return branches[0], len(avro_type) == 1
    return avro_type, True


def _iceberg_type(avro_type: Any, where: str, ids: _Ids) -> IcebergType:
    if isinstance(avro_type, str):
        avro_type = {"type": avro_type}
    if not isinstance(avro_type, dict):
        raise UnsupportedSchema(f"{where}: nested union {avro_type!r}")
    kind = avro_type["type"]
    logical = avro_type.get("logicalType")
    if isinstance(kind, (dict, list)):  # {"type": {"type": "map", ...}}: unwrap
        return _iceberg_type(kind, where, ids)
    if logical == "decimal" and kind in ("bytes", "fixed"):
        precision, scale = int(avro_type["precision"]), int(avro_type.get("scale", 0))
        if precision > 38:
            raise UnsupportedSchema(f"{where}: decimal precision {precision} > 38")
        return DecimalType(precision, scale)
    if kind == "long" and logical in ("timestamp-millis", "timestamp-micros"):
        return TimestamptzType()
    if kind == "long" and logical in ("local-timestamp-millis", "local-timestamp-micros"):
        return TimestampType()
    if kind == "int" and logical == "date":
        return DateType()
    if (kind == "int" and logical == "time-millis") or (kind == "long" and logical == "time-micros"):
        return TimeType()
    simple: dict[str, PrimitiveType] = {
        "boolean": BooleanType(),
        "int": IntegerType(),
        "long": LongType(),
        "float": FloatType(),
        "double": DoubleType(),
        "string": StringType(),
        "bytes": BinaryType(),
        "enum": StringType(),
    }
    if kind in simple:
        return simple[kind]
    if kind == "fixed":
        return FixedType(int(avro_type["size"]))
    if kind == "array":
        item, required = _strip_null(avro_type["items"], f"{where}[]")
        element_id = ids()
        return ListType(element_id, _iceberg_type(item, f"{where}[]", ids), element_required=required)
    if kind == "map":
        value, required = _strip_null(avro_type["values"], f"{where}{{}}")
        key_id, value_id = ids(), ids()
        return MapType(key_id, StringType(), value_id, _iceberg_type(value, f"{where}{{}}", ids), required)
    if kind == "record":
        return StructType(*_fields(avro_type["fields"], where + ".", ids))
    raise UnsupportedSchema(f"{where}: Avro type {kind!r} is not supported")


def _fields(avro_fields: Iterable[Mapping[str, Any]], prefix: str, ids: _Ids) -> list[NestedField]:
    out = []
    for avro_field in avro_fields:
        name = avro_field["name"]
        base, required = _strip_null(avro_field["type"], prefix + name)
        field_id = ids()
        out.append(
            NestedField(
                field_id,
                name,
                _iceberg_type(base, prefix + name, ids),
                required=required,
                doc=avro_field.get("doc"),
            )
        )
    return out


def iceberg_schema(avro_definition: Mapping[str, Any]) -> IcebergSchema:
    """The table schema for records of an Avro contract: its fields, then the `_kafka_*` columns."""
    ids = _Ids()
    fields = _fields(avro_definition["fields"], "", ids)
    clash = [f.name for f in fields if f.name in KAFKA_COLUMN_NAMES]
    if clash:
        raise UnsupportedSchema(f"field(s) {clash} clash with the archiver's own columns")
    return IcebergSchema(*fields, *_kafka_fields(ids))


def _kafka_fields(ids: _Ids) -> list[NestedField]:
    return [NestedField(ids(), name, kind, required=req, doc=doc) for name, kind, req, doc in KAFKA_COLUMNS]


# --- dead letters ------------------------------------------------------------------------------------------------
DEAD_LETTER_HEADERS_TYPE = "list<struct<key: string, value: binary>>"


def dead_letter_schema() -> IcebergSchema:
    """Dead letters: the untouched payload, the reason from the `lp-dlq-*` headers, the other headers in order."""
    ids = _Ids()
    header_element = ids()
    header_key, header_value = ids(), ids()
    fields = [
        NestedField(
            ids(), "error_code", StringType(), required=True, doc="lp-dlq-error-code (MISSING_DLQ_HEADERS if absent)."
        ),
        NestedField(ids(), "stage", StringType(), required=False, doc="lp-dlq-stage: decode, validate, enrich, retry."),
        NestedField(ids(), "rule", StringType(), required=False, doc="lp-dlq-rule: the failing rule, if any."),
        NestedField(ids(), "field", StringType(), required=False, doc="lp-dlq-field"),
        NestedField(ids(), "message", StringType(), required=False, doc="lp-dlq-message"),
        NestedField(ids(), "original_topic", StringType(), required=False, doc="lp-dlq-original-topic"),
        NestedField(ids(), "original_partition", IntegerType(), required=False, doc="lp-dlq-original-partition"),
        NestedField(ids(), "original_offset", LongType(), required=False, doc="lp-dlq-original-offset"),
        NestedField(
            ids(),
            "dead_lettered_at",
            TimestamptzType(),
            required=True,
            doc="lp-dlq-time; the Kafka timestamp when the header is missing or unreadable.",
        ),
        NestedField(ids(), "trace_id", StringType(), required=False, doc="lp-dlq-trace-id"),
        NestedField(ids(), "attempt", IntegerType(), required=False, doc="lp-dlq-attempt"),
        NestedField(ids(), "payload", BinaryType(), required=False, doc="The original value, byte for byte."),
        NestedField(
            ids(),
            "headers",
            ListType(
                header_element,
                StructType(
                    NestedField(header_key, "key", StringType(), required=True),
                    NestedField(header_value, "value", BinaryType(), required=False),
                ),
                element_required=True,
            ),
            required=True,
            doc="The record's other headers (traceparent, ...), in order: a replay sends them again.",
        ),
    ]
    return IcebergSchema(*fields, *_kafka_fields(ids))


# --- the tables ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TableSpec:
    """One archive table: where its rows come from and how it is partitioned."""

    name: str
    topics: tuple[str, ...]
    subject: str | None  # Avro contract of the values; None: dead letters (raw bytes + headers)
    event_time: str  # day(event_time) partitions the table
    event_type: str  # identity partition
    description: str = ""

    def schema(self, repository: SchemaRepository) -> IcebergSchema:
        if self.subject is None:
            return dead_letter_schema()
        return iceberg_schema(repository[self.subject].definition)

    def partition_spec(self, schema: IcebergSchema) -> PartitionSpec:
        time_field = schema.find_field(self.event_time)
        type_field = schema.find_field(self.event_type)
        return PartitionSpec(
            PartitionField(time_field.field_id, PARTITION_FIELD_ID_START, DayTransform(), f"{self.event_time}_day"),
            PartitionField(type_field.field_id, PARTITION_FIELD_ID_START + 1, IdentityTransform(), self.event_type),
        )


USER_EVENTS = "user_events"
TRANSACTIONS = "transactions"
DEAD_LETTERS = "dead_letters"
DEFAULT_DEAD_LETTER_TOPICS = (  # every dead-letter topic declared in deploy/k8s/topics
    *(dead_letter_topic(t) for t in (EVENTS_RAW, EVENTS_RAW_RETRY, *CDC_TOPICS)),
    *(
        dead_letter_topic(t, sink)  # a sink's own dead letters: <topic>.<sink name>.dlq
        for sink in ("clickhouse", "archiver")
        for t in (EVENTS_PROCESSED, TRANSACTIONS_PROCESSED)
    ),
)


def default_tables(
    events_topics: Iterable[str] = (EVENTS_PROCESSED,),
    transactions_topics: Iterable[str] = (TRANSACTIONS_PROCESSED,),
    dead_letter_topics: Iterable[str] = DEFAULT_DEAD_LETTER_TOPICS,
) -> list[TableSpec]:
    return [
        TableSpec(
            USER_EVENTS,
            tuple(events_topics),
            "processed_event",
            "event_time",
            "event_type",
            "Validated, enriched user-behaviour events.",
        ),
        TableSpec(
            TRANSACTIONS,
            tuple(transactions_topics),
            "processed_transaction",
            "changed_at",
            "op",
            "Every validated change of an OLTP transaction (op r/c/u/d), a change log.",
        ),
        TableSpec(
            DEAD_LETTERS,
            tuple(dead_letter_topics),
            None,
            "dead_lettered_at",
            "error_code",
            "Dead letters of every stage: original bytes and the reason.",
        ),
    ]


def arrow_schema(schema: IcebergSchema) -> pa.Schema:
    """The Arrow schema pyiceberg accepts for an append to a table with this schema (field ids included)."""
    return schema_to_pyarrow(schema)


# --- evolution -------------------------------------------------------------------------------------------------
class BreakingSchemaChange(ValueError):
    """The contract changed in a way the table cannot follow without rewriting data."""

    def __init__(self, table: str, problems: list[str]) -> None:
        self.table, self.problems = table, problems
        super().__init__(
            f"table {table}: the Avro contract changed in a way the archive cannot follow without rewriting "
            f"data: {'; '.join(problems)}. Make the change backward compatible (add fields as optional with a "
            "default, keep old fields) or archive to a new table."
        )


@dataclass
class Evolution:
    """What `apply_evolution` changes; empty when table and contract agree."""

    add: list[NestedField] = field(default_factory=list)
    widen: list[tuple[str, PrimitiveType]] = field(default_factory=list)
    make_optional: list[str] = field(default_factory=list)
    retired: list[str] = field(default_factory=list)  # dropped from the contract; the column stays
    problems: list[str] = field(default_factory=list)

    @property
    def changes(self) -> bool:
        return bool(self.add or self.widen or self.make_optional)

    def describe(self) -> list[str]:
        lines = [f"add optional column {f.name} {f.field_type}" for f in self.add]
        lines += [f"widen {name} to {kind}" for name, kind in self.widen]
        lines += [f"make {name} optional" for name in self.make_optional]
        lines += [f"keep {name} (no longer in the contract; null from now on)" for name in self.retired]
        return lines


def _promotable(old: IcebergType, new: IcebergType) -> bool:
    if isinstance(old, IntegerType) and isinstance(new, LongType):
        return True
    if isinstance(old, FloatType) and isinstance(new, DoubleType):
        return True
    return (
        isinstance(old, DecimalType)
        and isinstance(new, DecimalType)
        and old.scale == new.scale
        and new.precision >= old.precision
    )


def same_type(a: IcebergType, b: IcebergType) -> bool:
    """Equal types, ignoring field ids and docs (nested types are compared member by member)."""
    if isinstance(a, ListType) and isinstance(b, ListType):
        return a.element_required == b.element_required and same_type(a.element_type, b.element_type)
    if isinstance(a, MapType) and isinstance(b, MapType):
        return (
            a.value_required == b.value_required
            and same_type(a.key_type, b.key_type)
            and same_type(a.value_type, b.value_type)
        )
    if isinstance(a, StructType) and isinstance(b, StructType):
        if [f.name for f in a.fields] != [f.name for f in b.fields]:
            return False
        return all(
            x.required == y.required and same_type(x.field_type, y.field_type)
            for x, y in zip(a.fields, b.fields, strict=True)
        )
    return a == b


def fields_with_default(avro_definition: Mapping[str, Any] | None) -> frozenset[str]:
    """Top-level fields of a contract that declare a default (old records without them resolve to it)."""
    if avro_definition is None:
        return frozenset()
    return frozenset(f["name"] for f in avro_definition["fields"] if "default" in f)


def plan_evolution(
    table: IcebergSchema, contract: IcebergSchema, with_default: frozenset[str] = frozenset()
) -> Evolution:
    """How to bring a table's schema to the contract's (top-level columns; nested types must be unchanged).

    `with_default`: contract fields that have an Avro default; a new such field is accepted even when it is not
    nullable (the column is optional all the same: the rows already archived read as null).
    """
    plan = Evolution()
    current = {f.name: f for f in table.fields}
    wanted = {f.name: f for f in contract.fields}
    for name, new in wanted.items():
        old = current.get(name)
        if old is None:
            if new.required and name not in with_default:
                plan.problems.append(
                    f"field {name!r} is new, not nullable and has no default: rows already archived cannot have "
                    'it; declare it ["null", ...] with default null'
                )
            else:
                plan.add.append(NestedField(new.field_id, name, new.field_type, required=False, doc=new.doc))
            continue
        if not same_type(old.field_type, new.field_type):
            if _promotable(old.field_type, new.field_type):
                plan.widen.append((name, new.field_type))  # type: ignore[arg-type]
            else:
                plan.problems.append(
                    f"field {name!r} changes type from {old.field_type} to {new.field_type}, which Iceberg cannot "
                    "promote (allowed: int->long, float->double, wider decimal)"
                )
        if old.required and not new.required:
            plan.make_optional.append(name)
    for name, old in current.items():
        if name in wanted:
            continue
        if old.required:
            plan.problems.append(f"field {name!r} was removed from the contract but is a required column of the table")
        else:
            plan.retired.append(name)
    return plan
