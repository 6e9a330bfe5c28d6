"""Realistic records of the archived contracts, for tests and benchmarks (no Kafka, no stack needed).

Processed events are made the way the validator makes them: generator events, enriched against the
simulation's users and products (`enrich_event`), shaped by `outputs.processed_event`, Avro-encoded.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from services.archiver.committer import TableCommitter
from services.archiver.rows import AvroRowBuilder, RecordColumns
from services.archiver.schemas import arrow_schema
from services.contracts.deadletter import OriginalMessage, Stage, build_dead_letter
from services.generator.model import Simulation
from services.kit.avro import AvroSerializer, SchemaRepository
from services.validator.enrich import enrich_event
from services.validator.outputs import processed_event
from services.validator.references import ReferenceStore

if TYPE_CHECKING:
    from pyiceberg.table import Table

START = datetime(2026, 11, 2, 8, tzinfo=UTC)


def _references(simulation: Simulation) -> ReferenceStore:
    from services.validator.bench import load_references

    return load_references(simulation)


def processed_events(
    count: int, *, seed: int = 7, start: datetime = START, step: timedelta = timedelta(milliseconds=50)
) -> Iterator[tuple[bytes, dict[str, Any]]]:
    """(key, events.processed record) pairs, `step` apart in event time, keyed by user_id as the validator does."""
    simulation = Simulation(seed, n_users=2_000, n_products=500, start_time=start)
    references = _references(simulation)
    for i in range(count):
        now = start + step * i
        raw = simulation.next_event(now).to_record()
        record = processed_event(
            enrich_event(raw, references), quality_flags=[], validated_at=now, rules_version="samples"
        )
        yield raw["user_id"].encode(), record


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
                "rules_version": "samples",
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


def commit_samples(
    table: Table,
    repository: SchemaRepository,
    payloads: Sequence[bytes],
    commits: int,
    per_commit: int,
    committer: TableCommitter | None = None,
    topic: str = "events.processed",
) -> TableCommitter:
    """Commit `commits` snapshots of `per_commit` processed events each into `table` (an archiver's user_events),
    from partition 0 of `topic`, continuing at the committer's stored offset; `payloads` are cycled."""
    builder = AvroRowBuilder(repository, "processed_event", arrow_schema(table.schema()))
    committer = committer or TableCommitter(table)
    committer.claim([(topic, 0)])
    start = committer.expected[(topic, 0)] or 0
    for n in range(commits):
        columns = RecordColumns()
        for offset in range(start + n * per_commit, start + (n + 1) * per_commit):
            columns.append(topic, 0, offset, None, None, payloads[offset % len(payloads)], None)
        rows, _ = builder.build(columns)
        committer.add(rows, columns.consumed())
        committer.commit()
    return committer
