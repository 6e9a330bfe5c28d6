"""The generator service: synthetic shop traffic to Kafka (`events.raw`) and PostgreSQL (users, products,
transactions and their status changes).

Each loop turn produces the events that are due under the rate limit. A purchase's transaction is written to
PostgreSQL before its event reaches Kafka, so downstream enrichment usually finds it; a share of deliberately
bad events (see `bad_events`) exercises the dead-letter path. One trace span covers one loop turn's batch and
its context travels in every record's headers.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram
from pydantic import Field, field_validator

from services.contracts.headers import INJECTED_FAULT, PRODUCER
from services.contracts.topics import EVENTS_RAW
from services.generator.bad_events import BadEvent, BadEventGenerator
from services.generator.model import Simulation, StatusChange, Transaction
from services.generator.oltp import OltpWriter
from services.kit.avro import AvroSerializer, Schema, SchemaRepository
from services.kit.config import Dsn, ServiceSettings
from services.kit.dependencies import dsn_address, wait_for_tcp
from services.kit.kafka import KafkaProducer, client_config, require_topics
from services.kit.metrics import LATENCY_BUCKETS, STAGE_RECORDS_OUT
from services.kit.service import Service
from services.kit.tracing import (
    MAX_LINKS,
    TRACEPARENT,
    message_sampled,
    producer_span,
    traceparent,
    unsampled_headers,
)

EVENTS = Counter("lp_generator_events_total", "Events produced to Kafka", ["kind"])
OLTP_ROWS = Counter("lp_generator_oltp_rows_total", "Rows written to PostgreSQL", ["table", "op"])
PRODUCE_LATENCY = Histogram(
    "lp_generator_produce_latency_seconds", "produce() to broker acknowledgement", buckets=LATENCY_BUCKETS
)
PENDING = Gauge("lp_generator_pending_deliveries", "Records handed to the producer, not yet acknowledged")


class GeneratorSettings(ServiceSettings):
    service_name: str = "generator"
    postgres_dsn: Dsn = Field(..., description="PostgreSQL (OLTP) connection string.")
    events_topic: str = EVENTS_RAW
    events: int = Field(0, ge=0, description="Stop after this many events; 0 runs until SIGTERM.")
    rate: float = Field(1000.0, ge=0, description="Events per second; 0 = as fast as possible.")
    seed: int = Field(42, description="Same seed, same users, products, ids and event sequence.")
    users: int = Field(1000, ge=1)
    products: int = Field(500, ge=1)
    bad_event_share: float = Field(0.02, ge=0, le=1, description="Share of deliberately bad events.")
    simulated_start: datetime | None = Field(
        None, description="Fixed start of event time (ISO 8601); events then advance 1/RATE apart."
    )
    batch_max: int = Field(5000, ge=1, description="Most events produced per loop turn.")
    report_file: Path | None = Field(None, description="Write a JSON report here on exit.")

    @field_validator("simulated_start")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Generator(Service[GeneratorSettings]):
    def start(self) -> None:
        s = self.settings
        dsn = s.postgres_dsn.get_secret_value()
        if (address := dsn_address(dsn)) is not None:
            wait_for_tcp("POSTGRES_DSN", "{}:{}".format(*address), [address], s.dependency_wait_s)
        kafka = client_config(s)
        require_topics(kafka, s.events_topic, timeout=s.dependency_wait_s)
        schemas = SchemaRepository.load()
        self.serialize = AvroSerializer(schemas["raw_event"])
        self.rogue_serializers: dict[str, AvroSerializer] = {}
        self.producer = KafkaProducer(kafka)
        self.producer.stats.latency.histogram = PRODUCE_LATENCY
        self.producer.warm_up(s.events_topic)
        self.oltp = OltpWriter.connect(dsn)
        self.oltp.apply_schema()
        self.sim = Simulation(s.seed, s.users, s.products, start_time=s.simulated_start)
        self.bad = BadEventGenerator(s.seed, self.sim.users, self.sim.products, share=s.bad_event_share)
        self.oltp.upsert_users(self.sim.users)
        self.oltp.upsert_products(self.sim.products)
        OLTP_ROWS.labels("users", "upsert").inc(len(self.sim.users))
        OLTP_ROWS.labels("products", "upsert").inc(len(self.sim.products))
        self.produced = 0
        self.kinds: dict[str, int] = {}
        self.transactions_written = 0
        self.status_changes_written = 0
        self.started = time.monotonic()
        self.log.info(
            "generating",
            extra={"events": s.events or "unbounded", "rate": s.rate, "seed": s.seed, "topic": s.events_topic},
        )

    def _event_time(self, index: int) -> datetime:
        if self.settings.simulated_start is None:
            return datetime.now(UTC)
        spacing = 1.0 / self.settings.rate if self.settings.rate else 0.001
        return self.settings.simulated_start + timedelta(seconds=index * spacing)

    def _due(self) -> int:
        s = self.settings
        remaining = (s.events - self.produced) if s.events else s.batch_max
        if s.rate == 0:
            return min(remaining, s.batch_max)
        allowed = int((time.monotonic() - self.started) * s.rate) - self.produced
        return max(0, min(remaining, allowed, s.batch_max))

    def step(self) -> bool:
        s = self.settings
        if s.events and self.produced >= s.events:
            return False
        due = self._due()
        if due == 0:
            self.producer.poll(0.005)  # serve delivery callbacks while waiting for the next slot
            return True
        records: list[tuple[str | None, bytes, str | None, str | None]] = []  # key, value, event id, fault kind
        transactions: list[Transaction] = []
        for offset in range(due):
            now = self._event_time(self.produced + offset)
            bad = self.bad.maybe(now)
            if bad is not None:
                records.append((bad.key, self._encode_bad(bad), None, bad.kind))
                continue
            event = self.sim.next_event(now)
            self.bad.observe(event)
            if event.transaction is not None:
                transactions.append(event.transaction)
            records.append((event.key, self.serialize(event.to_record()), event.event_id, None))
        good = sum(1 for *_, fault in records if fault is None)
        self.kinds["good"] = self.kinds.get("good", 0) + good
        EVENTS.labels("good").inc(good)
        changes = self.sim.due_status_changes(self._event_time(self.produced + due))
        with self.tracer.start_as_current_span("generator.batch") as span:
            span.set_attribute("messaging.batch.message_count", len(records))
            self._write_oltp(transactions, changes)  # before the events: enrichment then finds the rows
            # Unsampled events share the batch's context, flag cleared; a sampled one gets its own send span.
            headers = [(PRODUCER, b"generator"), *unsampled_headers(span.get_span_context())]
            links = 0
            for key, value, event_id, fault in records:
                record_headers = headers
                send = None
                if message_sampled():
                    send = producer_span(self.tracer, s.events_topic, message_id=event_id)
                    record_headers = [(PRODUCER, b"generator"), (TRACEPARENT, traceparent(send.get_span_context()))]
                    if links < MAX_LINKS:
                        span.add_link(send.get_span_context())
                        links += 1
                # The fault header lets tests and the run summary tell injected faults apart; the validator
                # must never read it (it judges payloads, not labels).
                if fault is not None:
                    record_headers = [*record_headers, (INJECTED_FAULT, fault.encode())]
                self.producer.produce(s.events_topic, value, key=key, headers=record_headers)
                if send is not None:
                    send.end()
            self.producer.poll(0)
        self.produced += len(records)
        STAGE_RECORDS_OUT.labels("generator").inc(len(records))  # handed to the producer (faults included)
        PENDING.set(self.producer.pending())
        return True

    def _encode_bad(self, bad: BadEvent) -> bytes:
        EVENTS.labels(bad.kind).inc()
        self.kinds[bad.kind] = self.kinds.get(bad.kind, 0) + 1
        if bad.payload is not None:
            return bad.payload
        assert bad.record is not None
        if bad.writer_schema is None:
            return self.serialize(bad.record)
        serializer = self.rogue_serializers.get(bad.kind)
        if serializer is None:
            serializer = self.rogue_serializers[bad.kind] = AvroSerializer(
                Schema.from_definition(f"rogue_{bad.kind}", bad.writer_schema)
            )
        return serializer(bad.record)

    def _write_oltp(self, transactions: list[Transaction], changes: list[StatusChange]) -> None:
        self.oltp.write_batch(transactions, changes)  # one database transaction: a change never precedes its row
        if transactions:
            OLTP_ROWS.labels("transactions", "insert").inc(len(transactions))
            self.transactions_written += len(transactions)
        if changes:
            OLTP_ROWS.labels("transactions", "status_change").inc(len(changes))
            self.status_changes_written += len(changes)

    def stop(self) -> None:
        # After a start that failed half-way: close what it made, and report only a run that began.
        oltp = getattr(self, "oltp", None)
        try:
            if hasattr(self, "producer"):
                self.producer.flush(self.settings.shutdown_timeout_s)
            if hasattr(self, "started"):
                self._report()
        finally:
            if oltp is not None:
                oltp.close()

    def _report(self) -> None:
        elapsed = time.monotonic() - self.started
        report = {
            "events_produced": self.produced,
            "events_delivered": self.producer.stats.delivered,
            "events_by_kind": dict(sorted(self.kinds.items())),
            "transactions_written": self.transactions_written,
            "status_changes_written": self.status_changes_written,
            "users": len(self.sim.users),
            "products": len(self.sim.products),
            "duration_s": round(elapsed, 3),
            "events_per_s": round(self.produced / elapsed, 1) if elapsed else None,
            "produce_latency_ms": self.producer.stats.latency.percentiles_ms(),
        }
        self.log.info("finished", extra=report)
        if self.settings.report_file:
            self.settings.report_file.parent.mkdir(parents=True, exist_ok=True)
            self.settings.report_file.write_text(json.dumps(report, indent=2))
