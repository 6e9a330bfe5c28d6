"""Consumer lag per group and partition, in records and in seconds, as every Kafka consumer of the platform sees it.

A consumer calls `ConsumerLag.update` once per partition per handled batch (never per record) with the next offset
it will handle, the partition's high watermark from its last fetch response (no extra request: right even on
brokers whose ListOffsets is not, such as the local Tansu) and the timestamp of the last record it handled.
The gauges are computed when /metrics is scraped, with the client's current cached high watermark when the
consumer gives a way to read it (`highwater`: the client's background fetches keep it fresh while the consumer's
own loop is stuck). So a consumer that stops handling records (stuck on a store or a dependency, paused) shows
its lag in seconds growing with the wall clock although it updates nothing:

- `lp_kafka_consumer_lag_records`: high watermark minus next offset;
- `lp_kafka_consumer_lag_seconds`: 0 when caught up, else the age of the last record handled. The next record
  is at least as new, so this bounds the age of the oldest waiting record from above (by the gap between two
  records), which is what "how late is this consumer" needs.

A consumer process that is gone exports nothing: Prometheus' `up` (the `TargetDown` alert) covers that case.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client.core import REGISTRY, GaugeMetricFamily
from prometheus_client.registry import Collector

LAG_RECORDS = "lp_kafka_consumer_lag_records"
LAG_SECONDS = "lp_kafka_consumer_lag_seconds"
LABELS = ["consumer_group", "topic", "partition"]


@dataclass(slots=True)
class _Position:
    next_offset: int
    high_watermark: int
    last_timestamp_s: float | None  # of the last record handled (the broker's or the producer's time)


class ConsumerLag:
    """The lag of one consumer (one group) over the partitions it holds; exported by `LagCollector`."""

    def __init__(
        self,
        consumer_group: str,
        clock: Callable[[], float] = time.time,
        highwater: Callable[[str, int], int | None] | None = None,
    ) -> None:
        """`highwater(topic, partition)`: the client's cached high watermark, read at scrape time from the
        metrics thread (it must be cheap and must not block; a failure counts as unknown)."""
        self.consumer_group = consumer_group
        self.clock = clock
        self.highwater = highwater
        self._positions: dict[tuple[str, int], _Position] = {}
        self._lock = threading.Lock()  # scrapes come from the health server's threads
        _COLLECTOR.track(self)

    def update(
        self, topic: str, partition: int, next_offset: int, high_watermark: int | None, timestamp_ms: int | None
    ) -> None:
        """The consumer handled records up to `next_offset - 1` of this partition (once per batch)."""
        timestamp_s = timestamp_ms / 1000 if timestamp_ms is not None and timestamp_ms > 0 else None
        with self._lock:
            known = self._positions.get((topic, partition))
            high = high_watermark if high_watermark is not None else (known.high_watermark if known else next_offset)
            if timestamp_s is None and known is not None:
                timestamp_s = known.last_timestamp_s
            self._positions[(topic, partition)] = _Position(next_offset, max(high, next_offset), timestamp_s)

    def forget(self, partitions: Iterable[tuple[str, int]]) -> None:
        """Partitions revoked: their new owner exports them."""
        with self._lock:
            for key in partitions:
                self._positions.pop((key[0], key[1]), None)

    def lag(self) -> dict[tuple[str, int], tuple[int, float]]:
        """(records, seconds) per (topic, partition), now."""
        now = self.clock()
        with self._lock:
            positions = list(self._positions.items())
        out: dict[tuple[str, int], tuple[int, float]] = {}
        for key, position in positions:
            high = position.high_watermark
            if self.highwater is not None:
                with contextlib.suppress(Exception):  # closing, revoked meanwhile: the last known one stands
                    high = max(high, self.highwater(*key) or 0)
            records = max(0, high - position.next_offset)
            seconds = 0.0
            if records and position.last_timestamp_s is not None:
                seconds = max(0.0, now - position.last_timestamp_s)
            out[key] = (records, seconds)
        return out


class LagCollector(Collector):
    """Every live `ConsumerLag` of the process, computed at scrape time (registered once in the default registry)."""

    def __init__(self) -> None:
        # One per group: a newer consumer of a group in this process replaces the older one (which stopped).
        self._trackers: weakref.WeakValueDictionary[str, ConsumerLag] = weakref.WeakValueDictionary()

    def track(self, tracker: ConsumerLag) -> None:
        self._trackers[tracker.consumer_group] = tracker

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(LAG_RECORDS, "", labels=LABELS)
        yield GaugeMetricFamily(LAG_SECONDS, "", labels=LABELS)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        records = GaugeMetricFamily(
            LAG_RECORDS, "Records of the partition the consumer group has not handled yet", labels=LABELS
        )
        seconds = GaugeMetricFamily(
            LAG_SECONDS,
            "0 when caught up, else the age of the last record the consumer group handled (upper bound of its delay)",
            labels=LABELS,
        )
        for tracker in list(self._trackers.values()):
            for (topic, partition), (lag_records, lag_seconds) in tracker.lag().items():
                labels = [tracker.consumer_group, topic, str(partition)]
                records.add_metric(labels, lag_records)
                seconds.add_metric(labels, round(lag_seconds, 3))
        yield records
        yield seconds


_COLLECTOR = LagCollector()
REGISTRY.register(_COLLECTOR)
