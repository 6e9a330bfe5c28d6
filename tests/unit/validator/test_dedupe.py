"""The in-memory dedupe store: window by event time, size bound, and a watermark that cannot run ahead."""

from __future__ import annotations

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
