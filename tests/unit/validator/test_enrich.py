"""Enrichment: user and product attributes, event-time fields, and e-mail hashing."""

from __future__ import annotations

import hashlib
from datetime import UTC, date, datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

from services.validator.enrich import enrich_event, hash_email, is_email_key, scrub_emails, time_fields
from services.validator.references import ReferenceStore


def test_enrichment_fields(references: ReferenceStore, known: SimpleNamespace) -> None:
    enriched = enrich_event(known.event(), references)
    assert enriched["user_tier"] == "gold"
    assert enriched["user_country"] == "GB"
    assert enriched["user_city"] == "London"
    assert enriched["user_registration_date"] == date(2024, 3, 1)
    assert enriched["user_email_hash"] == hashlib.sha256(b"ada.lovelace@example.com").hexdigest()
    assert enriched["product_name"] == "Voltix Pro Headphones 7"
    assert (enriched["product_category"], enriched["product_subcategory"], enriched["product_brand"]) == (
        "electronics",
        "headphones",
        "Voltix",
    )
    assert enriched["product_price"] == 129.99 and isinstance(enriched["product_price"], float)
    # Monday 2026-01-05 12:00 UTC
    assert (enriched["event_date"], enriched["event_hour"], enriched["day_of_week"], enriched["is_weekend"]) == (
        date(2026, 1, 5),
        12,
        1,
        False,
    )
    assert enriched["event_id"] == known.event()["event_id"]  # the raw fields stay


def test_unknown_references_leave_nulls(references: ReferenceStore, known: SimpleNamespace) -> None:
    enriched = enrich_event(known.event(user_id="nobody", product_id=None), references)
    assert enriched["user_tier"] is None and enriched["user_email_hash"] is None
    assert enriched["product_category"] is None and enriched["product_price"] is None


def test_record_is_not_mutated(references: ReferenceStore, known: SimpleNamespace) -> None:
    record = known.event(properties={"email": "x@y.z"})
    snapshot = {**record, "properties": dict(record["properties"])}
    enrich_event(record, references)
    assert record == snapshot


@pytest.mark.parametrize(
    ("event_time", "expected"),
    [
        (datetime(2026, 1, 10, 23, 59, tzinfo=UTC), (date(2026, 1, 10), 23, 6, True)),  # Saturday
        (datetime(2026, 1, 11, 0, 0, tzinfo=UTC), (date(2026, 1, 11), 0, 7, True)),  # Sunday
        # 01:30 in UTC+2 on Saturday is 23:30 UTC on Friday: derived fields are UTC
        (datetime(2026, 1, 10, 1, 30, tzinfo=timezone(timedelta(hours=2))), (date(2026, 1, 9), 23, 5, False)),
        (datetime(2026, 1, 9, 8, 0), (date(2026, 1, 9), 8, 5, False)),  # naive means UTC
    ],
)
def test_time_fields(event_time: datetime, expected: tuple) -> None:
    fields = time_fields(event_time)
    assert (fields["event_date"], fields["event_hour"], fields["day_of_week"], fields["is_weekend"]) == expected


def test_time_fields_via_enrich_for_non_utc(references: ReferenceStore, known: SimpleNamespace) -> None:
    event_time = datetime(2026, 1, 10, 1, 30, tzinfo=timezone(timedelta(hours=2)))
    assert enrich_event(known.event(event_time=event_time), references)["day_of_week"] == 5
    assert time_fields(None)["event_date"] is None


def test_hash_email() -> None:
    expected = hashlib.sha256(b"ada@example.com").hexdigest()
    assert hash_email("  Ada@Example.COM\n") == expected
    assert hash_email(expected) == expected  # idempotent: hashing twice changes nothing


def test_email_keys_and_scrubbing() -> None:
    assert all(is_email_key(k) for k in ("email", "Email", "e-mail", "email_address", "contact_email"))
    assert not any(is_email_key(k) for k in ("emails_sent", "mail_server", "user_id"))
    scrubbed = scrub_emails({"email": "A@B.C", "note": "hi", "billing_email": "x@y.z", "email_count": 3})
    assert scrubbed["email"] == hash_email("a@b.c") and scrubbed["billing_email"] == hash_email("x@y.z")
    assert scrubbed["note"] == "hi"


def test_emails_never_leave_in_clear(references: ReferenceStore, known: SimpleNamespace) -> None:
    record = known.event(properties={"email": "Someone@Example.com", "payment_method": "paypal"})
    record["contact_email"] = "Other@Example.com"  # a field a future raw_event version might add
    enriched = enrich_event(record, references)
    assert enriched["properties"] == {"email": hash_email("someone@example.com"), "payment_method": "paypal"}
    assert enriched["contact_email"] == hash_email("other@example.com")
    assert "@" not in repr(enriched)
