"""Throughput of the validator core in one process: `python -m services.testing.validator_bench [--events N]`.

Measures, on the generator's traffic (seeded, 2 % bad events), records per second for
validate + enrich + build the output dict (the brief's target: >= 30k/s), and for the whole pure path
including Avro decode and encode (`EventProcessor.process`). No Kafka involved.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from services.contracts.deadletter import OriginalMessage
from services.generator.bad_events import BadEventGenerator
from services.generator.model import Simulation
from services.kit.avro import AvroDeserializer, AvroSerializer, Decoded, Schema, SchemaRepository
from services.testing.samples import load_references
from services.validator.dedupe import DedupeStore
from services.validator.engine import RuleEngine
from services.validator.enrich import enrich_event
from services.validator.outputs import processed_event
from services.validator.pipeline import EventProcessor
from services.validator.rulebook import RuleBook

START = datetime(2026, 1, 5, 12, tzinfo=UTC)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--products", type=int, default=2_000)
    args = parser.parse_args(argv)

    simulation = Simulation(seed=1, n_users=args.users, n_products=args.products, start_time=START)
    bad = BadEventGenerator(1, simulation.users, simulation.products, share=0.02)
    schemas = SchemaRepository.load()
    serialize = AvroSerializer(schemas["raw_event"])
    rogue = AvroSerializer(Schema.from_definition("rogue", bad.rogue_schema))
    payloads: list[tuple[datetime, bytes]] = []
    for i in range(args.events):
        now = START + timedelta(milliseconds=i)
        event = bad.maybe(now)
        if event is None:
            good = simulation.next_event(now)
            bad.observe(good)
            payloads.append((now, serialize(good.to_record())))
        elif event.payload is not None:
            payloads.append((now, event.payload))
        else:
            assert event.record is not None
            payloads.append((now, (rogue if event.writer_schema else serialize)(event.record)))
    decode = AvroDeserializer(schemas, "raw_event")
    decoded_records = [(now, d.record) for now, p in payloads if isinstance(d := decode(p), Decoded)]

    def timed(prepare: Callable[[], Callable[[], int]]) -> tuple[float, float]:
        """(records/s by CPU time, by wall time) of the work `prepare` returns; CPU time is the figure that
        holds on a shared machine. Loading the references is set-up: CDC feeds them continuously."""
        work = prepare()
        wall, cpu = time.perf_counter(), time.process_time()
        count = work()
        return count / (time.process_time() - cpu), count / (time.perf_counter() - wall)

    def core() -> Callable[[], int]:
        references = load_references(simulation)
        engine = RuleEngine(RuleBook(reference_tables=references.table_names), references, DedupeStore())

        def work() -> int:
            for now, record in decoded_records:
                verdict = engine.evaluate(record, "event", now=now)
                if verdict.ok:
                    processed_event(
                        enrich_event(record, references),
                        quality_flags=verdict.flags,
                        validated_at=now,
                        rules_version=verdict.rules_version,
                    )
            return len(decoded_records)

        return work

    def full() -> Callable[[], int]:
        references = load_references(simulation)
        clock_now = [START]
        engine = RuleEngine(
            RuleBook(reference_tables=references.table_names), references, DedupeStore(), lambda: clock_now[0]
        )
        processor = EventProcessor(engine, schemas)

        def work() -> int:
            for offset, (now, payload) in enumerate(payloads):
                clock_now[0] = now
                processor.process(OriginalMessage("events.raw", 0, offset, None, payload))
            return len(payloads)

        return work

    print(f"{len(payloads)} messages, {len(decoded_records)} decodable, {args.users} users, {args.products} products")
    for name, prepare in (("validate + enrich + build output dict", core), ("decode + all + encode (process)", full)):
        runs = [timed(prepare) for _ in range(args.repeat)]
        cpu, wall = max(r[0] for r in runs), max(r[1] for r in runs)
        print(f"{name:40s} {cpu:10,.0f} records/s CPU time   {wall:10,.0f} records/s wall time")


if __name__ == "__main__":
    main()
