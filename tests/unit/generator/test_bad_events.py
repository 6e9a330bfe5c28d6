"""Tests of the deliberately bad events that feed the dead-letter path."""

from __future__ import annotations

import io
import math
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import fastavro
import pytest
from fastavro.schema import load_schema, parse_schema
from fastavro.validation import validate

from services.generator.bad_events import (
    BAD_KINDS,
    DEFAULT_KIND_WEIGHTS,
    BadEvent,
    BadEventGenerator,
    load_raw_event_schema,
)
from services.generator.model import Simulation

SCHEMA_PATH = Path(__file__).resolve().parents[3] / "schemas" / "avro" / "raw_event.avsc"
NOW = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


def within(observed: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(observed - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


@pytest.fixture(scope="module")
def schema() -> dict:
    return load_schema(str(SCHEMA_PATH))


@pytest.fixture()
def sim() -> Simulation:
    return Simulation(seed=5, n_users=200, n_products=50, start_time=NOW)


def generator_with_history(sim: Simulation, seed: int = 5, **kwargs) -> BadEventGenerator:
    generator = BadEventGenerator(seed, sim.users, sim.products, **kwargs)
    for i in range(50):
        generator.observe(sim.next_event(NOW + i * timedelta(milliseconds=10)))
    return generator


def encode(schema: dict, record: dict) -> bytes:
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, schema, record)
    return buffer.getvalue()


def test_share_of_bad_events(sim: Simulation) -> None:
    generator = generator_with_history(sim, share=0.02)
    n = 100_000
    bad = sum(generator.maybe(NOW) is not None for _ in range(n))
    assert within(bad, n, 0.02)


def test_kind_mix_follows_weights(sim: Simulation) -> None:
    generator = generator_with_history(sim)
    n = 20_000
    kinds = Counter(generator.make(NOW).kind for _ in range(n))
    total = sum(DEFAULT_KIND_WEIGHTS.values())
    assert set(kinds) == set(BAD_KINDS)
    for kind, weight in DEFAULT_KIND_WEIGHTS.items():
        assert within(kinds[kind], n, weight / total), kind


def test_custom_weights_and_validation(sim: Simulation) -> None:
    only_two = BadEventGenerator(1, sim.users, sim.products, kind_weights={"garbage_bytes": 1, "null_ids": 0})
    assert {only_two.make(NOW).kind for _ in range(200)} == {"garbage_bytes"}
    with pytest.raises(ValueError, match="unknown bad-event kinds"):
        BadEventGenerator(1, sim.users, sim.products, kind_weights={"typo": 1})
    with pytest.raises(ValueError):
        BadEventGenerator(1, sim.users, sim.products, share=1.5)
    assert BadEventGenerator(1, sim.users, sim.products, share=0.0).maybe(NOW) is None


def test_lenient_kinds_still_match_the_real_schema_but_are_wrong(sim: Simulation, schema: dict) -> None:
    generator = generator_with_history(sim)
    user_ids = set(sim.user_by_id)
    for _ in range(200):
        for kind in ("null_ids", "negative_amount", "unknown_user", "future_timestamp", "duplicate"):
            bad = generator.make(NOW, kind)
            assert bad.kind == kind and bad.payload is None and bad.writer_schema is None
            record = bad.record
            assert record is not None
            validate(record, schema, raise_errors=True)  # decodes fine: the validator must catch it
            assert bad.key == record["user_id"]
            if kind == "null_ids":
                assert record["event_id"] is None or record["user_id"] is None
            elif kind == "negative_amount":
                assert record["event_type"] == "purchase" and record["amount"] < 0
            elif kind == "unknown_user":
                assert record["user_id"] not in user_ids
            elif kind == "future_timestamp":
                assert record["event_time"] > NOW + timedelta(days=1)


def test_duplicate_resends_an_observed_event_unchanged(sim: Simulation) -> None:
    generator = BadEventGenerator(3, sim.users, sim.products)
    assert generator.make(NOW, "duplicate").kind == "null_ids"  # nothing observed yet
    observed = {}
    for i in range(20):
        event = sim.next_event(NOW + i * timedelta(seconds=1))
        generator.observe(event)
        observed[event.event_id] = event.to_record()
    for _ in range(50):
        bad = generator.make(NOW + timedelta(minutes=5), "duplicate")
        assert bad.record == observed[bad.record["event_id"]]


def test_wrong_types_need_the_rogue_writer_schema(sim: Simulation, schema: dict) -> None:
    generator = generator_with_history(sim)
    bad = generator.make(NOW, "wrong_types")
    assert isinstance(bad.record["quantity"], str) and isinstance(bad.record["price"], str)
    assert bad.writer_schema is not None
    real = load_raw_event_schema()
    assert (bad.writer_schema["name"], bad.writer_schema["namespace"]) == (real["name"], real["namespace"])
    assert not validate(bad.record, schema, raise_errors=False)
    with pytest.raises((ValueError, TypeError)):
        encode(schema, bad.record)
    rogue = parse_schema(bad.writer_schema)
    payload = encode(rogue, bad.record)
    assert fastavro.schemaless_reader(io.BytesIO(payload), rogue, rogue) == bad.record
    # The consumer's reader schema cannot resolve it: the record is only readable with the rogue writer schema.
    with pytest.raises(fastavro.read.SchemaResolutionError):
        fastavro.schemaless_reader(io.BytesIO(payload), rogue, schema)


def test_garbage_bytes_never_decode(sim: Simulation, schema: dict) -> None:
    generator = generator_with_history(sim)
    for _ in range(500):
        bad = generator.make(NOW, "garbage_bytes")
        assert bad.record is None and bad.writer_schema is None
        assert isinstance(bad.payload, bytes) and len(bad.payload) >= 9
        with pytest.raises(Exception):  # noqa: B017 - any decoding failure will do
            fastavro.schemaless_reader(io.BytesIO(bad.payload), schema, schema)


def test_same_seed_gives_identical_bad_events() -> None:
    def sequence(seed: int) -> list[BadEvent]:
        sim = Simulation(seed=9, n_users=100, n_products=30)
        generator = generator_with_history(sim, seed=seed, share=0.5)
        return [b for i in range(400) if (b := generator.maybe(NOW + i * timedelta(seconds=1))) is not None]

    first = sequence(1)
    assert first == sequence(1)
    assert first != sequence(2)


def test_bad_events_leave_the_simulation_untouched() -> None:
    with_bad = Simulation(seed=4, n_users=100, n_products=30)
    clean = Simulation(seed=4, n_users=100, n_products=30)
    generator = BadEventGenerator(4, with_bad.users, with_bad.products, share=0.3)
    real_transactions: set[str] = set()
    bad_transaction_ids: set[str] = set()
    for i in range(3000):
        now = NOW + i * timedelta(milliseconds=100)
        if (bad := generator.maybe(now)) is not None:
            if bad.kind != "duplicate" and bad.record and bad.record["transaction_id"]:
                bad_transaction_ids.add(bad.record["transaction_id"])
            continue
        event = with_bad.next_event(now)
        generator.observe(event)
        if event.transaction:
            real_transactions.add(event.transaction.transaction_id)
        assert event.to_record() == clean.next_event(now).to_record()
    assert with_bad.transactions_created == clean.transactions_created == len(real_transactions)
    # A bad purchase names a transaction that exists nowhere (it never reaches PostgreSQL).
    assert bad_transaction_ids and bad_transaction_ids.isdisjoint(real_transactions)
