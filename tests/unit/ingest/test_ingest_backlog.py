"""Admission control: limits on unacknowledged events and bytes, and the stall detector."""

from __future__ import annotations

import time

import pytest

from services.ingest.backlog import Backlog, Backpressure


class FakeMessage:
    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size


def test_admits_within_limits_and_releases_on_delivery():
    backlog = Backlog(max_events=10, max_bytes=1000, stall_after_s=60)
    batch = backlog.admit(4, 400)
    assert (backlog.events, backlog.bytes) == (4, 400)
    for _ in range(3):
        batch.on_delivery(None, FakeMessage(100))
    assert not batch.done.is_set() and batch.remaining == 1
    batch.on_delivery(None, FakeMessage(100))
    assert batch.done.is_set() and batch.failed == 0
    assert (backlog.events, backlog.bytes) == (0, 0)
    assert backlog.oldest_age_s() == 0.0


def test_refuses_over_the_event_limit_without_reserving():
    backlog = Backlog(max_events=10, max_bytes=10_000, stall_after_s=60)
    backlog.admit(8, 80)
    with pytest.raises(Backpressure, match="limit is 10"):
        backlog.admit(3, 30)
    with pytest.raises(Backpressure):
        backlog.check(3)
    assert backlog.events == 8
    backlog.admit(2, 20)  # exactly at the limit is fine


def test_refuses_over_the_byte_limit():
    backlog = Backlog(max_events=100, max_bytes=1000, stall_after_s=60)
    backlog.admit(1, 900)
    with pytest.raises(Backpressure, match="bytes"):
        backlog.admit(1, 200)


def test_a_stalled_batch_refuses_everything_until_it_is_resolved():
    backlog = Backlog(max_events=100, max_bytes=10_000, stall_after_s=0.05)
    stuck = backlog.admit(1, 10)
    time.sleep(0.08)
    assert backlog.oldest_age_s() >= 0.05
    with pytest.raises(Backpressure, match="Kafka is slow"):
        backlog.check(1)
    stuck.on_delivery(None, FakeMessage(10))
    backlog.admit(1, 10)


def test_failures_are_recorded_and_abandoned_events_released():
    backlog = Backlog(max_events=100, max_bytes=10_000, stall_after_s=60)
    batch = backlog.admit(3, 300)
    batch.on_delivery("Local: Message timed out", FakeMessage(100))  # type: ignore[arg-type]
    batch.abandon(2, 200)  # never handed to the producer
    assert batch.done.is_set()
    assert batch.failed == 1 and "timed out" in (batch.error or "")
    assert (backlog.events, backlog.bytes) == (0, 0)
