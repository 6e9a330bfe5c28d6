"""Ids are validated as UUIDs before the fan-out: the `format: uuid` rule check, canonical forms, duplicates of
case-changed copies, CDC transactions (deletes too), and that nothing accepted fails a store's UUID column."""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import pytest

from services.contracts.deadletter import OriginalMessage, parse_dead_letter
from services.kit.avro import AvroDeserializer, AvroSerializer, Decoded, SchemaRepository
from services.testing.verdicts import mutate_id
from services.validator.cdc import make_envelope
from services.validator.dedupe import DedupeStore
from services.validator.engine import Outcome, RuleEngine
from services.validator.ids import canonical_uuid, uuid_problem
from services.validator.pipeline import EventProcessor, Output, Route, TransactionProcessor, apply_reference
from services.validator.references import ReferenceStore
from services.validator.rulebook import RuleBook, RuleLoadError, load_ruleset


@pytest.fixture(scope="module")
def schemas() -> SchemaRepository:
    return SchemaRepository.load()


ID_FIELDS = ("event_id", "user_id", "session_id", "product_id", "transaction_id")
GOOD = "0542cfdb-1c2d-4e5f-93a2-0123456789ab"


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (GOOD, None),
        (GOOD.upper(), None),  # the same UUID: accepted, then normalised
        ("0542cfdb-1c2d-4e5f-93v2-0123456789ab", "NOT_A_UUID"),  # a non-hex digit
        (GOOD.replace("-", ""), "NOT_A_UUID"),
        ("{" + GOOD + "}", "NOT_A_UUID"),
        ("urn:uuid:" + GOOD, "NOT_A_UUID"),
        (GOOD + "\n", "CONTROL_CHARACTER"),
        (GOOD[:8] + "\x00" + GOOD[9:], "CONTROL_CHARACTER"),
        ("\x1b[31m" + GOOD, "CONTROL_CHARACTER"),
        (GOOD[:35] + "\u0661", "NOT_A_UUID"),  # an Arabic-Indic digit one: not ASCII hex
        (GOOD + " ", "NOT_A_UUID"),
        ("", "NOT_A_UUID"),
        (12345, "NOT_A_UUID"),
    ],
)
def test_uuid_problem(value: Any, problem: str | None) -> None:
    found = uuid_problem(value)
    assert (found[0] if found else None) == problem


def test_canonical_uuid_lowers_only_uuids() -> None:
    assert canonical_uuid(GOOD.upper()) == GOOD
    assert canonical_uuid(GOOD) is GOOD
    assert canonical_uuid("NOT-A-UUID") == "NOT-A-UUID"  # left for the rule to refuse, as received
    assert canonical_uuid(None) is None


def test_format_uuid_rule_codes_and_fields(engine_for: Callable[..., RuleEngine], known: SimpleNamespace) -> None:
    engine = engine_for(
        events="""
        applies_to: event
        rules:
          - id: ids
            type: VALUE
            fields: [event_id, user_id, session_id]
            format: uuid
        """
    )
    assert engine.evaluate(known.event(session_id=None), "event").ok  # null passes: presence is MANDATORY's
    verdict = engine.evaluate(known.event(event_id="e-1", session_id=GOOD + "\x00"), "event")
    assert verdict.outcome is Outcome.REJECT
    assert [(f.rule_id, f.field, f.code) for f in verdict.errors] == [
        ("ids", "event_id", "NOT_A_UUID"),
        ("ids", "session_id", "CONTROL_CHARACTER"),
    ]
    assert "'\\x00'" in verdict.errors[1].message


def test_format_must_be_known(tmp_path: Any) -> None:
    (tmp_path / "r.yaml").write_text(
        "applies_to: event\nrules:\n  - {id: ids, type: VALUE, field: event_id, format: ulid}\n"
    )
    with pytest.raises(RuleLoadError, match="format"):
        load_ruleset(tmp_path)


def test_default_rules_declare_every_id_a_uuid() -> None:
    ruleset = RuleBook().current
    assert ruleset.uuid_fields("event") == ID_FIELDS
    assert ruleset.uuid_fields("transaction") == ("transaction_id", "user_id", "product_id")


def processor(known: SimpleNamespace, schemas: SchemaRepository) -> EventProcessor:
    references = ReferenceStore()
    references.put("users", known.user_row)
    references.put("products", known.product_row)
    engine = RuleEngine(RuleBook(), references, DedupeStore(), lambda: known.now)
    return EventProcessor(engine, schemas)


def message(schemas: SchemaRepository, record: dict[str, Any], offset: int = 0) -> OriginalMessage:
    return OriginalMessage("events.raw", 0, offset, b"k", AvroSerializer(schemas["raw_event"])(record))


@pytest.mark.parametrize("field", ID_FIELDS)
@pytest.mark.parametrize(
    ("value", "code"),
    [("0542cfdb-1c2d-4e5f-93v2-0123456789ab", "NOT_A_UUID"), (GOOD[:-1] + "\x00", "CONTROL_CHARACTER")],
)
def test_bad_ids_are_dead_lettered_with_rule_and_code(
    known: SimpleNamespace, schemas: SchemaRepository, field: str, value: str, code: str
) -> None:
    out = processor(known, schemas).process(message(schemas, known.event(**{field: value})))
    dead = parse_dead_letter(out.key, out.value, out.headers)
    assert (out.route, dead.error_code, dead.rule, dead.field) == (Route.DEAD_LETTER, code, "event_ids_uuid", field)


def test_case_changed_copy_of_an_accepted_event_is_a_duplicate(
    known: SimpleNamespace, schemas: SchemaRepository
) -> None:
    events = processor(known, schemas)
    original = known.event()
    first = events.process(message(schemas, original))
    assert first.route is Route.PROCESSED
    crafted = {**original, "event_id": original["event_id"].upper(), "amount": 1.0, "quantity": 1, "price": 1.0}
    copy = events.process(message(schemas, crafted, offset=1))
    dead = parse_dead_letter(copy.key, copy.value, copy.headers)
    assert (copy.route, dead.error_code, dead.rule) == (Route.DEAD_LETTER, "DUPLICATE", "event_id_unique")
    assert dead.value == message(schemas, crafted, offset=1).value  # the original bytes, upper case and all


def test_upper_case_ids_are_carried_on_canonical(known: SimpleNamespace, schemas: SchemaRepository) -> None:
    upper = {name: known.event()[name].upper() for name in ID_FIELDS}
    out = processor(known, schemas).process(message(schemas, known.event(**upper)))
    assert out.route is Route.PROCESSED  # the upper-case user_id and product_id found their rows, too
    decoded = AvroDeserializer(schemas, "processed_event")(out.value)
    assert isinstance(decoded, Decoded)
    assert {name: decoded.record[name] for name in ID_FIELDS} == {k: v.lower() for k, v in upper.items()}


def test_every_accepted_id_is_a_canonical_uuid(known: SimpleNamespace, schemas: SchemaRepository) -> None:
    """What a store's UUID column (ClickHouse) would refuse never leaves the validator: 3000 mutated events."""
    rng = random.Random(12)
    events = processor(known, schemas)
    decode = AvroDeserializer(schemas, "processed_event")
    accepted = rejected = 0
    for n in range(3000):
        record = known.event(event_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)))
        for name in rng.sample(ID_FIELDS, rng.randint(1, 2)):
            record[name] = mutate_id(rng, record[name])
        out = events.process(message(schemas, record, offset=n))
        if out.route is Route.PROCESSED:
            accepted += 1
            decoded = decode(out.value)
            assert isinstance(decoded, Decoded)
            for name in ID_FIELDS:
                value = decoded.record[name]
                assert value is None or str(uuid.UUID(value)) == value, (name, value)
        elif out.route is Route.RETRY:  # a valid UUID of no known user or product: late reference data?
            assert {name for name, _ in out.headers} >= {"lp-retry-rule"}
        else:
            rejected += 1
            dead = parse_dead_letter(out.key, out.value, out.headers)
            assert dead.error_code in {"NOT_A_UUID", "CONTROL_CHARACTER", "DUPLICATE", "MISSING_FIELD"}, dead
    assert accepted > 100 and rejected > 1000  # both sides exercised


# --- CDC ------------------------------------------------------------------------------------------------------------
ROW = {
    "transaction_id": "66666666-6666-4666-8666-666666666666",
    "user_id": "77777777-7777-4777-8777-777777777777",
    "product_id": "88888888-8888-4888-8888-888888888888",
    "quantity": 1,
    "unit_price": Decimal("10.00"),
    "discount": Decimal("0"),
    "tax": Decimal("0"),
    "total": Decimal("10.00"),
    "status": "created",
    "created_at": datetime(2026, 1, 5, tzinfo=UTC),
    "updated_at": datetime(2026, 1, 5, tzinfo=UTC),
}


def cdc(op: str, row: dict[str, Any]) -> OriginalMessage:
    before, after = (row, None) if op == "d" else (None, row)
    value = json.dumps(make_envelope(op, "transactions", before=before, after=after, lsn=5, ts_ms=1)).encode()
    return OriginalMessage("cdc.postgres.transactions", 0, 5, None, value)


@pytest.mark.parametrize("op", ["c", "d"])
def test_transaction_ids_are_checked_even_on_deletes(schemas: SchemaRepository, op: str) -> None:
    engine = RuleEngine(RuleBook(), ReferenceStore(), DedupeStore())
    transactions = TransactionProcessor(engine, schemas)
    (out,) = transactions.process(cdc(op, {**ROW, "product_id": "p-1"}))
    dead = parse_dead_letter(out.key, out.value, out.headers)
    assert (dead.error_code, dead.rule, dead.field) == ("NOT_A_UUID", "transaction_ids_uuid", "product_id")
    upper = {**ROW, "transaction_id": ROW["transaction_id"].upper()}
    outputs = transactions.process(cdc(op, upper))
    assert outputs[0].route is Route.PROCESSED and outputs[0].key == ROW["transaction_id"].encode()
    decoded = AvroDeserializer(schemas, "processed_transaction")(outputs[0].value)
    assert isinstance(decoded, Decoded) and decoded.record["transaction_id"] == ROW["transaction_id"]


def test_reference_rows_with_bad_ids_are_dead_lettered(known: SimpleNamespace) -> None:
    row = {**known.user_row, "user_id": "0542cfdb-1c2d-4e5f-93v2-0123456789ab"}
    value = json.dumps(make_envelope("c", "users", after=row, lsn=3), default=str).encode()
    out = apply_reference(ReferenceStore(), OriginalMessage("cdc.postgres.users", 0, 3, None, value), known.now)
    assert isinstance(out, Output) and out.topic == "cdc.postgres.users.dlq"
    dead = parse_dead_letter(out.key, out.value, out.headers)
    assert (dead.error_code, dead.field, str(dead.stage)) == ("NOT_A_UUID", "user_id", "decode")
