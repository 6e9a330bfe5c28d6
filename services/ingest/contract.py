"""The door of the ingest API: proto `Event` <-> raw_event record, and the per-event checks before Kafka.

Only what the Avro contract (schemas/avro/raw_event.avsc) and the door itself need is checked here: the
identifying fields are present, values are representable in the contract, the encoded event fits the size limit,
and an event_id appears once per batch. Business rules (known event types, positive prices, ...) are the
validator service's, downstream; duplicating them here would make two places to change.

The mapping is driven by the contract where it can be: the record template, the contract's own required
fields and its floating-point fields are read from the schema, so a contract change that the proto does not
follow shows up as SCHEMA_VIOLATION (and in the unit tests) rather than as silently wrong data.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from services.ingest.v1 import ingest_pb2 as pb
from services.kit.avro import AvroSerializer, Schema

SOURCE = "ingest-api"  # the contract's `source` for everything that came through this API
DOOR_REQUIRED = ("event_id", "event_type", "event_time")  # what the door needs to identify and order an event
KEY_FIELD = "user_id"  # Kafka key: one user's events stay in one partition, in order
TIME_FIELD = "event_time"
PROPERTIES_FIELD = "properties"
SERVER_SET_FIELDS = frozenset({"source"})  # contract fields the client cannot set

# google.protobuf.Timestamp's documented range: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59.999999999Z.
MIN_TIMESTAMP_SECONDS = -62_135_596_800
MAX_TIMESTAMP_SECONDS = 253_402_300_799

ACCEPTED = pb.EventResult.ACCEPTED
REJECTED = pb.EventResult.REJECTED
MISSING_FIELD = pb.EventResult.MISSING_FIELD
INVALID_VALUE = pb.EventResult.INVALID_VALUE
TOO_LARGE = pb.EventResult.TOO_LARGE
DUPLICATE_IN_BATCH = pb.EventResult.DUPLICATE_IN_BATCH
SCHEMA_VIOLATION = pb.EventResult.SCHEMA_VIOLATION

_EVENT_FIELDS = {field.name: field for field in pb.Event.DESCRIPTOR.fields}
_SCALAR_FIELDS = tuple(name for name in _EVENT_FIELDS if name not in (TIME_FIELD, PROPERTIES_FIELD))
_FASTAVRO_FIELD = re.compile(r"on field (\w+)")


def reason_name(code: int) -> str:
    return pb.EventResult.ReasonCode.Name(code)


class FieldProblem(Exception):
    """One field makes the event unacceptable; carries the reason code reported to the client."""

    def __init__(self, reason: int, field: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.field, self.message = reason, field, message


# --- proto -> record (server side) ----------------------------------------------------------------------------
def timestamp_to_millis(timestamp: Timestamp, field: str = TIME_FIELD) -> int:
    """Avro timestamp-millis of a Timestamp, floored to the millisecond; invalid Timestamps raise FieldProblem."""
    if not MIN_TIMESTAMP_SECONDS <= timestamp.seconds <= MAX_TIMESTAMP_SECONDS:
        raise FieldProblem(INVALID_VALUE, field, f"{field}: seconds {timestamp.seconds} outside years 1-9999")
    if not 0 <= timestamp.nanos <= 999_999_999:
        raise FieldProblem(INVALID_VALUE, field, f"{field}: nanos {timestamp.nanos} outside 0..999999999")
    return timestamp.seconds * 1000 + timestamp.nanos // 1_000_000


def contract_template(schema: Schema) -> dict[str, Any]:
    """Every contract field at its default (None where it has none), `source` set to this API."""
    template: dict[str, Any] = {}
    for field in schema.definition["fields"]:
        template[field["name"]] = field.get("default")
    template["source"] = SOURCE
    return template


def event_to_record(event: pb.Event, template: Mapping[str, Any]) -> dict[str, Any]:
    """The raw_event record of `event`: unset optional fields stay None (Avro null)."""
    record = dict(template)
    has = event.HasField
    # One HasField per optional field is faster than ListFields here, and exact for proto3 `optional`
    # (an explicitly set 0 or "" is present).
    for name in _SCALAR_FIELDS:
        if has(name):
            record[name] = getattr(event, name)
    if has(TIME_FIELD):
        record[TIME_FIELD] = timestamp_to_millis(event.event_time)
    properties = event.properties
    record[PROPERTIES_FIELD] = dict(properties) if properties else {}
    return record


# --- record -> proto (client side) ----------------------------------------------------------------------------
def to_timestamp(value: datetime | int | Timestamp) -> Timestamp:
    """A Timestamp from an aware datetime, epoch milliseconds (int) or a Timestamp."""
    if isinstance(value, Timestamp):
        return value
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("event_time is a naive datetime: give it a timezone (UTC)")
        stamp = Timestamp()
        stamp.FromDatetime(value.astimezone(UTC))
        return stamp
    if isinstance(value, int) and not isinstance(value, bool):
        stamp = Timestamp()
        stamp.FromMilliseconds(value)
        return stamp
    raise TypeError(f"event_time must be a datetime, epoch milliseconds or a Timestamp, not {type(value).__name__}")


def record_to_event(record: Mapping[str, Any]) -> pb.Event:
    """A proto Event from a dict in raw_event form (as `Simulation.next_event(...).to_record()` returns).

    None means unset; `source` is ignored (the server sets it); an unknown key raises ValueError, because a
    typo would otherwise silently drop a field.
    """
    event = pb.Event()
    for name, value in record.items():
        if value is None or name in SERVER_SET_FIELDS:
            continue
        if name == TIME_FIELD:
            event.event_time.CopyFrom(to_timestamp(value))
        elif name == PROPERTIES_FIELD:
            event.properties.update({str(k): str(v) for k, v in value.items()})
        elif name in _SCALAR_FIELDS:
            setattr(event, name, value)
        else:
            raise ValueError(f"unknown event field {name!r}; known: {sorted(_EVENT_FIELDS)}")
    return event


# --- the door ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Accepted:
    """An event that passed the door, ready to produce."""

    index: int
    event_id: str
    key: bytes | None
    payload: bytes


def _nullable(avro_type: Any) -> bool:
    return isinstance(avro_type, list) and "null" in avro_type


def _is_floating(avro_type: Any) -> bool:
    types = avro_type if isinstance(avro_type, list) else [avro_type]
    return any(t in ("double", "float") for t in types)


class EventGate:
    """Checks events against the contract and encodes the accepted ones (Avro single-object encoding)."""

    def __init__(self, schema: Schema, max_event_bytes: int) -> None:
        self.schema = schema
        self.max_event_bytes = max_event_bytes
        self.serialize = AvroSerializer(schema)
        self.template = contract_template(schema)
        fields = schema.definition["fields"]
        self.contract_required = tuple(
            f["name"] for f in fields if not _nullable(f["type"]) and "default" not in f and f["name"] != "source"
        )
        self.floating = tuple(f["name"] for f in fields if _is_floating(f["type"]))

    def check(self, event: pb.Event) -> tuple[dict[str, Any], bytes]:
        """The record and its encoded payload, or FieldProblem naming the first thing wrong."""
        record = event_to_record(event, self.template)
        for name in DOOR_REQUIRED:
            value = record.get(name)
            if value is None or (isinstance(value, str) and not value.strip()):
                raise FieldProblem(MISSING_FIELD, name, f"{name} is required")
        for name in self.contract_required:
            if record.get(name) is None:
                raise FieldProblem(MISSING_FIELD, name, f"{name} is required by the contract")
        for name in self.floating:
            value = record.get(name)
            if value is not None and not math.isfinite(value):
                raise FieldProblem(INVALID_VALUE, name, f"{name} must be a finite number, got {value}")
        try:
            payload = self.serialize(record)
        except (ValueError, TypeError, OverflowError) as error:  # fastavro's ways of saying "does not fit"
            found = _FASTAVRO_FIELD.search(str(error))
            raise FieldProblem(SCHEMA_VIOLATION, found.group(1) if found else "", str(error)) from None
        if len(payload) > self.max_event_bytes:
            raise FieldProblem(
                TOO_LARGE, "", f"event is {len(payload)} bytes as Avro; the limit is {self.max_event_bytes}"
            )
        return record, payload

    def check_batch(self, events: Sequence[pb.Event]) -> tuple[list[pb.EventResult], list[Accepted]]:
        """One result per event, in order, and the accepted events ready to produce.

        The first accepted event with a given event_id wins; later ones in the batch are DUPLICATE_IN_BATCH.
        An id whose first event was rejected for another reason does not block a later, good one.
        """
        results: list[pb.EventResult] = []
        accepted: list[Accepted] = []
        seen: set[str] = set()
        for index, event in enumerate(events):
            event_id = event.event_id
            try:
                record, payload = self.check(event)
                if event_id in seen:
                    raise FieldProblem(
                        DUPLICATE_IN_BATCH,
                        "event_id",
                        f"event_id {event_id[:100]!r} was already accepted in this batch",
                    )
            except FieldProblem as problem:
                results.append(
                    pb.EventResult(
                        index=index,
                        event_id=event_id,
                        status=REJECTED,
                        reason_code=problem.reason,
                        message=problem.message,
                        field=problem.field,
                    )
                )
                continue
            seen.add(event_id)
            key = record[KEY_FIELD]
            accepted.append(Accepted(index, event_id, key.encode() if key is not None else None, payload))
            results.append(pb.EventResult(index=index, event_id=event_id, status=ACCEPTED))
        return results, accepted
