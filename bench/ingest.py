"""Ingest API events/s (gRPC client -> `python -m services.ingest` -> Kafka, acknowledged) against bare
confluent-kafka producing the same Avro bytes to the same topic layout.

The requests (batches of BATCH events) are built before the clock starts, so the figure is the server's: door
checks, Avro encoding, produce, waiting for acks=all, answering. Several client threads keep calls in flight,
because one call waits for Kafka's acknowledgement before the next would be sent.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

from bench.generator import bare_produce_rate
from bench.harness import BenchContext, Result
from services.generator.model import Simulation
from services.ingest.client import IngestClient
from services.ingest.contract import SOURCE, record_to_event
from services.ingest.v1 import ingest_pb2 as pb
from services.kit.avro import AvroSerializer, SchemaRepository
from services.kit.kafka import count_messages, create_topics
from services.kit.metrics import LatencyRecorder
from services.testing.ingest import IngestProcess

BATCH = 500
CLIENT_THREADS = 4


def run(ctx: BenchContext) -> list[Result]:
    events = max(10_000, int(100_000 * ctx.scale)) // BATCH * BATCH
    bootstrap = ctx.env["KAFKA_BOOTSTRAP_SERVERS"]
    simulation = Simulation(7, 1000, 500)
    now = datetime.now(UTC)
    records = [simulation.next_event(now).to_record() | {"source": SOURCE} for _ in range(events)]

    serialize = AvroSerializer(SchemaRepository.load()["raw_event"])
    ceiling = bare_produce_rate(bootstrap, [(r["user_id"], serialize(r)) for r in records])

    requests = [
        pb.PublishEventsRequest(events=[record_to_event(r) for r in records[i : i + BATCH]])
        for i in range(0, events, BATCH)
    ]
    topic = f"bench.ingest.{int(time.time() * 1000)}"
    create_topics({"bootstrap.servers": bootstrap}, {topic: 16})  # like events.raw
    latency = LatencyRecorder()
    accepted = 0
    lock = threading.Lock()
    queue = list(reversed(requests))

    def client_loop(target: str) -> None:
        nonlocal accepted
        with IngestClient(target, max_attempts=20) as client:
            while True:
                with lock:
                    if not queue:
                        return
                    request = queue.pop()
                began = time.perf_counter()
                response = client.publish_request(request)
                latency.observe(time.perf_counter() - began)
                with lock:
                    accepted += response.accepted_count

    server = IngestProcess(
        ctx.env, topic=topic, log_path=ctx.work_dir / "ingest-bench.log", log_level="WARNING", max_batch_events=BATCH
    )
    with server:
        threads = [threading.Thread(target=client_loop, args=(server.target,)) for _ in range(CLIENT_THREADS)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
    if server.exit_code != 0:
        raise RuntimeError(f"ingest server exited with {server.exit_code}\n{server.log_tail()}")
    if accepted != events:
        raise RuntimeError(f"{accepted} of {events} events accepted")
    written = count_messages({"bootstrap.servers": bootstrap}, topic)
    if written != events:
        raise RuntimeError(f"{written} events in {topic}, expected {events}")
    p = latency.percentiles_ms() or {}
    return [
        Result(
            "ingest API events/s",
            round(events / elapsed),
            "events/s",
            round(ceiling),
            "bare confluent-kafka produce of the same Avro bytes",
            note=(
                f"{events} events, batches of {BATCH}, {CLIENT_THREADS} client threads, acks=all before each answer; "
                f"call latency p50 {p.get('p50')} ms, p99 {p.get('p99')} ms"
            ),
        )
    ]
