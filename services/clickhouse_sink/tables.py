"""What each input topic becomes in ClickHouse: the table, the insert expressions and the pre-insert checks.

The decoded batch (an Arrow table whose columns are the Avro fields, as ClickHouse reads them) is inserted with
`INSERT INTO <table> (<columns>) SELECT <expressions> FROM <source>`, where the source is `Python(<arrow>)` in
chDB and `input('<structure>')` on a server: the conversions (text to UUID, IPv4, ...) run inside ClickHouse
on both. The checks run in the decode query; a row failing one is dead-lettered with the field and the value
instead of failing the whole insert.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Range of DateTime64 and Date32: a value outside is stored wrapped, so it is refused instead.
_TIME_RANGE = "toDateTime64('1900-01-01 00:00:00', 3, 'UTC') AND toDateTime64('2299-12-31 23:59:59', 3, 'UTC')"


@dataclass(frozen=True)
class Check:
    """A condition a stored row needs; `sql` is true for a GOOD row (NULLs must be handled explicitly)."""

    field: str
    sql: str
    expects: str  # what the column takes, for the dead letter's message


@dataclass(frozen=True)
class TableSpec:
    table: str
    subject: str  # Avro subject of the topic's values
    time_field: str  # event time of a row: event-to-visible latency, and the partition month
    expressions: Mapping[str, str] = field(default_factory=dict)  # column -> expression over the Avro fields
    checks: Sequence[Check] = ()
    monthly: bool = False  # the table is PARTITION BY toYYYYMM(time_field): one insert per month
    extra_columns: Mapping[str, str] = field(default_factory=dict)  # columns not in the Avro record

    def insert_sql(self, database: str, fields: Sequence[str], source: str, topic_id: str | None, insert: str) -> str:
        """`fields`: the Avro fields present (the reader schema's, in order); the source also has the columns
        `_kafka_partition`, `_kafka_offset` and `_kafka_batch_last` (see `sink`)."""
        kafka = ["kafka_topic_id", "kafka_insert", "kafka_partition", "kafka_offset", "kafka_batch_last"]
        columns = list(fields) + list(self.extra_columns) + kafka
        exprs = [self.expressions.get(name, f"`{name}`") for name in fields]
        exprs += list(self.extra_columns.values())
        exprs += [
            sql_string(topic_id or ""),
            sql_string(insert),
            "_kafka_partition",
            "_kafka_offset",
            "_kafka_batch_last",
        ]
        names = ", ".join(f"`{c}`" for c in columns)
        return f"INSERT INTO {database}.{self.table} ({names}) SELECT {', '.join(exprs)} FROM {source}"

    def reject_sql(self) -> str:
        """An expression naming the first failing check's field, or '' for a good row."""
        if not self.checks:
            return "''"
        branches = ", ".join(f"NOT ({c.sql}), '{c.field}'" for c in self.checks)
        return f"multiIf({branches}, '')"

    def check(self, field_name: str) -> Check:
        return next(c for c in self.checks if c.field == field_name)


def sql_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _uuid(name: str, nullable: bool) -> Check:
    good = f"isNotNull(toUUIDOrNull(`{name}`))"
    return Check(name, f"`{name}` IS NULL OR {good}" if nullable else good, "a UUID")


EVENTS = TableSpec(
    table="user_events_realtime",
    subject="processed_event",
    time_field="event_time",
    expressions={
        "event_id": "toUUID(event_id)",
        "user_id": "toUUID(user_id)",
        "session_id": "CAST(session_id, 'Nullable(UUID)')",
        "transaction_id": "CAST(transaction_id, 'Nullable(UUID)')",
        # The validator only flags an address that is not a dotted quad (warn rule): kept, stored as NULL.
        "ip_address": "toIPv4OrNull(ip_address)",
    },
    checks=(
        _uuid("event_id", False),
        _uuid("user_id", False),
        _uuid("session_id", True),
        _uuid("transaction_id", True),
        Check("event_time", f"event_time BETWEEN {_TIME_RANGE}", "a time between 1900 and 2299"),
        Check("event_hour", "event_hour BETWEEN 0 AND 23", "an hour 0-23"),
        Check("day_of_week", "day_of_week BETWEEN 1 AND 7", "an ISO day of week 1-7"),
    ),
    monthly=True,
)

TRANSACTIONS = TableSpec(
    table="transactions_realtime",
    subject="processed_transaction",
    time_field="changed_at",
    expressions={
        "transaction_id": "toUUID(transaction_id)",
        "user_id": "CAST(user_id, 'Nullable(UUID)')",
        "product_id": "CAST(product_id, 'Nullable(UUID)')",
    },
    checks=(
        _uuid("transaction_id", False),
        _uuid("user_id", True),
        _uuid("product_id", True),
        Check("source_lsn", "source_lsn IS NULL OR source_lsn >= 0", "a non-negative LSN"),
        Check("changed_at", f"changed_at BETWEEN {_TIME_RANGE}", "a time between 1900 and 2299"),
    ),
    # ReplacingMergeTree(version, is_deleted): the change with the highest LSN is the row's state.
    extra_columns={"version": "toUInt64(ifNull(source_lsn, 0))", "is_deleted": "toUInt8(op = 'd')"},
)

SPECS = {spec.subject: spec for spec in (EVENTS, TRANSACTIONS)}


# --- Avro types as ClickHouse reads them (the `file(..., 'Avro', structure)` and `input(structure)` types) ------
def clickhouse_type(avro: Any) -> str:
    """The ClickHouse type ClickHouse's Avro reader produces for an Avro type (the subset the contracts use)."""
    if isinstance(avro, list):
        branches = [b for b in avro if b != "null"]
        if len(branches) != 1 or len(avro) > 2:
            raise ValueError(f"unsupported union {avro}")
        inner = clickhouse_type(branches[0])
        return f"Nullable({inner})" if "null" in avro else inner
    if isinstance(avro, dict):
        logical = avro.get("logicalType")
        kind = avro["type"]
        if logical == "timestamp-millis":
            return "DateTime64(3, 'UTC')"
        if logical == "timestamp-micros":
            return "DateTime64(6, 'UTC')"
        if logical == "date":
            return "Date32"
        if logical == "decimal":
            return f"Decimal({avro['precision']}, {avro.get('scale', 0)})"
        if kind == "map":
            return f"Map(String, {clickhouse_type(avro['values'])})"
        if kind == "array":
            return f"Array({clickhouse_type(avro['items'])})"
        if kind == "fixed":
            return f"FixedString({avro['size']})"
        return clickhouse_type(kind)
    simple = {
        "string": "String",
        "bytes": "String",
        "int": "Int32",
        "long": "Int64",
        "float": "Float32",
        "double": "Float64",
        "boolean": "Bool",
    }
    if avro in simple:
        return simple[avro]
    raise ValueError(f"unsupported Avro type {avro!r}")


def structure(definition: Mapping[str, Any]) -> str:
    """`name Type, ...` of a record schema's fields."""
    return ", ".join(f"`{f['name']}` {clickhouse_type(f['type'])}" for f in definition["fields"])
