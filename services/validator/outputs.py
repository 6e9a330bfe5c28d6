"""Pure builders of the validator's output records (dicts matching schemas/avro/*.avsc, ready to serialize).

- `processed_event`: events.processed, from an enriched event (`enrich.enrich_event`);
- `processed_transaction`: transactions.processed, from a `cdc.ChangeEvent` of the transactions table;
- `status_change`: transactions.status_history, from the same change when the status moved.

Money in processed_transaction is `decimal(12,2)` (exact, like PostgreSQL's numeric): sums in the marts
must not drift, and ClickHouse, Iceberg and Snowflake all have a native decimal for it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from services.contracts.envelope import OP_DELETE, OP_READ, OP_UPDATE
from services.validator.cdc import ChangeEvent
from services.validator.enrich import hash_email, is_email_key
from services.validator.rejections import OUTPUT_CONTRACT

CENT = Decimal("0.01")

PROCESSED_EVENT_FIELDS = (
    "event_id", "event_type", "event_time", "user_id", "session_id", "product_id", "transaction_id",
    "quantity", "price", "amount", "search_query", "page_url", "referrer", "device_type", "ip_address",
    "country", "source", "properties",
    "user_tier", "user_country", "user_city", "user_registration_date", "user_email_hash",
    "product_name", "product_category", "product_subcategory", "product_brand", "product_price",
    "event_date", "event_hour", "day_of_week", "is_weekend",
)  # fmt: skip
PROCESSED_EVENT_REQUIRED = ("event_id", "event_type", "event_time", "user_id", "event_date", "event_hour")
TRANSACTION_COLUMNS = (
    "transaction_id", "user_id", "product_id", "quantity", "unit_price", "discount", "tax", "total",
    "payment_method", "shipping_address", "status", "created_at", "updated_at",
)  # fmt: skip
MONEY_COLUMNS = ("unit_price", "discount", "tax", "total")
_PROCESSED_EVENT_KEYS = frozenset(PROCESSED_EVENT_FIELDS)


class OutputContractError(ValueError):
    """The record cannot satisfy the output contract (dead-letter at stage enrich)."""

    code = OUTPUT_CONTRACT

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def processed_event(
    enriched: Mapping[str, Any], *, quality_flags: Iterable[str], validated_at: datetime, rules_version: str
) -> dict[str, Any]:
    """The events.processed record; raises `OutputContractError` if a non-null field is missing (which the
    default MANDATORY rule prevents; a rule file without it must not yield records the sinks cannot key)."""
    if enriched.keys() == _PROCESSED_EVENT_KEYS:  # what enrich_event returns for a raw_event: copy in C
        out = dict(enriched)
    else:
        out = {name: enriched.get(name) for name in PROCESSED_EVENT_FIELDS}
    for name in PROCESSED_EVENT_REQUIRED:
        if out[name] is None:
            raise OutputContractError(name, "is null but required by processed_event")
    if out["source"] is None:
        out["source"] = "generator"  # the raw contract's default
    properties = out["properties"]
    if properties is None:
        out["properties"] = {}
    elif any(is_email_key(k) for k in properties):  # enrich_event hashes them already; this is the last guard
        out["properties"] = {k: hash_email(v) if is_email_key(k) else v for k, v in properties.items()}
    out["quality_flags"] = list(quality_flags)
    out["validated_at"] = validated_at
    out["rules_version"] = rules_version
    return out


def _money(value: Any, column: str) -> Decimal | None:
    if value is None:
        return None
    try:
        return Decimal(value).quantize(CENT, rounding=ROUND_HALF_UP)
    except (ArithmeticError, TypeError, ValueError):
        raise OutputContractError(column, f"{value!r} is not a decimal") from None


def processed_transaction(
    change: ChangeEvent, *, quality_flags: Iterable[str], validated_at: datetime, rules_version: str
) -> dict[str, Any]:
    """The transactions.processed record for one CDC change of the transactions table."""
    row = change.row
    out = {name: row.get(name) for name in TRANSACTION_COLUMNS}
    if out["transaction_id"] is None:
        raise OutputContractError("transaction_id", "is null")
    for column in MONEY_COLUMNS:
        out[column] = _money(out[column], column)
    changed_at = change.changed_at
    if changed_at is None:
        raise OutputContractError("changed_at", "the envelope has neither source.ts_ms nor ts_ms")
    out.update(
        op=change.op,
        source_lsn=change.lsn,
        changed_at=changed_at,
        quality_flags=list(quality_flags),
        validated_at=validated_at,
        rules_version=rules_version,
    )
    return out


def status_change(change: ChangeEvent) -> dict[str, Any] | None:
    """The transactions.status_history record, or None when the change moved no status (or is a delete)."""
    if change.op == OP_DELETE or change.after is None:
        return None
    new_status = change.after.get("status")
    if new_status is None:
        return None
    if change.op == OP_UPDATE:
        old_status = change.before.get("status") if change.before is not None else None
        if old_status == new_status:
            return None
    else:  # c: a new row; r: a snapshot does not know the history before it
        old_status = None
    changed_at = change.after.get("updated_at") or change.changed_at
    transaction_id = change.after.get("transaction_id")
    if changed_at is None or transaction_id is None:
        return None
    return {
        "transaction_id": transaction_id,
        "old_status": old_status,
        "new_status": new_status,
        "changed_at": changed_at,
        "source": "cdc-snapshot" if change.op == OP_READ else "cdc",
        "source_lsn": change.lsn,
    }
