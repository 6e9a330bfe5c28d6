"""Realistic records of the platform's contracts, for tests and benchmarks (no Kafka, no stack needed).

Processed events are made the way the validator makes them: generator events, enriched against the simulation's
users and products (fed in as CDC snapshot envelopes, `load_references`), shaped by `outputs.processed_event`.
Transactions come two ways: the OLTP rows of the simulation's purchases (`ProcessedSamples`), or a seeded life
cycle of changes c, u, u, d per transaction (`processed_transactions`).
"""

from __future__ import annotations

import dataclasses
import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from services.contracts.deadletter import OriginalMessage, Stage, build_dead_letter
from services.generator.model import Simulation
from services.kit.avro import AvroSerializer, SchemaRepository
from services.validator.cdc import make_envelope
from services.validator.enrich import enrich_event
from services.validator.outputs import CENT, MONEY_COLUMNS, processed_event
from services.validator.references import ReferenceStore

RULES_VERSION = "samples"
START = datetime(2026, 11, 2, 8, tzinfo=UTC)


def load_references(simulation: Simulation) -> ReferenceStore:
    """The simulation's users and products, fed through CDC snapshot envelopes as Debezium would send them."""
    references = ReferenceStore()
    for lsn, user in enumerate(simulation.users, start=1):
        row = {k: v for k, v in dataclasses.asdict(user).items() if k != "shipping_address"}
        references.apply_envelope("users", None, make_envelope("r", "users", after=row, lsn=lsn))
    for lsn, product in enumerate(simulation.products, start=1):
        after = dataclasses.asdict(product)
        references.apply_envelope("products", None, make_envelope("r", "products", after=after, lsn=lsn))
    return references


def processed(raw: dict[str, Any], references: ReferenceStore, validated_at: datetime) -> dict[str, Any]:
    """The events.processed record the validator makes of the raw event `raw` when no rule flags it."""
    return processed_event(
        enrich_event(raw, references), quality_flags=[], validated_at=validated_at, rules_version=RULES_VERSION
    )


class ProcessedSamples:
    """Processed events of a simulation in wall-clock time, with the processed transactions of their purchases."""

    def __init__(self, seed: int = 7, users: int = 500, products: int = 200) -> None:
        self.simulation = Simulation(seed, users, products)
        self.references = load_references(self.simulation)
        self.lsn = 1_000_000

    def events(self, count: int, start: datetime | None = None, spacing_ms: float = 0.0) -> Iterator[dict[str, Any]]:
        """`count` processed_event records; event times from `start` (default now) `spacing_ms` apart."""
        start = start or datetime.now(UTC)
        for index in range(count):
            now = start + timedelta(milliseconds=index * spacing_ms) if spacing_ms else datetime.now(UTC)
            yield processed(self.simulation.next_event(now).to_record(), self.references, datetime.now(UTC))

    def events_with_transactions(self, count: int) -> Iterator[tuple[dict[str, Any], dict[str, Any] | None]]:
        """Events now, each with the processed_transaction of the purchase it made (or None)."""
        for _ in range(count):
            now = datetime.now(UTC)
            event = self.simulation.next_event(now)
            record = processed(event.to_record(), self.references, now)
            yield record, (self.transaction(event.transaction, now) if event.transaction is not None else None)

    def transaction(self, row: Any, changed_at: datetime, op: str = "c") -> dict[str, Any]:
        """The processed_transaction record of the OLTP row `row` changed by `op` at `changed_at`."""
        self.lsn += 1
        out = {name: getattr(row, name) for name in (f.name for f in dataclasses.fields(row))}
        for column in MONEY_COLUMNS:
            if out[column] is not None:
                out[column] = Decimal(out[column]).quantize(CENT)
        out.update(
            op=op,
            source_lsn=self.lsn,
            changed_at=changed_at,
            quality_flags=[],
            validated_at=changed_at,
            rules_version=RULES_VERSION,
        )
        return out


def processed_events(
    count: int, *, seed: int = 7, start: datetime = START, step: timedelta = timedelta(milliseconds=50)
) -> Iterator[tuple[bytes, dict[str, Any]]]:
    """(key, events.processed record) pairs, `step` apart in event time, keyed by user_id as the validator does."""
    simulation = Simulation(seed, n_users=2_000, n_products=500, start_time=start)
    references = load_references(simulation)
    for i in range(count):
        now = start + step * i
        raw = simulation.next_event(now).to_record()
        yield raw["user_id"].encode(), processed(raw, references, now)


def encoded_events(
    count: int, *, seed: int = 7, start: datetime = START, step: timedelta = timedelta(milliseconds=50)
) -> Iterator[tuple[bytes, bytes, dict[str, Any]]]:
    """(key, Avro payload, record) for `processed_events`."""
    serialize = AvroSerializer(SchemaRepository.load()["processed_event"])
    for key, record in processed_events(count, seed=seed, start=start, step=step):
        yield key, serialize(record), record


def processed_transactions(count: int, *, seed: int = 7, start: datetime = START) -> Iterator[dict[str, Any]]:
    """transactions.processed records: a life cycle of changes (c, u..., d) per transaction."""
    rng = random.Random(seed)
    lsn = 1_000
    made = 0
    while made < count:
        tid = str(uuid.UUID(int=rng.getrandbits(128)))
        price = Decimal(rng.randrange(100, 50_000)) / 100
        quantity = rng.randrange(1, 5)
        row: dict[str, Any] = {
            "transaction_id": tid,
            "user_id": str(uuid.UUID(int=rng.getrandbits(128))),
            "product_id": str(uuid.UUID(int=rng.getrandbits(128))),
            "quantity": quantity,
            "unit_price": price,
            "discount": Decimal("0.00"),
            "tax": (price * quantity * Decimal("0.19")).quantize(Decimal("0.01")),
            "total": (price * quantity * Decimal("1.19")).quantize(Decimal("0.01")),
            "payment_method": rng.choice(["card", "paypal", "invoice"]),
            "shipping_address": None,
            "status": "created",
            "created_at": start + timedelta(seconds=made),
            "updated_at": start + timedelta(seconds=made),
        }
        for op, status in (("c", "created"), ("u", "paid"), ("u", "shipped"), ("d", None)):
            if made >= count:
                break
            lsn += 1
            changed = start + timedelta(seconds=made)
            row = {**row, "status": status or row["status"], "updated_at": changed}
            yield {
                **row,
                "op": op,
                "source_lsn": lsn,
                "changed_at": changed,
                "quality_flags": [],
                "validated_at": changed,
                "rules_version": RULES_VERSION,
            }
            made += 1


def dead_letter(
    value: bytes | None, *, code: str = "OUT_OF_RANGE", offset: int = 0, now: datetime = START
) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]:
    """(key, value, headers) of a dead letter of `value` as the validator writes it."""
    original = OriginalMessage(
        "events.raw", 0, offset, b"user-key", value, [("traceparent", b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01")]
    )
    letter = build_dead_letter(
        original, code=code, stage=Stage.VALIDATE, message="amount < 0", now=now, rule="amount_not_negative"
    )
    return letter.key, letter.value, letter.headers
