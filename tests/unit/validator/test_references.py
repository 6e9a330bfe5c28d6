"""CDC envelopes into the reference store: typing, r/c/u/d, tombstones, and idempotency on replays."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from decimal import Decimal
from types import SimpleNamespace

import pytest

from services.validator.cdc import (
    CdcFormatError,
    make_envelope,
    parse_envelope,
    parse_key,
    table_of_topic,
    to_date,
    to_timestamp,
)
from services.validator.enrich import hash_email
from services.validator.references import ApplyResult, ReferenceStore

USER = "11111111-1111-4111-8111-111111111111"
USER_KEY = json.dumps({"user_id": USER}).encode()


def user_row(**overrides: object) -> dict:
    row = {
        "user_id": USER,
        "email": "Ada@Example.com",
        "first_name": "Ada",
        "last_name": "Lovelace",
        "tier": "silver",
        "country": "GB",
        "city": "London",
        "registration_date": 19_700,  # Debezium io.debezium.time.Date: days since the epoch
        "created_at": 1_767_225_600_000_000,  # MicroTimestamp
        "updated_at": "2026-01-02T03:04:05.123456Z",  # ZonedTimestamp
    }
    row.update(overrides)
    return row


def envelope(op: str, lsn: int | None, before: dict | None = None, after: dict | None = None) -> bytes:
    document = {
        "before": before,
        "after": after,
        "source": {"lsn": lsn, "ts_ms": 1_767_225_600_123, "snapshot": "false", "table": "users"},
        "op": op,
        "ts_ms": 1_767_225_600_456,
    }
    return json.dumps(document).encode()


def test_columns_are_typed() -> None:
    change = parse_envelope(envelope("c", 100, after=user_row()), "users")
    assert change is not None
    row = change.after
    assert row is not None
    assert row["registration_date"] == date(2023, 12, 9)
    assert row["created_at"] == datetime(2026, 1, 1, tzinfo=UTC)
    assert row["updated_at"] == datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
    assert (change.op, change.lsn, change.snapshot) == ("c", 100, False)
    assert change.changed_at == datetime(2026, 1, 1, 0, 0, 0, 123000, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1_767_225_600_000, datetime(2026, 1, 1, tzinfo=UTC)),  # millis
        (1_767_225_600_000_000, datetime(2026, 1, 1, tzinfo=UTC)),  # micros
        ("1767225600000", datetime(2026, 1, 1, tzinfo=UTC)),
        ("2026-01-01T00:00:00", datetime(2026, 1, 1, tzinfo=UTC)),  # naive means UTC
        ("2026-01-01T01:00:00+01:00", datetime(2026, 1, 1, tzinfo=UTC)),
    ],
)
def test_timestamps(value: object, expected: datetime) -> None:
    assert to_timestamp(value) == expected


def test_dates_and_bad_values() -> None:
    assert to_date("2024-02-29") == date(2024, 2, 29)
    assert to_date(0) == date(1970, 1, 1)
    with pytest.raises(ValueError):
        to_date(True)
    with pytest.raises(ValueError):
        to_timestamp("yesterday")


def test_envelope_variants() -> None:
    wrapped = {"schema": {"type": "struct"}, "payload": json.loads(envelope("u", 5, after=user_row()))}
    change = parse_envelope(json.dumps(wrapped), "users")
    assert change is not None and change.op == "u"
    assert parse_envelope(None, "users") is None  # tombstone
    assert parse_envelope(b"", "users") is None
    snapshot = parse_envelope(make_envelope("r", "users", after={"user_id": USER}, lsn=1), "users")
    assert snapshot is not None and snapshot.snapshot


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "not an object"),
        (b'{"op": "x", "after": {}}', "op 'x'"),
        (b'{"op": "c", "after": null}', "without `after`"),
        (b'{"op": "d", "before": null}', "delete without `before`"),
        (
            b'{"op": "c", "after": {"user_id": "11111111-1111-4111-8111-111111111111", "registration_date": "soon"}}',
            "users.registration_date",
        ),
        (
            b'{"op": "c", "after": {"user_id": "11111111-1111-4111-8111-111111111111"}, "source": {"lsn": "abc"}}',
            "source.lsn",
        ),
    ],
)
def test_bad_envelopes(value: bytes, message: str) -> None:
    with pytest.raises(CdcFormatError, match=message):
        parse_envelope(value, "users")


def test_keys_and_topics() -> None:
    assert parse_key(b'{"user_id": "u-1"}', "user_id") == "u-1"
    assert parse_key({"schema": {}, "payload": {"user_id": "u-2"}}, "user_id") == "u-2"
    assert parse_key(b"u-3", "user_id") == "u-3"
    assert parse_key(None, "user_id") is None
    assert table_of_topic("cdc.postgres.users") == "users"
    assert table_of_topic("cdc.postgres.public.products") == "products"
    with pytest.raises(ValueError):
        table_of_topic("events.raw")


def test_upsert_update_delete() -> None:
    store = ReferenceStore()
    assert store.apply_envelope("users", USER_KEY, envelope("c", 100, after=user_row())) == "upserted"
    assert store.contains("users", USER)
    assert store.get("users", USER)["tier"] == "silver"  # type: ignore[index]
    update = envelope("u", 110, before=user_row(), after=user_row(tier="gold"))
    assert store.apply_envelope("users", None, update) is ApplyResult.UPSERTED  # key from the row
    assert store.view("users", USER)["user_tier"] == "gold"  # type: ignore[index]
    assert store.apply_envelope("users", None, envelope("d", 120, before=user_row(tier="gold"))) == "deleted"
    assert not store.contains("users", USER) and store.view("users", USER) is None
    assert store.apply_envelope("users", USER_KEY, None) is ApplyResult.IGNORED  # tombstone after
    assert store.size("users") == 0


def test_replays_are_idempotent() -> None:
    store = ReferenceStore()
    history = [
        envelope("r", 100, after=user_row()),
        envelope("u", 110, before=user_row(), after=user_row(tier="gold")),
        envelope("u", 120, before=user_row(tier="gold"), after=user_row(tier="platinum")),
    ]
    assert [store.apply_envelope("users", None, e) for e in history] == ["upserted"] * 3
    # the whole topic again (a consumer restarting from the beginning), and an out-of-order duplicate
    assert [store.apply_envelope("users", None, e) for e in history] == ["stale"] * 3
    assert store.apply_envelope("users", None, history[1]) is ApplyResult.STALE
    assert store.get("users", USER)["tier"] == "platinum"  # type: ignore[index]
    assert store.results[("users", ApplyResult.STALE)] == 4


def test_replay_does_not_resurrect_a_deleted_row() -> None:
    store = ReferenceStore()
    create = envelope("c", 100, after=user_row())
    delete = envelope("d", 130, before=user_row())
    for value in (create, delete, None):
        store.apply_envelope("users", USER_KEY, value)
    assert store.apply_envelope("users", None, create) is ApplyResult.STALE
    assert store.apply_envelope("users", None, delete) is ApplyResult.STALE
    assert not store.contains("users", USER)
    # a genuinely newer insert of the same key comes back
    assert store.apply_envelope("users", None, envelope("c", 140, after=user_row())) is ApplyResult.UPSERTED


def test_tombstone_alone_deletes_and_keeps_the_lsn_marker() -> None:
    store = ReferenceStore()
    store.apply_envelope("users", None, envelope("c", 100, after=user_row()))
    assert store.apply_envelope("users", USER_KEY, None) is ApplyResult.DELETED
    assert store.apply_envelope("users", None, envelope("c", 100, after=user_row())) is ApplyResult.STALE


def test_changes_without_lsn_always_apply_and_markers_are_bounded() -> None:
    store = ReferenceStore(max_deleted=2)
    store.apply_envelope("users", None, envelope("c", None, after=user_row()))
    assert store.apply_envelope("users", None, envelope("u", None, after=user_row(tier="gold"))) == "upserted"
    for n in range(3):
        store.apply_envelope(
            "users", None, envelope("c", 10, after=user_row(user_id=f"{n:08x}-0000-4000-8000-000000000000"))
        )
        store.apply_envelope(
            "users", None, envelope("d", 20, before=user_row(user_id=f"{n:08x}-0000-4000-8000-000000000000"))
        )
    # the oldest marker was evicted: its replay is applied again (the bound trades memory for exactness)
    assert (
        store.apply_envelope(
            "users", None, envelope("c", 10, after=user_row(user_id="00000000-0000-4000-8000-000000000000"))
        )
        == "upserted"
    )
    assert (
        store.apply_envelope(
            "users", None, envelope("c", 10, after=user_row(user_id="00000002-0000-4000-8000-000000000000"))
        )
        == "stale"
    )


def test_emails_are_hashed_on_the_way_in(known: SimpleNamespace) -> None:
    store = ReferenceStore()
    store.apply_envelope("users", None, envelope("c", 1, after=user_row(email="  Ada@Example.COM ")))
    stored = store.get("users", USER)
    assert stored is not None
    assert stored["email"] == hash_email("ada@example.com")
    assert "Ada@Example.COM" not in repr(store.__dict__)
    assert set(stored) == {"user_id", "email", "tier", "country", "city", "registration_date", "updated_at"}


def test_products_keep_decimal_prices_and_unknown_tables_fail(known: SimpleNamespace) -> None:
    store = ReferenceStore()
    after = {**known.product_row, "price": "129.99", "cost": "70.00"}
    store.apply_envelope("products", None, make_envelope("c", "products", after=after, lsn=5))
    assert store.get("products", known.product_id)["price"] == Decimal("129.99")  # type: ignore[index]
    assert store.view("products", known.product_id)["product_price"] == 129.99  # type: ignore[index]
    with pytest.raises(KeyError, match="unknown reference table"):
        store.apply_envelope("shops", None, envelope("c", 1, after={}))


def test_put_is_the_bootstrap_path(known: SimpleNamespace) -> None:
    store = ReferenceStore()
    assert store.put("users", known.user_row, lsn=7) is ApplyResult.UPSERTED
    assert store.put("users", known.user_row, lsn=7) is ApplyResult.STALE


@pytest.mark.parametrize("table", ["users", "products", "transactions"])
def test_envelopes_match_the_cdc_contract(table: str, known: SimpleNamespace) -> None:
    """make_envelope (used by tests and the bench) writes what schemas/avro/cdc_<table>.avsc describes, and the
    parser reads such an envelope back to the typed row."""
    import fastavro
    from fastavro.validation import validate

    from services.kit.avro import avro_schema_dir
    from services.validator.cdc import TABLES

    contract = avro_schema_dir() / f"cdc_{table}.avsc"
    assert contract.exists(), f"{contract.name} is the contract of cdc.postgres.{table}"
    rows = {
        "users": known.user_row,
        "products": known.product_row,
        "transactions": {
            "transaction_id": "66666666-6666-4666-8666-666666666666",
            "user_id": known.user_id,
            "product_id": known.product_id,
            "quantity": 2,
            "unit_price": Decimal("129.99"),
            "discount": Decimal("0.00"),
            "tax": Decimal("26.00"),
            "total": Decimal("285.98"),
            "payment_method": "paypal",
            "shipping_address": "1 Main St, London, GB",
            "status": "paid",
            "created_at": datetime(2026, 1, 5, 12, 0, 0, 123456, tzinfo=UTC),
            "updated_at": datetime(2026, 1, 5, 12, 0, 5, tzinfo=UTC),
        },
    }
    row = rows[table]
    document = make_envelope("u", table, before=row, after=row, lsn=123, ts_ms=1_767_614_405_000)
    assert validate(document, fastavro.parse_schema(json.loads(contract.read_text())), raise_errors=True)
    change = parse_envelope(json.dumps(document).encode(), table)
    assert change is not None and change.lsn == 123
    assert change.after == TABLES[table].typed_row(row)
    assert change.after == row  # typed back to exactly the Python values we started from


@pytest.mark.parametrize(
    ("user_id", "code"),
    [
        ("0542cfdb-1c2d-4e5f-93v2-0123456789ab", "NOT_A_UUID"),
        ("11111111-1111-4111-8111-11111111111\x00", "CONTROL_CHARACTER"),
        ("{11111111-1111-4111-8111-111111111111}", "NOT_A_UUID"),
        (42, "NOT_A_UUID"),
    ],
)
def test_reference_ids_must_be_uuids(user_id: object, code: str) -> None:
    """A users/products row's key is a PostgreSQL uuid column: anything else is refused, with what is wrong."""
    store = ReferenceStore()
    with pytest.raises(CdcFormatError) as raised:
        store.apply_envelope("users", None, envelope("c", 100, after=user_row(user_id=user_id)))
    assert (raised.value.code, raised.value.field) == (code, "user_id")
    assert store.size("users") == 0
    key = json.dumps({"user_id": user_id}).encode()
    with pytest.raises(CdcFormatError):  # the record key is as untrusted as the row
        store.apply_envelope("users", key, envelope("c", 100, after=user_row()))


def test_upper_case_reference_ids_are_stored_canonical() -> None:
    store = ReferenceStore()
    upper = USER.upper().replace("1", "A")
    assert store.apply_envelope("users", None, envelope("c", 100, after=user_row(user_id=upper))) == "upserted"
    assert store.contains("users", upper.lower()) and not store.contains("users", upper)
