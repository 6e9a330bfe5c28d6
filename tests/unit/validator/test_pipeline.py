"""The whole pure path: the generator's seeded traffic, late references, CDC transactions, batch rows."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace

import pytest

from services.contracts.deadletter import OriginalMessage, Stage, parse_dead_letter
from services.generator.bad_events import BAD_KINDS, BadEventGenerator
from services.generator.model import Simulation
from services.kit.avro import AvroDeserializer, AvroSerializer, Decoded, Schema, SchemaRepository
from services.validator.batch import BatchRow, read_jsonl
from services.validator.cdc import make_envelope
from services.validator.dedupe import DedupeStore
from services.validator.engine import RuleEngine
from services.validator.pipeline import (
    EventProcessor,
    Output,
    Route,
    TransactionProcessor,
    apply_reference,
    retry_wait_seconds,
)
from services.validator.references import ApplyResult, ReferenceStore
from services.validator.retry import RetryPolicy, parse_retry_headers
from services.validator.rulebook import RuleBook

START = datetime(2026, 1, 5, 12, tzinfo=UTC)
TRACEPARENT = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
# What each injected fault must become: (route, error code, rule) -- decode errors name no rule.
EXPECTED = {
    "null_ids": (Route.DEAD_LETTER, "MISSING_FIELD", "event_required_ids"),
    "wrong_types": (Route.DEAD_LETTER, "UNKNOWN_WRITER_SCHEMA", None),
    "negative_amount": (Route.DEAD_LETTER, "OUT_OF_RANGE", "amount_not_negative"),
    "unknown_user": (Route.RETRY, None, "user_exists"),
    "duplicate": (Route.DEAD_LETTER, "DUPLICATE", "event_id_unique"),
    "future_timestamp": (Route.DEAD_LETTER, "FUTURE_TIMESTAMP", "event_time_not_in_future"),
    "garbage_bytes": (Route.DEAD_LETTER, "NOT_AVRO_SINGLE_OBJECT", None),
}


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture(scope="module")
def schemas() -> SchemaRepository:
    return SchemaRepository.load()


def references_from(simulation: Simulation) -> ReferenceStore:
    """The simulation's users and products as Debezium snapshot envelopes (JSON bytes, as on the topic)."""
    store = ReferenceStore()
    for lsn, user in enumerate(simulation.users, start=1):
        row = {k: v for k, v in asdict(user).items() if k != "shipping_address"}
        key = json.dumps({"user_id": user.user_id}).encode()
        value = json.dumps(make_envelope("r", "users", after=row, lsn=lsn)).encode()
        assert store.apply_envelope("users", key, value) is ApplyResult.UPSERTED
    for lsn, product in enumerate(simulation.products, start=1):
        value = json.dumps(make_envelope("r", "products", after=asdict(product), lsn=lsn)).encode()
        store.apply_envelope("products", None, value)
    return store


def processor_for(
    references: ReferenceStore, schemas: SchemaRepository, clock: Clock, **kwargs: object
) -> EventProcessor:
    engine = RuleEngine(RuleBook(reference_tables=references.table_names), references, DedupeStore(), clock)
    return EventProcessor(engine, schemas, **kwargs)  # type: ignore[arg-type]


def test_generator_traffic_routes_every_fault_kind(schemas: SchemaRepository) -> None:
    simulation = Simulation(seed=11, n_users=300, n_products=80, start_time=START)
    bad_events = BadEventGenerator(11, simulation.users, simulation.products, share=0.08)
    clock = Clock(START)
    processor = processor_for(references_from(simulation), schemas, clock)
    serialize = AvroSerializer(schemas["raw_event"])
    rogue = AvroSerializer(Schema.from_definition("rogue", bad_events.rogue_schema))
    read_processed = AvroDeserializer(schemas, "processed_event")

    outcomes: Counter[tuple] = Counter()
    parked: list[Output] = []
    for offset in range(4_000):
        clock.now = now = START + timedelta(milliseconds=250 * offset)
        bad = bad_events.maybe(now)
        if bad is None:
            event = simulation.next_event(now)
            bad_events.observe(event)
            kind, key, value = "good", event.key, serialize(event.to_record())
        else:
            kind, key = bad.kind, bad.key
            if bad.payload is not None:
                value = bad.payload
            else:
                assert bad.record is not None
                value = (rogue if bad.writer_schema else serialize)(bad.record)
        message = OriginalMessage(
            "events.raw", offset % 16, offset, key.encode() if key else None, value, [("traceparent", TRACEPARENT)]
        )
        out = processor.process(message)

        if kind == "good":
            assert out.route is Route.PROCESSED, parse_dead_letter(out.key, out.value, out.headers)
            assert out.topic == "events.processed" and out.key == message.key
            decoded = read_processed(out.value)
            assert isinstance(decoded, Decoded)
            assert decoded.record["user_tier"] is not None and decoded.record["quality_flags"] == []
            assert ("traceparent", TRACEPARENT) in out.headers
            outcomes[("good", out.route)] += 1
            continue
        route, code, rule = EXPECTED[kind]
        assert out.route is route, kind
        if route is Route.RETRY:
            state = parse_retry_headers(out.headers)
            assert state is not None and state.rule == rule and state.attempt == 1
            assert out.topic == "events.raw.retry" and out.value == value
            parked.append(out)
        else:
            dead = parse_dead_letter(out.key, out.value, out.headers)
            assert (dead.error_code, dead.rule) == (code, rule), kind
            assert out.topic == "events.raw.dlq" and dead.value == value  # original bytes, unchanged
            assert (dead.original_topic, dead.original_offset) == ("events.raw", offset)
            assert dead.stage is (Stage.DECODE if rule is None else Stage.VALIDATE)
            assert dead.trace_id == "0af7651916cd43dd8448eb211c80319c"
        outcomes[(kind, out.route)] += 1

    assert {kind for kind, _ in outcomes} == {"good", *BAD_KINDS}, outcomes
    assert outcomes[("good", Route.PROCESSED)] > 3_000

    # The unknown users never arrive: each parked record ends, after its retries, as REFERENCE_NOT_FOUND.
    for out in parked:
        state = parse_retry_headers(out.headers)
        assert state is not None
        clock.now, retries = state.first_seen, 0  # as if the retry consumer kept up
        while out.route is Route.RETRY:
            clock.now += timedelta(seconds=retry_wait_seconds(out.headers, clock.now))
            retries += 1
            out = processor.process(OriginalMessage("events.raw.retry", 0, retries, out.key, out.value, out.headers))
        dead = parse_dead_letter(out.key, out.value, out.headers)
        assert (dead.error_code, dead.rule, dead.stage, dead.attempt) == (
            "REFERENCE_NOT_FOUND",
            "user_exists",
            Stage.RETRY,
            RetryPolicy().max_attempts,
        )
        assert dead.original_topic == "events.raw" and out.topic == "events.raw.dlq"
    counters = processor.engine.rule_counters()
    assert counters["event_id_unique"].failed == outcomes[("duplicate", Route.DEAD_LETTER)]


def test_late_reference_is_retried_then_processed(schemas: SchemaRepository, known: SimpleNamespace) -> None:
    clock = Clock(START)
    references = ReferenceStore()
    references.put("products", known.product_row)
    processor = processor_for(references, schemas, clock)
    value = AvroSerializer(schemas["raw_event"])(known.event(event_time=START))
    first = processor.process(OriginalMessage("events.raw", 4, 100, b"k", value, [("traceparent", TRACEPARENT)]))
    assert first.route is Route.RETRY and first.topic == "events.raw.retry"
    assert retry_wait_seconds(first.headers, START) == 2.0

    # CDC catches up before the retry is due
    user = json.dumps(make_envelope("c", "users", after=known.user_row, lsn=9)).encode()
    assert apply_reference(references, OriginalMessage("cdc.postgres.users", 0, 0, None, user), START) == "upserted"
    clock.now = START + timedelta(seconds=2)
    assert retry_wait_seconds(first.headers, clock.now) == 0.0
    second = processor.process(OriginalMessage("events.raw.retry", 0, 1, first.key, first.value, first.headers))
    assert second.route is Route.PROCESSED
    assert [k for k, _ in second.headers] == ["traceparent"]  # retry bookkeeping does not leak downstream


def test_late_reference_gives_up_after_the_policy(schemas: SchemaRepository, known: SimpleNamespace) -> None:
    clock = Clock(START)
    policy = RetryPolicy(max_attempts=3)
    processor = processor_for(ReferenceStore(), schemas, clock, retry_policy=policy)
    value = AvroSerializer(schemas["raw_event"])(known.event(event_time=START))
    out: Output = processor.process(OriginalMessage("events.raw", 4, 100, b"k", value))
    delays = []
    while out.route is Route.RETRY:
        wait = retry_wait_seconds(out.headers, clock.now)
        delays.append(wait)
        clock.now += timedelta(seconds=wait)
        out = processor.process(OriginalMessage("events.raw.retry", 0, len(delays), out.key, out.value, out.headers))
    assert delays == [2.0, 4.0, 8.0]
    assert out.route is Route.DEAD_LETTER and out.topic == "events.raw.dlq"
    dead = parse_dead_letter(out.key, out.value, out.headers)
    assert (dead.error_code, dead.stage, dead.rule, dead.field, dead.attempt) == (
        "REFERENCE_NOT_FOUND",
        Stage.RETRY,
        "user_exists",
        "user_id",
        3,
    )
    assert (dead.original_topic, dead.original_partition, dead.original_offset) == ("events.raw", 4, 100)
    assert dead.value == value


def test_a_retried_record_failing_decode_keeps_its_origin(schemas: SchemaRepository) -> None:
    processor = processor_for(ReferenceStore(), schemas, Clock(START))
    headers = [
        ("lp-retry-attempt", b"2"),
        ("lp-retry-not-before", b"0"),
        ("lp-retry-first-seen", b"0"),
        ("lp-retry-original-topic", b"events.raw"),
        ("lp-retry-original-partition", b"1"),
        ("lp-retry-original-offset", b"5"),
    ]
    out = processor.process(OriginalMessage("events.raw.retry", 0, 9, None, b"junk", headers))
    dead = parse_dead_letter(out.key, out.value, out.headers)
    assert (out.topic, dead.original_topic, dead.original_offset, dead.attempt) == (
        "events.raw.dlq",
        "events.raw",
        5,
        2,
    )


def test_batch_rows_take_the_same_path(schemas: SchemaRepository, known: SimpleNamespace, tmp_path: Path) -> None:
    references = ReferenceStore()
    references.put("users", known.user_row)
    references.put("products", known.product_row)
    processor = processor_for(references, schemas, Clock(START))
    path = tmp_path / "events.jsonl"
    good = {k: v for k, v in known.event().items() if k != "event_time"} | {"event_time": "2026-01-05T11:00:00Z"}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "event_id": str(uuid.uuid4()), "amount": -3}) + "\n")
    outputs = []
    for row in read_jsonl(path):
        assert isinstance(row, BatchRow)
        origin = OriginalMessage(row.origin, -1, row.position, None, json.dumps(good).encode())
        outputs.append(processor.process_record(row.record, origin))
    assert [o.route for o in outputs] == [Route.PROCESSED, Route.DEAD_LETTER]
    dead = parse_dead_letter(outputs[1].key, outputs[1].value, outputs[1].headers)
    assert (outputs[1].topic, dead.error_code, dead.original_topic, dead.original_offset) == (
        "events.raw.dlq",
        "OUT_OF_RANGE",
        f"file:{path}",
        2,
    )


# --- transactions --------------------------------------------------------------------------------------------------
TRANSACTION_ID = "66666666-6666-4666-8666-666666666666"
ROW = {
    "transaction_id": TRANSACTION_ID,
    "user_id": "77777777-7777-4777-8777-777777777777",
    "product_id": "88888888-8888-4888-8888-888888888888",
    "quantity": 2,
    "unit_price": Decimal("129.99"),
    "discount": Decimal("13.00"),
    "tax": Decimal("49.40"),
    "total": Decimal("296.38"),
    "payment_method": "paypal",
    "shipping_address": "1 Main St, London, GB",
    "status": "created",
    "created_at": START,
    "updated_at": START,
}


@pytest.fixture()
def transactions(schemas: SchemaRepository) -> TransactionProcessor:
    engine = RuleEngine(RuleBook(), ReferenceStore(), DedupeStore(), Clock(START))
    return TransactionProcessor(engine, schemas)


def cdc(op: str, before: dict | None = None, after: dict | None = None, lsn: int = 1) -> OriginalMessage:
    value = json.dumps(make_envelope(op, "transactions", before=before, after=after, lsn=lsn, ts_ms=1)).encode()
    return OriginalMessage(
        "cdc.postgres.transactions", 0, lsn, json.dumps({"transaction_id": TRANSACTION_ID}).encode(), value
    )


def decode(schemas: SchemaRepository, subject: str, value: bytes | None) -> dict:
    decoded = AvroDeserializer(schemas, subject)(value)
    assert isinstance(decoded, Decoded), decoded
    return decoded.record


def test_transaction_lifecycle(transactions: TransactionProcessor, schemas: SchemaRepository) -> None:
    created = transactions.process(cdc("c", after=ROW, lsn=10))
    assert [o.route for o in created] == [Route.PROCESSED, Route.STATUS_HISTORY]
    assert [o.topic for o in created] == ["transactions.processed", "transactions.status_history"]
    assert created[0].key == TRANSACTION_ID.encode()
    assert decode(schemas, "processed_transaction", created[0].value)["total"] == Decimal("296.38")
    assert decode(schemas, "transaction_status_change", created[1].value)["new_status"] == "created"

    paid = transactions.process(cdc("u", before=ROW, after={**ROW, "status": "paid"}, lsn=20))
    history = decode(schemas, "transaction_status_change", paid[1].value)
    assert (history["old_status"], history["new_status"], history["source_lsn"]) == ("created", "paid", 20)

    untouched = transactions.process(cdc("u", before=ROW, after={**ROW, "payment_method": "card"}, lsn=30))
    assert [o.route for o in untouched] == [Route.PROCESSED]
    deleted = transactions.process(cdc("d", before=ROW, lsn=40))
    assert decode(schemas, "processed_transaction", deleted[0].value)["op"] == "d"
    tombstone = OriginalMessage("cdc.postgres.transactions", 0, 41, TRANSACTION_ID.encode(), None)
    assert transactions.process(tombstone) == []


def test_transaction_rejections(transactions: TransactionProcessor) -> None:
    (out,) = transactions.process(cdc("c", after={**ROW, "total": Decimal("300.00")}))
    assert out.route is Route.DEAD_LETTER and out.topic == "cdc.postgres.transactions.dlq"
    dead = parse_dead_letter(out.key, out.value, out.headers)
    assert (dead.error_code, dead.rule, dead.field) == ("TOTAL_MISMATCH", "transaction_total_consistent", "total")

    (out,) = transactions.process(OriginalMessage("cdc.postgres.transactions", 0, 1, None, b"{not json"))
    dead = parse_dead_letter(out.key, out.value, out.headers)
    assert (dead.error_code, dead.stage) == ("CDC_BAD_ENVELOPE", Stage.DECODE)

    (out,) = transactions.process(cdc("c", after={**ROW, "total": Decimal("1e20")}))  # beyond decimal(12,2)
    assert out.route is Route.DEAD_LETTER


def test_transaction_warnings_become_flags(transactions: TransactionProcessor, schemas: SchemaRepository) -> None:
    voucher = {**ROW, "discount": Decimal("300.00"), "tax": Decimal("0"), "total": Decimal("-40.02")}
    (out,) = transactions.process(cdc("c", after=voucher))
    assert out.route is Route.DEAD_LETTER  # a negative total is an error
    generous = {**ROW, "quantity": 1, "unit_price": Decimal("10"), "discount": Decimal("10"), "tax": Decimal("0"),
                "total": Decimal("0")}  # fmt: skip
    ok = transactions.process(cdc("c", after=generous))
    assert decode(schemas, "processed_transaction", ok[0].value)["quality_flags"] == []
    bigger = {**generous, "discount": Decimal("12"), "tax": Decimal("2"), "total": Decimal("0")}
    flagged = transactions.process(cdc("c", after=bigger))
    record = decode(schemas, "processed_transaction", flagged[0].value)
    assert record["quality_flags"] == ["transaction_discount_within_subtotal"]


def test_bad_reference_envelopes_are_dead_lettered(known: SimpleNamespace) -> None:
    out = apply_reference(ReferenceStore(), OriginalMessage("cdc.postgres.users", 2, 3, b"k", b"nope"), START)
    assert isinstance(out, Output) and out.topic == "cdc.postgres.users.dlq"
    assert parse_dead_letter(out.key, out.value, out.headers).error_code == "CDC_BAD_ENVELOPE"


def test_an_avro_file_and_the_stream_give_the_same_outputs(
    schemas: SchemaRepository, known: SimpleNamespace, tmp_path: Path
) -> None:
    """One engine for streams and files: the rows of an Avro container file, judged as one batch through
    `process_records`, give byte for byte the outputs the same events give as Kafka payloads through
    `process_batch` (column-wise decode and splice encoding on one side, dicts on the other)."""
    import fastavro

    from services.validator.batch import read_file

    events = [known.event(event_id=str(uuid.UUID(int=i + 1, version=4))) for i in range(5)]
    events[1]["amount"] = -1.0  # OUT_OF_RANGE
    events[2]["user_id"] = events[2]["user_id"].upper()  # carried on in canonical form
    events[3]["properties"] = {"contact_email": "A@Example.com"}  # hashed
    events[4]["device_type"] = "fridge"  # warn: kept, flagged
    for event in events:
        event["source"] = "batch-file"  # what the file reader stamps on every row
    path = tmp_path / "events.avro"
    with path.open("wb") as handle:
        fastavro.writer(handle, schemas["raw_event"].parsed, events)
    rows = [row for row in read_file(path) if isinstance(row, BatchRow)]
    assert len(rows) == len(events)
    serialize = AvroSerializer(schemas["raw_event"])
    messages = [OriginalMessage("events.raw", 0, i, None, serialize(e)) for i, e in enumerate(events)]

    def judged(records: bool) -> list:
        references = ReferenceStore()
        references.put("users", known.user_row)
        references.put("products", known.product_row)
        processor = processor_for(references, schemas, Clock(START))
        if records:
            return processor.process_records([row.record for row in rows], messages)
        return processor.process_batch(messages)

    from_file, from_stream = judged(True), judged(False)
    assert [o.route for o in from_stream][1:2] == [Route.DEAD_LETTER], from_stream[1]
    assert [o.route for o in from_stream] == [Route.PROCESSED, Route.DEAD_LETTER, *[Route.PROCESSED] * 3]
    assert [(o.route, o.topic, o.value) for o in from_file] == [(o.route, o.topic, o.value) for o in from_stream]
    processed = [decode(schemas, "processed_event", o.value) for o in from_stream if o.route is Route.PROCESSED]
    assert processed[1]["user_id"] == events[2]["user_id"].lower()
    assert processed[2]["properties"]["contact_email"] != "A@Example.com"
    assert processed[3]["quality_flags"] == ["device_type_known"]
