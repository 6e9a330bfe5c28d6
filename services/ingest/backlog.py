"""Admission control for the ingest API: how much is handed to Kafka and not yet acknowledged.

Every accepted event is counted from `produce` until its delivery report (success or failure), so the figures
are exactly librdkafka's queue as far as this service filled it. A request is admitted only if its events fit
under both limits and Kafka is keeping up (the oldest unacknowledged batch is younger than `stall_after_s`);
otherwise it is refused before anything is written. A request that times out waiting keeps its share of the
budget until librdkafka resolves its events, so a stalled broker can never make the queue grow past the limits.
"""

from __future__ import annotations

import itertools
import threading
import time

from confluent_kafka import KafkaError, Message


class Backpressure(Exception):
    """The request cannot be admitted now; nothing was written."""


class PendingBatch:
    """The accepted events of one request, from produce to the last delivery report."""

    __slots__ = ("_backlog", "done", "error", "events", "failed", "id", "remaining", "size", "started")

    def __init__(self, backlog: Backlog, batch_id: int, events: int, size: int) -> None:
        self._backlog = backlog
        self.id = batch_id
        self.events = events
        self.size = size
        self.remaining = events
        self.failed = 0
        self.error: str | None = None
        self.started = time.monotonic()
        self.done = threading.Event()

    def on_delivery(self, error: KafkaError | None, message: Message) -> None:
        """librdkafka's delivery report for one event (runs on the thread that polls the producer)."""
        self._backlog._resolved(self, 1, len(message), None if error is None else str(error))

    def abandon(self, events: int, size: int) -> None:
        """`events` of the batch were never handed to the producer: release their share."""
        self._backlog._resolved(self, events, size, None)


class Backlog:
    def __init__(self, max_events: int, max_bytes: int, stall_after_s: float) -> None:
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.stall_after_s = stall_after_s
        self.events = 0
        self.bytes = 0
        self._batches: dict[int, PendingBatch] = {}  # insertion order: the first one is the oldest
        self._ids = itertools.count()
        self._lock = threading.Lock()

    def oldest_age_s(self, now: float | None = None) -> float:
        with self._lock:
            oldest = next(iter(self._batches.values()), None)
        return 0.0 if oldest is None else (now or time.monotonic()) - oldest.started

    def _refusal(self, events: int, size: int) -> str | None:
        oldest = next(iter(self._batches.values()), None)
        if oldest is not None:
            waited = time.monotonic() - oldest.started
            if waited > self.stall_after_s:
                return f"Kafka is slow: events produced {waited:.1f}s ago are not acknowledged yet"
        if self.events + events > self.max_events:
            return f"{self.events} events await Kafka's acknowledgement; the limit is {self.max_events}"
        if self.bytes + size > self.max_bytes:
            return f"{self.bytes} bytes await Kafka's acknowledgement; the limit is {self.max_bytes}"
        return None

    def check(self, events: int, size: int = 0) -> None:
        """Raise Backpressure if `events` would not be admitted now (a cheap early exit, reserves nothing)."""
        with self._lock:
            refusal = self._refusal(events, size)
        if refusal:
            raise Backpressure(refusal)

    def admit(self, events: int, size: int) -> PendingBatch:
        """Reserve room for `events` totalling `size` bytes, or raise Backpressure."""
        with self._lock:
            refusal = self._refusal(events, size)
            if refusal:
                raise Backpressure(refusal)
            batch = PendingBatch(self, next(self._ids), events, size)
            self.events += events
            self.bytes += size
            self._batches[batch.id] = batch
            return batch

    def _resolved(self, batch: PendingBatch, events: int, size: int, error: str | None) -> None:
        with self._lock:
            self.events -= events
            self.bytes -= size
            batch.remaining -= events
            if error is not None:
                batch.failed += events
                batch.error = error
            finished = batch.remaining <= 0
            if finished:
                self._batches.pop(batch.id, None)
        if finished:
            batch.done.set()
