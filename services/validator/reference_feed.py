"""Every validator worker's own, complete copy of the reference tables (users, products).

Lookups and enrichment need *all* users and products, but a consumer group splits partitions between workers,
and after a restart the group's committed offsets sit past every change already seen: a grouped, in-memory
store would be partial with several workers and empty after a restart, and events would be wrongly retried
and dead-lettered as REFERENCE_NOT_FOUND. So each worker reads every partition of the reference topics from
the beginning, outside any group (nothing is committed), before it processes events, and keeps following
them while it runs. The store is LSN-guarded, so reading history again is harmless.

The feed only *applies* changes. A malformed change is skipped here and dead-lettered once by the worker that
owns its partition in the group (`ValidatorProcessor`), so several workers never dead-letter it several times.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition
from confluent_kafka.admin import AdminClient

from services.validator.cdc import CdcFormatError, table_of_topic
from services.validator.references import ReferenceStore

log = logging.getLogger("services.validator.reference_feed")


class ReferenceFeedError(ConnectionError):
    """The reference topics could not be read up to their end in time (the worker must not start without them)."""


class ReferenceFeed:
    """Reads `topics` from the beginning into `store` on a background thread; `start()` returns once caught up."""

    def __init__(
        self,
        store: ReferenceStore,
        kafka_config: Mapping[str, Any],
        topics: Sequence[str],
        *,
        on_change: Callable[[str, str], None] | None = None,
    ) -> None:
        self.store = store
        self.kafka_config = dict(kafka_config)
        self.topics = list(topics)
        self.on_change = on_change  # (table, result) per applied change, for metrics
        self.applied = 0
        self.skipped = 0  # malformed changes: the owning worker dead-letters them
        self.caught_up = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, timeout_s: float = 120.0) -> ReferenceFeed:
        """Start following the topics; block until every partition was read to the end it had at start."""
        partitions = self._partitions()
        self._thread = threading.Thread(target=self._run, args=(partitions,), name="reference-feed", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.caught_up.wait(0.2):
            if self._error is not None:
                raise ReferenceFeedError(f"reading the reference topics failed: {self._error}") from self._error
            if time.monotonic() > deadline:
                self.stop()
                raise ReferenceFeedError(
                    f"reference topics {', '.join(self.topics)} not read to their end within {timeout_s:g}s "
                    "(VALIDATOR_REFERENCE_CATCH_UP_TIMEOUT_S)"
                )
        sizes = dict(self.sizes())
        log.info("reference data loaded", extra={"applied": self.applied, "skipped": self.skipped, **sizes})
        return self

    def sizes(self) -> list[tuple[str, int]]:
        return [(table, self.store.size(table)) for table in self.store.table_names]

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _partitions(self) -> list[TopicPartition]:
        # All topics, none by name: the local broker creates any topic a metadata request names.
        metadata = AdminClient(self.kafka_config).list_topics(timeout=10)
        found: list[TopicPartition] = []
        for topic in self.topics:
            entry = metadata.topics.get(topic)
            if entry is None or entry.error is not None:
                raise ReferenceFeedError(
                    f"reference topic {topic!r} does not exist: python -m services.declarations apply"
                )
            found.extend(TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(entry.partitions))
        return found

    def _run(self, partitions: list[TopicPartition]) -> None:
        consumer = Consumer(
            {
                **self.kafka_config,
                "group.id": "lp-validator-references",  # required by the client; never joined, never committed
                "enable.auto.commit": False,
                "enable.partition.eof": True,  # the true end: watermark queries are wrong on the local broker
                "fetch.wait.max.ms": 100,
            }
        )
        pending = {(tp.topic, tp.partition) for tp in partitions}
        try:
            consumer.assign(partitions)
            while not self._stop.is_set():
                for message in consumer.consume(1000, 0.5):
                    error = message.error()
                    if error is None:
                        self._apply(message)
                    elif error.code() == KafkaError._PARTITION_EOF:
                        pending.discard((message.topic(), message.partition()))
                    else:
                        log.warning("reading reference data: %s", error)
                if not pending and not self.caught_up.is_set():
                    self.caught_up.set()
        except Exception as error:  # reported by start(); later, the worker keeps its last good copy
            self._error = error
            log.exception("the reference feed stopped")
        finally:
            consumer.close()

    def _apply(self, message: Message) -> None:
        table = table_of_topic(message.topic())
        try:
            result = self.store.apply_envelope(table, message.key(), message.value())
        except CdcFormatError:
            self.skipped += 1
            return
        self.applied += 1
        if self.on_change is not None:
            self.on_change(table, str(result))
