"""The benchmark's quix-streams peer does the validator's work: same verdicts, same processed_event bytes' content.

Fed the same CDC envelopes and raw events as `ValidatorProcessor` (the service's processor), the peer's plain
Python rules must accept and refuse the same events for the same rule and write the same processed_event (bar
`validated_at` and `rules_version`), else the benchmark would compare different work. Late references differ by
design: the service retries them, the peer dead-letters them.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from bench.validator_peer import PROCESSED_HEADER, EventValidator, encode_processed
from services.contracts.headers import DLQ_RULE, DLQ_STAGE
from services.contracts.topics import EVENTS_PROCESSED, EVENTS_RAW, EVENTS_RAW_RETRY
from services.generator.model import Simulation
from services.kit.avro import AvroDeserializer, AvroSerializer, Decoded, SchemaRepository
from services.validator.cdc import make_envelope
from services.validator.processor import ValidatorProcessor
from services.validator.rulebook import RuleBook
from services.validator.runtime import Record

NOW = datetime.now(UTC)


@pytest.fixture(scope="module")
def simulation() -> Simulation:
    return Simulation(5, 200, 100, start_time=NOW - timedelta(minutes=10))


def changes(simulation: Simulation) -> list[tuple[str, bytes, bytes]]:
    """(table, key, envelope) as the benchmark seeds cdc.postgres.users and .products."""
    found = []
    for user in simulation.users:
        row = {k: v for k, v in asdict(user).items() if k != "shipping_address"}
        envelope = make_envelope("r", "users", after=row, ts_ms=1)
        found.append(("users", json.dumps({"user_id": user.user_id}).encode(), json.dumps(envelope).encode()))
    for product in simulation.products:
        envelope = make_envelope("r", "products", after=asdict(product), ts_ms=1)
        key = json.dumps({"product_id": product.product_id}).encode()
        found.append(("products", key, json.dumps(envelope, default=str).encode()))
    return found


def raw_events(simulation: Simulation) -> list[dict[str, Any]]:
    """Generator events, then one of each way to fail a rule or be flagged."""
    records = [simulation.next_event(NOW).to_record() for _ in range(400)]
    purchase = next(r for r in records if r["event_type"] == "purchase")
    viewed = next(r for r in records if r["event_type"] == "product_view")

    def variant(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
        return {**base, "event_id": str(uuid.uuid4()), **changes}

    return [
        *records,
        records[0],  # a duplicate
        variant(records[1], user_id=None),
        variant(records[1], event_id="not-a-uuid"),
        variant(records[1], session_id="{" + str(uuid.uuid4()) + "}"),
        variant(records[1], user_id=records[1]["user_id"].upper(), event_id=str(uuid.uuid4()).upper()),
        variant(records[1], event_type="teleport"),
        variant(purchase, amount=-1.0),
        variant(purchase, price=-0.5),
        variant(purchase, quantity=0),
        variant(purchase, quantity=1001),
        variant(purchase, transaction_id=None),
        variant(viewed, product_id=None),
        variant(records[1], event_time=NOW + timedelta(hours=1)),
        variant(records[1], device_type="fridge", ip_address="999.1.1.1", country="usa"),
        variant(records[1], properties={"contact_email": " Someone@Example.com ", "plan": "gold"}),
        variant(records[1], user_id=str(uuid.uuid4())),
        variant(viewed, product_id=str(uuid.uuid4())),
    ]


def test_the_peer_judges_and_enriches_like_the_service(simulation: Simulation) -> None:
    schemas = SchemaRepository.load()
    service = ValidatorProcessor(RuleBook(), schemas)
    peer = EventValidator()
    for table, key, envelope in changes(simulation):
        service.references.apply_envelope(table, key, envelope)
        apply = peer.apply_user_change if table == "users" else peer.apply_product_change
        apply(json.loads(envelope))
    serialize = AvroSerializer(schemas["raw_event"])
    payloads = [serialize(record) for record in raw_events(simulation)] + [b"\xc3\x01garbage"]
    read_processed = AvroDeserializer(schemas, "processed_event")

    routes: dict[str, int] = {}
    for offset, payload in enumerate(payloads):
        (out,) = service([Record(EVENTS_RAW, 0, offset, b"k", payload)])
        verdict = peer.judge(payload)
        if out.topic == EVENTS_PROCESSED:
            routes["processed"] = routes.get("processed", 0) + 1
            assert "record" in verdict, verdict.get("reason")
            ours = encode_processed(verdict["record"])
            assert ours[:10] == out.value[:10] == PROCESSED_HEADER
            service_record, peer_record = read_processed(out.value), read_processed(ours)
            assert isinstance(service_record, Decoded) and isinstance(peer_record, Decoded)
            for name in ("validated_at", "rules_version"):
                del service_record.record[name], peer_record.record[name]
            assert peer_record.record == service_record.record
        elif out.topic == EVENTS_RAW_RETRY:  # a late reference: retried by the service, dead-lettered by the peer
            routes["late"] = routes.get("late", 0) + 1
            assert verdict["rule"] in ("user_exists", "product_exists")
        else:
            routes["dead"] = routes.get("dead", 0) + 1
            headers = dict(out.headers)
            expected = headers[DLQ_RULE].decode() or headers[DLQ_STAGE].decode()
            assert verdict.get("rule") == expected, (verdict.get("reason"), headers)
            assert verdict["raw"] == payload
    assert routes == {"processed": 400 + 3, "dead": 13, "late": 2}


def test_the_duplicate_window_is_fifteen_minutes_of_event_time(simulation: Simulation) -> None:
    peer = EventValidator()
    for table, _key, envelope in changes(simulation):
        (peer.apply_user_change if table == "users" else peer.apply_product_change)(json.loads(envelope))
    serialize = AvroSerializer(SchemaRepository.load()["raw_event"])
    first = {**simulation.next_event(NOW).to_record(), "event_time": NOW - timedelta(minutes=30)}
    assert "record" in peer.judge(serialize(first))
    within = {**first, "event_time": first["event_time"] + timedelta(minutes=14)}
    assert peer.judge(serialize(within))["rule"] == "event_id_unique"
    after = {**first, "event_time": first["event_time"] + timedelta(minutes=16)}
    assert "record" in peer.judge(serialize(after))
