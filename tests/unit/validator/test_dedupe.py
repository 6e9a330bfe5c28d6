"""The in-memory dedupe store: window by event time, size bound, and a watermark that cannot run ahead."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from services.validator.dedupe import DedupeStore

T0 = datetime(2026, 1, 5, 12, tzinfo=UTC)
WINDOW = timedelta(minutes=10)


def test_seen_within_the_window() -> None:
    store = DedupeStore()
    store.remember("r", "a", T0, WINDOW)
    assert store.seen("r", "a", T0 + timedelta(minutes=9))
    assert not store.seen("r", "a", T0 + timedelta(minutes=11))
    assert not store.seen("other_rule", "a", T0)  # namespaces are per rule
    store.remember("r", "a", T0 + timedelta(minutes=5), WINDOW)  # the first one wins: expiry unchanged
    assert not store.seen("r", "a", T0 + timedelta(minutes=11))


def test_entries_expire_as_event_time_moves_on() -> None:
    store = DedupeStore()
    for minute in range(30):
        store.remember("r", minute, T0 + timedelta(minutes=minute), WINDOW)
    assert len(store) == 11  # minutes 19..29 are within 10 minutes of the newest
    assert store.expired == 19


def test_size_bound_evicts_the_oldest() -> None:
    store = DedupeStore(max_entries=3)
    for n in range(5):
        store.remember("r", n, T0, WINDOW)
    assert len(store) == 3 and store.evicted_by_size == 2
    assert not store.seen("r", 0, T0) and store.seen("r", 4, T0)
    store.clear()
    assert len(store) == 0
    with pytest.raises(ValueError):
        DedupeStore(max_entries=0)


def test_a_future_event_does_not_expire_everything() -> None:
    store = DedupeStore()
    store.remember("r", "a", T0, WINDOW, now=T0)
    store.remember("r", "future", T0 + timedelta(days=30), WINDOW, now=T0)
    assert store.seen("r", "a", T0) and len(store) == 2


def test_admit_is_seen_then_remember_row_by_row() -> None:
    """The batch call gives the same duplicates and leaves the same memory as the per-row calls, through
    out-of-order times, expiry, the size bound, rows that are not accepted and rows without a key."""
    rng = random.Random(7)
    for trial in range(200):
        max_entries = rng.choice([3, 10, 1000])
        window, now = rng.choice([5, 50]), rng.randrange(100, 200)
        size = rng.randrange(1, 60)
        keys = [rng.choice([None, *range(12)]) for _ in range(size)]
        times = [rng.randrange(0, 260) for _ in range(size)]
        accepting = [rng.random() < 0.8 for _ in range(size)]
        rows = sorted(rng.sample(range(size), rng.randrange(0, size + 1)))
        by_row, at_once = DedupeStore(max_entries), DedupeStore(max_entries)
        for store in (by_row, at_once):  # the same history before the batch
            for t in range(0, 100, 7):
                store.remember("r", t % 12, t, window, now=now)
        expected: dict[int, object] = {}
        for row in rows:
            if keys[row] is None:
                continue
            if by_row.seen("r", keys[row], times[row]):
                expected[row] = keys[row]
            elif accepting[row]:
                by_row.remember("r", keys[row], times[row], window, now=now)
        got = at_once.admit("r", rows, keys, times, accepting, window, now=now)
        assert got == expected, trial
        assert list(at_once._entries.items()) == list(by_row._entries.items()), trial
        assert (at_once.expired, at_once.evicted_by_size) == (by_row.expired, by_row.evicted_by_size), trial
