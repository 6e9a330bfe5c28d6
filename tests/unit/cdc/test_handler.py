"""The batch handler: what each Kafka record carries, and that a failed flush fails the batch."""

from __future__ import annotations

import json
from typing import Any

import pytest

from services.cdc.app import CdcPlan, CdcService
from services.cdc.preflight import PreflightReport
from services.cdc.settings import CdcSettings
from services.contracts.headers import CDC_LSN, CDC_OP
from services.kit.kafka import DeliveryFailed, DeliveryStats


class FakeProducer:
    def __init__(self, fail_flush: bool = False) -> None:
        self.produced: list[dict[str, Any]] = []
        self.flushes = 0
        self.fail_flush = fail_flush
        self.stats = DeliveryStats()

    def produce(self, topic: str, value: bytes | None, key: Any = None, headers: Any = None) -> None:
        self.produced.append({"topic": topic, "value": value, "key": key, "headers": dict(headers or [])})

    def flush(self, timeout: float = 30.0) -> None:
        self.flushes += 1
        if self.fail_flush:
            raise DeliveryFailed("1 records failed delivery; last error: broker down")


def service(producer: FakeProducer) -> CdcService:
    settings = CdcSettings(kafka_bootstrap_servers="k:9092", postgres_dsn="postgresql://u@h/d")  # type: ignore[call-arg]
    plan = CdcPlan(
        properties={"slot.name": "lp_cdc", "publication.name": "lp_cdc"},
        topics={"public.users": "cdc.postgres.users"},
        heartbeat_topic="cdc.heartbeat",
        preflight=PreflightReport(),
    )
    cdc = CdcService(settings, plan)
    cdc.producer = producer  # type: ignore[assignment]
    return cdc


def envelope(op: str, lsn: int, snapshot: str = "false") -> str:
    row = {"user_id": "u1", "tier": "gold"}
    return json.dumps(
        {
            "before": None if op in ("c", "r") else row,
            "after": None if op == "d" else row,
            "source": {"lsn": lsn, "table": "users", "snapshot": snapshot, "txId": 7, "ts_ms": 1},
            "op": op,
            "ts_ms": 2,
        }
    )


KEY = '{"user_id":"u1"}'


def test_records_carry_lsn_op_and_trace_headers_and_are_flushed_before_returning() -> None:
    producer = FakeProducer()
    cdc = service(producer)
    cdc.handle_batch(
        [
            ("cdc.postgres.users", KEY, envelope("r", 100, snapshot="last")),
            ("cdc.heartbeat", '{"serverName":"cdc"}', '{"ts_ms":5}'),
            ("cdc.postgres.users", KEY, envelope("u", 200)),
            ("cdc.postgres.users", KEY, envelope("d", 300)),
        ]
    )
    cdc.handle_batch([("cdc.postgres.users", KEY, None)])  # the tombstone can come in the next batch
    assert producer.flushes == 2
    users = [p for p in producer.produced if p["topic"] == "cdc.postgres.users"]
    assert [(p["headers"][CDC_OP], p["headers"][CDC_LSN]) for p in users] == [
        (b"r", b"100"),
        (b"u", b"200"),
        (b"d", b"300"),
        (b"tombstone", b"300"),  # same LSN as its delete
    ]
    assert all(p["key"] == KEY for p in users)
    assert all("traceparent" in p["headers"] for p in producer.produced)
    assert users[-1]["value"] is None
    (heartbeat,) = [p for p in producer.produced if p["topic"] == "cdc.heartbeat"]
    assert CDC_LSN not in heartbeat["headers"]
    assert cdc.counts == {("users", "r"): 1, ("users", "u"): 1, ("users", "d"): 1, ("users", "tombstone"): 1}
    assert cdc.heartbeats == 1 and cdc.last_lsn == 300 and cdc.streaming
    report = cdc.report()
    assert report["events"] == 3 and report["tombstones"] == 1
    assert report["events_by_table"] == {"users": {"d": 1, "r": 1, "tombstone": 1, "u": 1}}


def test_snapshot_in_progress_is_not_streaming() -> None:
    cdc = service(FakeProducer())
    cdc.handle_batch([("cdc.postgres.users", KEY, envelope("r", 100, snapshot="first"))])
    assert not cdc.streaming


def test_a_heartbeat_means_streaming_even_after_an_empty_snapshot() -> None:
    cdc = service(FakeProducer())
    cdc.handle_batch([("cdc.heartbeat", '{"serverName":"cdc"}', '{"ts_ms":5}')])
    assert cdc.streaming and not cdc.counts


def test_a_failed_flush_fails_the_batch() -> None:
    cdc = service(FakeProducer(fail_flush=True))
    with pytest.raises(DeliveryFailed):
        cdc.handle_batch([("cdc.postgres.users", KEY, envelope("c", 100))])
    assert not cdc.counts  # nothing counted as delivered
