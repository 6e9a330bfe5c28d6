"""The output builders give dicts that satisfy the new Avro contracts (and survive an encode/decode)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fastavro
import pytest
from fastavro.validation import validate

from services.declarations.avro_compat import parse as strict_parse
from services.kit.avro import AvroDeserializer, AvroSerializer, Decoded, SchemaRepository
from services.validator.cdc import ChangeEvent, make_envelope, parse_envelope
from services.validator.enrich import enrich_event
from services.validator.outputs import (
    PROCESSED_EVENT_FIELDS,
    TRANSACTION_COLUMNS,
    OutputContractError,
    processed_event,
    processed_transaction,
    status_change,
)
from services.validator.references import ReferenceStore

SCHEMA_DIR = Path(__file__).resolve().parents[3] / "schemas" / "avro"
VALIDATED_AT = datetime(2026, 1, 5, 12, 0, 1, tzinfo=UTC)


def schema(name: str) -> Any:
    return fastavro.parse_schema(json.loads((SCHEMA_DIR / f"{name}.avsc").read_text()))


def round_trip(name: str, record: dict[str, Any]) -> dict[str, Any]:
    repository = SchemaRepository.load(SCHEMA_DIR)
    decoded = AvroDeserializer(repository, name)(AvroSerializer(repository[name])(record))
    assert isinstance(decoded, Decoded), decoded
    return decoded.record


@pytest.mark.parametrize("name", ["processed_event", "processed_transaction", "transaction_status_change"])
def test_new_schemas_pass_the_platform_checks(name: str) -> None:
    definition = json.loads((SCHEMA_DIR / f"{name}.avsc").read_text())
    # the declarations library's parser: names, defaults matching the first union branch, logical types
    strict_parse(definition)
    assert definition["doc"]


def test_builder_fields_match_the_schemas() -> None:
    event_fields = [f["name"] for f in json.loads((SCHEMA_DIR / "processed_event.avsc").read_text())["fields"]]
    assert event_fields == [*PROCESSED_EVENT_FIELDS, "quality_flags", "validated_at", "rules_version"]
    transaction_fields = [
        f["name"] for f in json.loads((SCHEMA_DIR / "processed_transaction.avsc").read_text())["fields"]
    ]
    assert transaction_fields[: len(TRANSACTION_COLUMNS)] == list(TRANSACTION_COLUMNS)


def test_processed_event_validates(references: ReferenceStore, known: SimpleNamespace) -> None:
    enriched = enrich_event(known.event(country="gb"), references)
    record = processed_event(enriched, quality_flags=["country_iso2"], validated_at=VALIDATED_AT, rules_version="v1")
    assert validate(record, schema("processed_event"), raise_errors=True)
    back = round_trip("processed_event", record)
    assert back["quality_flags"] == ["country_iso2"]
    assert back["user_email_hash"] == enriched["user_email_hash"]
    assert back["event_date"] == enriched["event_date"]


def test_processed_events_take_the_compiled_codec_with_fastavros_bytes_and_values(
    references: ReferenceStore, known: SimpleNamespace
) -> None:
    serializer = AvroSerializer(SchemaRepository.load()["processed_event"])
    assert serializer.plan is not None  # arrays and dates compile: no per-record fallback to fastavro
    sparse = {"event_id": "e", "event_type": "login", "event_time": known.now, "user_id": "nobody"}
    for event, flags in (
        (known.event(country="gb"), ["country_iso2", "ip_address_ipv4"]),
        (known.event(properties={"k": "ü€"}), []),
        (sparse, ["x" * 300]),
    ):
        record = processed_event(
            enrich_event(event, references), quality_flags=flags, validated_at=VALIDATED_AT, rules_version="v1"
        )
        assert serializer(record) == serializer.encode_with_fastavro(record)
        payload = serializer(record)
        fast = AvroDeserializer(SchemaRepository.load(), "processed_event")
        reference = AvroDeserializer(SchemaRepository.load(), "processed_event")
        reference.fast = None  # fastavro's reader
        ours, theirs = fast(payload), reference(payload)
        assert fast.fast is not None and isinstance(ours, Decoded) and isinstance(theirs, Decoded)
        assert ours.record == theirs.record


def test_processed_event_for_a_sparse_event(references: ReferenceStore, known: SimpleNamespace) -> None:
    sparse = {"event_id": "e", "event_type": "login", "event_time": known.now, "user_id": "nobody"}
    record = processed_event(
        enrich_event(sparse, references), quality_flags=[], validated_at=VALIDATED_AT, rules_version=""
    )
    assert validate(record, schema("processed_event"), raise_errors=True)
    assert record["source"] == "generator" and record["properties"] == {}


def test_processed_event_refuses_missing_identifiers(references: ReferenceStore, known: SimpleNamespace) -> None:
    enriched = enrich_event(known.event(event_id=None), references)
    with pytest.raises(OutputContractError) as caught:
        processed_event(enriched, quality_flags=[], validated_at=VALIDATED_AT, rules_version="")
    assert caught.value.field == "event_id" and caught.value.code == "OUTPUT_CONTRACT"


def test_processed_event_hashes_emails_as_a_last_guard(known: SimpleNamespace) -> None:
    enriched = {**known.event(properties={"email": "a@b.c"}), "event_date": known.now.date(), "event_hour": 12}
    record = processed_event(enriched, quality_flags=[], validated_at=VALIDATED_AT, rules_version="")
    assert "@" not in record["properties"]["email"]


TRANSACTION_ROW = {
    "transaction_id": "t-1",
    "user_id": "u-1",
    "product_id": "p-1",
    "quantity": 2,
    "unit_price": Decimal("129.99"),
    "discount": Decimal("13"),
    "tax": Decimal("49.40"),
    "total": Decimal("296.38"),
    "payment_method": "paypal",
    "shipping_address": "1 Main St, London, GB",
    "status": "paid",
    "created_at": datetime(2026, 1, 5, 12, tzinfo=UTC),
    "updated_at": datetime(2026, 1, 5, 12, 0, 5, tzinfo=UTC),
}


def change(op: str, before: dict | None = None, after: dict | None = None, lsn: int = 500) -> ChangeEvent:
    parsed = parse_envelope(
        make_envelope(op, "transactions", before=before, after=after, lsn=lsn, ts_ms=1_767_614_405_000),
        "transactions",
    )
    assert parsed is not None
    return parsed


def test_processed_transaction_validates_with_exact_decimals() -> None:
    update = change("u", before={**TRANSACTION_ROW, "status": "created"}, after=TRANSACTION_ROW)
    record = processed_transaction(update, quality_flags=[], validated_at=VALIDATED_AT, rules_version="v1")
    assert validate(record, schema("processed_transaction"), raise_errors=True)
    assert record["discount"] == Decimal("13.00")  # quantized to the schema's scale
    assert (record["op"], record["source_lsn"]) == ("u", 500)
    assert record["changed_at"] == datetime(2026, 1, 5, 12, 0, 5, tzinfo=UTC)
    back = round_trip("processed_transaction", record)
    assert back["total"] == Decimal("296.38") and back["unit_price"] == Decimal("129.99")
    assert back["updated_at"] == TRANSACTION_ROW["updated_at"]


def test_processed_transaction_for_a_delete() -> None:
    record = processed_transaction(
        change("d", before={"transaction_id": "t-1"}), quality_flags=[], validated_at=VALIDATED_AT, rules_version=""
    )
    assert validate(record, schema("processed_transaction"), raise_errors=True)
    assert record["op"] == "d" and record["total"] is None


def test_processed_transaction_contract_errors() -> None:
    with pytest.raises(OutputContractError, match="transaction_id"):
        processed_transaction(
            change("c", after={"status": "paid"}), quality_flags=[], validated_at=VALIDATED_AT, rules_version=""
        )
    no_time = ChangeEvent("transactions", "c", None, dict(TRANSACTION_ROW), 1, None, None, False)
    with pytest.raises(OutputContractError, match="changed_at"):
        processed_transaction(no_time, quality_flags=[], validated_at=VALIDATED_AT, rules_version="")


def test_status_changes() -> None:
    paid = status_change(change("u", before={**TRANSACTION_ROW, "status": "created"}, after=TRANSACTION_ROW))
    assert paid == {
        "transaction_id": "t-1",
        "old_status": "created",
        "new_status": "paid",
        "changed_at": TRANSACTION_ROW["updated_at"],  # business time of the transition
        "source": "cdc",
        "source_lsn": 500,
    }
    assert validate(paid, schema("transaction_status_change"), raise_errors=True)
    created = status_change(change("c", after={**TRANSACTION_ROW, "status": "created"}))
    assert created is not None and created["old_status"] is None and created["new_status"] == "created"
    snapshot = status_change(change("r", after=TRANSACTION_ROW))
    assert snapshot is not None and snapshot["source"] == "cdc-snapshot" and snapshot["old_status"] is None
    assert round_trip("transaction_status_change", paid)["new_status"] == "paid"
    # no transition: another column changed, or a delete
    assert status_change(change("u", before={**TRANSACTION_ROW, "tax": Decimal(0)}, after=TRANSACTION_ROW)) is None
    assert status_change(change("d", before=TRANSACTION_ROW)) is None
