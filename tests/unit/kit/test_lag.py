"""Consumer lag computed at scrape time, and the windowed share behind the data-quality score."""

from __future__ import annotations

import math

from prometheus_client import REGISTRY

from services.kit.lag import ConsumerLag
from services.kit.metrics import WindowedShare


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def scraped(group: str, topic: str, partition: int) -> tuple[float | None, float | None]:
    labels = {"consumer_group": group, "topic": topic, "partition": str(partition)}
    return (
        REGISTRY.get_sample_value("lp_kafka_consumer_lag_records", labels),
        REGISTRY.get_sample_value("lp_kafka_consumer_lag_seconds", labels),
    )


def test_a_stuck_consumer_shows_its_lag_in_seconds_growing_without_updating_anything():
    clock = Clock(10_000.0)
    lag = ConsumerLag("g-stuck", clock=clock)
    lag.update("events.raw", 0, next_offset=100, high_watermark=100, timestamp_ms=9_999_000)
    assert scraped("g-stuck", "events.raw", 0) == (0, 0)  # caught up: not late, however old the last record
    lag.update("events.raw", 0, next_offset=200, high_watermark=260, timestamp_ms=9_998_000)
    assert scraped("g-stuck", "events.raw", 0) == (60, 2.0)
    clock.now += 400  # nothing handled since
    assert scraped("g-stuck", "events.raw", 0) == (60, 402.0)


def test_missing_watermark_or_timestamp_keep_the_last_known_and_revoked_partitions_disappear():
    clock = Clock(1_000.0)
    lag = ConsumerLag("g-keep", clock=clock)
    lag.update("t", 1, next_offset=10, high_watermark=50, timestamp_ms=990_000)
    lag.update("t", 1, next_offset=20, high_watermark=None, timestamp_ms=None)
    assert lag.lag() == {("t", 1): (30, 10.0)}
    lag.update("t", 1, next_offset=60, high_watermark=None, timestamp_ms=995_000)  # read past a stale watermark
    assert lag.lag() == {("t", 1): (0, 0.0)}
    lag.forget([("t", 1)])
    assert scraped("g-keep", "t", 1) == (None, None)


def test_windowed_share_counts_only_the_window_and_is_nan_when_empty():
    clock = Clock(0.0)
    share = WindowedShare(window_s=300, slots=30, clock=clock)
    assert math.isnan(share.share())
    share.add(90, 100)
    clock.now = 200
    share.add(100, 100)
    assert share.share() == 190 / 200
    clock.now = 305  # the first batch left the window
    assert share.share() == 1.0
    clock.now = 600
    assert math.isnan(share.share())  # idle: no data, not a score


def test_a_consumer_stuck_while_caught_up_shows_lag_from_the_clients_current_watermark():
    """Its own loop updates nothing, but the client's fetcher saw new records: the scrape reads that watermark."""
    clock = Clock(5_000.0)
    watermarks = {("events.raw", 2): 500}

    def highwater(topic: str, partition: int) -> int | None:
        if (topic, partition) not in watermarks:
            raise AssertionError("Partition is not assigned")  # what aiokafka does for a revoked one
        return watermarks[(topic, partition)]

    lag = ConsumerLag("g-live", clock=clock, highwater=highwater)
    lag.update("events.raw", 2, next_offset=500, high_watermark=500, timestamp_ms=4_999_000)
    assert lag.lag() == {("events.raw", 2): (0, 0.0)}
    watermarks[("events.raw", 2)] = 530  # records arrived; the consumer is stuck
    clock.now += 600
    assert lag.lag() == {("events.raw", 2): (30, 601.0)}
    del watermarks[("events.raw", 2)]  # the client cannot answer: the last known watermark stands
    assert lag.lag() == {("events.raw", 2): (0, 0.0)}
