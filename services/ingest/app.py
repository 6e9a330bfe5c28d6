"""The ingest service: the external gRPC API (proto/lambda_pipeline/ingest/v1/ingest.proto) in front of `events.raw`.

Threads: gRPC handlers check a batch at the door (`contract.EventGate`), reserve room in the backlog, produce the
accepted events and wait for their delivery reports; the service's main loop polls the producer, which runs those
reports, and keeps the gRPC health status in step with readiness. A request is answered only after Kafka
acknowledged every accepted event of it (acks=all), so ACCEPTED means durable; when Kafka is slow or the backlog
is full, requests are refused with RESOURCE_EXHAUSTED before anything is written, so memory stays bounded.

On SIGTERM: health goes NOT_SERVING, new calls are refused, calls in progress get their acknowledgements (the
main thread keeps polling), the producer is flushed, exit 0.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import Counter, Gauge, Histogram
from pydantic import Field, model_validator

from services.contracts.headers import PRODUCER
from services.contracts.topics import EVENTS_RAW
from services.ingest.backlog import Backlog, Backpressure
from services.ingest.contract import SOURCE, EventGate, reason_name
from services.ingest.v1 import ingest_pb2 as pb
from services.ingest.v1 import ingest_pb2_grpc as pb_grpc
from services.kit.avro import SchemaRepository
from services.kit.config import BindHost, BindPort, ServiceSettings
from services.kit.kafka import DeliveryFailed, KafkaProducer, client_config, require_topics
from services.kit.metrics import LATENCY_BUCKETS, STAGE_ERRORS, STAGE_RECORDS_IN, STAGE_RECORDS_OUT
from services.kit.service import Service
from services.kit.tracing import TRACEPARENT, message_sampled, producer_span, traceparent, unsampled_headers

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["IngestService"].full_name  # lambda_pipeline.ingest.v1.IngestService
RETRY_AFTER_KEY = "retry-after-ms"  # trailing metadata on RESOURCE_EXHAUSTED: how long the client should wait
TRACE_METADATA = ("traceparent", "tracestate")
REQUEST_BUCKETS = (*LATENCY_BUCKETS[:-1], 60)

EVENTS = Counter("lp_ingest_events_total", "Events answered, by status and rejection reason", ["status", "reason"])
REQUESTS = Counter("lp_ingest_requests_total", "PublishEvents calls by gRPC status code", ["code"])
REQUEST_LATENCY = Histogram(
    "lp_ingest_request_seconds", "PublishEvents from receipt to answer", ["code"], buckets=REQUEST_BUCKETS
)
PRODUCE_LATENCY = Histogram(
    "lp_ingest_produce_latency_seconds", "produce() to broker acknowledgement", buckets=LATENCY_BUCKETS
)
BACKLOG_EVENTS = Gauge("lp_ingest_backlog_events", "Accepted events handed to Kafka, not yet acknowledged")
BACKLOG_BYTES = Gauge("lp_ingest_backlog_bytes", "Bytes of accepted events handed to Kafka, not yet acknowledged")
OLDEST_PENDING = Gauge("lp_ingest_oldest_pending_seconds", "Age of the oldest unacknowledged batch")


class IngestSettings(ServiceSettings):
    service_name: str = "ingest"
    grpc_port: BindPort = Field(50051, description="Port of the gRPC API (0: any, logged at start).")
    grpc_bind_host: BindHost = Field("0.0.0.0", description="Interface the gRPC API listens on.")
    grpc_workers: int = Field(16, ge=1, description="Threads serving gRPC calls.")
    max_concurrent_requests: int = Field(
        64, ge=1, description="Calls in progress (incl. health checks); more get RESOURCE_EXHAUSTED from gRPC."
    )
    events_topic: str = Field(EVENTS_RAW, min_length=1)
    max_batch_events: int = Field(1000, ge=1, description="Most events per request; more: INVALID_ARGUMENT.")
    max_event_bytes: int = Field(
        65_536, ge=256, le=1_000_000, description="Largest event, Avro-encoded; larger ones: TOO_LARGE."
    )
    max_request_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="Largest request message; larger ones are refused by gRPC."
    )
    max_pending: int = Field(
        50_000, ge=1, description="Accepted events not yet acknowledged by Kafka above which: RESOURCE_EXHAUSTED."
    )
    max_pending_bytes: int = Field(128 * 1024 * 1024, ge=1024, description="The same bound in bytes.")
    stall_after_s: float = Field(
        5.0, gt=0, description="Oldest unacknowledged batch older than this: Kafka is slow, RESOURCE_EXHAUSTED."
    )
    ack_timeout_s: float = Field(
        10.0, gt=0, description="Longest wait for Kafka's acknowledgement of a request (then UNAVAILABLE)."
    )
    retry_after_ms: int = Field(500, ge=0, description="Wait suggested to clients refused with RESOURCE_EXHAUSTED.")
    kafka_linger_ms: float = Field(5.0, ge=0, description="Producer batching delay: request latency vs. throughput.")
    kafka_delivery_timeout_s: float = Field(
        30.0, gt=0, description="librdkafka gives up on an event after this (message.timeout.ms)."
    )
    shutdown_refuse_s: float = Field(
        1.0,
        ge=0,
        description="After SIGTERM, answer UNAVAILABLE this long before closing the listener, so clients move on "
        "instead of having calls cut off (CANCELLED) by the transport shutting down.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> IngestSettings:
        if self.max_batch_events > self.max_pending:
            raise ValueError(f"MAX_BATCH_EVENTS ({self.max_batch_events}) > MAX_PENDING ({self.max_pending})")
        if self.max_event_bytes > self.max_pending_bytes:
            raise ValueError("MAX_EVENT_BYTES > MAX_PENDING_BYTES: no single event could ever be admitted")
        return self


class RequestFailed(Exception):
    """A whole-request failure, answered with `code` (no per-event results)."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.retry_after_ms = code, message, retry_after_ms


class IngestServicer(pb_grpc.IngestServiceServicer):
    def __init__(self, service: IngestService) -> None:
        self.service = service
        self.settings = service.settings
        self.tracer = service.tracer

    def PublishEvents(
        self, request: pb.PublishEventsRequest, context: grpc.ServicerContext
    ) -> pb.PublishEventsResponse:
        started = time.perf_counter()
        carrier = {key: value for key, value in context.invocation_metadata() if key in TRACE_METADATA}
        parent = propagate.extract(carrier)
        failure: RequestFailed | None = None
        response = pb.PublishEventsResponse()
        with self.tracer.start_as_current_span(
            "ingest.PublishEvents",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": SERVICE_NAME, "rpc.method": "PublishEvents"},
        ) as span:
            span.set_attribute("messaging.batch.message_count", len(request.events))
            try:
                response = self._publish(request, context)
                span.set_attribute("lp.ingest.accepted", response.accepted_count)
                span.set_attribute("lp.ingest.rejected", response.rejected_count)
            except RequestFailed as error:
                failure = error
            except Exception:  # a bug, not the caller's fault: answer INTERNAL and keep the details in the log
                self.service.log.exception("PublishEvents failed")
                failure = RequestFailed(grpc.StatusCode.INTERNAL, "internal error in the ingest service; see its log")
            if failure is not None:
                span.set_status(Status(StatusCode.ERROR, failure.message))
                span.set_attribute("rpc.grpc.status_code", failure.code.value[0])
        code = "OK" if failure is None else failure.code.name
        REQUESTS.labels(code).inc()
        REQUEST_LATENCY.labels(code).observe(time.perf_counter() - started)
        if failure is not None:
            if failure.retry_after_ms is not None:
                context.set_trailing_metadata(((RETRY_AFTER_KEY, str(failure.retry_after_ms)),))
            context.abort(failure.code, failure.message)
        return response

    def _publish(self, request: pb.PublishEventsRequest, context: grpc.ServicerContext) -> pb.PublishEventsResponse:
        s, service = self.settings, self.service
        if not service.accepting:
            raise RequestFailed(grpc.StatusCode.UNAVAILABLE, "the ingest service is shutting down; try another")
        count = len(request.events)
        if count > s.max_batch_events:
            raise RequestFailed(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the batch has {count} events; the limit is {s.max_batch_events} (MAX_BATCH_EVENTS): split it",
            )
        try:
            service.backlog.check(count)  # shed load before spending CPU on a batch that cannot be admitted
        except Backpressure as error:
            raise RequestFailed(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error), s.retry_after_ms) from None
        results, accepted = service.gate.check_batch(request.events)
        if accepted:
            size = sum(len(event.payload) for event in accepted)
            try:
                batch = service.backlog.admit(len(accepted), size)
            except Backpressure as error:
                raise RequestFailed(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error), s.retry_after_ms) from None
            # A client that traced its request has every event followed as a child of the server span; otherwise
            # each event is drawn at the sample ratio and a sampled one starts its own trace. Unsampled events
            # carry the server span's context with the sampled flag cleared (dead letters keep its trace id).
            request = trace.get_current_span()
            request_context = request.get_span_context()
            caller = getattr(request, "parent", None)
            follow_caller = caller is not None and caller.trace_flags.sampled and request_context.trace_flags.sampled
            headers = [(PRODUCER, SOURCE.encode()), *unsampled_headers(request_context)]
            produced = 0
            try:
                for event in accepted:
                    event_headers = headers
                    send = None
                    if follow_caller or message_sampled():
                        send = producer_span(
                            service.tracer,
                            s.events_topic,
                            parent=request_context if follow_caller else None,
                            message_id=event.event_id,
                        )
                        event_headers = [
                            (PRODUCER, SOURCE.encode()),
                            (TRACEPARENT, traceparent(send.get_span_context())),
                        ]
                    service.producer.produce(
                        s.events_topic,
                        event.payload,
                        key=event.key,
                        headers=event_headers,
                        on_delivery=batch.on_delivery,
                    )
                    if send is not None:
                        send.end()
                    produced += 1
            except Exception as error:  # e.g. KafkaException: the client is unusable; never leak reservations
                unproduced = accepted[produced:]
                batch.abandon(len(unproduced), sum(len(event.payload) for event in unproduced))
                service.log.exception("produce failed")
                raise RequestFailed(grpc.StatusCode.UNAVAILABLE, f"could not hand events to Kafka: {error}") from None
            wait = s.ack_timeout_s
            remaining = context.time_remaining()
            if remaining is not None:
                wait = max(0.0, min(wait, remaining))
            if not batch.done.wait(wait):
                raise RequestFailed(
                    grpc.StatusCode.UNAVAILABLE,
                    f"Kafka did not acknowledge {batch.remaining} of {batch.events} events within {wait:.1f}s; "
                    "they may still be written: retrying is safe (consumers deduplicate on event_id)",
                )
            if batch.failed:
                raise RequestFailed(
                    grpc.StatusCode.UNAVAILABLE,
                    f"Kafka failed {batch.failed} of {batch.events} events ({batch.error}); the others may be "
                    "written: retrying is safe (consumers deduplicate on event_id)",
                )
        rejected = len(results) - len(accepted)
        STAGE_RECORDS_IN.labels("ingest").inc(len(results))  # the shared per-stage counters, once per request
        if accepted:
            EVENTS.labels("accepted", "").inc(len(accepted))
            STAGE_RECORDS_OUT.labels("ingest").inc(len(accepted))
        if rejected:
            STAGE_ERRORS.labels("ingest").inc(rejected)
            for result in results:
                if result.status == pb.EventResult.REJECTED:
                    EVENTS.labels("rejected", reason_name(result.reason_code)).inc()
        return pb.PublishEventsResponse(results=results, accepted_count=len(accepted), rejected_count=rejected)


def build_grpc_server(
    settings: IngestSettings, servicer: IngestServicer, health_servicer: health.HealthServicer
) -> tuple[grpc.Server, int]:
    """The gRPC server with its limits, bound but not started; returns it and the bound port."""
    server = grpc.server(
        ThreadPoolExecutor(max_workers=settings.grpc_workers, thread_name_prefix="grpc"),
        options=[
            ("grpc.max_receive_message_length", settings.max_request_bytes),
            # results echo event ids and messages: allow a response somewhat larger than its request
            ("grpc.max_send_message_length", 2 * settings.max_request_bytes + 1024 * 1024),
            ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it silently
        ],
        # gRPC refuses calls beyond this with RESOURCE_EXHAUSTED; without it, waiting calls queue without bound.
        maximum_concurrent_rpcs=settings.max_concurrent_requests,
    )
    pb_grpc.add_IngestServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(f"{settings.grpc_bind_host}:{settings.grpc_port}")
    return server, port


class IngestService(Service[IngestSettings]):
    accepting = False  # True between start-up and SIGTERM: only then are calls served

    def start(self) -> None:
        s = self.settings
        kafka = client_config(s)
        require_topics(kafka, s.events_topic, timeout=s.dependency_wait_s)
        self.gate = EventGate(SchemaRepository.load()["raw_event"], s.max_event_bytes)
        self.backlog = Backlog(s.max_pending, s.max_pending_bytes, s.stall_after_s)
        self.producer = KafkaProducer(
            kafka,
            **{
                "linger.ms": s.kafka_linger_ms,
                "message.timeout.ms": int(s.kafka_delivery_timeout_s * 1000),
                # The backlog admits at most max_pending events: librdkafka's queue must hold them all, so
                # produce() never hits a full queue (and never blocks a handler thread).
                "queue.buffering.max.messages": s.max_pending + s.max_batch_events,
                "queue.buffering.max.kbytes": max(1, 2 * s.max_pending_bytes // 1024),
            },
        )
        self.producer.stats.latency.histogram = PRODUCE_LATENCY
        self.producer.warm_up(s.events_topic)

        self.health_servicer = health.HealthServicer()
        self._serving: bool | None = None
        self._set_serving(False)
        self.grpc_server, self.grpc_port = build_grpc_server(s, IngestServicer(self), self.health_servicer)
        self.grpc_server.start()
        self.log.info(
            "grpc on :%d",
            self.grpc_port,
            extra={"grpc_port": self.grpc_port, "topic": s.events_topic, "max_pending": s.max_pending},
        )

    def _set_serving(self, serving: bool) -> None:
        if serving == self._serving:
            return
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):  # "" is the server as a whole, as probes ask by default
            self.health_servicer.set(name, status)
        self._serving = serving

    def step(self) -> bool:
        # Delivery reports run here; poll returns as soon as one is ready, so no acknowledgement waits for a tick.
        self.producer.poll(0.05)
        ready = not self.stopping.is_set() and self.health.readiness()[0]
        self.accepting = ready
        self._set_serving(ready)
        BACKLOG_EVENTS.set(self.backlog.events)
        BACKLOG_BYTES.set(self.backlog.bytes)
        OLDEST_PENDING.set(self.backlog.oldest_age_s())
        return True

    def stop(self) -> None:
        self.accepting = False
        began = time.monotonic()
        if hasattr(self, "grpc_server"):
            self.health_servicer.enter_graceful_shutdown()  # NOT_SERVING: balancers stop sending first
            refuse_until = began + self.settings.shutdown_refuse_s
            while time.monotonic() < refuse_until:  # calls get a clean UNAVAILABLE from the handler meanwhile
                self.producer.poll(0.05)
            grace = min(self.settings.ack_timeout_s + 1, self.settings.shutdown_timeout_s / 2)
            stopped = self.grpc_server.stop(grace)  # refuse new calls; let those in progress finish
            while not stopped.is_set():
                self.producer.poll(0.05)  # ...which needs their delivery reports
            self.log.info("grpc server stopped", extra={"drain_s": round(time.monotonic() - began, 3)})
        if hasattr(self, "producer"):
            budget = max(1.0, self.settings.shutdown_timeout_s * 0.9 - (time.monotonic() - began))
            try:
                self.producer.flush(budget)
            except DeliveryFailed as error:
                if self.producer.pending():
                    raise
                # Failed deliveries were already answered (UNAVAILABLE) to the calls they belonged to.
                self.log.warning("some deliveries failed during the run: %s", error)
            stats = self.producer.stats
            self.log.info("flushed", extra={"delivered": stats.delivered, "failed": stats.failed})
