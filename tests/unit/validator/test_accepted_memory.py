"""The duplicate memory rebuilt from what was accepted: a processor that read back the processed records of
another (the one before a restart) judges their copies duplicates, case-changed ids included, with the rule's
semantics (the first wins, the window in event time)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest

from services.contracts.deadletter import parse_dead_letter
from services.kit.avro import AvroSerializer, SchemaRepository
from services.validator.processor import ValidatorProcessor
from services.validator.recovery import accepted_partitions
from services.validator.references import ReferenceStore
from services.validator.rulebook import DEFAULT_RULES_DIR, RuleBook
from services.validator.runtime import Record, accepted_memory


@pytest.fixture(scope="module")
def schemas() -> SchemaRepository:
    return SchemaRepository.load()


def new_processor(schemas: SchemaRepository, references: ReferenceStore) -> ValidatorProcessor:
    return ValidatorProcessor(
        RuleBook(DEFAULT_RULES_DIR, reference_tables=("users", "products")), schemas, references=references
    )


def raw(schemas: SchemaRepository, known: SimpleNamespace, offset: int, **overrides: object) -> Record:
    value = AvroSerializer(schemas["raw_event"])(known.event(**overrides))
    return Record("events.raw", 0, offset, known.user_id.encode(), value)


def test_a_copy_of_an_event_accepted_before_a_restart_is_a_duplicate(
    schemas: SchemaRepository, references: ReferenceStore, known: SimpleNamespace
) -> None:
    now = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=20)
    before = new_processor(schemas, references)
    (accepted,) = before([raw(schemas, known, 1, event_time=now)])
    assert accepted.topic == "events.processed"

    after = new_processor(schemas, references)  # the restarted worker: empty memory until it reads back
    memory = accepted_memory(after.process)
    assert memory is not None
    assert memory.sources == {"events.raw": "events.processed", "events.raw.retry": "events.processed"}
    assert memory.window_s == 15 * 60 and memory.max_records == after.engine.dedupe.max_entries
    assert memory.remember([accepted.value, b"not avro", None]) == 1  # what does not decode is skipped

    event_id = known.event()["event_id"]
    for offset, copy_id in ((2, event_id), (3, event_id.upper())):
        (output,) = after([raw(schemas, known, offset, event_id=copy_id, event_time=now, amount=1.0)])
        dead = parse_dead_letter(output.key, output.value, output.headers)
        assert (output.topic, dead.error_code, dead.rule) == ("events.raw.dlq", "DUPLICATE", "event_id_unique")
    # a copy beyond the window (event time) is not one, as for a memory this process filled itself
    (late,) = after([raw(schemas, known, 4, event_time=now + timedelta(minutes=16))])
    assert late.topic == "events.processed"


def test_the_first_accepted_wins_over_a_read_back_copy(
    schemas: SchemaRepository, references: ReferenceStore, known: SimpleNamespace
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    first = new_processor(schemas, references)
    (early,) = first([raw(schemas, known, 1, event_time=now - timedelta(minutes=20))])
    other = new_processor(schemas, references)
    (later,) = other([raw(schemas, known, 1, event_time=now - timedelta(minutes=10))])
    after = new_processor(schemas, references)
    assert after.remember_accepted([early.value, later.value]) == 2
    # the entry keeps the first copy's expiry (20 min ago + 15 min): a copy 3 minutes ago is no duplicate (the
    # later copy's expiry, 5 minutes from now, would have made it one)
    (output,) = after([raw(schemas, known, 2, event_time=now - timedelta(minutes=3))])
    assert output.topic == "events.processed"


def test_a_processor_without_a_duplicate_rule_offers_no_memory(
    schemas: SchemaRepository, references: ReferenceStore, rules_dir
) -> None:
    book = RuleBook(
        rules_dir(events="rules:\n  - {id: id_present, type: MANDATORY, applies_to: [event], fields: [event_id]}\n")
    )
    assert accepted_memory(ValidatorProcessor(book, schemas, references=references)) is None
    assert accepted_memory(lambda batch: []) is None


def test_accepted_partitions_follow_the_key_partitioning() -> None:
    sources = {"events.raw": "events.processed", "events.raw.retry": "events.processed"}
    inputs = [("events.raw", 3), ("events.raw.retry", 3), ("cdc.postgres.users", 0)]
    counts = {"events.raw": 16, "events.raw.retry": 16, "events.processed": 16}
    assert accepted_partitions(inputs, sources, counts) == [("events.processed", 3)]
    # other partition counts: an input partition's events may be in any output partition
    counts = {"events.raw": 8, "events.raw.retry": 16, "events.processed": 16}
    assert accepted_partitions(inputs[:1], sources, counts) == [("events.processed", p) for p in range(16)]
    assert accepted_partitions(inputs, sources, {"events.raw": 16}) == []  # no output topic: nothing to read
