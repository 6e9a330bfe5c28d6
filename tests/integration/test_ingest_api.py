"""The ingest API as a process (`python -m services.ingest`) against a real broker."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from confluent_kafka import Message

from services.generator.model import Simulation
from services.ingest.client import IngestClient, IngestError
from services.kit.avro import AvroDeserializer, Decoded, SchemaRepository
from services.kit.kafka import create_topics, scan_topic
from services.stack import LocalStack, StackSettings
from services.testing.ingest import IngestProcess

pytestmark = pytest.mark.integration

MAX_BATCH_EVENTS = 600


def new_topic(bootstrap: str, partitions: int = 4) -> str:
    name = f"test.ingest.{uuid.uuid4().hex[:8]}"
    create_topics({"bootstrap.servers": bootstrap}, {name: partitions})
    return name


def read_topic(bootstrap: str, topic: str) -> list[Message]:
    messages: list[Message] = []
    scan_topic({"bootstrap.servers": bootstrap}, topic, on_message=messages.append)
    return messages


def events(count: int, seed: int = 5) -> list[dict[str, Any]]:
    simulation = Simulation(seed, 200, 100)
    now = datetime.now(UTC)
    return [simulation.next_event(now).to_record() for _ in range(count)]


def metrics(http_port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as response:
        return response.read().decode()


@pytest.fixture(scope="module")
def served(stack, tmp_path_factory) -> Iterator[tuple[IngestProcess, str]]:
    topic = new_topic(stack.bootstrap_servers)
    log = tmp_path_factory.mktemp("ingest") / "ingest.log"
    server = IngestProcess(
        stack.env(),
        topic=topic,
        log_path=log,
        max_batch_events=MAX_BATCH_EVENTS,
        max_event_bytes=8192,
        max_request_bytes=2 * 1024 * 1024,
    ).start()
    try:
        yield server, topic
    finally:
        code = server.stop()
        assert code == 0, server.log_tail()


def test_good_batch_is_accepted_and_written_exactly_once_with_key_and_headers(stack, served):
    server, topic = served
    batch = events(500)
    with IngestClient(server.target) as client:
        results = client.publish(batch)
    assert [r.status for r in results] == ["ACCEPTED"] * 500
    assert [r.event_id for r in results] == [e["event_id"] for e in batch]

    sent = {e["event_id"]: e for e in batch}
    decode = AvroDeserializer(SchemaRepository.load(), "raw_event")
    seen: Counter[str] = Counter()
    for message in read_topic(stack.bootstrap_servers, topic):
        decoded = decode(message.value())
        assert isinstance(decoded, Decoded), decoded
        record = decoded.record
        if record["event_id"] not in sent:
            continue
        seen[record["event_id"]] += 1
        original = sent[record["event_id"]]
        assert message.key().decode() == original["user_id"]  # keyed by user: per-user order
        headers = dict(message.headers() or [])
        assert headers["producer"] == b"ingest-api"
        assert headers["traceparent"].startswith(b"00-")
        assert record["source"] == "ingest-api"
        assert record["event_type"] == original["event_type"]
        assert record["event_time"] == original["event_time"].replace(
            microsecond=original["event_time"].microsecond // 1000 * 1000
        )
        assert record["price"] == original["price"] and record["properties"] == original["properties"]
    assert set(seen) == set(sent) and set(seen.values()) == {1}, "every accepted event exactly once"


def test_bad_events_are_rejected_with_reasons_and_good_ones_in_the_batch_accepted(stack, served):
    server, topic = served
    batch = events(8, seed=9)
    batch[1]["event_id"] = None
    batch[2]["event_type"] = ""
    batch[3]["event_time"] = None
    batch[4]["amount"] = float("inf")
    batch[5]["event_id"] = batch[0]["event_id"]
    batch[6]["properties"] = {"blob": "x" * 9000}  # > MAX_EVENT_BYTES=8192 once encoded
    with IngestClient(server.target) as client:
        results = client.publish(batch)
    assert [(r.index, r.status, r.reason_code, r.field) for r in results] == [
        (0, "ACCEPTED", None, ""),
        (1, "REJECTED", "MISSING_FIELD", "event_id"),
        (2, "REJECTED", "MISSING_FIELD", "event_type"),
        (3, "REJECTED", "MISSING_FIELD", "event_time"),
        (4, "REJECTED", "INVALID_VALUE", "amount"),
        (5, "REJECTED", "DUPLICATE_IN_BATCH", "event_id"),
        (6, "REJECTED", "TOO_LARGE", ""),
        (7, "ACCEPTED", None, ""),
    ]
    assert all(r.message for r in results if not r.accepted)
    ids = Counter()
    decode = AvroDeserializer(SchemaRepository.load(), "raw_event")
    for message in read_topic(stack.bootstrap_servers, topic):
        ids[decode(message.value()).record["event_id"]] += 1  # type: ignore[union-attr]
    assert ids[batch[0]["event_id"]] == 1 and ids[batch[7]["event_id"]] == 1
    for rejected in (2, 3, 4, 6):
        assert ids[batch[rejected]["event_id"]] == 0

    text = metrics(server.http_port)
    assert 'lp_ingest_events_total{reason="MISSING_FIELD",status="rejected"} 3.0' in text
    assert 'lp_ingest_events_total{reason="TOO_LARGE",status="rejected"} 1.0' in text
    assert "lp_ingest_request_seconds_bucket" in text


def test_oversized_batch_and_request_are_refused_whole(served):
    server, _ = served
    with IngestClient(server.target, max_attempts=3) as client:
        with pytest.raises(IngestError) as too_many:
            client.publish(events(MAX_BATCH_EVENTS + 1))
        assert too_many.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "split it" in too_many.value.details
        huge = events(300)
        for event in huge:
            event["properties"] = {"blob": "y" * 7000}  # each event fits, the request (~2.1 MB) does not
        with pytest.raises(IngestError) as too_big:
            client.publish(huge)
        assert too_big.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert too_big.value.attempts == 1  # a message-size error is not retried


def test_health_is_serving_over_grpc_and_http(served):
    server, _ = served
    with IngestClient(server.target) as client:
        assert client.health() == "SERVING"
        assert client.health("lambda_pipeline.ingest.v1.IngestService") == "SERVING"
    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/readyz", timeout=5) as response:
        assert json.loads(response.read())["status"] == "ok"


def test_sigterm_drains_calls_in_progress_and_exits_zero(stack, tmp_path):
    topic = new_topic(stack.bootstrap_servers)
    server = IngestProcess(stack.env(), topic=topic, log_path=tmp_path / "ingest.log").start()
    accepted: list[str] = []
    failures: list[str] = []
    stop = threading.Event()

    def publish_until_stopped(seed: int) -> None:
        with IngestClient(server.target, max_attempts=1) as client:
            while not stop.is_set():
                batch = events(200, seed=seed)
                seed += 100
                try:
                    results = client.publish(batch)
                except IngestError as error:
                    failures.append(error.code.name)
                    return
                accepted.extend(r.event_id for r in results if r.accepted)

    workers = [threading.Thread(target=publish_until_stopped, args=(seed,)) for seed in (1, 2, 3)]
    for worker in workers:
        worker.start()
    time.sleep(1.5)
    try:
        assert accepted, f"nothing accepted before SIGTERM\n{server.log_tail()}"
        assert server.stop(timeout_s=30) == 0, server.log_tail()
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)
        server.kill()
    assert set(failures) <= {"UNAVAILABLE"}  # calls after SIGTERM are refused, never half-answered
    written = Counter()
    decode = AvroDeserializer(SchemaRepository.load(), "raw_event")
    for message in read_topic(stack.bootstrap_servers, topic):
        written[decode(message.value()).record["event_id"]] += 1  # type: ignore[union-attr]
    missing = [event_id for event_id in accepted if written[event_id] != 1]
    assert not missing, f"{len(missing)} ACCEPTED events not in the topic exactly once"
    assert "grpc server stopped" in server.log_tail()


def test_backpressure_when_the_broker_stalls_then_recovery(stack_state_dir: Path, tmp_path: Path):
    """SIGSTOP the broker: calls are refused with RESOURCE_EXHAUSTED quickly, memory stays flat; SIGCONT: accepted."""
    broker_only = LocalStack(StackSettings.with_free_ports(state_dir=stack_state_dir), only=["broker"])
    broker_only.start()
    server: IngestProcess | None = None
    broker_pid = broker_only.broker.pid
    assert broker_pid
    try:
        bootstrap = broker_only.bootstrap_servers
        topic = new_topic(bootstrap)
        server = IngestProcess(
            {"KAFKA_BOOTSTRAP_SERVERS": bootstrap},
            topic=topic,
            log_path=tmp_path / "ingest.log",
            max_pending=2000,
            ack_timeout_s=2,
            stall_after_s=1,
            retry_after_ms=100,
            kafka_delivery_timeout_s=120,
        ).start()
        process = psutil.Process(server.pid)
        with IngestClient(server.target, max_attempts=1) as client:
            assert all(r.accepted for r in client.publish(events(500, seed=20)))
            rss_before = process.memory_info().rss

            os.killpg(broker_pid, signal.SIGSTOP)
            # 8 concurrent calls of 500 events against MAX_PENDING=2000: at most 4 fit in the backlog (they are
            # produced and time out unacknowledged); the others are refused at once by the backlog limit.
            stalled = [events(500, seed=seed) for seed in range(100, 108)]
            outcomes: list[tuple[str, float, str]] = []

            def call(batch: list[dict[str, Any]]) -> None:
                began = time.monotonic()
                try:
                    client.publish(batch)
                    outcomes.append(("OK", time.monotonic() - began, ""))
                except IngestError as error:
                    outcomes.append((error.code.name, time.monotonic() - began, error.details))

            callers = [threading.Thread(target=call, args=(batch,)) for batch in stalled]
            for caller in callers:
                caller.start()
            for caller in callers:
                caller.join(30)
            by_code = Counter(code for code, _, _ in outcomes)
            assert by_code["OK"] == 0 and 1 <= by_code["UNAVAILABLE"] <= 4, outcomes
            assert by_code["RESOURCE_EXHAUSTED"] == 8 - by_code["UNAVAILABLE"], outcomes
            assert max(seconds for _, seconds, _ in outcomes) < 6, "answers come within ACK_TIMEOUT_S, no hang"
            assert all("limit is 2000" in d or "Kafka is slow" in d for c, _, d in outcomes if c != "UNAVAILABLE")

            refused_ids: set[str] = set()
            codes: Counter[str] = Counter()
            burst_started = time.monotonic()
            for seed in range(22, 62):  # 40 calls x 500 events = 20k events while Kafka is stalled
                batch = events(500, seed=seed)
                try:
                    client.publish(batch)
                    codes["OK"] += 1
                except IngestError as error:
                    codes[error.code.name] += 1
                    if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        refused_ids.update(e["event_id"] for e in batch)
            burst_s = time.monotonic() - burst_started
            assert codes == {"RESOURCE_EXHAUSTED": 40}, codes
            assert burst_s < 10, f"refusals must be quick, took {burst_s:.1f}s for 40 calls"
            text = metrics(server.http_port)
            backlog = next(
                float(line.split()[-1]) for line in text.splitlines() if line.startswith("lp_ingest_backlog_events ")
            )
            assert backlog <= 2000
            rss_growth_mb = (process.memory_info().rss - rss_before) / 1e6
            assert rss_growth_mb < 50, f"memory grew {rss_growth_mb:.0f} MB while refusing"

            os.killpg(broker_pid, signal.SIGCONT)
            with IngestClient(server.target, max_attempts=30, max_backoff_s=1.0) as patient:
                recovered = events(500, seed=99)
                assert all(r.accepted for r in patient.publish(recovered))

        assert server.stop() == 0, server.log_tail()
        written = Counter()
        decode = AvroDeserializer(SchemaRepository.load(), "raw_event")
        for message in read_topic(bootstrap, topic):
            written[decode(message.value()).record["event_id"]] += 1  # type: ignore[union-attr]
        assert not refused_ids & set(written), "a refused call wrote nothing"
        assert all(written[e["event_id"]] == 1 for e in recovered)
        # The timed-out calls' events were still delivered after the broker resumed (at most once each here).
        assert {written[e["event_id"]] for batch in stalled for e in batch} <= {0, 1}
    finally:
        with contextlib.suppress(ProcessLookupError):  # never leave a stopped broker behind
            os.killpg(broker_pid, signal.SIGCONT)
        if server is not None:
            server.kill()
        broker_only.stop()
