"""Debezium change envelopes of `cdc.postgres.<table>`, parsed into typed rows. All CDC parsing lives here.

The envelope's shape (before, after, op, source.lsn, ...) is the contract in `services.contracts.envelope`; a
`{"schema":..., "payload":...}` wrapper is unwrapped too, and a Kafka tombstone (null value) follows each delete.
Column values arrive as Debezium encodes them: numerics as strings (`decimal.handling.mode=string`), timestamps
as epoch micro- or milliseconds (or ISO-8601 text for `timestamptz` as ZonedTimestamp, which is what the
platform's connector writes), dates as days since the epoch (or ISO text). `TableSpec` turns them into `Decimal`,
aware `datetime` and `date`, from the column types of schemas/postgres/oltp.sql. The envelope contract is
schemas/avro/cdc_<table>.avsc (valueEncoding: json).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from services.contracts.envelope import (
    AFTER,
    BEFORE,
    OP,
    OP_DELETE,
    OP_READ,
    OPS,
    SOURCE,
    SOURCE_LSN,
    SOURCE_SNAPSHOT,
    SOURCE_TS_MS,
    TS_MS,
    unwrap,
)
from services.contracts.topics import CDC_TOPIC_PREFIX
from services.validator.ids import canonical_uuid, uuid_problem

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
EPOCH_DATE = date(1970, 1, 1)
# Epoch integers above this are microseconds: as milliseconds it would be the year 5138, as microseconds 1973.
MICROS_THRESHOLD = 100_000_000_000_000


class CdcFormatError(ValueError):
    """The record is not a readable Debezium envelope (the caller dead-letters it at stage decode).

    `code` is `CDC_BAD_ENVELOPE`, or what is wrong with one column's value (`NOT_A_UUID`, ...); `field` names it."""

    code = "CDC_BAD_ENVELOPE"

    def __init__(self, message: str, *, code: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.field = field


class InvalidId(ValueError):
    """A uuid column's value is not a UUID; `code` says how (`services.validator.ids`)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# --- column converters -----------------------------------------------------------------------------------------
def to_decimal(value: Any) -> Decimal:
    if isinstance(value, Decimal):
        return value
    if isinstance(value, bool):
        raise ValueError("a boolean is not a decimal")
    if isinstance(value, int | float | str):
        try:
            result = Decimal(str(value).strip())
        except InvalidOperation:
            raise ValueError(f"not a decimal: {value!r}") from None
        if not result.is_finite():
            raise ValueError(f"not a finite decimal: {value!r}")
        return result
    raise ValueError(f"not a decimal: {value!r}")


def to_timestamp(value: Any) -> datetime:
    """Epoch micro/milliseconds (told apart by magnitude) or ISO-8601 text; naive means UTC."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, bool):
        raise ValueError("a boolean is not a timestamp")
    if isinstance(value, int | float):
        micros = int(value) if abs(value) >= MICROS_THRESHOLD else int(value * 1000)
        return EPOCH + timedelta(microseconds=micros)
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("-").isdigit():
            return to_timestamp(int(text))
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"not a timestamp: {value!r}") from None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    raise ValueError(f"not a timestamp: {value!r}")


def to_date(value: Any) -> date:
    """Days since the epoch (io.debezium.time.Date) or ISO text."""
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return EPOCH_DATE + timedelta(days=value)
    if isinstance(value, str):
        try:
            return date.fromisoformat(value.strip()[:10])
        except ValueError:
            raise ValueError(f"not a date: {value!r}") from None
    raise ValueError(f"not a date: {value!r}")


def to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("a boolean is not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise ValueError(f"not an integer: {value!r}")


def to_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise ValueError(f"not text: {value!r}")


def to_uuid(value: Any) -> str:
    """A PostgreSQL `uuid` column: the canonical (lower-case) text, or `InvalidId` saying what is wrong."""
    problem = uuid_problem(value)
    if problem is not None:
        code, reason = problem
        raise InvalidId(code, f"{value!r} {reason}"[:300])
    return canonical_uuid(value)


Converter = Callable[[Any], Any]


@dataclass(frozen=True)
class TableSpec:
    """How one OLTP table's rows are typed; `keep` limits what a reference store holds (memory)."""

    name: str
    primary_key: str
    columns: Mapping[str, Converter]
    keep: tuple[str, ...] | None = None  # None: every column
    pii_email: tuple[str, ...] = field(default=())  # e-mail columns: hashed before they are stored or emitted

    def typed_row(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """Columns converted to Python types; unknown columns pass through; raises CdcFormatError."""
        typed = {}
        for column, value in row.items():
            convert = self.columns.get(column)
            if value is None or convert is None:
                typed[column] = value
                continue
            try:
                typed[column] = convert(value)
            except ValueError as error:
                raise CdcFormatError(
                    f"{self.name}.{column}: {error}", code=getattr(error, "code", None), field=column
                ) from None
        return typed

    def typed_key(self, key: str | None) -> str | None:
        """A record key's primary-key value typed like its column (a Kafka key is as untrusted as the row)."""
        if key is None:
            return None
        return self.typed_row({self.primary_key: key})[self.primary_key]


USERS = TableSpec(
    "users",
    "user_id",
    {
        "user_id": to_uuid,
        "email": to_text,
        "first_name": to_text,
        "last_name": to_text,
        "tier": to_text,
        "country": to_text,
        "city": to_text,
        "registration_date": to_date,
        "created_at": to_timestamp,
        "updated_at": to_timestamp,
    },
    keep=("user_id", "email", "tier", "country", "city", "registration_date", "updated_at"),
    pii_email=("email",),
)
PRODUCTS = TableSpec(
    "products",
    "product_id",
    {
        "product_id": to_uuid,
        "name": to_text,
        "category": to_text,
        "subcategory": to_text,
        "brand": to_text,
        "price": to_decimal,
        "cost": to_decimal,
        "created_at": to_timestamp,
        "updated_at": to_timestamp,
    },
    keep=("product_id", "name", "category", "subcategory", "brand", "price", "updated_at"),
)
TRANSACTIONS = TableSpec(
    "transactions",
    "transaction_id",
    {
        "transaction_id": to_text,
        "user_id": to_text,
        "product_id": to_text,
        "quantity": to_int,
        "unit_price": to_decimal,
        "discount": to_decimal,
        "tax": to_decimal,
        "total": to_decimal,
        "payment_method": to_text,
        "shipping_address": to_text,
        "status": to_text,
        "created_at": to_timestamp,
        "updated_at": to_timestamp,
    },
)
TABLES: dict[str, TableSpec] = {spec.name: spec for spec in (USERS, PRODUCTS, TRANSACTIONS)}


def table_of_topic(topic: str, prefix: str = CDC_TOPIC_PREFIX) -> str:
    """`cdc.postgres.users` -> `users` (Debezium may also put the schema in between: `cdc.postgres.public.users`)."""
    if not topic.startswith(prefix):
        raise ValueError(f"{topic!r} is not a CDC topic (expected the prefix {prefix!r})")
    return topic[len(prefix) :].rsplit(".", 1)[-1]


# --- envelopes -------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ChangeEvent:
    table: str
    op: str  # r (snapshot read), c, u, d
    before: dict[str, Any] | None  # typed rows
    after: dict[str, Any] | None
    lsn: int | None  # source.lsn: orders changes of one key; replays carry the same LSN
    source_ts_ms: int | None  # commit time at the source
    ts_ms: int | None  # when Debezium processed it
    snapshot: bool

    @property
    def row(self) -> dict[str, Any]:
        """The row as it is now (`after`), or as it was before a delete."""
        row = self.after if self.after is not None else self.before
        return row if row is not None else {}

    @property
    def changed_at(self) -> datetime | None:
        millis = self.source_ts_ms if self.source_ts_ms is not None else self.ts_ms
        return None if millis is None else EPOCH + timedelta(milliseconds=millis)


def _json(value: bytes | str | Mapping[str, Any]) -> Any:
    if isinstance(value, Mapping):
        return value
    try:
        return json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CdcFormatError(f"not JSON: {error}") from None


def _optional_int(value: Any, name: str) -> int | None:
    if value is None:
        return None
    try:
        return to_int(value)
    except ValueError:
        raise CdcFormatError(f"{name}: not an integer: {value!r}") from None


def parse_envelope(
    value: bytes | str | Mapping[str, Any] | None, table: str, spec: TableSpec | None = None
) -> ChangeEvent | None:
    """The change, typed by `spec` (default: the table's known spec); None for a tombstone."""
    if value is None or value in (b"", ""):
        return None
    document = unwrap(_json(value))
    if document is None:
        return None
    if not isinstance(document, Mapping):
        raise CdcFormatError(f"envelope is a JSON {type(document).__name__}, not an object")
    op = document.get(OP)
    if op not in OPS:
        raise CdcFormatError(f"op {op!r} is not one of r, c, u, d")
    spec = spec or TABLES.get(table)
    before, after = document.get(BEFORE), document.get(AFTER)
    for name, row in ((BEFORE, before), (AFTER, after)):
        if row is not None and not isinstance(row, Mapping):
            raise CdcFormatError(f"{name} is not an object")
    if op == OP_DELETE and before is None:
        raise CdcFormatError("delete without `before`")
    if op != OP_DELETE and after is None:
        raise CdcFormatError(f"op {op!r} without `after`")
    source = document.get(SOURCE) or {}
    if not isinstance(source, Mapping):
        raise CdcFormatError("source is not an object")
    snapshot = source.get(SOURCE_SNAPSHOT)
    return ChangeEvent(
        table=table,
        op=op,
        before=None if before is None else (spec.typed_row(before) if spec else dict(before)),
        after=None if after is None else (spec.typed_row(after) if spec else dict(after)),
        lsn=_optional_int(source.get(SOURCE_LSN), "source.lsn"),
        source_ts_ms=_optional_int(source.get(SOURCE_TS_MS), "source.ts_ms"),
        ts_ms=_optional_int(document.get(TS_MS), "ts_ms"),
        # Debezium writes "true", "last", "first", "incremental", "false" or a boolean
        snapshot=snapshot not in (None, False, "false"),
    )


def parse_key(key: bytes | str | Mapping[str, Any] | None, primary_key: str) -> str | None:
    """The primary-key value from a Debezium key (`{"user_id": ...}`, possibly schema-wrapped) or a plain key."""
    if key is None:
        return None
    if isinstance(key, Mapping):
        document: Any = unwrap(key)
    else:
        text = key.decode("utf-8", "replace") if isinstance(key, bytes) else key
        try:
            document = unwrap(json.loads(text))
        except json.JSONDecodeError:
            return text or None
    if isinstance(document, Mapping):
        value = document.get(primary_key)
        return None if value is None else str(value)
    return None if document is None else str(document)


# --- building envelopes (tests, bootstrap from a database dump) ------------------------------------------------
def _encode_column(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):  # timestamptz as Debezium's ZonedTimestamp: ISO-8601 UTC, microseconds
        aware = value if value.tzinfo else value.replace(tzinfo=UTC)
        return aware.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if isinstance(value, date):  # io.debezium.time.Date
        return (value - EPOCH_DATE).days
    return value


def _encode_row(row: Mapping[str, Any] | None) -> dict[str, Any] | None:
    return None if row is None else {k: _encode_column(v) for k, v in row.items()}


def make_envelope(
    op: str,
    table: str,
    *,
    before: Mapping[str, Any] | None = None,
    after: Mapping[str, Any] | None = None,
    lsn: int | None = None,
    ts_ms: int = 0,
) -> dict[str, Any]:
    """An envelope as the platform's connector writes it (schemas/avro/cdc_<table>.avsc), from typed rows."""
    source = {
        "version": "3.x",
        "connector": "postgresql",
        "name": "cdc",
        "ts_ms": ts_ms,
        "snapshot": "true" if op == OP_READ else "false",
        "db": "lambda",
        "schema": "public",
        "table": table,
        SOURCE_LSN: lsn,
    }
    return {BEFORE: _encode_row(before), AFTER: _encode_row(after), SOURCE: source, OP: op, TS_MS: ts_ms}
