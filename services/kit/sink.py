"""The shared frame of every sink: consume, batch per partition, write, dead-letter, then commit.

A sink (ClickHouse, Iceberg, ...) implements `Sink.write(batch)` for the records of ONE topic-partition and
says which of them the store refused; `SinkRunner` does everything around it, the same way for every sink:

- consumes with the kit's `KafkaConsumer` (manual commits) and keeps one buffer per assigned partition;
- checks every payload against the topic's Avro contract (`AvroDeserializer`): a record that does not decode
  goes to the dead-letter topic with its `DecodeErrorCode`, it never stops the sink;
- flushes a buffer when it holds `BATCH_MAX_ROWS` records or its first record waited `BATCH_MAX_AGE_S`, and
  all buffers at once when together they hold `BATCH_MAX_ROWS` (many partitions, none full alone);
- on `SinkBackpressure` (store slow or down) pauses the partition, backs off exponentially with jitter and
  retries the SAME batch, then resumes: nothing is dropped and nothing is skipped;
- produces the rejected records to the dead-letter topic (original bytes, reason in `lp-dlq-*` headers),
  waits for the broker's acknowledgement, and only then commits `last offset + 1` of the batch;
- on revoke flushes and commits the revoked partitions; on SIGTERM (`close`) flushes and commits everything.

Idempotence is the sink's half of the contract: `PartitionBatch.dedup_token` names the consumed offset range,
so a store that remembers tokens (ClickHouse's `insert_deduplication_token`) ignores a replayed batch. For the
token to repeat, a replay must cut the same batches: a sink that can tell which batches it already holds
returns their last offsets from `written_batch_ends`, and the runner ends replayed batches exactly there. A
sink that keeps its own offsets (Iceberg commits them with the data) returns them from `stored_offsets` and
the runner seeks there instead of the Kafka committed offset.

A store whose every write costs a lot whatever its size (ClickHouse: a part per table and view per insert)
sets `Sink.group_writes`: when any partition is due, the runner hands the batches of ALL its partitions to
`write_group` at once, retries that group as a whole, and on replay regroups stored batches as they were
written (`WrittenBatch.group`), so the group's token repeats too.

Delivery to the dead-letter topic is at least once: a crash after the dead letters were acknowledged but
before the commit dead-letters those records again on replay (each carries its original topic, partition
and offset in headers, so a reader can tell).
"""

from __future__ import annotations

import logging
import random
import struct
import time
from abc import ABC, abstractmethod
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal, NamedTuple, cast, overload

from confluent_kafka import KafkaException, Message
from confluent_kafka import TopicPartition as KafkaTopicPartition
from opentelemetry import trace
from prometheus_client import Counter, Gauge, Histogram
from pydantic import Field

from services.kit.avro import (
    HEADER_SIZE,
    AvroDeserializer,
    Decoded,
    DecodeError,
    SchemaRepository,
)
from services.kit.config import ServiceSettings
from services.kit.kafka import Headers, KafkaConsumer, KafkaProducer, client_config, require_topics
from services.kit.metrics import LATENCY_BUCKETS
from services.kit.service import Service, SettingsT
from services.kit.tracing import extract_context

# The dead-letter format is the validator's (same headers, same parser, same replay CLI). It belongs in the kit
# now that sinks share it; until it moves, the sinks import it from there.
from services.contracts.deadletter import OriginalMessage, Stage, build_dead_letter  # isort: skip

log = logging.getLogger(__name__)

# "record": the runner decodes every record (refusals go to the dead-letter topic); "header": it only checks the
# single-object header and size (the store decodes the bodies column-wise); "none": it checks nothing and wraps
# records only when one is looked at (the sink decodes and checks everything itself, e.g. raw-bytes topics).
DecodeMode = Literal["record", "header", "none"]
STORE_STAGE = cast(Stage, "store")  # a dead letter refused by a sink's store (not one of the validator's stages)
TRACE_LINKS_PER_BATCH = 16  # a batch span links to at most this many producer traces
MAX_POLL_WAIT_S = 0.1

CONSUMED = Counter("lp_sink_records_consumed_total", "Records consumed and buffered for writing", ["sink", "topic"])
ROWS_WRITTEN = Counter("lp_sink_rows_written_total", "Records the sink's store accepted", ["sink", "topic"])
ROWS_REJECTED = Counter(
    "lp_sink_rows_rejected_total", "Records sent to the dead-letter topic", ["sink", "topic", "code"]
)
BATCHES = Counter("lp_sink_batches_total", "Partition batches written and committed", ["sink", "topic"])
BACKPRESSURE = Counter("lp_sink_backpressure_total", "Writes refused as backpressure (then retried)", ["sink", "topic"])
WRITE_SECONDS = Histogram("lp_sink_write_seconds", "Sink.write of one batch", ["sink"], buckets=LATENCY_BUCKETS)
PAUSED = Gauge("lp_sink_paused_partitions", "Partitions paused for backpressure or assignment", ["sink"])
BUFFERED = Gauge("lp_sink_buffered_records", "Records consumed, not yet committed", ["sink"])
LAG = Gauge(
    "lp_sink_consumer_lag", "High watermark minus the next offset, per partition", ["sink", "topic", "partition"]
)


class TopicPartition(NamedTuple):
    """A partition of a topic (hashable; unlike confluent_kafka.TopicPartition it carries no offset)."""

    topic: str
    partition: int


# --- records and batches ----------------------------------------------------------------------------------------
class UndecodableRecord(ValueError):
    def __init__(self, error: DecodeError) -> None:
        super().__init__(f"{error.code}: {error.message}")
        self.error = error


class SinkRecord:
    """One consumed record. Fields are read from the Kafka message on first use (most are never needed).

    `value` is the decoded Avro record (dict). With `Sink.decode_mode = "record"` (the default) the runner has
    decoded every record before `write`, so `value` never fails there; a `"header"` sink decodes payloads its
    own way (columnar) and may call `decode()` for the odd record its decoder refuses.
    """

    __slots__ = ("_decoded", "_decoder", "message")

    def __init__(self, message: Message, decoder: AvroDeserializer | None = None) -> None:
        self.message = message
        self._decoder = decoder
        self._decoded: Decoded | DecodeError | None = None

    @classmethod
    def of(
        cls,
        topic: str,
        partition: int,
        offset: int,
        value: bytes | None,
        *,
        key: bytes | None = None,
        headers: Headers | None = None,
        timestamp_ms: int | None = None,
        decoder: AvroDeserializer | None = None,
    ) -> SinkRecord:
        """A record not read from Kafka (tests, tools)."""
        message = Message(
            topic=topic,
            partition=partition,
            offset=offset,
            key=key,
            value=value,
            headers=headers,
            timestamp=(1, timestamp_ms) if timestamp_ms is not None else (0, 0),
        )
        return cls(message, decoder)

    @property
    def topic(self) -> str:
        return cast(str, self.message.topic())

    @property
    def partition(self) -> int:
        return cast(int, self.message.partition())

    @property
    def offset(self) -> int:
        return cast(int, self.message.offset())

    @property
    def key(self) -> bytes | None:
        return cast("bytes | None", self.message.key())

    @property
    def raw(self) -> bytes | None:
        """The value bytes exactly as consumed (what a dead letter carries)."""
        return cast("bytes | None", self.message.value())

    @property
    def headers(self) -> list[tuple[str, bytes | None]]:
        return list(self.message.headers() or ())

    @property
    def timestamp_ms(self) -> int | None:
        kind, value = self.message.timestamp()
        return value if kind else None

    def decode(self) -> Decoded | DecodeError:
        if self._decoded is None:
            if self._decoder is None:
                raise RuntimeError("this record has no Avro decoder")
            self._decoded = self._decoder(self.raw)
        return self._decoded

    @property
    def value(self) -> dict[str, Any]:
        result = self.decode()
        if isinstance(result, DecodeError):
            raise UndecodableRecord(result)
        return result.record

    def __repr__(self) -> str:
        return f"SinkRecord({self.topic}:{self.partition}@{self.offset})"


@dataclass(slots=True)
class PartitionBatch:
    """Records of ONE topic-partition, in offset order, covering the consumed range first..last_offset.

    The range includes records the runner already dead-lettered (undecodable): it is what was consumed, so
    the same range consumed again yields the same `dedup_token`.
    """

    topic: str
    partition: int
    records: list[SinkRecord]
    first_offset: int
    last_offset: int
    topic_id: str | None = None  # the topic's Kafka id: tells a re-created topic (offsets from 0 again) apart

    @property
    def topic_partition(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)

    @property
    def dedup_token(self) -> str:
        """`<topic>[@<topic id>]:<partition>:<first>-<last offset>`: the same consumed range, the same token."""
        topic = f"{self.topic}@{self.topic_id}" if self.topic_id else self.topic
        return f"{topic}:{self.partition}:{self.first_offset}-{self.last_offset}"

    def __len__(self) -> int:
        return len(self.records)


@dataclass(frozen=True, slots=True)
class Rejection:
    """A record the store refused: it goes to the dead-letter topic with this reason."""

    record: SinkRecord
    code: str
    message: str
    field: str | None = None
    stage: Stage = STORE_STAGE


@dataclass(slots=True)
class WriteResult:
    written: int = 0  # records the store holds now (rows a replay dedups count too)
    rejected: list[Rejection] = field(default_factory=list)


class SinkBackpressure(Exception):
    """The store is slow or unavailable: the runner pauses the partition and retries the same batch later."""

    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class WrittenBatch:
    """A batch the store holds: its last offset, and the group it was written with (see `Sink.write_group`)."""

    last_offset: int
    group: str | None = None


class Sink(ABC):
    """A store the runner writes partition batches to. Keep `write` idempotent for a given `dedup_token`."""

    name: ClassVar[str] = "sink"
    decode_mode: ClassVar[DecodeMode] = "record"
    # True: the runner hands over the due batches of ALL its partitions at once (`write_group`), for stores
    # where every write costs a lot whatever its size (ClickHouse: a part and its views per insert).
    group_writes: ClassVar[bool] = False

    def revoked(self, partitions: Sequence[TopicPartition]) -> None:  # noqa: B027 (an optional hook)
        """The runner drained these partitions and gave them up (a rebalance): forget what is kept of them."""

    def lost(self, partitions: Sequence[TopicPartition]) -> None:  # noqa: B027 (an optional hook)
        """These partitions were lost without a drain (another member may own them): drop what is kept."""

    @abstractmethod
    def write(self, batch: PartitionBatch) -> WriteResult:
        """Store the batch (all of it, or raise). Return the records the store refused, with reasons.

        Raise `SinkBackpressure` when the store is slow or down (the same batch comes back later); any other
        exception stops the service without committing, so the batch is replayed after the restart.
        """

    def write_group(self, batches: Sequence[PartitionBatch]) -> list[WriteResult]:
        """Store several partition batches together (`group_writes`); one result each, in order.

        All or nothing from the runner's view: after `SinkBackpressure` the SAME group comes back, so a write
        that half succeeded must be idempotent. A replay after a crash hands over the same group again when
        this process owns all of its partitions (`WrittenBatch.group`)."""
        return [self.write(batch) for batch in batches]

    def stored_offsets(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int] | None:
        """Next offset to consume per partition, for a sink that keeps offsets with its data (seek there).
        None, or a partition left out: use the Kafka committed offset. May raise `SinkBackpressure`."""
        return None

    def written_batch_ends(
        self, starts: Mapping[TopicPartition, int], topic_ids: Mapping[str, str | None]
    ) -> Mapping[TopicPartition, Sequence[int | WrittenBatch]]:
        """The batches the store already holds at or after each start offset (written to the store, not yet
        committed to Kafka), for the topics' current incarnation (`topic_ids`, as in `PartitionBatch`): their
        last offsets, or `WrittenBatch`es naming the group they were written with. The runner ends replayed
        batches exactly there (and regroups them), so they repeat their `dedup_token`. Default: none known.
        May raise `SinkBackpressure`."""
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the store's resources (after the last write)."""


# --- payload checks -------------------------------------------------------------------------------------------
def check_header(deserializer: AvroDeserializer, payload: bytes | None) -> DecodeError | None:
    """The header checks of `AvroDeserializer` only: a "header" sink decodes the body itself (and reports a
    corrupt body with `DecodeErrorCode.CORRUPT`)."""
    writer = deserializer.writer_of(payload)
    return writer if isinstance(writer, DecodeError) else None


def fingerprint_bytes(deserializer: AvroDeserializer) -> bytes:
    """Bytes 2..10 of a payload written with the reader's (current) schema."""
    return struct.pack("<Q", deserializer.reader.fingerprint)


# --- settings ---------------------------------------------------------------------------------------------------
class SinkSettings(ServiceSettings):
    """What every sink service shares (field `x` from variable `X`)."""

    consumer_group: str = Field(..., min_length=1, description="Kafka consumer group of the sink.")
    batch_max_rows: int = Field(50_000, ge=1, le=1_000_000, description="Flush a partition's buffer at this size.")
    batch_max_age_s: float = Field(
        1.0, gt=0, description="Flush a partition's buffer when its first record is this old."
    )
    poll_max_records: int = Field(10_000, ge=1, description="Most records taken from the consumer per poll.")
    backoff_initial_s: float = Field(0.2, gt=0, description="First retry delay after backpressure (doubles).")
    backoff_max_s: float = Field(30.0, gt=0, description="Longest retry delay after backpressure.")
    revoke_flush_timeout_s: float = Field(
        10.0, gt=0, description="Budget to flush a revoked partition; after it the batch is left to the new owner."
    )
    dlq_ack_timeout_s: float = Field(30.0, gt=0, description="Wait for the broker to acknowledge dead letters.")


@dataclass(frozen=True, slots=True)
class RunnerConfig:
    batch_max_rows: int = 50_000
    batch_max_age_s: float = 1.0
    poll_max_records: int = 10_000
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 30.0
    revoke_flush_timeout_s: float = 10.0
    dlq_ack_timeout_s: float = 30.0

    @classmethod
    def from_settings(cls, settings: SinkSettings) -> RunnerConfig:
        return cls(**{name: getattr(settings, name) for name in cls.__dataclass_fields__})


def backoff_delay(attempt: int, initial: float, maximum: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with "equal jitter": between half and all of min(max, initial * 2^(attempt-1))."""
    ceiling = min(maximum, initial * 2 ** max(0, attempt - 1))
    return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)


class LazyRecords(Sequence[SinkRecord]):
    """A batch's messages, wrapped as `SinkRecord`s only when one is looked at (a rejection, a trace link): for
    sinks that read the messages column-wise (`decode_mode = "none"`)."""

    def __init__(self, messages: list[Message], decoder: AvroDeserializer | None = None) -> None:
        self.messages = messages
        self.decoder = decoder

    def __len__(self) -> int:
        return len(self.messages)

    @overload
    def __getitem__(self, index: int) -> SinkRecord: ...
    @overload
    def __getitem__(self, index: slice) -> list[SinkRecord]: ...
    def __getitem__(self, index: int | slice) -> SinkRecord | list[SinkRecord]:
        if isinstance(index, slice):
            return [SinkRecord(m, self.decoder) for m in self.messages[index]]
        return SinkRecord(self.messages[index], self.decoder)


def messages_of(records: Sequence[SinkRecord]) -> list[Message]:
    """The Kafka messages behind `records`, without wrapping a `LazyRecords` batch record by record."""
    if isinstance(records, LazyRecords):
        return records.messages
    return [record.message for record in records]


# --- the runner -------------------------------------------------------------------------------------------------
@dataclass
class _Pending:
    """One partition's batch in a write, with the records the runner already refused (undecodable)."""

    batch: PartitionBatch
    decode_rejections: list[Rejection]
    result: WriteResult | None = None


@dataclass
class _Group:
    """Batches written together (one, unless the sink groups writes), kept until their dead letters are
    acknowledged and their offsets committed; retried as a whole."""

    members: list[_Pending]
    written: bool = False  # the store accepted them: a retry only redoes the dead letters
    attempts: int = 0
    next_attempt_at: float = 0.0

    @property
    def records(self) -> int:
        return sum(len(m.batch.records) for m in self.members)


@dataclass
class _PartitionState:
    tp: TopicPartition
    resolved: bool = False  # start offset and replay cuts known
    messages: list[Message] = field(default_factory=list)
    first_buffered_at: float = 0.0
    cuts: deque[WrittenBatch] = field(default_factory=deque)
    group: _Group | None = None
    paused: bool = False
    resolve_attempts: int = 0
    next_resolve_at: float = 0.0


@dataclass
class RunnerStats:
    written: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    backpressure: int = 0
    uncommitted_at_close: int = 0


class _Consumer(KafkaConsumer):
    """The kit consumer, subscribed with rebalance callbacks (the kit's subscribes without them)."""

    def __init__(
        self,
        base_config: Mapping[str, Any],
        group_id: str,
        topics: Sequence[str],
        on_assign: Callable[[Any, list[KafkaTopicPartition]], None],
        on_revoke: Callable[[Any, list[KafkaTopicPartition]], None],
        on_lost: Callable[[Any, list[KafkaTopicPartition]], None],
        **overrides: Any,
    ) -> None:
        super().__init__(base_config, group_id, topics, **overrides)
        # Re-subscribing before the first poll replaces the subscription; no rebalance has happened yet.
        self._consumer.subscribe(self.topics, on_assign=on_assign, on_revoke=on_revoke, on_lost=on_lost)

    def committed(self, partitions: Sequence[TopicPartition], timeout: float = 10.0) -> dict[TopicPartition, int]:
        """The group's committed offset per partition (negative: none)."""
        found = self._consumer.committed([KafkaTopicPartition(t, p) for t, p in partitions], timeout=timeout)
        return {TopicPartition(kp.topic, kp.partition): kp.offset for kp in found}

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self._consumer.seek(KafkaTopicPartition(tp.topic, tp.partition, offset))

    def high_watermark(self, tp: TopicPartition) -> int | None:
        """From the last fetch response (no request; right even where ListOffsets is not, as on Tansu)."""
        try:
            _low, high = self._consumer.get_watermark_offsets(KafkaTopicPartition(*tp), cached=True)
        except KafkaException:
            return None
        return high if high >= 0 else None


class SinkRunner:
    """Drives one `Sink` from Kafka. Call `step()` in a loop and `close()` once (see the module docstring)."""

    def __init__(
        self,
        sink: Sink,
        kafka_config: Mapping[str, Any],
        group_id: str,
        subjects: Mapping[str, str | None],
        dead_letter_topic: Callable[[str], str],
        config: RunnerConfig = RunnerConfig(),
        *,
        schemas: SchemaRepository | None = None,
        producer: KafkaProducer | None = None,
        consumer_factory: Callable[..., Any] | None = None,
        consumer_overrides: Mapping[str, Any] | None = None,
        topic_ids: Mapping[str, str | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        """`subjects`: input topic -> Avro subject of its values; `dead_letter_topic`: input topic -> DLQ topic.

        `consumer_factory(on_assign=, on_revoke=, on_lost=)` replaces the Kafka consumer (unit tests); it must
        offer consume, commit, pause, resume, close, committed, seek and high_watermark as `_Consumer` does.
        `topic_ids`: the input topics' Kafka ids (default: asked from the cluster; none with a factory)."""
        self.sink = sink
        self.config = config
        self.subjects = dict(subjects)
        self.dead_letter_topic = dead_letter_topic
        self.clock = clock
        self.rng = rng or random.Random()
        schemas = schemas or SchemaRepository.load()
        # A subject of None: raw bytes without a contract (dead-letter topics); nothing to decode or check.
        self.decoders = {
            topic: AvroDeserializer(schemas, subject) for topic, subject in self.subjects.items() if subject
        }
        self.states: dict[TopicPartition, _PartitionState] = {}
        self.stats = RunnerStats()
        self.producer = producer or KafkaProducer(kafka_config)
        if topic_ids is None:
            topic_ids = lookup_topic_ids(kafka_config, list(self.subjects)) if consumer_factory is None else {}
        self.topic_ids: dict[str, str | None] = {topic: topic_ids.get(topic) for topic in self.subjects}
        callbacks = {"on_assign": self._on_assign, "on_revoke": self._on_revoke, "on_lost": self._on_lost}
        if consumer_factory is not None:
            self.consumer = consumer_factory(**callbacks)
        else:
            self.consumer = _Consumer(
                kafka_config, group_id, list(self.subjects), **callbacks, **dict(consumer_overrides or {})
            )
        self.tracer = trace.get_tracer("services.kit.sink")
        self._labels = {"sink": sink.name}
        self._commit_retry: dict[TopicPartition, int] = {}
        self._throttled: set[TopicPartition] = set()

    # -- the loop ----------------------------------------------------------------------------------------------
    def step(self, poll_timeout: float | None = None) -> int:
        """Resolve new partitions, retry due batches, poll once, flush what is due. Returns records polled."""
        now = self.clock()
        self._resolve_assignments(now)
        self._retry_due(now)
        self._retry_commits()
        timeout = self._poll_timeout(now) if poll_timeout is None else poll_timeout
        self._throttle()
        messages = self.consumer.consume(self.config.poll_max_records, timeout)
        if messages:
            self._buffer(messages)
        self._flush_due(self.clock())
        self._export_gauges()
        return len(messages)

    def close(self, timeout_s: float = 20.0) -> None:
        """Flush and commit every partition (bounded by `timeout_s`), then leave the group.

        What cannot be written in time stays uncommitted and is consumed again by the next owner."""
        deadline = self.clock() + timeout_s
        try:
            self._drain(list(self.states.values()), deadline)
        finally:
            left = self.buffered
            self.stats.uncommitted_at_close = left
            if left:
                log.warning("closing with %d records unwritten: the next owner consumes them again", left)
            self.states.clear()
            try:
                self.consumer.close()
            finally:
                self._export_gauges()

    def readiness(self) -> str | None:
        """None when no partition waits on the store, else why (for /readyz)."""
        blocked = [s.tp for s in self.states.values() if s.group is not None and s.group.attempts > 0]
        if blocked:
            return f"store refused writes for {len(blocked)} partition(s); retrying"
        return None

    @property
    def buffered(self) -> int:
        groups = {id(s.group): s.group for s in self.states.values() if s.group is not None}
        return sum(len(s.messages) for s in self.states.values()) + sum(g.records for g in groups.values())

    # -- rebalance callbacks (called inside consume()) ---------------------------------------------------------
    def _on_assign(self, consumer: Any, partitions: list[KafkaTopicPartition]) -> None:
        consumer.incremental_assign(partitions)
        # Paused until the start offset and the replay cuts are known (the store may be down right now).
        consumer.pause(partitions)
        for kp in partitions:
            tp = TopicPartition(kp.topic, kp.partition)
            self.states[tp] = _PartitionState(tp, paused=True)
        log.info("assigned %s", ", ".join(f"{kp.topic}[{kp.partition}]" for kp in partitions))

    def _on_revoke(self, _consumer: Any, partitions: list[KafkaTopicPartition]) -> None:
        revoked = [TopicPartition(kp.topic, kp.partition) for kp in partitions]
        deadline = self.clock() + self.config.revoke_flush_timeout_s
        self._drain([self.states[tp] for tp in revoked if tp in self.states], deadline)
        self._forget(revoked)
        self.sink.revoked(revoked)
        log.info("revoked %s", ", ".join(f"{kp.topic}[{kp.partition}]" for kp in partitions))

    def _on_lost(self, _consumer: Any, partitions: list[KafkaTopicPartition]) -> None:
        # Another member may own them already: drop the buffers, commit nothing (the owner replays them).
        lost = [TopicPartition(kp.topic, kp.partition) for kp in partitions]
        self._forget(lost)
        self.sink.lost(lost)
        log.warning("lost %s", ", ".join(f"{kp.topic}[{kp.partition}]" for kp in partitions))

    def _forget(self, partitions: Sequence[TopicPartition]) -> None:
        """Drop these partitions. A group they were in is given up for its other members too: those restart
        from their committed offset and the store's cuts, as after an assignment."""
        for tp in partitions:
            state = self.states.pop(tp, None)
            self._commit_retry.pop(tp, None)
            if state is None or state.group is None:
                continue
            for member in state.group.members:
                other = self.states.get(member.batch.topic_partition)
                if other is not None and other.group is state.group:
                    other.group = None
                    other.messages.clear()
                    other.cuts.clear()
                    other.resolved = False
                    other.next_resolve_at = 0.0
                    if not other.paused:
                        self.consumer.pause([KafkaTopicPartition(*other.tp)])
                        other.paused = True

    # -- assignment resolution -----------------------------------------------------------------------------
    def _resolve_assignments(self, now: float) -> None:
        waiting = [s for s in self.states.values() if not s.resolved and s.next_resolve_at <= now]
        if not waiting:
            return
        tps = [s.tp for s in waiting]
        try:
            starts = self.consumer.committed(tps, timeout=10)
            stored = self.sink.stored_offsets(tps) or {}
            # No committed offset: the consumer starts at the beginning (auto.offset.reset=earliest).
            starts = {tp: max(0, offset) for tp, offset in starts.items()}
            for tp, offset in stored.items():
                if tp in starts and offset >= 0:
                    starts[tp] = offset
            ends = self.sink.written_batch_ends(starts, self.topic_ids)
            for tp in tps:
                self.consumer.seek(tp, starts.get(tp, 0))  # also re-reads what a given-up group had taken
        except (SinkBackpressure, KafkaException) as error:
            for state in waiting:
                state.resolve_attempts += 1
                delay = self._delay(state.resolve_attempts, getattr(error, "retry_after_s", None))
                state.next_resolve_at = now + delay
            log.warning("cannot resolve the start of %d partition(s), retrying: %s", len(waiting), error)
            return
        for state in waiting:
            start = starts.get(state.tp, 0)
            written = [e if isinstance(e, WrittenBatch) else WrittenBatch(int(e)) for e in ends.get(state.tp, ())]
            state.cuts = deque(sorted({e for e in written if e.last_offset >= start}, key=lambda e: e.last_offset))
            state.messages.clear()  # fetched before the seek
            state.resolved = True
            if state.cuts:
                log.info(
                    "%s[%d]: %d batch(es) from %d were written but not committed; replaying them as they were",
                    state.tp.topic,
                    state.tp.partition,
                    len(state.cuts),
                    start,
                )
            self._resume(state)

    # -- buffering and flushing ----------------------------------------------------------------------------
    def _buffer(self, messages: list[Message]) -> None:
        now = self.clock()
        before = {tp: len(state.messages) for tp, state in self.states.items()}
        current: _PartitionState | None = None
        current_key: tuple[str, int] | None = None
        for message in messages:
            key = (message.topic(), message.partition())
            if key != current_key:
                current_key = key
                current = self.states.get(TopicPartition(*key))
                if current is not None and not current.resolved:
                    current = None  # fetched before the resolution's seek: read again from there
                if current is not None and not current.messages:
                    current.first_buffered_at = now
            if current is None:
                continue  # a partition revoked or being resolved: consumed again from its start offset
            current.messages.append(message)
        for tp, count in before.items():
            added = len(self.states[tp].messages) - count
            if added:
                CONSUMED.labels(self.sink.name, tp.topic).inc(added)

    def _flush_due(self, now: float, force: bool = False, only: Sequence[_PartitionState] | None = None) -> None:
        """Form and write the groups that are due: replays of stored batches first, then new batches."""
        candidates = [s for s in (only if only is not None else self.states.values()) if s.resolved]
        while self._flush_replays(candidates, now):
            pass
        cfg = self.config
        while True:
            free = [s for s in candidates if s.group is None and s.messages and not s.cuts]
            due = [
                s
                for s in free
                if force or len(s.messages) >= cfg.batch_max_rows or now - s.first_buffered_at >= cfg.batch_max_age_s
            ]
            if not due and sum(len(s.messages) for s in free) >= cfg.batch_max_rows:
                # Together they fill a write: write them now. Waiting for their age would stall the consumer, which
                # `_throttle` pauses at two writes' worth (with many partitions, long before any one is full).
                due = free
            if not due:
                return
            if self.sink.group_writes:
                # Whatever every partition has buffered goes along: one write per flush, not one per partition.
                members, budget = [], cfg.batch_max_rows
                for state in sorted(free, key=lambda s: s.first_buffered_at):
                    if budget <= 0:
                        break
                    taken = state.messages[: min(cfg.batch_max_rows, budget)]
                    budget -= len(taken)
                    members.append((state, taken, taken[-1].offset()))
                self._start_group(members, now)
            else:
                for state in due:
                    taken = state.messages[: cfg.batch_max_rows]
                    self._start_group([(state, taken, taken[-1].offset())], now)

    def _flush_replays(self, candidates: Sequence[_PartitionState], now: float) -> int:
        """Batches the store holds but Kafka never saw committed: re-formed exactly, regrouped as written.

        A group goes again only when every partition of it this process owns has it as its next batch, whole
        (of partitions owned elsewhere it cannot know more: their owner replays those)."""
        owners: dict[str | int, list[_PartitionState]] = {}
        for state in self.states.values():
            if not state.resolved:
                continue
            for cut in state.cuts:
                if cut.group is not None:
                    owners.setdefault(cut.group, []).append(state)
        ready: dict[str | int, list[tuple[_PartitionState, list[Message], int]]] = {}
        for state in candidates:
            if state.group is not None:
                continue
            while state.cuts and state.messages and state.messages[0].offset() > state.cuts[0].last_offset:
                state.cuts.popleft()  # the cut's records are gone (retention): nothing to replay there
            if not state.cuts or not state.messages or state.messages[-1].offset() < state.cuts[0].last_offset:
                continue  # nothing stored to replay, or not all of it here yet (a shorter batch: another token)
            cut = state.cuts[0]
            taken = state.messages[: bisect_right(state.messages, cut.last_offset, key=lambda m: m.offset())]
            ready.setdefault(cut.group if cut.group is not None else id(state), []).append(
                (state, taken, cut.last_offset)
            )
        started = 0
        for key, members in ready.items():
            if isinstance(key, str) and {id(s) for s in owners.get(key, [])} != {id(m[0]) for m in members}:
                continue  # another partition of the group is not at this batch yet
            for state, _taken, _last in members:
                state.cuts.popleft()
            self._start_group(members, now)
            started += 1
        return started

    def _start_group(self, members: Sequence[tuple[_PartitionState, list[Message], int]], now: float) -> None:
        pendings = []
        for state, taken, last in members:
            # What is left arrived after `taken`, but keeps its age: with a backlog, the next batch is due at once.
            state.messages = state.messages[len(taken) :]
            pendings.append(self._prepare(state.tp, taken, last))
        group = _Group(pendings)
        for state, _taken, _last in members:
            state.group = group
        self._attempt(group, now)

    def resync(self, partitions: Sequence[TopicPartition]) -> None:
        """Seek these partitions to the sink's stored offsets again (the sink dropped what it held of them, e.g.
        fenced by another writer). Call between steps, never from inside `Sink.write`."""
        for tp in partitions:
            state = self.states.get(tp)
            if state is not None:
                state.resolved = False  # the next step asks stored_offsets, seeks there, drops what was fetched
                state.next_resolve_at = 0.0
                state.messages.clear()
                state.group = None  # a batch waiting for a retry was read before the fence: never write it

    def _prepare(self, tp: TopicPartition, messages: list[Message], last: int) -> _Pending:
        decoder = self.decoders.get(tp.topic)
        if decoder is None or self.sink.decode_mode == "none":
            records = cast(list[SinkRecord], LazyRecords(messages, decoder))
            topic_id = self.topic_ids.get(tp.topic)
            return _Pending(PartitionBatch(tp.topic, tp.partition, records, messages[0].offset(), last, topic_id), [])
        header_only = self.sink.decode_mode == "header"
        if header_only:
            # The common case, every payload written with the current schema, checked in one pass: no
            # per-record object is built (at 100k records/s each microsecond per record is a tenth of the budget).
            current, max_bytes = decoder.reader.header, decoder.max_bytes
            odd = [m for m in messages if (v := m.value()) is None or v[:HEADER_SIZE] != current or len(v) > max_bytes]
            if not odd:
                lazy = cast(list[SinkRecord], LazyRecords(messages, decoder))
                topic_id = self.topic_ids.get(tp.topic)
                return _Pending(PartitionBatch(tp.topic, tp.partition, lazy, messages[0].offset(), last, topic_id), [])
        records: list[SinkRecord] = []
        rejections: list[Rejection] = []
        for message in messages:
            record = SinkRecord(message, decoder)
            if header_only:
                error = check_header(decoder, message.value())
            else:
                result = record.decode()
                error = result if isinstance(result, DecodeError) else None
            if error is None:
                records.append(record)
            else:
                rejections.append(Rejection(record, str(error.code), error.message, stage=Stage.DECODE))
        batch = PartitionBatch(
            tp.topic, tp.partition, records, messages[0].offset(), last, self.topic_ids.get(tp.topic)
        )
        return _Pending(batch, rejections)

    def _attempt(self, group: _Group, now: float) -> bool:
        """One try at writing, dead-lettering and committing a group. False: it waits for a retry."""
        try:
            if not group.written:
                self._write(group)
                group.written = True
            rejected = [r for m in group.members for r in m.decode_rejections + (m.result or WriteResult()).rejected]
            if rejected:
                self._dead_letter(rejected)
        except SinkBackpressure as error:
            self._backoff(group, now, error.retry_after_s, str(error))
            return False
        except (KafkaException, _DeadLettersNotAcknowledged) as error:  # the write is done: redo the dead letters
            self._backoff(group, now, None, f"dead-letter topic: {error}")
            return False
        offsets = {}
        for member in group.members:
            state = self.states.get(member.batch.topic_partition)
            if state is None or state.group is not group:
                continue
            state.group = None
            offsets[state.tp] = member.batch.last_offset + 1
            self._account(member)
            if state.paused and state.resolved:
                self._resume(state)
        self._commit(offsets)  # one synchronous commit for the whole group
        return True

    def _write(self, group: _Group) -> None:
        batches = [m.batch for m in group.members]
        tail: list[Message] = []  # the last records of the write: their traces are linked
        for batch in reversed(batches):
            if len(tail) >= TRACE_LINKS_PER_BATCH:
                break
            tail = messages_of(batch.records)[-(TRACE_LINKS_PER_BATCH - len(tail)) :] + tail
        links = []
        for message in tail:
            span_context = trace.get_current_span(extract_context(message.headers())).get_span_context()
            if span_context.is_valid:
                links.append(trace.Link(span_context))
        parent = extract_context(tail[-1].headers()) if tail else None
        with self.tracer.start_as_current_span(f"{self.sink.name}.write", context=parent, links=links) as span:
            span.set_attribute("messaging.batch.message_count", sum(len(b.records) for b in batches))
            span.set_attribute("lp.sink.batches", [b.dedup_token for b in batches])
            started = time.perf_counter()
            with_records = [b for b in batches if b.records]
            if not with_records:
                results: list[WriteResult] = []
            elif self.sink.group_writes:
                results = self.sink.write_group(with_records)
            else:
                results = [self.sink.write(b) for b in with_records]
            WRITE_SECONDS.labels(**self._labels).observe(time.perf_counter() - started)
            by_batch = dict(zip((id(b) for b in with_records), results, strict=True))
            for member in group.members:
                member.result = by_batch.get(id(member.batch), WriteResult())
            span.set_attribute("lp.sink.rejected", sum(len(r.rejected) for r in results))

    def _dead_letter(self, rejected: Sequence[Rejection]) -> None:
        now = datetime.now(UTC)
        for rejection in rejected:
            record = rejection.record
            original = OriginalMessage(
                record.topic, record.partition, record.offset, record.key, record.raw, record.headers
            )
            letter = build_dead_letter(
                original,
                code=rejection.code,
                stage=rejection.stage,
                message=rejection.message,
                now=now,
                field=rejection.field,
                topic=self.dead_letter_topic(record.topic),
            )
            self.producer.produce(letter.topic, letter.value, key=letter.key, headers=letter.headers)
        try:
            self.producer.flush(self.config.dlq_ack_timeout_s)
        except Exception as error:  # DeliveryFailed: not acknowledged, so the offsets must not be committed
            raise _DeadLettersNotAcknowledged(str(error)) from error

    def _commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        if not offsets:
            return
        try:
            self.consumer.commit([KafkaTopicPartition(tp.topic, tp.partition, o) for tp, o in offsets.items()])
            for tp in offsets:
                self._commit_retry.pop(tp, None)
        except KafkaException as error:
            # The rows are stored; a replay of these ranges re-forms the same batches and the store ignores them.
            log.warning("commit of %d partition(s) failed, retrying: %s", len(offsets), error)
            self._commit_retry.update(offsets)

    def _retry_commits(self) -> None:
        for tp in [tp for tp in self._commit_retry if tp not in self.states]:
            self._commit_retry.pop(tp)
        if self._commit_retry:
            self._commit(dict(self._commit_retry))

    def _account(self, member: _Pending) -> None:
        batch, result = member.batch, member.result or WriteResult()
        rejected = member.decode_rejections + result.rejected
        topic = batch.topic
        self.stats.batches += 1
        self.stats.written[topic] = self.stats.written.get(topic, 0) + result.written
        if rejected:
            self.stats.rejected[topic] = self.stats.rejected.get(topic, 0) + len(rejected)
        BATCHES.labels(self.sink.name, topic).inc()
        ROWS_WRITTEN.labels(self.sink.name, topic).inc(result.written)
        for rejection in rejected:
            ROWS_REJECTED.labels(self.sink.name, topic, rejection.code).inc()
        high = self.consumer.high_watermark(batch.topic_partition)
        if high is not None:
            LAG.labels(self.sink.name, topic, str(batch.partition)).set(max(0, high - batch.last_offset - 1))

    # -- backpressure ----------------------------------------------------------------------------------------
    def _delay(self, attempts: int, hint: float | None) -> float:
        delay = backoff_delay(attempts, self.config.backoff_initial_s, self.config.backoff_max_s, self.rng)
        return max(delay, min(hint or 0.0, self.config.backoff_max_s))

    def _backoff(self, group: _Group, now: float, hint: float | None, reason: str) -> None:
        group.attempts += 1
        delay = self._delay(group.attempts, hint)
        group.next_attempt_at = now + delay
        self.stats.backpressure += 1
        for member in group.members:
            BACKPRESSURE.labels(self.sink.name, member.batch.topic).inc()
            state = self.states.get(member.batch.topic_partition)
            if state is not None and not state.paused:
                self.consumer.pause([KafkaTopicPartition(*state.tp)])
                state.paused = True
        log.warning(
            "%d batch(es) not written (attempt %d, first %s), retrying in %.2fs: %s",
            len(group.members),
            group.attempts,
            group.members[0].batch.dedup_token,
            delay,
            reason,
        )

    def _groups(self, states: Sequence[_PartitionState] | None = None) -> list[_Group]:
        found: dict[int, _Group] = {}
        for state in states if states is not None else self.states.values():
            if state.group is not None:
                found[id(state.group)] = state.group
        return list(found.values())

    def _retry_due(self, now: float) -> None:
        for group in self._groups():
            if group.next_attempt_at <= now:
                self._attempt(group, now)

    def _throttle(self) -> None:
        """Bound memory: past two writes' worth of buffered records, fetch nothing more until they are written
        (paused partitions; consume() goes on, for the group's heartbeats and rebalances)."""
        over = self.buffered >= 2 * self.config.batch_max_rows
        if over and not self._throttled:
            chosen = [s.tp for s in self.states.values() if not s.paused]
            if chosen:
                self.consumer.pause([KafkaTopicPartition(*tp) for tp in chosen])
                self._throttled = set(chosen)
        elif not over and self._throttled:
            ready = [tp for tp in self._throttled if tp in self.states and not self.states[tp].paused]
            if ready:
                self.consumer.resume([KafkaTopicPartition(*tp) for tp in ready])
            self._throttled = set()

    def _resume(self, state: _PartitionState) -> None:
        if state.paused:
            self.consumer.resume([KafkaTopicPartition(state.tp.topic, state.tp.partition)])
            state.paused = False

    def _drain(self, states: Sequence[_PartitionState], deadline: float) -> None:
        """Write and commit everything buffered for these partitions, retrying backpressure until `deadline`."""
        states = [s for s in states if s.resolved]
        while self.clock() < deadline:
            now = self.clock()
            groups = self._groups(states)
            if groups:
                for group in groups:
                    if group.next_attempt_at <= now:
                        self._attempt(group, now)
                if self._groups(states):
                    wake = min(g.next_attempt_at for g in self._groups(states))
                    time.sleep(max(0.0, min(wake, deadline) - self.clock()))
                continue
            left = sum(len(s.messages) for s in states)
            if not left:
                return
            self._flush_due(now, force=True, only=states)
            if not self._groups(states) and sum(len(s.messages) for s in states) == left:
                return  # only parts of replayed batches are here: they stay uncommitted (see _flush_replays)

    def _poll_timeout(self, now: float) -> float:
        """Wait in consume() until the next buffer or retry is due, at most MAX_POLL_WAIT_S: consume() returns
        early only with `poll_max_records` records, and a record's age counts from when consume() returns it."""
        wake = now + MAX_POLL_WAIT_S
        for state in self.states.values():
            if state.group is not None:
                wake = min(wake, state.group.next_attempt_at)
            elif state.messages:
                wake = min(wake, state.first_buffered_at + self.config.batch_max_age_s)
            if not state.resolved:
                wake = min(wake, state.next_resolve_at)
        return max(0.0, min(MAX_POLL_WAIT_S, wake - now))

    def _export_gauges(self) -> None:
        PAUSED.labels(**self._labels).set(sum(1 for s in self.states.values() if s.paused))
        BUFFERED.labels(**self._labels).set(self.buffered)


class _DeadLettersNotAcknowledged(RuntimeError):
    pass


def lookup_topic_ids(kafka_config: Mapping[str, Any], topics: Sequence[str], timeout: float = 10.0) -> dict[str, str]:
    """Kafka's id of each topic (KIP-516): a topic deleted and created again gets a new one. Brokers without
    topic ids give none, and tokens then rest on the name alone."""
    from confluent_kafka import TopicCollection
    from confluent_kafka.admin import AdminClient

    ids: dict[str, str] = {}
    try:
        admin = AdminClient(dict(kafka_config))  # keep a reference: the futures die with the client
        futures = admin.describe_topics(TopicCollection(list(topics)), request_timeout=timeout)
        for name, future in futures.items():
            topic_id = future.result(timeout=timeout).topic_id
            if topic_id is not None and str(topic_id).strip("A="):  # all zeros: no id
                ids[name] = str(topic_id)
    except Exception as error:  # an old broker: tokens without the id (a re-created topic then needs care)
        log.warning("cannot read the topics' ids (%s): dedup tokens use the names only", error)
    return ids


# --- the service --------------------------------------------------------------------------------------------------
class SinkService(Service[SettingsT], ABC):
    """A sink as a service: `make_sink()` and `subjects()` are all a subclass must give.

    Settings must be (a subclass of) `SinkSettings`. `stop()` flushes and commits within SHUTDOWN_TIMEOUT_S."""

    runner: SinkRunner
    sink: Sink

    @abstractmethod
    def make_sink(self) -> Sink:
        """Connect to the store (apply migrations, ...); raise to fail start-up."""

    @abstractmethod
    def subjects(self) -> dict[str, str | None]:
        """Input topic -> Avro subject of its values (None: raw bytes without a contract)."""

    def dead_letter_topic(self, topic: str) -> str:
        """Where refused records of `topic` go (default `<topic>.<sink name>.dlq`)."""
        return f"{topic}.{self.sink.name}.dlq"

    def start(self) -> None:
        settings = cast(SinkSettings, self.settings)
        kafka = client_config(settings)
        subjects = self.subjects()
        self.sink = self.make_sink()
        require_topics(kafka, *subjects, *(self.dead_letter_topic(t) for t in subjects))
        self.runner = SinkRunner(
            self.sink,
            kafka,
            settings.consumer_group,
            subjects,
            self.dead_letter_topic,
            RunnerConfig.from_settings(settings),
        )
        self.health.add_check("store", self.runner.readiness)
        self.log.info(
            "sinking %s into %s",
            ", ".join(subjects),
            self.sink.name,
            extra={"consumer_group": settings.consumer_group, "batch_max_rows": settings.batch_max_rows},
        )

    def step(self) -> bool:
        self.runner.step()
        return True

    def stop(self) -> None:
        runner = getattr(self, "runner", None)
        try:
            if runner is not None:
                # Leave a margin of the shutdown budget for closing the store and the report.
                runner.close(timeout_s=max(1.0, self.settings.shutdown_timeout_s * 0.75))
        finally:
            sink = getattr(self, "sink", None)
            if sink is not None:
                sink.close()
