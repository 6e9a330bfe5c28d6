"""`SinkRunner`: drives one `Sink` from Kafka (the contract is the package docstring, `services.kit.sink`)."""

from __future__ import annotations

import logging
import random
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from confluent_kafka import KafkaException, Message
from confluent_kafka import TopicPartition as KafkaTopicPartition
from opentelemetry import trace
from opentelemetry.trace import Span, SpanContext
from prometheus_client import Counter, Gauge, Histogram

from services.kit.avro import HEADER_SIZE, AvroDeserializer, DecodeError, SchemaRepository, SchemaStoreUnavailable
from services.kit.health import Health
from services.kit.kafka import KafkaConsumer, KafkaProducer
from services.kit.lag import ConsumerLag
from services.kit.metrics import (
    DEAD_LETTERS,
    EVENT_TO_VISIBLE,
    LATENCY_BUCKETS,
    STAGE_ERRORS,
    STAGE_RECORDS_IN,
    STAGE_RECORDS_OUT,
)
from services.kit.sink.base import (
    DeadLetterRoute,
    Rejection,
    RejectionStage,
    Sink,
    SinkBackpressure,
    WriteResult,
    WrittenBatch,
)
from services.kit.sink.records import LazyRecords, PartitionBatch, SinkRecord, TopicPartition, check_header, messages_of
from services.kit.sink.settings import RunnerConfig, backoff_delay
from services.kit.tracing import (
    DEAD_LETTER_SAMPLED,
    batch_span,
    consumer_span,
    dead_letter_span,
    sampled_context,
    traces_messages,
    with_traceparent,
)

log = logging.getLogger(__name__)

SCHEMA_STORE = "schema-store"  # the dependency /readyz names while writer schemas cannot be looked up

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


@dataclass
class _Pending:
    """One partition's batch in a write, with the records the runner already refused (undecodable)."""

    batch: PartitionBatch
    decode_rejections: list[Rejection]
    result: WriteResult | None = None
    # Not yet checked against the contract (the schema store was down): checked again before the next try.
    unchecked: list[Message] | None = None


@dataclass
class _Group:
    """Batches written together (one, unless the sink groups writes), kept until their dead letters are
    acknowledged and their offsets committed; retried as a whole."""

    members: list[_Pending]
    written: bool = False  # the store accepted them: a retry only redoes the dead letters
    waits_for_schemas: bool = False  # held back because the schema store could not be read
    attempts: int = 0
    next_attempt_at: float = 0.0
    # (topic, partition, offset) of each sampled record -> its `process` span: a dead letter's span is its child.
    traced: dict[tuple[str, int, int], SpanContext] = field(default_factory=dict)

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
        dead_letter: DeadLetterRoute,
        config: RunnerConfig | None = None,
        *,
        schemas: SchemaRepository | None = None,
        producer: KafkaProducer | None = None,
        consumer_factory: Callable[..., Any] | None = None,
        consumer_overrides: Mapping[str, Any] | None = None,
        topic_ids: Mapping[str, str | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        health: Health | None = None,
    ) -> None:
        """`subjects`: input topic -> Avro subject of its values; `dead_letter`: the record to produce for a
        refused one (its topic, key, value and headers are the route's: the kit knows no dead-letter format).

        `consumer_factory(on_assign=, on_revoke=, on_lost=)` replaces the Kafka consumer (unit tests); it must
        offer consume, commit, pause, resume, close, committed, seek and high_watermark as `_Consumer` does.
        `topic_ids`: the input topics' Kafka ids (default: asked from the cluster; none with a factory).
        `health`: where a schema store that cannot be read is marked down (`schemas` with a resolver)."""
        self.sink = sink
        self.config = config or RunnerConfig()
        self.subjects = dict(subjects)
        self.dead_letter = dead_letter
        self.clock = clock
        self.rng = rng or random.Random()
        self.health = health
        self.schema_store_down: str | None = None  # why writer schemas cannot be looked up right now
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
        self.group_id = group_id
        self._labels = {"sink": sink.name}
        # lp_kafka_consumer_lag_*: positions per written batch; high watermarks read by this thread after each poll
        # (librdkafka's cached ones) and only looked up at scrape time: a scrape calling the consumer would wait
        # for the poll in progress, longer than a scraper's timeout
        self._high_watermarks: dict[tuple[str, int], int] = {}
        self.lag = ConsumerLag(group_id, highwater=lambda t, p: self._high_watermarks.get((t, p)))
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
        self._note_high_watermarks()
        self._flush_due(self.clock())
        self._export_gauges()
        return len(messages)

    def _note_high_watermarks(self) -> None:
        for tp in self.states:
            high = self.consumer.high_watermark(tp)
            if high is not None:
                self._high_watermarks[(tp.topic, tp.partition)] = high

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
        if self.schema_store_down is not None:
            return f"schema store unavailable, batches wait: {self.schema_store_down}"
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
        self.lag.forget(partitions)
        for tp in partitions:
            self._high_watermarks.pop((tp.topic, tp.partition), None)
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
        self._schema_store_up()  # a group given up no longer waits for the store

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
        if any(p.unchecked is not None for p in pendings):
            group.waits_for_schemas = True
            self._backoff(group, now, None, f"schema store: {self.schema_store_down}")
            return
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
        self._schema_store_up()

    def _prepare(self, tp: TopicPartition, messages: list[Message], last: int) -> _Pending:
        try:
            return self._check(tp, messages, last)
        except SchemaStoreUnavailable as error:
            # Nothing is refused for it: the batch waits, unchecked, and `_attempt` checks it again (backoff).
            self._schema_store_down(str(error))
            records = cast(list[SinkRecord], LazyRecords(messages, self.decoders.get(tp.topic)))
            batch = PartitionBatch(
                tp.topic, tp.partition, records, messages[0].offset(), last, self.topic_ids.get(tp.topic)
            )
            return _Pending(batch, [], unchecked=messages)

    def _check(self, tp: TopicPartition, messages: list[Message], last: int) -> _Pending:
        """The batch of `messages`, with the records that do not decode (or whose header is wrong) set aside as
        rejections. Raises `SchemaStoreUnavailable` when a writer schema must be looked up and cannot be."""
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
                rejections.append(Rejection(record, str(error.code), error.message, stage=RejectionStage.DECODE))
        batch = PartitionBatch(
            tp.topic, tp.partition, records, messages[0].offset(), last, self.topic_ids.get(tp.topic)
        )
        return _Pending(batch, rejections)

    def _attempt(self, group: _Group, now: float) -> bool:
        """One try at writing, dead-lettering and committing a group. False: it waits for a retry."""
        try:
            if not group.written:
                for member in group.members:
                    if member.unchecked is not None:
                        checked = self._check(member.batch.topic_partition, member.unchecked, member.batch.last_offset)
                        member.batch, member.decode_rejections = checked.batch, checked.decode_rejections
                        member.unchecked = None
                self._write(group)
                group.written = True
            if group.waits_for_schemas:
                group.waits_for_schemas = False
                self._schema_store_up()
            rejected = [r for m in group.members for r in m.decode_rejections + (m.result or WriteResult()).rejected]
            if rejected:
                self._dead_letter(rejected, group.traced)
        except SinkBackpressure as error:
            self._backoff(group, now, error.retry_after_s, str(error))
            return False
        except SchemaStoreUnavailable as error:  # no record is at fault: the same batch again later, nothing refused
            group.waits_for_schemas = True
            self._schema_store_down(str(error))
            self._backoff(group, now, None, f"schema store: {error}")
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

    def _schema_store_down(self, reason: str) -> None:
        self.schema_store_down = reason
        if self.health is not None:
            self.health.dependency_down(SCHEMA_STORE, reason)

    def _schema_store_up(self) -> None:
        """A group held back for the store went through: the store is up unless another group still waits."""
        if any(g.waits_for_schemas for g in self._groups()):
            return
        if self.schema_store_down is not None:
            self.schema_store_down = None
            if self.health is not None:
                self.health.dependency_up(SCHEMA_STORE)
            log.info("schema store readable again: batches resume")

    def _write(self, group: _Group) -> None:
        batches = [m.batch for m in group.members]
        # Sampled records (flag in their traceparent) get a `process` span each, child of the validator's; the
        # write is one span linked to them. An unsampled record costs the header read in `sampled_context`.
        sampled: list[tuple[Message, SpanContext]] = []
        for batch in batches if traces_messages() else ():
            for message in messages_of(batch.records):
                parent = sampled_context(message.headers())
                if parent is not None:
                    sampled.append((message, parent))
        record_spans = [
            consumer_span(
                self.tracer,
                parent,
                message.topic(),
                message.partition(),
                message.offset(),
                self.group_id,
                attributes={"lp.sink": self.sink.name},
            )
            for message, parent in sampled
        ]
        group.traced = {
            (message.topic(), message.partition(), message.offset()): span.get_span_context()
            for (message, _), span in zip(sampled, record_spans, strict=True)
            if span.get_span_context().is_valid
        }
        write_span = batch_span(
            self.tracer,
            f"{self.sink.name}.write",
            "insert",
            [parent for _, parent in sampled],
            attributes={"lp.sink": self.sink.name},
        )
        try:
            with trace.use_span(write_span, end_on_exit=True):
                self._write_traced(group, batches, write_span)
        finally:
            for span in record_spans:
                span.end()

    def _write_traced(self, group: _Group, batches: list[PartitionBatch], span: Span) -> None:
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

    def _dead_letter(
        self, rejected: Sequence[Rejection], traced: Mapping[tuple[str, int, int], SpanContext] | None = None
    ) -> None:
        now = datetime.now(UTC)
        reasons: dict[tuple[str, str], int] = {}
        for rejection in rejected:
            letter = self.dead_letter(rejection, now)
            headers = letter.headers
            record = rejection.record
            parent = (traced or {}).get((record.topic, record.partition, record.offset))
            if parent is not None:  # a sampled record: its trace ends in the dead-letter span
                span = dead_letter_span(self.tracer, parent, letter.topic, rejection.code, str(rejection.stage))
                headers = with_traceparent(headers, span.get_span_context(), DEAD_LETTER_SAMPLED)
                span.end()
            self.producer.produce(letter.topic, letter.value, key=letter.key, headers=headers)
            reasons[(letter.topic, rejection.code)] = reasons.get((letter.topic, rejection.code), 0) + 1
        try:
            self.producer.flush(self.config.dlq_ack_timeout_s)
        except Exception as error:  # DeliveryFailed: not acknowledged, so the offsets must not be committed
            raise _DeadLettersNotAcknowledged(str(error)) from error
        for (topic, code), count in reasons.items():
            DEAD_LETTERS.labels(topic, code, "").inc(count)

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
        STAGE_RECORDS_IN.labels(self.sink.name).inc(len(batch.records) + len(member.decode_rejections))
        STAGE_RECORDS_OUT.labels(self.sink.name).inc(result.written)
        if rejected:
            STAGE_ERRORS.labels(self.sink.name).inc(len(rejected))
        last_timestamp_ms = self._observe_visible(batch)
        high = self.consumer.high_watermark(batch.topic_partition)
        self.lag.update(topic, batch.partition, batch.last_offset + 1, high, last_timestamp_ms)

    def _observe_visible(self, batch: PartitionBatch) -> int | None:
        """Event-to-visible of the batch's oldest and newest record (two observations per batch, not per record);
        returns the newest record's timestamp (ms) for the lag in seconds."""
        if not batch.records:
            return None
        first, last = batch.records[0].timestamp_ms, batch.records[-1].timestamp_ms
        if self.sink.visible_on_write:
            now = time.time()
            histogram = EVENT_TO_VISIBLE.labels(self.sink.name, batch.topic)
            for timestamp_ms in {first, last}:
                if timestamp_ms is not None and timestamp_ms > 0:
                    histogram.observe(max(0.0, now - timestamp_ms / 1000))
        return last

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
