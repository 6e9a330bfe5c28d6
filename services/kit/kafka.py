"""Thin wrappers over confluent-kafka with the platform's defaults.

Producers are idempotent, batched and compressed; consumers never auto-commit (a service commits what it has
durably handed on). The defaults also suit the local Tansu broker: short session timeouts, because its group
coordinator holds a JoinGroup for half the session timeout. Nothing here relies on Kafka transactions.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from services.kit.config import ServiceSettings
from services.kit.dependencies import DependencyUnavailable
from services.kit.metrics import LatencyRecorder

log = logging.getLogger(__name__)

# librdkafka's own log lines go through this logger instead of straight to stderr (where a broker that does not
# answer printed one line per reconnect: hundreds while a service waited). They are served on poll(): a client
# that only waits for metadata (`wait_for_broker`) says nothing, and its one error names the variable.
LIBRDKAFKA_LOG = logging.getLogger("librdkafka")

Headers = list[tuple[str, bytes]]


def client_config(settings: ServiceSettings, client_id: str | None = None) -> dict[str, Any]:
    """Connection settings shared by producers, consumers and admin clients."""
    config: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        "security.protocol": settings.kafka_security_protocol,
        "client.id": client_id or settings.service_name,
        "logger": LIBRDKAFKA_LOG,
    }
    if settings.kafka_sasl_mechanism:
        config |= {
            "sasl.mechanism": settings.kafka_sasl_mechanism,
            "sasl.username": settings.kafka_sasl_username or "",
            "sasl.password": settings.kafka_sasl_password.get_secret_value() if settings.kafka_sasl_password else "",
        }
    return config


class DeliveryFailed(RuntimeError):
    """Some records could not be delivered; the caller must not commit their source offsets."""


@dataclass
class DeliveryStats:
    delivered: int = 0
    failed: int = 0
    last_error: str | None = None
    per_topic: dict[str, int] = field(default_factory=dict)
    latency: LatencyRecorder = field(default_factory=LatencyRecorder)  # produce() to broker ack


# Idempotent (no duplicates from retries), large zstd batches: throughput at 20k events/s on few cores.
PRODUCER_DEFAULTS: dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 20,
    "batch.size": 1_000_000,
    "compression.type": "zstd",
    "queue.buffering.max.messages": 200_000,
    "message.timeout.ms": 120_000,
}


LATENCY_SAMPLE_EVERY = 8  # delivery latency is recorded for one record in this many


class KafkaProducer:
    """Idempotent producer with delivery accounting.

    `produce` never drops: when librdkafka's queue is full it serves delivery callbacks until there is room.
    `flush` raises `DeliveryFailed` if any record since the previous flush failed, so a caller that commits
    source offsets only after `flush` returns keeps at-least-once delivery.
    """

    def __init__(self, base_config: Mapping[str, Any], **overrides: Any) -> None:
        self._producer = Producer({**PRODUCER_DEFAULTS, **base_config, **overrides})
        self.stats = DeliveryStats()
        self._failed_since_flush = 0
        self._lock = threading.Lock()

    def _on_delivery(self, error: KafkaError | None, message: Message) -> None:
        with self._lock:
            if error is None:
                self.stats.delivered += 1
                topic = message.topic()
                self.stats.per_topic[topic] = self.stats.per_topic.get(topic, 0) + 1
                # Sampling keeps the per-record cost of the callback low at tens of thousands of records/s.
                if self.stats.delivered % LATENCY_SAMPLE_EVERY == 0:
                    latency = message.latency()
                    if latency is not None:
                        self.stats.latency.observe(latency)
            else:
                self.stats.failed += 1
                self._failed_since_flush += 1
                self.stats.last_error = str(error)

    def produce(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | str | None = None,
        headers: Headers | None = None,
        partition: int | None = None,
        on_delivery: Callable[[KafkaError | None, Message], None] | None = None,
    ) -> None:
        kwargs: dict[str, Any] = {"key": key, "value": value, "headers": headers}
        if partition is not None:
            kwargs["partition"] = partition
        if on_delivery is None:
            kwargs["on_delivery"] = self._on_delivery
        else:

            def both(error: KafkaError | None, message: Message) -> None:
                self._on_delivery(error, message)
                on_delivery(error, message)

            kwargs["on_delivery"] = both
        while True:
            try:
                self._producer.produce(topic, **kwargs)
                return
            except BufferError:
                # Local queue full: backpressure from the broker. Wait for deliveries instead of dropping.
                self._producer.poll(0.05)

    def warm_up(self, topic: str, timeout: float = 10.0) -> None:
        """Fetch the topic's metadata now, so the first records do not wait for it.

        Call `require_topics` first: a metadata request naming a missing topic makes Tansu create it.
        """
        metadata = self._producer.list_topics(topic, timeout=timeout)
        entry = metadata.topics.get(topic)
        if entry is None or entry.error is not None:
            raise KafkaException(entry.error if entry else f"topic {topic!r} not found")

    def poll(self, timeout: float = 0) -> int:
        return self._producer.poll(timeout)

    def pending(self) -> int:
        return len(self._producer)

    def flush(self, timeout: float = 30.0) -> None:
        remaining = self._producer.flush(timeout)
        with self._lock:
            failed, self._failed_since_flush = self._failed_since_flush, 0
        if remaining:
            raise DeliveryFailed(f"{remaining} records still undelivered after {timeout:.0f}s")
        if failed:
            raise DeliveryFailed(f"{failed} records failed delivery; last error: {self.stats.last_error}")


def consumer_config(base_config: Mapping[str, Any], group_id: str, **overrides: Any) -> dict[str, Any]:
    return {
        "group.id": group_id,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        # Short timeouts: fast failover, and Tansu's coordinator waits session.timeout/2 before a join completes.
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 1000,
        "max.poll.interval.ms": 300_000,
        "partition.assignment.strategy": "cooperative-sticky",
        "fetch.min.bytes": 1,
        "fetch.wait.max.ms": 100,
        **base_config,
        **overrides,
    }


class KafkaConsumer:
    """Consumer with explicit commits and per-partition pause/resume for backpressure."""

    def __init__(self, base_config: Mapping[str, Any], group_id: str, topics: Sequence[str], **overrides: Any):
        self._consumer = Consumer(consumer_config(base_config, group_id, **overrides))
        self.topics = list(topics)
        self._consumer.subscribe(self.topics)

    def consume(self, max_messages: int = 1000, timeout: float = 0.5) -> list[Message]:
        """Good messages only; partition EOF events are skipped, real errors raise."""
        messages = self._consumer.consume(max_messages, timeout)
        good = []
        for message in messages:
            error = message.error()
            if error is None:
                good.append(message)
            elif error.code() != KafkaError._PARTITION_EOF:
                raise KafkaException(error)
        return good

    def commit(self, offsets: Iterable[TopicPartition] | None = None) -> None:
        """Synchronous commit: after this returns, a restart resumes after the committed offsets."""
        if offsets is None:
            self._consumer.commit(asynchronous=False)
        else:
            self._consumer.commit(offsets=list(offsets), asynchronous=False)

    def pause(self, partitions: Iterable[TopicPartition]) -> None:
        self._consumer.pause(list(partitions))

    def resume(self, partitions: Iterable[TopicPartition]) -> None:
        self._consumer.resume(list(partitions))

    def assignment(self) -> list[TopicPartition]:
        return self._consumer.assignment()

    def close(self) -> None:
        self._consumer.close()


def next_offsets(messages: Iterable[Message]) -> list[TopicPartition]:
    """The offsets to commit after `messages`: highest offset + 1 per partition."""
    highest: dict[tuple[str, int], int] = {}
    for message in messages:
        key = (message.topic(), message.partition())
        highest[key] = max(highest.get(key, -1), message.offset())
    return [TopicPartition(topic, partition, offset + 1) for (topic, partition), offset in highest.items()]


def wait_for_broker(base_config: Mapping[str, Any], timeout: float = 30.0) -> None:
    """Block until the cluster answers a metadata request, or raise DependencyUnavailable: one line naming
    KAFKA_BOOTSTRAP_SERVERS and the address."""
    admin = AdminClient({"logger": LIBRDKAFKA_LOG, **base_config})
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            admin.list_topics(timeout=max(0.1, min(2.0, deadline - time.monotonic())))
            return
        except KafkaException as error:
            last = error
            time.sleep(0.3)
    reason = None
    if last is not None and last.args and isinstance(last.args[0], KafkaError):
        quiet = (KafkaError._TRANSPORT, KafkaError._TIMED_OUT, KafkaError._ALL_BROKERS_DOWN)
        reason = None if last.args[0].code() in quiet else last.args[0].str()
    raise DependencyUnavailable("KAFKA_BOOTSTRAP_SERVERS", str(base_config.get("bootstrap.servers")), timeout, reason)


def topic_exists(base_config: Mapping[str, Any], topic: str, timeout: float = 10.0) -> bool:
    metadata = AdminClient(dict(base_config)).list_topics(timeout=timeout)
    return topic in metadata.topics and metadata.topics[topic].error is None


class MissingTopicError(RuntimeError):
    """A topic a service needs is not declared on the cluster (services never create topics themselves)."""


def require_topics(base_config: Mapping[str, Any], *topics: str, timeout: float = 30.0) -> None:
    """Wait for the broker, then fail start-up with a clear message if any topic is missing."""
    wait_for_broker(base_config, timeout)
    existing = AdminClient(dict(base_config)).list_topics(timeout=10).topics
    missing = [t for t in topics if t not in existing or existing[t].error is not None]
    if missing:
        raise MissingTopicError(
            f"topic(s) {', '.join(repr(t) for t in missing)} do not exist: apply the declarations first "
            "(python -m services.declarations apply)"
        )


def create_topics(base_config: Mapping[str, Any], partitions: Mapping[str, int], timeout: float = 30.0) -> None:
    """Create topics with replication 1 (tests and benchmarks; the platform's own topics are declared)."""
    admin = AdminClient(dict(base_config))  # keep a reference: the futures die with the client
    futures = admin.create_topics([NewTopic(name, count, 1) for name, count in partitions.items()])
    for future in futures.values():
        future.result(timeout=timeout)


def scan_topic(
    base_config: Mapping[str, Any],
    topic: str,
    start: Mapping[int, int] | None = None,
    on_message: Callable[[Message], None] | None = None,
    timeout: float = 120.0,
) -> dict[int, int]:
    """Read every partition of `topic` from `start` (default: the beginning) to its end.

    Returns the end offset (next offset to be written) per partition and hands each record to `on_message`.
    Watermark queries (ListOffsets) are wrong on the local broker, but the high watermark a fetch returns is
    right, so partition EOF marks the true end. Meant for summaries, checks and tests, not for hot paths.
    """
    # All topics, not this one by name: Tansu creates any topic a metadata request names.
    metadata = AdminClient(dict(base_config)).list_topics(timeout=10)
    if topic not in metadata.topics or metadata.topics[topic].error is not None:
        raise KeyError(f"topic {topic!r} does not exist")
    partitions = sorted(metadata.topics[topic].partitions)
    begin = {p: (start or {}).get(p, OFFSET_BEGINNING) for p in partitions}
    consumer = Consumer(
        {
            **base_config,
            "group.id": "lp-scanner",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "fetch.wait.max.ms": 50,
        }
    )
    ends: dict[int, int] = {}
    try:
        consumer.assign([TopicPartition(topic, p, begin[p]) for p in partitions])
        deadline = time.monotonic() + timeout
        while len(ends) < len(partitions):
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic}: partitions {sorted(set(partitions) - set(ends))} not at end")
            for message in consumer.consume(10_000, 0.5):
                error = message.error()
                if error is None:
                    if on_message is not None:
                        on_message(message)
                elif error.code() == KafkaError._PARTITION_EOF:
                    ends[message.partition()] = message.offset()
                else:
                    raise KafkaException(error)
        return ends
    finally:
        consumer.close()


def count_messages(base_config: Mapping[str, Any], topic: str, since: Mapping[int, int] | None = None) -> int:
    """Records in `topic` (after the per-partition offsets `since`, when given), counted one by one."""
    counted = 0

    def count(_message: Message) -> None:
        nonlocal counted
        counted += 1

    scan_topic(base_config, topic, start=since, on_message=count)
    return counted


def committed_offsets(
    base_config: Mapping[str, Any], group: str, partitions: Iterable[tuple[str, int]], timeout: float = 10.0
) -> dict[tuple[str, int], int]:
    """The offsets `group` has committed per (topic, partition); 0 where it has committed none.

    Reads them without joining the group (an OffsetFetch), so it never disturbs the group's members."""
    wanted = [TopicPartition(topic, partition) for topic, partition in partitions]
    consumer = Consumer({**base_config, "group.id": group, "enable.auto.commit": False})
    try:
        found = consumer.committed(wanted, timeout=timeout)
    finally:
        consumer.close()
    return {(tp.topic, tp.partition): max(tp.offset, 0) for tp in found}


def cluster_id(base_config: Mapping[str, Any], timeout: float = 10.0) -> str:
    """The Kafka cluster's id. Positions (offsets) stored outside Kafka are only valid for the cluster that
    issued them: the local broker gets a new id with each (in-memory) start, as its log starts empty."""
    return str(AdminClient(dict(base_config)).list_topics(timeout=timeout).cluster_id or "")
