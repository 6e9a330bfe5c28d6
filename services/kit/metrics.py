"""Metric helpers shared by the services.

Prometheus histograms answer "how is it now" on /metrics; run summaries and benchmarks need exact percentiles
of a bounded run, so `LatencyRecorder` keeps a uniform reservoir sample alongside.
"""

from __future__ import annotations

import math
import random
import threading

from prometheus_client import Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)


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
