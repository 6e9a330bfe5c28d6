"""Realistic processed records (what the validator writes), for the sink's tests and benchmark.

Events come from the generator's simulation, enriched by the validator's own code (`enrich_event`,
`processed_event`); transactions are the purchases' OLTP rows as `processed_transaction` records (op c).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from services.generator.model import Simulation
from services.validator.enrich import enrich_event
from services.validator.outputs import CENT, MONEY_COLUMNS, processed_event
from services.validator.references import ReferenceStore

RULES_VERSION = "samples"


class ProcessedSamples:
    def __init__(self, seed: int = 7, users: int = 500, products: int = 200) -> None:
        self.simulation = Simulation(seed, users, products)
        self.references = ReferenceStore()
        for user in self.simulation.users:
            self.references.put("users", dataclasses.asdict(user))
        for product in self.simulation.products:
            self.references.put("products", dataclasses.asdict(product))
        self.lsn = 1_000_000

    def events(self, count: int, start: datetime | None = None, spacing_ms: float = 0.0) -> Iterator[dict[str, Any]]:
        """`count` processed_event records; event times from `start` (default now) `spacing_ms` apart."""
        start = start or datetime.now(UTC)
        for index in range(count):
            now = start + timedelta(milliseconds=index * spacing_ms) if spacing_ms else datetime.now(UTC)
            event = self.simulation.next_event(now)
            yield processed_event(
                enrich_event(event.to_record(), self.references),
                quality_flags=[],
                validated_at=datetime.now(UTC),
                rules_version=RULES_VERSION,
            )

    def events_with_transactions(self, count: int) -> Iterator[tuple[dict[str, Any], dict[str, Any] | None]]:
        """Events now, each with the processed_transaction of the purchase it made (or None)."""
        for _ in range(count):
            now = datetime.now(UTC)
            event = self.simulation.next_event(now)
            record = processed_event(
                enrich_event(event.to_record(), self.references),
                quality_flags=[],
                validated_at=now,
                rules_version=RULES_VERSION,
            )
            yield record, (self.transaction(event.transaction, now) if event.transaction is not None else None)

    def transaction(self, row: Any, changed_at: datetime, op: str = "c") -> dict[str, Any]:
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
