"""Metric helpers and the metrics every stage exports under one name (docs/observability.md).

Prometheus histograms answer "how is it now" on /metrics; run summaries and benchmarks need exact percentiles
of a bounded run, so `LatencyRecorder` keeps a uniform reservoir sample alongside.

The shared metrics let one alert or dashboard panel cover every stage (`stage` is the service's role: generator,
cdc, ingest, validator, clickhouse, archiver, snowflake_loader). They are updated once per batch, never per record.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable

from prometheus_client import Counter, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)
VISIBLE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)

STAGE_RECORDS_IN = Counter("lp_stage_records_in_total", "Records a stage took in (received or consumed)", ["stage"])
STAGE_RECORDS_OUT = Counter(
    "lp_stage_records_out_total", "Records a stage handed on (produced, written or loaded)", ["stage"]
)
STAGE_ERRORS = Counter(
    "lp_stage_errors_total",
    "Records a stage refused or failed on (ingest rejections, sink rejections, validator runtime failures; "
    "the validator's rule verdicts are lp_validator_verdicts_total)",
    ["stage"],
)
DEAD_LETTERS = Counter(
    "lp_dead_letters_total",
    "Dead letters acknowledged by the broker, by dead-letter topic, error code and rule (empty if none)",
    ["topic", "code", "rule"],
)
EVENT_TO_VISIBLE = Histogram(
    "lp_sink_event_to_visible_seconds",
    "Record timestamp (producer time: ingest or generator) to the sink's write returning, oldest and newest "
    "record of each batch",
    ["sink", "topic"],
    buckets=VISIBLE_BUCKETS,
)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, min(len(sorted_values), math.ceil(q / 100 * len(sorted_values))))
    return sorted_values[rank - 1]


class LatencyRecorder:
    """Records latencies (seconds) into an optional Prometheus histogram and a reservoir sample."""

    def __init__(self, histogram: Histogram | None = None, capacity: int = 50_000, seed: int = 0) -> None:
        self.histogram = histogram
        self.capacity = capacity
        self.count = 0
        self._sample: list[float] = []
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        if self.histogram is not None:
            self.histogram.observe(seconds)
        with self._lock:
            self.count += 1
            if len(self._sample) < self.capacity:
                self._sample.append(seconds)
            else:  # reservoir sampling keeps every observation equally likely to be in the sample
                slot = self._rng.randrange(self.count)
                if slot < self.capacity:
                    self._sample[slot] = seconds

    def percentiles_ms(self) -> dict[str, float] | None:
        with self._lock:
            values = sorted(self._sample)
        if not values:
            return None
        return {f"p{q}": round(percentile(values, q) * 1000, 2) for q in (50, 95, 99)}


class WindowedShare:
    """The share of `good` in `total` over the last `window_s` seconds, in `slots` buckets (added to per batch).

    `share()` is NaN when nothing was counted in the window: "no data" rather than a perfect or a failing
    score, so an alert comparing it with a threshold stays quiet while idle."""

    def __init__(self, window_s: float = 300.0, slots: int = 30, clock: Callable[[], float] = time.monotonic) -> None:
        self.slot_s = window_s / slots
        self.slots = slots
        self.clock = clock
        self._counts: dict[int, list[int]] = {}  # slot number -> [good, total]
        self._lock = threading.Lock()

    def add(self, good: int, total: int) -> None:
        if total <= 0:
            return
        slot = int(self.clock() // self.slot_s)
        with self._lock:
            counts = self._counts.setdefault(slot, [0, 0])
            counts[0] += good
            counts[1] += total
            for old in [s for s in self._counts if s <= slot - self.slots]:
                del self._counts[old]

    def share(self) -> float:
        oldest = int(self.clock() // self.slot_s) - self.slots + 1
        with self._lock:
            good = sum(c[0] for s, c in self._counts.items() if s >= oldest)
            total = sum(c[1] for s, c in self._counts.items() if s >= oldest)
        return good / total if total else math.nan
