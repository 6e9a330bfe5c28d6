"""The gRPC servicer and the client in one process, with a fake producer: status codes, retries, tracing."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health
from opentelemetry.sdk.trace import TracerProvider

from services.ingest.app import RETRY_AFTER_KEY, IngestServicer, IngestSettings, build_grpc_server
from services.ingest.backlog import Backlog
from services.ingest.client import IngestClient, IngestError, retry_after_s
from services.ingest.contract import EventGate, record_to_event
from services.ingest.v1 import ingest_pb2 as pb
from services.ingest.v1 import ingest_pb2_grpc as pb_grpc
from services.kit.avro import SchemaRepository
from services.kit.tracing import extract_context, trace_id_of


class FakeMessage:
    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size


@dataclass
class FakeProducer:
    """Acknowledges at once ("ack"), fails ("fail") or holds reports until `release()` ("hold")."""

    mode: str = "ack"
    records: list[dict[str, Any]] = field(default_factory=list)
    held: list[tuple[Any, int]] = field(default_factory=list)

    def produce(self, topic: str, value: bytes, key=None, headers=None, on_delivery=None) -> None:
        self.records.append({"topic": topic, "value": value, "key": key, "headers": dict(headers or [])})
        if self.mode == "ack":
            on_delivery(None, FakeMessage(len(value)))
        elif self.mode == "fail":
            on_delivery("Local: Message timed out", FakeMessage(len(value)))
        else:
            self.held.append((on_delivery, len(value)))

    def release(self) -> None:
        held, self.held = self.held, []
        for callback, size in held:
            callback(None, FakeMessage(size))


@dataclass
class Harness:
    service: SimpleNamespace
    producer: FakeProducer
    target: str
    server: grpc.Server


def event(i: int, **overrides: Any) -> dict[str, Any]:
    return {
        "event_id": f"e-{i}",
        "event_type": "page_view",
        "event_time": datetime(2026, 1, 1, tzinfo=UTC),
        "user_id": f"u-{i % 3}",
        **overrides,
    }


@pytest.fixture
def harness() -> Iterator[Harness]:
    settings = IngestSettings(
        kafka_bootstrap_servers="unused:9092",
        grpc_port=0,
        grpc_bind_host="127.0.0.1",
        max_batch_events=5,
        max_pending=8,
        max_request_bytes=64 * 1024,
        ack_timeout_s=0.3,
        stall_after_s=30,
        retry_after_ms=50,
    )
    producer = FakeProducer()
    service = SimpleNamespace(
        settings=settings,
        tracer=TracerProvider().get_tracer("test-ingest"),
        accepting=True,
        backlog=Backlog(settings.max_pending, settings.max_pending_bytes, settings.stall_after_s),
        gate=EventGate(SchemaRepository.load()["raw_event"], settings.max_event_bytes),
        producer=producer,
        log=logging.getLogger("test-ingest"),
    )
    health_servicer = health.HealthServicer()
    server, port = build_grpc_server(settings, IngestServicer(service), health_servicer)  # type: ignore[arg-type]
    server.start()
    health_servicer.set("", 1)  # SERVING
    try:
        yield Harness(service, producer, f"127.0.0.1:{port}", server)
    finally:
        server.stop(0)


def test_good_batch_is_accepted_with_key_headers_and_joined_trace(harness):
    tracer = TracerProvider().get_tracer("test-client")
    with IngestClient(harness.target) as client, tracer.start_as_current_span("client") as span:
        results = client.publish([event(i) for i in range(5)])
        client_trace = f"{span.get_span_context().trace_id:032x}"
    assert [r.status for r in results] == ["ACCEPTED"] * 5
    assert [r.index for r in results] == list(range(5))
    records = harness.producer.records
    assert [r["key"] for r in records] == [b"u-0", b"u-1", b"u-2", b"u-0", b"u-1"]
    assert {r["topic"] for r in records} == {"events.raw"}
    headers = records[0]["headers"]
    assert headers["producer"] == b"ingest-api"
    assert trace_id_of(extract_context(list(headers.items()))) == client_trace  # the server span joined the trace


def test_mixed_batch_answers_per_event(harness):
    with IngestClient(harness.target) as client:
        batch = [event(0), event(1, event_type=None), event(2), event(2), event(4, price=float("nan"))]
        results = client.publish(batch)
    assert [(r.status, r.reason_code) for r in results] == [
        ("ACCEPTED", None),
        ("REJECTED", "MISSING_FIELD"),
        ("ACCEPTED", None),
        ("REJECTED", "DUPLICATE_IN_BATCH"),
        ("REJECTED", "INVALID_VALUE"),
    ]
    assert len(harness.producer.records) == 2


def test_too_many_events_is_invalid_argument_and_not_retried(harness):
    with IngestClient(harness.target) as client, pytest.raises(IngestError) as caught:
        client.publish([event(i) for i in range(6)])
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.attempts == 1
    assert "MAX_BATCH_EVENTS" in caught.value.details
    assert harness.producer.records == []


def test_oversized_request_is_refused_by_grpc_and_not_retried(harness):
    big = [event(i, properties={"blob": "x" * 20_000}) for i in range(5)]  # ~100 KB > 64 KiB
    with IngestClient(harness.target, max_attempts=5) as client, pytest.raises(IngestError) as caught:
        client.publish(big)
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert caught.value.attempts == 1
    assert harness.producer.records == []


def test_unacknowledged_events_time_out_then_backpressure_then_recovery(harness):
    harness.producer.mode = "hold"
    with IngestClient(harness.target, max_attempts=1) as client:
        with pytest.raises(IngestError) as timed_out:
            client.publish([event(i) for i in range(5)])
        assert timed_out.value.code == grpc.StatusCode.UNAVAILABLE
        assert "retrying is safe" in timed_out.value.details
        assert harness.service.backlog.events == 5  # still counted: librdkafka still holds them

        stub = pb_grpc.IngestServiceStub(grpc.insecure_channel(harness.target))
        request = pb.PublishEventsRequest(events=[record_to_event(event(i)) for i in range(10, 14)])
        with pytest.raises(grpc.RpcError) as refused:
            stub.PublishEvents(request, timeout=5)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit is 8" in refused.value.details()
        assert retry_after_s(refused.value) == 0.05
        assert dict(refused.value.trailing_metadata())[RETRY_AFTER_KEY] == "50"
        written = len(harness.producer.records)

        harness.producer.release()
        harness.producer.mode = "ack"
        response = stub.PublishEvents(request, timeout=5)
        assert response.accepted_count == 4
        assert len(harness.producer.records) == written + 4


def test_client_retries_backpressure_until_room_frees_up(harness):
    harness.producer.mode = "hold"
    harness.service.backlog.admit(8, 800)  # full: every call is refused until the release below
    backlog = harness.service.backlog

    def free_up() -> None:
        batch = next(iter(backlog._batches.values()))
        batch.abandon(8, 800)
        harness.producer.mode = "ack"

    timer = threading.Timer(0.3, free_up)
    timer.start()
    with IngestClient(harness.target, max_attempts=20, initial_backoff_s=0.02, max_backoff_s=0.1) as client:
        results = client.publish([event(i) for i in range(3)])
    timer.join()
    assert all(r.accepted for r in results)
    assert client.retries >= 1


def test_delivery_failure_is_unavailable(harness):
    harness.producer.mode = "fail"
    with (
        IngestClient(harness.target, max_attempts=2, initial_backoff_s=0.01) as client,
        pytest.raises(IngestError) as caught,
    ):
        client.publish([event(0)])
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert caught.value.attempts == 2
    assert "timed out" in caught.value.details
    assert harness.service.backlog.events == 0


def test_shutting_down_is_unavailable(harness):
    harness.service.accepting = False
    with IngestClient(harness.target, max_attempts=1) as client, pytest.raises(IngestError) as caught:
        client.publish([event(0)])
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


def test_health_and_empty_batch(harness):
    with IngestClient(harness.target) as client:
        assert client.health() == "SERVING"
        assert client.health("no.such.Service") == "SERVICE_UNKNOWN"
        assert client.publish([]) == []
    with IngestClient("127.0.0.1:1") as nowhere:
        assert nowhere.health(timeout_s=0.5) == "UNREACHABLE"


def test_backoff_is_bounded_and_honours_the_hint():
    client = IngestClient("127.0.0.1:1", initial_backoff_s=0.1, max_backoff_s=1.0)
    try:
        for attempt in range(1, 12):
            delay = client.backoff_s(attempt)
            assert 0 < delay <= 1.0
        assert 0.05 <= client.backoff_s(1) <= 0.1
        assert client.backoff_s(1, hint_s=0.5) == 0.5
        assert client.backoff_s(1, hint_s=30) == 1.0
    finally:
        client.close()


def test_settings_must_be_consistent():
    with pytest.raises(ValueError, match="MAX_BATCH_EVENTS"):
        IngestSettings(kafka_bootstrap_servers="x:1", max_batch_events=100, max_pending=10)


def test_a_bug_is_internal_and_leaks_nothing(harness):
    def broken(events):
        raise KeyError("oops")

    harness.service.gate.check_batch = broken
    with IngestClient(harness.target) as client, pytest.raises(IngestError) as caught:
        client.publish([event(0)])
    assert caught.value.code == grpc.StatusCode.INTERNAL
    assert caught.value.attempts == 1
    assert "oops" not in caught.value.details  # internals stay in the server log
