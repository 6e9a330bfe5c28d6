"""A writer schema from the schema store: a store that cannot be read is a retry of the batch, never a dead letter."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.generator.model import Simulation
from services.kit.avro import AvroSerializer, Schema, SchemaRepository, SchemaStoreUnavailable, WriterSchema
from services.testing.samples import load_references
from services.validator.processor import SCHEMA_STORE, ValidatorProcessor
from services.validator.rulebook import RuleBook
from services.validator.runtime import Output, Record, RetryBatchLater, prepare_hook, run_processor

START = datetime(2026, 3, 2, 9, tzinfo=UTC)


def raw_event_v2() -> Schema:
    """raw_event plus an optional field: what a producer one version ahead of this consumer writes."""
    definition = dict(SchemaRepository.load()["raw_event"].definition)
    definition["fields"] = [*definition["fields"], {"name": "campaign", "type": ["null", "string"], "default": None}]
    return Schema.from_definition("raw_event", definition)


class FlakyStore:
    """A resolver whose store is down until `up` is set; counts the lookups."""

    def __init__(self, known: Schema) -> None:
        self.known, self.up, self.calls = known, False, 0

    def __call__(self, fingerprint: int) -> WriterSchema | None:
        self.calls += 1
        if not self.up:
            raise SchemaStoreUnavailable("schema store down")
        return WriterSchema(self.known.name, self.known.definition) if fingerprint == self.known.fingerprint else None


@pytest.fixture
def setup() -> tuple[ValidatorProcessor, FlakyStore, list[Record]]:
    v2 = raw_event_v2()
    store = FlakyStore(v2)
    simulation = Simulation(seed=5, n_users=50, n_products=20, start_time=START)
    processor = ValidatorProcessor(
        RuleBook(), SchemaRepository.load(resolver=store), references=load_references(simulation)
    )
    encode = AvroSerializer(v2)
    records = []
    for offset in range(5):
        event = simulation.next_event(START)
        records.append(
            Record("events.raw", 0, offset, (event.key or "").encode(), encode({**event.to_record(), "campaign": "x"}))
        )
    return processor, store, records


def test_a_store_outage_is_a_retry_of_the_whole_batch_then_every_v2_event_is_processed(setup) -> None:
    processor, store, records = setup
    prepare = prepare_hook(processor.process)
    assert prepare is not None
    with pytest.raises(RetryBatchLater) as raised:
        prepare(records)
    assert raised.value.dependency == SCHEMA_STORE
    with pytest.raises(RetryBatchLater):  # had the runtime no prepare hook: still a retry, no dead letter
        run_processor(processor, records)
    store.up = True
    prepare(records)
    result = run_processor(processor, records)
    assert result.dead_letters == 0 and not result.batch_failed
    assert [o.topic for o in result.outputs] == ["events.processed"] * len(records)
    assert store.calls == 3  # two refusals, then one lookup: the writer is cached for the rest


def test_payloads_of_the_current_schema_never_ask_the_store(setup) -> None:
    processor, store, _ = setup
    simulation = Simulation(seed=6, n_users=5, n_products=5, start_time=START)
    current = AvroSerializer(SchemaRepository.load()["raw_event"])
    event = simulation.next_event(START)
    batch = [Record("events.raw", 0, 0, None, current(event.to_record())), Record("events.raw", 0, 1, None, b"junk")]
    processor.prepare(batch)
    assert store.calls == 0


def test_run_processor_never_dead_letters_a_retry_even_on_the_record_by_record_path() -> None:
    def process(batch: list[Record]) -> list[Output]:
        if len(batch) > 1:
            raise ValueError("one bad record somewhere")
        raise RetryBatchLater(SCHEMA_STORE, "down")

    with pytest.raises(RetryBatchLater):
        run_processor(process, [Record("events.raw", 0, i, None, b"x") for i in range(3)])


def test_the_resolver_can_be_turned_off() -> None:
    from services.contracts.schema_store import StoreWriterResolver, writer_resolver
    from services.kit.config import load_settings
    from services.validator.processor import ValidatorSettings

    on = load_settings(ValidatorSettings, kafka_bootstrap_servers="localhost:9092")
    assert isinstance(writer_resolver(on), StoreWriterResolver)
    off = load_settings(ValidatorSettings, kafka_bootstrap_servers="localhost:9092", schema_store_resolve=False)
    assert writer_resolver(off) is None
