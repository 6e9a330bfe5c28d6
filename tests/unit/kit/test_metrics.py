import pytest

from services.kit.metrics import LatencyRecorder, percentile


def test_nearest_rank_percentiles():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 95) == 95.0
    assert percentile(values, 99) == 99.0
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_reservoir_keeps_distribution_beyond_capacity():
    recorder = LatencyRecorder(capacity=2000, seed=1)
    for i in range(100_000):
        recorder.observe((i % 1000) / 1000)  # uniform 0..0.999 s
    assert recorder.count == 100_000
    result = recorder.percentiles_ms()
    assert result is not None
    assert 450 <= result["p50"] <= 550
    assert 920 <= result["p95"] <= 980
    assert LatencyRecorder().percentiles_ms() is None
