"""Locust load test of the ingest API: each simulated user publishes batches of events through `IngestClient`.

    INGEST_TARGET=127.0.0.1:50051 locust -f loadtest/locustfile.py --headless -u 16 -r 16 -t 60s --processes 4

Environment:
    INGEST_TARGET        host:port of the gRPC API (default 127.0.0.1:50051; `--host` overrides it)
    INGEST_BATCH         events per call (default 500)
    INGEST_CALLS_PER_S   per-user call rate; 0 (default) calls as fast as answers come back
    INGEST_MAX_ATTEMPTS  client attempts per call (default 1: backpressure shows up as failures, not as latency)

Each call is reported with `events.request.fire` as request type "grpc", name "PublishEvents xBATCH": requests/s
times BATCH is events/s. A call counts as failed if it raised (e.g. RESOURCE_EXHAUSTED) or any event in it was
rejected. Events are realistic (the generator's shop model) with fresh event ids and the current time per call,
built from a pool prepared at start so the load generator's own CPU goes into calls, not into making events.
"""

from __future__ import annotations

import os
import time
import uuid
from datetime import UTC, datetime

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()  # Locust runs users as gevent greenlets: gRPC must cooperate with gevent's loop

from google.protobuf.timestamp_pb2 import Timestamp  # noqa: E402
from locust import User, constant, constant_throughput, task  # noqa: E402

from services.generator.model import Simulation  # noqa: E402
from services.ingest.client import IngestClient, IngestError  # noqa: E402
from services.ingest.contract import record_to_event  # noqa: E402
from services.ingest.v1 import ingest_pb2 as pb  # noqa: E402

TARGET = os.environ.get("INGEST_TARGET", "127.0.0.1:50051")
BATCH = int(os.environ.get("INGEST_BATCH", "500"))
CALLS_PER_S = float(os.environ.get("INGEST_CALLS_PER_S", "0"))
MAX_ATTEMPTS = int(os.environ.get("INGEST_MAX_ATTEMPTS", "1"))
POOL_BATCHES = 4  # distinct batches per user, cycled; ids and times are refreshed before every call


class IngestUser(User):
    host = TARGET
    wait_time = constant_throughput(CALLS_PER_S) if CALLS_PER_S > 0 else constant(0)

    def on_start(self) -> None:
        self.client = IngestClient(self.host.removeprefix("grpc://"), max_attempts=MAX_ATTEMPTS)
        simulation = Simulation(uuid.uuid4().int % 2**31, 1000, 500)
        now = datetime.now(UTC)
        self.requests = [
            pb.PublishEventsRequest(
                events=[record_to_event(simulation.next_event(now).to_record()) for _ in range(BATCH)]
            )
            for _ in range(POOL_BATCHES)
        ]
        self.calls = 0

    def on_stop(self) -> None:
        self.client.close()

    @task
    def publish(self) -> None:
        request = self.requests[self.calls % POOL_BATCHES]
        self.calls += 1
        stamp = Timestamp()
        stamp.GetCurrentTime()
        for event in request.events:
            event.event_id = str(uuid.uuid4())  # a new event each time: downstream would deduplicate repeats
            event.event_time.CopyFrom(stamp)
        started = time.perf_counter()
        exception: Exception | None = None
        accepted = 0
        try:
            response = self.client.publish_request(request)
            accepted = response.accepted_count
            if response.rejected_count:
                first = next(r for r in response.results if r.status == pb.EventResult.REJECTED)
                exception = RuntimeError(f"{response.rejected_count} events rejected, e.g. {first.message}")
        except IngestError as error:
            exception = error
        self.environment.events.request.fire(
            request_type="grpc",
            name=f"PublishEvents x{BATCH}",
            response_time=(time.perf_counter() - started) * 1000,
            response_length=accepted,
            exception=exception,
            context={},
        )
