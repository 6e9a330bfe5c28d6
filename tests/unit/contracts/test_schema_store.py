"""The consumers' writer-schema resolver over the schema store, and the kit decoder asking it (no broker: the store
read is a function here; tests/integration/test_operator.py reads the real topic)."""

from __future__ import annotations

from typing import Any

import pytest

from services.contracts.schema_store import SchemaStoreError, SchemaVersion, StoreWriterResolver
from services.kit.avro import AvroDeserializer, AvroSerializer, DecodeError, DecodeErrorCode, Schema, SchemaRepository

V1 = {"type": "record", "name": "Order", "fields": [{"name": "id", "type": "string"}]}
V2 = {**V1, "fields": [*V1["fields"], {"name": "note", "type": "string", "default": ""}]}


def version(subject: str, number: int, definition: dict[str, Any]) -> SchemaVersion:
    fingerprint = f"{Schema.from_definition(subject, definition).fingerprint:016x}"
    return SchemaVersion(subject, number, definition, fingerprint, "BACKWARD", "2026-01-01T00:00:00Z")


class Store:
    def __init__(self, *versions: SchemaVersion) -> None:
        self.history: dict[str, list[SchemaVersion]] = {}
        for item in versions:
            self.history.setdefault(item.subject, []).append(item)
        self.down = False
        self.reads = 0

    def __call__(self) -> dict[str, list[SchemaVersion]]:
        self.reads += 1
        if self.down:
            raise SchemaStoreError("cannot reach Kafka")
        return self.history


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def resolver(store: Store, clock: Clock, **options: Any) -> StoreWriterResolver:
    return StoreWriterResolver({}, reader=store, clock=clock, sleep=clock.sleep, **options)


def test_an_unknown_writer_is_resolved_from_the_store_and_decoded_with_the_reader_schema() -> None:
    v1, v2 = Schema.from_definition("orders", V1), Schema.from_definition("orders", V2)
    store, clock = Store(version("orders", 1, V1), version("orders", 2, V2)), Clock()
    decode = AvroDeserializer(SchemaRepository([v1], resolver=resolver(store, clock)), "orders")
    for index in range(3):
        result = decode(AvroSerializer(v2)({"id": f"o{index}", "note": "x"}))
        assert not isinstance(result, DecodeError), result
        assert result.record == {"id": f"o{index}"} and result.writer.fingerprint == v2.fingerprint
    assert store.reads == 1  # cached after the first


def test_a_store_outage_raises_instead_of_dead_lettering() -> None:
    v1, v2 = Schema.from_definition("orders", V1), Schema.from_definition("orders", V2)
    store, clock = Store(version("orders", 2, V2)), Clock()
    store.down = True
    decode = AvroDeserializer(SchemaRepository([v1], resolver=resolver(store, clock)), "orders")
    payload = AvroSerializer(v2)({"id": "o", "note": "x"})
    with pytest.raises(SchemaStoreError):
        decode(payload)
    store.down = False
    clock.now += 5
    assert not isinstance(decode(payload), DecodeError)  # the retry succeeds


def test_unknown_fingerprints_are_dead_letters_without_hammering_the_store() -> None:
    v1 = Schema.from_definition("orders", V1)
    store, clock = Store(version("orders", 1, V1)), Clock()
    decode = AvroDeserializer(SchemaRepository([v1], resolver=resolver(store, clock, negative_ttl_s=30)), "orders")
    stranger = Schema.from_definition("orders", {**V1, "name": "Stranger"})
    payload = AvroSerializer(stranger)({"id": "o"})
    for _ in range(5):
        result = decode(payload)
        assert isinstance(result, DecodeError) and result.code is DecodeErrorCode.UNKNOWN_SCHEMA
    assert store.reads == 1
    clock.now += 31
    decode(payload)
    assert store.reads == 2  # asked again once the negative entry expired


def test_reads_are_spaced_and_a_version_registered_since_the_last_read_is_found() -> None:
    v2 = Schema.from_definition("orders", V2)
    store, clock = Store(version("orders", 1, V1)), Clock()
    lookup = resolver(store, clock, min_read_interval_s=1.0)
    assert lookup(v2.fingerprint) is None
    store.history["orders"].append(version("orders", 2, V2))
    assert lookup(v2.fingerprint) is None  # negative entry: still within its TTL
    other = Schema.from_definition("payments", {**V1, "name": "Payment"})
    store.history["payments"] = [version("payments", 1, other.definition)]
    before = clock.now
    found = lookup(other.fingerprint)
    assert found is not None and found.subject == "payments"
    assert clock.now - before <= 1.0 and store.reads == 2


def test_the_cache_is_bounded() -> None:
    definitions = [{**V1, "name": f"R{index}"} for index in range(10)]
    store, clock = Store(*(version("s", index + 1, d) for index, d in enumerate(definitions))), Clock()
    lookup = resolver(store, clock, max_entries=3)
    assert lookup(Schema.from_definition("s", definitions[9]).fingerprint) is not None
    assert len(lookup) == 3


def test_a_record_that_does_not_hash_to_its_fingerprint_is_not_trusted() -> None:
    v1 = Schema.from_definition("orders", V1)
    forged = SchemaVersion("orders", 2, V2, f"{v1.fingerprint + 1:016x}", "BACKWARD", "")
    repository = SchemaRepository([v1], resolver=resolver(Store(forged), Clock()))
    assert repository.writer(v1.fingerprint + 1) is None
