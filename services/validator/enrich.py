"""Enrichment of accepted events: user and product attributes, event-time fields, e-mail hashing.

Enrichment never fails: a reference that is missing (a LOOKUP rule removed, or set to warn) leaves its
fields null. Derived time fields are computed in UTC.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from services.validator.references import ReferenceStore

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
USER_FIELDS = {  # output field -> users column
    "user_tier": "tier",
    "user_country": "country",
    "user_city": "city",
    "user_registration_date": "registration_date",
    "user_email_hash": "email",  # hashed when stored (ReferenceStore), never raw
}
PRODUCT_FIELDS = {
    "product_name": "name",
    "product_category": "category",
    "product_subcategory": "subcategory",
    "product_brand": "brand",
    "product_price": "price",
}
# The raw_event fields: a record with no other top-level key needs no e-mail scan (one C-level set test).
RAW_EVENT_FIELDS = frozenset(
    {
        "event_id", "event_type", "event_time", "user_id", "session_id", "product_id", "transaction_id",
        "quantity", "price", "amount", "search_query", "page_url", "referrer", "device_type", "ip_address",
        "country", "source", "properties",
    }
)  # fmt: skip
_NO_USER = dict.fromkeys(USER_FIELDS)
_NO_PRODUCT = dict.fromkeys(PRODUCT_FIELDS)


def user_view(row: Mapping[str, Any]) -> dict[str, Any]:
    """The user_* enrichment fields of a users row (computed once per CDC change, not per event)."""
    return {out: row.get(column) for out, column in USER_FIELDS.items()}


def product_view(row: Mapping[str, Any]) -> dict[str, Any]:
    view = {out: row.get(column) for out, column in PRODUCT_FIELDS.items()}
    if view["product_price"] is not None:
        view["product_price"] = float(view["product_price"])  # Decimal in the row, double in the output
    return view


VIEWS = {"users": user_view, "products": product_view}


def hash_email(value: str) -> str:
    """sha256 hex of the trimmed, lower-cased address; a value that already is such a hash is kept as is."""
    if _SHA256_HEX.match(value):
        return value
    return hashlib.sha256(value.strip().lower().encode("utf-8")).hexdigest()


_email_key_cache: dict[str, bool] = {}


def is_email_key(name: str) -> bool:
    """Whether a field or map key names an e-mail address (`email`, `e-mail`, `contact_email`, ...)."""
    known = _email_key_cache.get(name)
    if known is None:
        lowered = name.lower()
        known = lowered in ("email", "e_mail", "e-mail", "email_address") or lowered.endswith(("_email", "-email"))
        if len(_email_key_cache) < 10_000:  # keys come from schemas, so this stays small; the bound is a guard
            _email_key_cache[name] = known
    return known


def scrub_emails(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """A copy with every e-mail-named string value hashed (for free-form maps such as `properties`)."""
    return {
        key: hash_email(value) if isinstance(value, str) and is_email_key(key) else value
        for key, value in mapping.items()
    }


def time_fields(event_time: datetime | None) -> dict[str, Any]:
    """event_date, event_hour, day_of_week (ISO: 1 = Monday ... 7 = Sunday) and is_weekend, in UTC."""
    if event_time is None:
        return {"event_date": None, "event_hour": None, "day_of_week": None, "is_weekend": None}
    if event_time.tzinfo is not UTC:
        event_time = event_time.replace(tzinfo=UTC) if event_time.tzinfo is None else event_time.astimezone(UTC)
    weekday = event_time.isoweekday()
    return {
        "event_date": event_time.date(),
        "event_hour": event_time.hour,
        "day_of_week": weekday,
        "is_weekend": weekday >= 6,
    }


def enrich_event(record: Mapping[str, Any], references: ReferenceStore) -> dict[str, Any]:
    """The record plus user_*, product_* and time fields; e-mail-named values anywhere are hashed."""
    enriched = dict(record)
    user_id, product_id = record.get("user_id"), record.get("product_id")
    enriched.update((user_id is not None and references.view("users", user_id)) or _NO_USER)
    enriched.update((product_id is not None and references.view("products", product_id)) or _NO_PRODUCT)
    event_time = record.get("event_time")
    if event_time is not None and event_time.tzinfo is UTC:  # what Avro decoding gives: skip the conversion
        weekday = event_time.isoweekday()
        enriched["event_date"] = event_time.date()
        enriched["event_hour"] = event_time.hour
        enriched["day_of_week"] = weekday
        enriched["is_weekend"] = weekday >= 6
    else:
        enriched.update(time_fields(event_time))
    properties = record.get("properties")
    if properties and any(is_email_key(k) for k in properties):
        enriched["properties"] = scrub_emails(properties)
    if not RAW_EVENT_FIELDS.issuperset(record):
        for key in record:
            if is_email_key(key) and isinstance(record[key], str):
                enriched[key] = hash_email(record[key])
    return enriched
