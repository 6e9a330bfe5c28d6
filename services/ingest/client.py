"""A small Python client of the ingest API.

    from services.ingest.client import IngestClient

    with IngestClient("localhost:50051") as client:
        results = client.publish([{"event_id": "...", "event_type": "page_view", "event_time": datetime.now(UTC), ...}])
        rejected = [r for r in results if not r.accepted]

Events are dicts in raw_event form (the fields of schemas/avro/raw_event.avsc; None means unset, `source` is
ignored because the server sets it) or ready-made `ingest_pb2.Event`s. RESOURCE_EXHAUSTED (backpressure) and
UNAVAILABLE are retried with bounded, jittered exponential backoff, honouring the server's `retry-after-ms`
hint; other failures raise `IngestError` at once. A retry after UNAVAILABLE may write an event twice
(at-least-once); consumers deduplicate on event_id, so keep ids stable across retries.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import propagate

from services.ingest.contract import record_to_event
from services.ingest.v1 import ingest_pb2 as pb
from services.ingest.v1 import ingest_pb2_grpc as pb_grpc

RETRYABLE = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE})
RETRY_AFTER_KEY = "retry-after-ms"
_MESSAGE_TOO_LARGE = "larger than max"  # gRPC's own RESOURCE_EXHAUSTED for an oversized message: never retry


@dataclass(frozen=True, slots=True)
class EventResult:
    """The outcome of one published event (the proto's EventResult with enum names as strings)."""

    index: int
    event_id: str
    status: str  # "ACCEPTED" or "REJECTED"
    reason_code: str | None = None  # e.g. "MISSING_FIELD"; None when accepted
    message: str = ""
    field: str = ""

    @property
    def accepted(self) -> bool:
        return self.status == "ACCEPTED"

    @classmethod
    def from_proto(cls, result: pb.EventResult) -> EventResult:
        reason = result.reason_code
        return cls(
            index=result.index,
            event_id=result.event_id,
            status=pb.EventResult.Status.Name(result.status),
            reason_code=pb.EventResult.ReasonCode.Name(reason) if reason else None,
            message=result.message,
            field=result.field,
        )


class IngestError(Exception):
    """The call failed as a whole (after retries, if the failure was retryable)."""

    def __init__(self, code: grpc.StatusCode, details: str, attempts: int = 1) -> None:
        super().__init__(f"{code.name}: {details} (after {attempts} attempt{'s' if attempts != 1 else ''})")
        self.code, self.details, self.attempts = code, details, attempts


def is_retryable(error: grpc.RpcError) -> bool:
    code = error.code()  # type: ignore[attr-defined]
    return code in RETRYABLE and _MESSAGE_TOO_LARGE not in (error.details() or "")  # type: ignore[attr-defined]


def retry_after_s(error: grpc.RpcError) -> float:
    """The server's suggested wait (trailing metadata `retry-after-ms`), 0 when absent."""
    trailing = getattr(error, "trailing_metadata", None)
    for key, value in (trailing() if callable(trailing) else None) or ():
        if key == RETRY_AFTER_KEY:
            try:
                return max(0.0, int(value) / 1000)
            except ValueError:
                return 0.0
    return 0.0


class IngestClient:
    def __init__(
        self,
        target: str,
        *,
        timeout_s: float = 30.0,
        max_attempts: int = 6,
        initial_backoff_s: float = 0.1,
        max_backoff_s: float = 5.0,
        max_message_bytes: int = 16 * 1024 * 1024,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        """`target`: host:port. `max_message_bytes` should match the server's MAX_REQUEST_BYTES, so an
        oversized request fails here, before it is sent."""
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.target = target
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s
        channel_options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", 4 * max_message_bytes),
            *options,
        ]
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=channel_options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=channel_options)
        self._stub = pb_grpc.IngestServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self.retries = 0  # retried attempts over the client's life (for load tests and benchmarks)

    # --- publishing ---------------------------------------------------------------------------------------------
    def publish(self, events: Sequence[Mapping[str, Any] | pb.Event]) -> list[EventResult]:
        """Publish one batch; one result per event, in order. Raises IngestError if the batch as a whole fails."""
        request = pb.PublishEventsRequest(
            events=[event if isinstance(event, pb.Event) else record_to_event(event) for event in events]
        )
        response = self.publish_request(request)
        return [EventResult.from_proto(result) for result in response.results]

    def publish_request(self, request: pb.PublishEventsRequest) -> pb.PublishEventsResponse:
        """The raw call with retries: for callers that build requests once and send them many times."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._stub.PublishEvents(request, timeout=self.timeout_s, metadata=_trace_metadata())
            except grpc.RpcError as error:
                if not is_retryable(error) or attempt >= self.max_attempts:
                    raise IngestError(error.code(), error.details() or "", attempt) from None  # type: ignore[attr-defined]
                self.retries += 1
                time.sleep(self.backoff_s(attempt, retry_after_s(error)))

    def backoff_s(self, attempt: int, hint_s: float = 0.0) -> float:
        """Exponential backoff with jitter, at least the server's hint, never more than max_backoff_s."""
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * 2 ** (attempt - 1))
        return min(self.max_backoff_s, max(hint_s, random.uniform(ceiling / 2, ceiling)))

    # --- health -------------------------------------------------------------------------------------------------
    def health(self, service: str = "", timeout_s: float = 5.0) -> str:
        """The server's gRPC health status: "SERVING", "NOT_SERVING", ...; "UNREACHABLE" if it does not answer."""
        try:
            answer = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                return "SERVICE_UNKNOWN"
            return "UNREACHABLE"
        return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)

    def wait_until_serving(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        status = "UNREACHABLE"
        while time.monotonic() < deadline:
            status = self.health(timeout_s=1.0)
            if status == "SERVING":
                return
            time.sleep(0.1)
        raise TimeoutError(f"ingest API at {self.target} not SERVING after {timeout_s:.0f}s (last: {status})")

    # --- lifecycle ----------------------------------------------------------------------------------------------
    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> IngestClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _trace_metadata() -> list[tuple[str, str]]:
    """W3C trace context of the caller's current span (empty without one): the server span joins the trace."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return list(carrier.items())
