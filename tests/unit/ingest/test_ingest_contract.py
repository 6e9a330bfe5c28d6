"""The door: proto Event <-> raw_event record, and the per-event checks with their reason codes."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from services.generator.model import Simulation
from services.ingest import contract
from services.ingest.contract import EventGate, FieldProblem, event_to_record, record_to_event, timestamp_to_millis
from services.ingest.v1 import ingest_pb2 as pb
from services.kit.avro import AvroDeserializer, Decoded, Schema, SchemaRepository
from services.kit.paths import avro_schema_dir

R = pb.EventResult
T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
T0_MS = int(datetime(2026, 3, 1, 12, 0, 0, 123000, tzinfo=UTC).timestamp() * 1000)


@pytest.fixture(scope="module")
def repo() -> SchemaRepository:
    return SchemaRepository.load()


@pytest.fixture(scope="module")
def gate(repo) -> EventGate:
    return EventGate(repo["raw_event"], max_event_bytes=4096)


def good(**overrides) -> dict:
    record = {
        "event_id": "0b3f9a56-2c0c-4a6e-9a8e-6f1f1f1f1f1f",
        "event_type": "purchase",
        "event_time": T0,
        "user_id": "user-1",
        "session_id": "session-1",
        "product_id": "product-1",
        "transaction_id": "tx-1",
        "quantity": 2,
        "price": 9.99,
        "amount": 19.98,
        "search_query": None,
        "page_url": "/checkout",
        "referrer": "https://example.com/",
        "device_type": "mobile",
        "ip_address": "10.0.0.1",
        "country": "DE",
        "properties": {"campaign": "spring"},
    }
    record.update(overrides)
    return record


def check_one(gate: EventGate, event: pb.Event) -> pb.EventResult:
    results, _ = gate.check_batch([event])
    return results[0]


# --- the mapping ------------------------------------------------------------------------------------------------
def test_proto_event_mirrors_the_avro_contract_field_by_field():
    """Every contract field but the server-set `source` has a proto field of a matching type, and no more."""
    definition = json.loads((avro_schema_dir() / "raw_event.avsc").read_text())
    avro = {f["name"]: f["type"] for f in definition["fields"]}
    proto = {f.name: f for f in pb.Event.DESCRIPTOR.fields}
    assert set(proto) == set(avro) - contract.SERVER_SET_FIELDS
    expected_proto_type = {"string": "string", "int": "int32", "double": "double"}
    for name, avro_type in avro.items():
        if name in contract.SERVER_SET_FIELDS:
            continue
        field = proto[name]
        if name == contract.TIME_FIELD:
            assert avro_type == ["null", {"type": "long", "logicalType": "timestamp-millis"}]
            assert field.message_type.full_name == "google.protobuf.Timestamp"
        elif name == contract.PROPERTIES_FIELD:
            assert avro_type == {"type": "map", "values": "string"}
            assert field.message_type.GetOptions().map_entry
        else:
            assert isinstance(avro_type, list) and avro_type[0] == "null", f"{name} is nullable in the contract"
            proto_type = {9: "string", 5: "int32", 1: "double"}[field.type]
            assert proto_type == expected_proto_type[avro_type[1]], name
            assert field.has_presence, f"{name} must be proto3 optional (nullable in the contract)"


def test_record_round_trips_through_the_proto(gate):
    record = event_to_record(record_to_event(good()), gate.template)
    assert record == {**good(), "event_time": T0_MS, "source": "ingest-api"}


def test_unset_fields_become_avro_nulls_and_zero_values_stay_set(gate):
    event = record_to_event(good(quantity=0, price=0.0, referrer="", properties={}, user_id=None))
    record = event_to_record(event, gate.template)
    assert record["quantity"] == 0 and record["price"] == 0.0 and record["referrer"] == ""
    assert record["user_id"] is None and record["search_query"] is None
    assert record["properties"] == {}


def test_source_is_always_the_ingest_api(gate):
    record = event_to_record(record_to_event(good(source="generator")), gate.template)
    assert record["source"] == "ingest-api"


def test_event_time_forms_and_millisecond_truncation():
    assert timestamp_to_millis(record_to_event(good(event_time=T0)).event_time) == T0_MS
    assert timestamp_to_millis(record_to_event(good(event_time=T0_MS)).event_time) == T0_MS
    stamp = Timestamp(seconds=-1, nanos=999_999_999)  # 1969-12-31T23:59:59.999999999: floor, not towards zero
    assert timestamp_to_millis(stamp) == -1
    with pytest.raises(ValueError, match="naive"):
        record_to_event(good(event_time=datetime(2026, 1, 1)))
    with pytest.raises(TypeError):
        record_to_event(good(event_time="2026-01-01"))


def test_client_conversion_refuses_unknown_fields_and_wrong_types():
    with pytest.raises(ValueError, match="unknown event field 'evnt_type'"):
        record_to_event({"evnt_type": "search"})
    with pytest.raises(TypeError):
        record_to_event(good(quantity="2"))


def test_generator_events_convert_and_pass(gate):
    simulation = Simulation(3, 50, 20)
    events = [record_to_event(simulation.next_event(T0).to_record()) for _ in range(200)]
    results, accepted = gate.check_batch(events)
    assert all(r.status == R.ACCEPTED for r in results)
    assert len(accepted) == 200


def test_accepted_payload_decodes_as_the_contract_with_key(repo, gate):
    results, accepted = gate.check_batch([record_to_event(good())])
    assert results[0] == pb.EventResult(index=0, event_id=good()["event_id"], status=R.ACCEPTED)
    decoded = AvroDeserializer(repo, "raw_event")(accepted[0].payload)
    assert isinstance(decoded, Decoded)
    assert decoded.record["event_time"] == datetime(2026, 3, 1, 12, 0, 0, 123000, tzinfo=UTC)
    assert decoded.record["source"] == "ingest-api"
    assert accepted[0].key == b"user-1"
    _, accepted = gate.check_batch([record_to_event(good(user_id=None))])
    assert accepted[0].key is None  # the contract allows it; the validator decides downstream


# --- rejections, one per reason ---------------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["event_id", "event_type", "event_time"])
def test_door_required_fields_missing(gate, field):
    result = check_one(gate, record_to_event(good(**{field: None})))
    assert (result.status, result.reason_code, result.field) == (R.REJECTED, R.MISSING_FIELD, field)


@pytest.mark.parametrize("field", ["event_id", "event_type"])
def test_blank_identifiers_count_as_missing(gate, field):
    result = check_one(gate, record_to_event(good(**{field: "  "})))
    assert (result.reason_code, result.field) == (R.MISSING_FIELD, field)


@pytest.mark.parametrize("field", ["price", "amount"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_measures_are_invalid(gate, field, value):
    result = check_one(gate, record_to_event(good(**{field: value})))
    assert (result.reason_code, result.field) == (R.INVALID_VALUE, field)


@pytest.mark.parametrize(
    "stamp", [Timestamp(seconds=253_402_300_800), Timestamp(seconds=-62_135_596_801), Timestamp(seconds=0, nanos=-1)]
)
def test_timestamps_outside_the_proto_range_are_invalid(gate, stamp):
    event = record_to_event(good())
    event.event_time.CopyFrom(stamp)
    result = check_one(gate, event)
    assert (result.reason_code, result.field) == (R.INVALID_VALUE, "event_time")


def test_business_rules_are_left_to_the_validator(gate):
    """Unknown event type, negative price, odd ids: well-formed for the contract, so accepted here."""
    event = record_to_event(good(event_type="teleport", price=-5.0, quantity=-3, event_id="not-a-uuid", country="??"))
    assert check_one(gate, event).status == R.ACCEPTED


def test_too_large(gate):
    result = check_one(gate, record_to_event(good(properties={"blob": "x" * 5000})))
    assert result.reason_code == R.TOO_LARGE
    assert "4096" in result.message


def test_first_accepted_event_id_wins_in_a_batch(gate):
    first, again, fixed = good(event_id="a"), good(event_id="a"), good(event_id="b")
    broken_b = good(event_id="b", event_type=None)
    results, accepted = gate.check_batch([record_to_event(e) for e in (first, broken_b, again, fixed)])
    assert [(r.index, r.status, r.reason_code) for r in results] == [
        (0, R.ACCEPTED, 0),
        (1, R.REJECTED, R.MISSING_FIELD),
        (2, R.REJECTED, R.DUPLICATE_IN_BATCH),
        (3, R.ACCEPTED, 0),  # the earlier "b" was rejected, so this one is not a duplicate
    ]
    assert [a.index for a in accepted] == [0, 3]


def test_results_keep_request_order_with_mixed_events(gate):
    events = [record_to_event(good(event_id=str(i), event_type=None if i % 3 == 0 else "search")) for i in range(9)]
    results, accepted = gate.check_batch(events)
    assert [r.index for r in results] == list(range(9))
    assert [r.event_id for r in results] == [str(i) for i in range(9)]
    assert [r.status for r in results].count(R.REJECTED) == 3
    assert len(accepted) == 6


def test_a_contract_the_mapping_does_not_fit_is_a_schema_violation():
    """If the contract changes type under the proto (here: quantity becomes a string), nothing wrong is written."""
    definition = json.loads((avro_schema_dir() / "raw_event.avsc").read_text())
    for field in definition["fields"]:
        if field["name"] == "quantity":
            field["type"] = ["null", "string"]
    gate = EventGate(Schema.from_definition("raw_event", definition), max_event_bytes=4096)
    result = check_one(gate, record_to_event(good(quantity=3)))
    assert (result.reason_code, result.field) == (R.SCHEMA_VIOLATION, "quantity")


def test_a_contract_required_field_is_enforced():
    definition = json.loads((avro_schema_dir() / "raw_event.avsc").read_text())
    for field in definition["fields"]:
        if field["name"] == "session_id":
            field["type"] = "string"
            del field["default"]
    gate = EventGate(Schema.from_definition("raw_event", definition), max_event_bytes=4096)
    assert gate.contract_required == ("session_id",)
    result = check_one(gate, record_to_event(good(session_id=None)))
    assert (result.reason_code, result.field) == (R.MISSING_FIELD, "session_id")


def test_field_problem_carries_reason():
    problem = FieldProblem(R.TOO_LARGE, "", "too big")
    assert contract.reason_name(problem.reason) == "TOO_LARGE"
