"""Bounded, in-memory memory of keys already accepted, for DUPLICATE_ALLOW_ONE rules.

Not a changelog (Faust table recovery is unreliable on the local broker, Tansu): the memory is *rebuilt* instead.
When the streaming runtime is given partitions of events.raw or events.raw.retry (start, restart after a
`kill -9`, rebalance), before processing any of their records it reads back what they accepted, the
events.processed records of the rule's window (plus a 5-minute margin, bounded by `max_entries`), and feeds
them here through `ValidatorProcessor.remember_accepted` (services/validator/recovery.py `rebuild_memory`).
So a producer's copy of an event accepted before a restart or by another worker is still its duplicate,
within the window. Events are keyed by user_id, so copies of one event land on the same partition.

Times are microseconds since the epoch (ints: the engine reads them from a timestamp column without making a
datetime per record); any totally ordered time with a matching window type works the same.

Bounds: an entry expires once the newest event time seen is more than the rule's window past it, and the
oldest entries are evicted beyond `max_entries`. The effective window is therefore
min(window, max_entries / event rate), after a restart as before it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence

DEFAULT_MAX_ENTRIES = 1_000_000


class DedupeStore:
    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        # (namespace, key) -> expiry (event time + window). Insertion order ~ event-time order, so expiry and
        # the size bound both evict from the front in O(1).
        self._entries: OrderedDict[tuple[str, Hashable], int] = OrderedDict()
        self._watermark: int | None = None  # newest event time remembered
        self.evicted_by_size = 0
        self.expired = 0

    def __len__(self) -> int:
        return len(self._entries)

    def seen(self, namespace: str, key: Hashable, event_time: int) -> bool:
        """Whether `key` was remembered and its window still covers `event_time`."""
        expiry = self._entries.get((namespace, key))
        return expiry is not None and event_time <= expiry

    def remember(self, namespace: str, key: Hashable, event_time: int, window: int, *, now: int | None = None) -> None:
        """Record `key` as accepted (the first one wins: an existing entry keeps its expiry). The watermark never
        passes `now`, so one event stamped far in the future cannot expire everything else."""
        entries = self._entries
        entry = (namespace, key)
        if entry not in entries:
            entries[entry] = event_time + window
        self._advance(event_time, now)

    def admit(
        self,
        namespace: str,
        rows: Iterable[int],
        keys: Sequence[Hashable | None],
        times: Sequence[int],
        accepting: Sequence[bool],
        window: int,
        *,
        now: int,
    ) -> dict[int, Hashable]:
        """`seen`, then `remember` if `accepting[row]`, for each row in turn (arrival order), as one call: the
        rows that repeat a remembered key, with their key. Rows without a key (None) are skipped. The same steps
        as calling the two methods per row, without two calls per record (the validator's hot loop)."""
        entries = self._entries
        get = entries.get
        duplicates: dict[int, Hashable] = {}
        for row in rows:
            key = keys[row]
            if key is None:
                continue
            entry = (namespace, key)
            expiry = get(entry)
            event_time = times[row]
            if expiry is not None and event_time <= expiry:
                duplicates[row] = key
                continue
            if not accepting[row]:
                continue
            if expiry is None:
                entries[entry] = event_time + window
            self._advance(event_time, now)
        return duplicates

    def _advance(self, event_time: int, now: int | None) -> None:
        """After remembering a key of `event_time`: move the watermark (never past `now`), expire what it passed,
        and evict the oldest entries beyond the size bound."""
        advance = event_time if now is None or event_time <= now else now
        if self._watermark is None or advance > self._watermark:
            self._watermark = advance
            self._expire(advance)
        entries = self._entries
        while len(entries) > self.max_entries:
            entries.popitem(last=False)
            self.evicted_by_size += 1

    def _expire(self, watermark: int) -> None:
        entries = self._entries
        while entries:
            first = next(iter(entries))
            if entries[first] >= watermark:
                return
            del entries[first]
            self.expired += 1

    def clear(self) -> None:
        """Forget everything (e.g. when the partitions this worker owns change)."""
        self._entries.clear()
        self._watermark = None
