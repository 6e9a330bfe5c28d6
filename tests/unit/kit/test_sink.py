"""SinkRunner against a scripted consumer, producer and sink: batching, dead letters, backpressure, replays."""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import pytest
from confluent_kafka import KafkaException, Message
from confluent_kafka import TopicPartition as KafkaTopicPartition
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client import REGISTRY

from services.contracts.deadletter import DeadLetterRecord, from_sink_rejection, parse_dead_letter
from services.kit import tracing
from services.kit.avro import AvroSerializer, Schema, SchemaRepository, SchemaStoreUnavailable, WriterSchema
from services.kit.health import Health
from services.kit.kafka import DeliveryFailed
from services.kit.sink import (
    PartitionBatch,
    Rejection,
    RunnerConfig,
    Sink,
    SinkBackpressure,
    SinkRecord,
    SinkRunner,
    TopicPartition,
    WriteResult,
    WrittenBatch,
    backoff_delay,
    check_header,
)

TOPIC = "things"
SCHEMA = Schema.from_definition(
    "thing",
    {
        "type": "record",
        "name": "Thing",
        "fields": [{"name": "id", "type": "string"}, {"name": "n", "type": "long"}],
    },
)
OTHER = Schema.from_definition(
    "other", {"type": "record", "name": "Other", "fields": [{"name": "x", "type": "string"}]}
)
TP = TopicPartition(TOPIC, 0)


def payload(i: int) -> bytes:
    return AvroSerializer(SCHEMA)({"id": f"id-{i}", "n": i})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeConsumer:
    """What the runner needs of a consumer: an in-memory log per partition, pause/resume, commits."""

    def __init__(self, on_assign: Any, on_revoke: Any, on_lost: Any) -> None:
        self.callbacks = (on_assign, on_revoke, on_lost)
        self.log: dict[TopicPartition, list[Message]] = {}
        self.position: dict[TopicPartition, int] = {}
        self.assigned: set[TopicPartition] = set()
        self.paused: set[TopicPartition] = set()
        self.commits: list[tuple[TopicPartition, int]] = []
        self.group_offsets: dict[TopicPartition, int] = {}
        self.seeks: list[tuple[TopicPartition, int]] = []
        self.fail_commits = 0
        self.closed = False

    # test helpers
    def add(self, tp: TopicPartition, value: bytes | None) -> int:
        log = self.log.setdefault(tp, [])
        offset = len(log)
        log.append(Message(topic=tp.topic, partition=tp.partition, offset=offset, value=value, key=b"k"))
        return offset

    def assign(self, *tps: TopicPartition) -> None:
        self.callbacks[0](self, [KafkaTopicPartition(t, p) for t, p in tps])

    def revoke(self, *tps: TopicPartition) -> None:
        self.callbacks[1](self, [KafkaTopicPartition(t, p) for t, p in tps])
        for tp in tps:
            self.assigned.discard(tp)

    # the consumer interface
    def incremental_assign(self, partitions: list[KafkaTopicPartition]) -> None:
        for kp in partitions:
            tp = TopicPartition(kp.topic, kp.partition)
            self.assigned.add(tp)
            self.position[tp] = max(0, self.group_offsets.get(tp, 0))

    def consume(self, max_messages: int, timeout: float) -> list[Message]:
        out: list[Message] = []
        for tp in sorted(self.assigned - self.paused):
            log = self.log.get(tp, [])
            start = self.position.get(tp, 0)
            taken = log[start : start + max_messages - len(out)]
            self.position[tp] = start + len(taken)
            out += taken
        return out

    def commit(self, offsets: Sequence[KafkaTopicPartition]) -> None:
        if self.fail_commits:
            self.fail_commits -= 1
            raise KafkaException("coordinator not available")
        for kp in offsets:
            tp = TopicPartition(kp.topic, kp.partition)
            self.commits.append((tp, kp.offset))
            self.group_offsets[tp] = kp.offset

    def pause(self, partitions: Sequence[KafkaTopicPartition]) -> None:
        self.paused |= {TopicPartition(kp.topic, kp.partition) for kp in partitions}

    def resume(self, partitions: Sequence[KafkaTopicPartition]) -> None:
        self.paused -= {TopicPartition(kp.topic, kp.partition) for kp in partitions}

    def committed(self, partitions: Sequence[TopicPartition], timeout: float = 10.0) -> dict[TopicPartition, int]:
        return {tp: self.group_offsets.get(tp, -1001) for tp in partitions}

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))
        self.position[tp] = offset

    def high_watermark(self, tp: TopicPartition) -> int | None:
        return len(self.log.get(tp, []))

    def close(self) -> None:
        self.closed = True


class FakeProducer:
    def __init__(self) -> None:
        self.produced: list[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]] = []
        self.fail_flushes = 0

    def produce(self, topic: str, value: bytes | None, key: bytes | None = None, headers: Any = None) -> None:
        self.produced.append((topic, key, value, headers))

    def flush(self, timeout: float = 30.0) -> None:
        if self.fail_flushes:
            self.fail_flushes -= 1
            raise DeliveryFailed("broker did not acknowledge")


class FakeSink(Sink):
    name = "fake"

    def __init__(self, *, reject: Mapping[int, str] | None = None, ends: Sequence[int] = ()) -> None:
        self.batches: list[PartitionBatch] = []
        self.stored: list[int] = []
        self.refuse = 0
        self.reject = dict(reject or {})
        self.ends = list(ends)
        self.resolve_failures = 0
        self.offsets: dict[TopicPartition, int] | None = None

    def write(self, batch: PartitionBatch) -> WriteResult:
        self.batches.append(batch)
        if self.refuse:
            self.refuse -= 1
            raise SinkBackpressure("store down", retry_after_s=0.5)
        rejected = [
            Rejection(r, "TOO_BIG", self.reject[r.offset], field="n") for r in batch.records if r.offset in self.reject
        ]
        kept = [r for r in batch.records if r.offset not in self.reject]
        self.stored += [r.value["n"] for r in kept]
        return WriteResult(len(kept), rejected)

    def stored_offsets(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int] | None:
        return self.offsets

    def written_batch_ends(
        self, starts: Mapping[TopicPartition, int], topic_ids: Mapping[str, str | None]
    ) -> dict[TopicPartition, list[int]]:
        self.topic_ids_seen = dict(topic_ids)
        if self.resolve_failures:
            self.resolve_failures -= 1
            raise SinkBackpressure("store down")
        return {tp: self.ends for tp in starts}


def dead_letter(rejection: Rejection, now: datetime) -> DeadLetterRecord:
    """The route the sinks give: the contracts' dead-letter format."""
    return from_sink_rejection(rejection, now=now, sink="test")


def make_runner(
    sink: Sink, schemas: SchemaRepository | None = None, health: Health | None = None, **config: Any
) -> tuple[SinkRunner, FakeConsumer, FakeProducer, Clock]:
    clock = Clock()
    producer = FakeProducer()
    holder: dict[str, FakeConsumer] = {}

    def factory(**callbacks: Any) -> FakeConsumer:
        holder["consumer"] = FakeConsumer(**callbacks)
        return holder["consumer"]

    runner = SinkRunner(
        sink,
        {},
        "group",
        {TOPIC: "thing"},
        dead_letter,
        RunnerConfig(**{"batch_max_rows": 3, "batch_max_age_s": 1.0, **config}),
        schemas=schemas or SchemaRepository([SCHEMA, OTHER]),
        producer=producer,  # type: ignore[arg-type]
        consumer_factory=factory,
        topic_ids={TOPIC: "AbCd"},
        clock=clock,
        rng=random.Random(1),
        health=health,
    )
    return runner, holder["consumer"], producer, clock


def started(sink: Sink, values: Sequence[bytes | None] = (), **config: Any):
    runner, consumer, producer, clock = make_runner(sink, **config)
    for value in values:
        consumer.add(TP, value)
    consumer.assign(TP)
    assert TP in consumer.paused  # until the start offset and the replay cuts are known
    return runner, consumer, producer, clock


def test_flushes_by_size_then_by_age_and_commits_after_each_write():
    sink = FakeSink()
    runner, consumer, _producer, clock = started(sink, [payload(i) for i in range(7)])
    runner.step()
    assert [b.dedup_token for b in sink.batches] == ["things@AbCd:0:0-2", "things@AbCd:0:3-5"]
    assert consumer.commits == [(TP, 3), (TP, 6)]
    clock.now += 0.5
    runner.step()
    assert len(sink.batches) == 2  # the last record is not old enough yet
    clock.now += 0.6
    runner.step()
    assert sink.batches[-1].dedup_token == "things@AbCd:0:6-6"
    assert consumer.commits[-1] == (TP, 7)
    assert sink.stored == list(range(7))
    assert runner.stats.written == {TOPIC: 7} and runner.stats.batches == 3


def test_undecodable_records_are_dead_lettered_with_their_code_and_stay_in_the_range():
    sink = FakeSink()
    bad = [payload(0), b"garbage", AvroSerializer(OTHER)({"x": "y"}), payload(3)[:-1], payload(4), b""]
    runner, consumer, producer, clock = started(sink, bad, batch_max_rows=10)
    runner.step()
    clock.now += 2
    runner.step()
    (batch,) = sink.batches
    assert batch.dedup_token == "things@AbCd:0:0-5"  # the consumed range, dead letters included
    assert [r.offset for r in batch.records] == [0, 4]
    letters = [parse_dead_letter(key, value, headers) for _topic, key, value, headers in producer.produced]
    assert {topic for topic, *_ in producer.produced} == {"things.test.dlq"}
    assert [(d.original_offset, d.error_code, str(d.stage)) for d in letters] == [
        (1, "NOT_AVRO_SINGLE_OBJECT", "decode"),
        (2, "INCOMPATIBLE_WRITER_SCHEMA", "decode"),
        (3, "CORRUPT_OR_TRUNCATED", "decode"),
        (5, "EMPTY_PAYLOAD", "decode"),
    ]
    assert letters[0].value == b"garbage"  # the original bytes, untouched
    assert consumer.commits == [(TP, 6)]


def test_header_mode_leaves_the_body_to_the_sink():
    class HeaderSink(FakeSink):
        decode_mode = "header"

        def write(self, batch: PartitionBatch) -> WriteResult:
            self.batches.append(batch)
            rejected = []
            for record in batch.records:
                result = record.decode()
                if not hasattr(result, "record"):
                    rejected.append(Rejection(record, str(result.code), result.message))
            return WriteResult(len(batch.records) - len(rejected), rejected)

    sink = HeaderSink()
    runner, _consumer, producer, clock = started(sink, [payload(0), payload(1)[:-1], b"junk"], batch_max_rows=10)
    runner.step()
    clock.now += 2
    runner.step()
    assert [r.offset for r in sink.batches[0].records] == [0, 1]  # the truncated body got past the header check
    codes = sorted(parse_dead_letter(k, v, h).error_code for _t, k, v, h in producer.produced)
    assert codes == ["CORRUPT_OR_TRUNCATED", "NOT_AVRO_SINGLE_OBJECT"]


def test_store_rejections_go_to_the_dead_letter_topic_with_the_reason():
    sink = FakeSink(reject={1: "n too large for the column"})
    runner, consumer, producer, _clock = started(sink, [payload(i) for i in range(3)])
    runner.step()
    runner.step()
    (letter,) = [parse_dead_letter(k, v, h) for _t, k, v, h in producer.produced]
    assert (letter.error_code, letter.field, letter.message, str(letter.stage)) == (
        "TOO_BIG",
        "n",
        "n too large for the column",
        "store",
    )
    assert (letter.original_topic, letter.original_partition, letter.original_offset) == (TOPIC, 0, 1)
    assert consumer.commits == [(TP, 3)]
    assert runner.stats.rejected == {TOPIC: 1} and runner.stats.written == {TOPIC: 2}


def test_backpressure_pauses_retries_the_same_batch_then_resumes():
    sink = FakeSink()
    sink.refuse = 2
    runner, consumer, _producer, clock = started(sink, [payload(i) for i in range(5)])
    runner.step()
    assert TP in consumer.paused and consumer.commits == []
    assert runner.readiness() is not None
    consumer.add(TP, payload(5))  # arrives meanwhile: must wait behind the blocked batch
    runner.step()
    assert len(sink.batches) == 1  # not retried before its backoff
    for _ in range(2):
        clock.now += 60
        runner.step()
    tokens = [b.dedup_token for b in sink.batches]
    assert tokens[:3] == ["things@AbCd:0:0-2"] * 3  # the SAME batch, three times
    assert [r.offset for r in sink.batches[2].records] == [0, 1, 2]
    assert consumer.commits[0] == (TP, 3)
    assert TP not in consumer.paused and runner.readiness() is None
    clock.now += 2
    runner.step()
    runner.step()
    assert consumer.commits[-1] == (TP, 6)
    assert sink.stored == list(range(6))  # nothing lost, nothing twice
    assert runner.stats.backpressure == 2


def test_unacknowledged_dead_letters_block_the_commit_and_are_produced_again():
    sink = FakeSink(reject={0: "bad"})
    runner, consumer, producer, clock = started(sink, [payload(i) for i in range(3)])
    producer.fail_flushes = 1
    runner.step()
    assert consumer.commits == [] and TP in consumer.paused
    clock.now += 60
    runner.step()
    assert len(sink.batches) == 1  # the store kept the batch: only the dead letters are redone
    assert len(producer.produced) == 2
    assert consumer.commits == [(TP, 3)]


def test_failed_commit_is_retried():
    sink = FakeSink()
    runner, consumer, _producer, _clock = started(sink, [payload(i) for i in range(3)])
    consumer.fail_commits = 1
    runner.step()
    assert consumer.commits == []
    runner.step()
    assert consumer.commits == [(TP, 3)]


def test_replay_cuts_batches_where_the_store_has_them():
    sink = FakeSink(ends=[1, 4])  # batches 0-1 and 2-4 were written before a crash, never committed
    runner, consumer, _producer, clock = started(sink, [payload(i) for i in range(9)], batch_max_rows=100)
    runner.step()
    assert sink.topic_ids_seen == {TOPIC: "AbCd"}
    assert [b.dedup_token for b in sink.batches] == ["things@AbCd:0:0-1", "things@AbCd:0:2-4"]
    clock.now += 2
    runner.step()
    assert sink.batches[-1].dedup_token == "things@AbCd:0:5-8"
    assert consumer.commits == [(TP, 2), (TP, 5), (TP, 9)]


def test_replay_cut_waits_for_the_whole_batch_and_close_leaves_a_partial_one():
    sink = FakeSink(ends=[5])
    runner, consumer, _producer, clock = started(sink, [payload(i) for i in range(3)], batch_max_rows=2)
    runner.step()
    clock.now += 5
    runner.step()
    assert sink.batches == []  # 0..2 of the stored 0..5: a shorter batch would get another token
    runner.close(timeout_s=1)
    assert sink.batches == [] and consumer.commits == [] and consumer.closed
    assert runner.stats.uncommitted_at_close == 3


def test_start_waits_for_the_store_and_uses_stored_offsets():
    sink = FakeSink()
    sink.resolve_failures = 1
    sink.offsets = {TP: 2}
    runner, consumer, _producer, clock = started(sink, [payload(i) for i in range(4)], batch_max_rows=100)
    runner.step()
    assert TP in consumer.paused and sink.batches == []
    clock.now += 60
    runner.step()
    assert consumer.seeks == [(TP, 2)] and TP not in consumer.paused
    clock.now += 2
    runner.step()
    runner.step()
    assert [b.dedup_token for b in sink.batches] == ["things@AbCd:0:2-3"]


def test_revoke_flushes_and_commits_the_revoked_partition():
    sink = FakeSink()
    runner, consumer, _producer, _clock = started(sink, [payload(i) for i in range(2)], batch_max_rows=100)
    runner.step()
    runner.step()
    assert sink.batches == []
    consumer.revoke(TP)
    assert sink.batches[0].dedup_token == "things@AbCd:0:0-1" and consumer.commits == [(TP, 2)]
    assert TP not in runner.states


def test_close_flushes_everything_and_gives_up_in_time_when_the_store_is_down():
    sink = FakeSink()
    runner, consumer, _producer, _clock = started(sink, [payload(i) for i in range(2)], batch_max_rows=100)
    runner.step()
    runner.step()
    runner.close(timeout_s=5)
    assert consumer.commits == [(TP, 2)] and consumer.closed

    down = FakeSink()
    down.refuse = 10**6
    runner, consumer, _producer, clock = started(down, [payload(i) for i in range(2)], batch_max_rows=100)
    runner.step()
    runner.step()

    def tick(seconds: float) -> None:
        clock.now += seconds

    import services.kit.sink.runner as module

    original = module.time.sleep
    module.time.sleep = tick  # type: ignore[assignment]
    try:
        runner.close(timeout_s=5)
    finally:
        module.time.sleep = original  # type: ignore[assignment]
    assert consumer.commits == [] and runner.stats.uncommitted_at_close == 2


def test_other_write_errors_propagate_without_commit():
    class Broken(FakeSink):
        def write(self, batch: PartitionBatch) -> WriteResult:
            raise RuntimeError("bug")

    runner, consumer, _producer, clock = started(Broken(), [payload(0)])
    runner.step()
    clock.now += 2
    with pytest.raises(RuntimeError, match="bug"):
        runner.step()
    assert consumer.commits == []


def test_sink_record_reads_the_message_lazily():
    record = SinkRecord.of(TOPIC, 3, 42, payload(7), key=b"k", headers=[("h", b"v")], timestamp_ms=123)
    assert (record.topic, record.partition, record.offset, record.key) == (TOPIC, 3, 42, b"k")
    assert record.headers == [("h", b"v")] and record.timestamp_ms == 123 and record.raw == payload(7)
    with pytest.raises(RuntimeError):
        record.decode()  # no decoder given
    batch = PartitionBatch(TOPIC, 3, [record], 40, 42)
    assert batch.dedup_token == "things:3:40-42"
    assert (
        PartitionBatch(TOPIC, 3, [record], 40, 42, topic_id="AbCd").dedup_token == "things@AbCd:3:40-42"
        and batch.topic_partition == (TOPIC, 3)
        and len(batch) == 1
    )


def test_check_header_and_backoff():
    from services.kit.avro import AvroDeserializer

    decoder = AvroDeserializer(SchemaRepository([SCHEMA, OTHER]), "thing")
    assert check_header(decoder, payload(1)) is None
    assert check_header(decoder, payload(1)[:-1]) is None  # the body is not looked at
    assert str(check_header(decoder, b"\xc3\x01" + b"\x00" * 8 + b"x").code) == "UNKNOWN_WRITER_SCHEMA"
    assert str(check_header(decoder, None).code) == "EMPTY_PAYLOAD"
    rng = random.Random(3)
    delays = [backoff_delay(n, 0.2, 5.0, rng) for n in range(1, 12)]
    assert 0.1 <= delays[0] <= 0.2 and all(2.5 <= d <= 5.0 for d in delays[6:])


class GroupSink(FakeSink):
    group_writes = True

    def __init__(self, written: Mapping[TopicPartition, list[WrittenBatch]] | None = None) -> None:
        super().__init__()
        self.groups: list[list[str]] = []
        self.written = dict(written or {})

    def write_group(self, batches: Sequence[PartitionBatch]) -> list[WriteResult]:
        self.groups.append([b.dedup_token for b in batches])
        if self.refuse:
            self.refuse -= 1
            raise SinkBackpressure("store down")
        return [WriteResult(len(b.records)) for b in batches]

    def written_batch_ends(
        self, starts: Mapping[TopicPartition, int], topic_ids: Mapping[str, str | None]
    ) -> Mapping[TopicPartition, Sequence[int | WrittenBatch]]:
        return {tp: self.written.get(tp, []) for tp in starts}


def started_group(sink: Sink, per_partition: int, partitions: int = 3, **config: Any):
    runner, consumer, _producer, clock = make_runner(sink, **config)
    tps = [TopicPartition(TOPIC, p) for p in range(partitions)]
    for tp in tps:
        for i in range(per_partition):
            consumer.add(tp, payload(i))
    consumer.assign(*tps)
    return runner, consumer, tps, clock


def test_partitions_that_together_fill_a_write_are_written_before_their_age():
    # Twelve partitions of 2 records, writes of 10: no partition alone is full, and waiting for their age
    # would leave the consumer throttled (at two writes' worth) until then.
    sink = FakeSink()
    consumed = ("lp_sink_records_consumed_total", {"sink": "fake", "topic": TOPIC})
    before = REGISTRY.get_sample_value(*consumed) or 0.0
    runner, consumer, tps, _clock = started_group(sink, 2, partitions=12, batch_max_rows=10)
    runner.step()
    assert sorted(b.dedup_token for b in sink.batches) == sorted(f"things@AbCd:{tp.partition}:0-1" for tp in tps)
    assert sorted(consumer.commits) == [(tp, 2) for tp in tps]
    assert REGISTRY.get_sample_value(*consumed) - before == 24


def test_grouped_sink_gets_every_partition_in_one_write_retried_as_a_whole():
    sink = GroupSink()
    sink.refuse = 1
    runner, consumer, tps, clock = started_group(sink, 2, batch_max_rows=100)
    runner.step()
    assert sink.groups == []  # nothing due yet
    clock.now += 2
    runner.step()
    first = ["things@AbCd:0:0-1", "things@AbCd:1:0-1", "things@AbCd:2:0-1"]
    assert sink.groups == [first] and consumer.commits == []
    assert consumer.paused == set(tps)  # the whole group waits
    clock.now += 60
    runner.step()
    assert sink.groups == [first, first]  # the same group again
    assert sorted(consumer.commits) == [(tp, 2) for tp in tps] and not consumer.paused


def test_grouped_replay_regroups_what_was_written_together():
    written = {
        TopicPartition(TOPIC, 0): [WrittenBatch(1, "g1"), WrittenBatch(3, "g2")],
        TopicPartition(TOPIC, 1): [WrittenBatch(2, "g1")],
        TopicPartition(TOPIC, 2): [WrittenBatch(0, "g2")],
    }
    sink = GroupSink(written)
    runner, consumer, tps, clock = started_group(sink, 2, batch_max_rows=100)
    runner.step()  # partition 1 has only 0..1 of the stored 0..2: group g1 waits for it, g2 waits behind g1
    assert sink.groups == []
    consumer.add(tps[1], payload(2))
    consumer.add(tps[0], payload(2))
    consumer.add(tps[0], payload(3))
    runner.step()
    assert sink.groups == [
        ["things@AbCd:0:0-1", "things@AbCd:1:0-2"],
        ["things@AbCd:0:2-3", "things@AbCd:2:0-0"],
    ]
    clock.now += 2
    runner.step()
    assert sink.groups[-1] == ["things@AbCd:2:1-1"]
    assert consumer.group_offsets == {tps[0]: 4, tps[1]: 3, tps[2]: 2}


def test_a_full_buffer_stops_fetching_until_written():
    sink = FakeSink()
    sink.refuse = 1
    runner, consumer, _producer, clock = started(sink, [payload(i) for i in range(12)], batch_max_rows=2)
    consumer.log[TopicPartition(TOPIC, 1)] = []
    consumer.assign(TopicPartition(TOPIC, 1))
    runner.step()  # the first batch is refused: everything else stays buffered
    runner.step()
    assert runner.buffered >= 4 and TopicPartition(TOPIC, 1) in consumer.paused  # fetching stopped
    clock.now += 60
    for _ in range(10):
        runner.step()
    assert runner.buffered == 0 and not consumer.paused
    assert sink.stored == list(range(12))


THING_V2 = Schema.from_definition(
    "thing",
    {
        "type": "record",
        "name": "Thing",
        "fields": [*SCHEMA.definition["fields"], {"name": "tag", "type": ["null", "string"], "default": None}],
    },
)


class FlakyStore:
    """A writer resolver whose store is down until `up`; knows THING_V2."""

    def __init__(self) -> None:
        self.up = False
        self.calls = 0

    def __call__(self, fingerprint: int) -> WriterSchema | None:
        self.calls += 1
        if not self.up:
            raise SchemaStoreUnavailable("store unreachable")
        return WriterSchema("thing", THING_V2.definition) if fingerprint == THING_V2.fingerprint else None


@pytest.mark.parametrize("mode", ["record", "header"])
def test_a_schema_store_outage_stalls_the_batch_never_dead_letters_and_it_is_written_once_the_store_is_back(mode):
    class ModeSink(FakeSink):
        decode_mode = mode

    sink, store, health = ModeSink(), FlakyStore(), Health()
    health.set_ready(True)
    v2 = AvroSerializer(THING_V2)
    values = [payload(0), v2({"id": "id-1", "n": 1, "tag": "new"}), payload(2)]
    runner, consumer, producer, clock = started(
        sink, values, schemas=SchemaRepository([SCHEMA, OTHER], resolver=store), health=health
    )
    runner.step()
    assert sink.batches == [] and consumer.commits == [] and producer.produced == []
    assert TP in consumer.paused
    assert "schema store" in (runner.readiness() or "")
    ready, detail = health.readiness()
    assert not ready and "schema-store" in detail["failing"]
    clock.now += 60
    runner.step()  # still down: waits again, refuses nothing
    assert sink.batches == [] and producer.produced == []
    store.up = True
    clock.now += 60
    runner.step()
    assert [r.offset for r in sink.batches[0].records] == [0, 1, 2]
    assert sink.stored == [0, 1, 2] and producer.produced == []  # the v2 record decoded, nothing dead-lettered
    assert consumer.commits == [(TP, 3)]
    assert runner.readiness() is None and health.readiness()[0]


def test_lag_dead_letters_stage_counters_and_event_to_visible_are_exported_per_batch():
    sink = FakeSink(reject={1: "n too large for the column"})
    runner, consumer, _producer, _clock = make_runner(sink)
    now_ms = int(time.time() * 1000)
    log = consumer.log.setdefault(TP, [])
    for offset in range(5):  # records produced 30 s ago
        log.append(
            Message(topic=TOPIC, partition=0, offset=offset, value=payload(offset), timestamp=(1, now_ms - 30_000))
        )
    consumer.assign(TP)

    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = {
        "dead": value("lp_dead_letters_total", topic="things.test.dlq", code="TOO_BIG", rule=""),
        "in": value("lp_stage_records_in_total", stage="fake"),
        "out": value("lp_stage_records_out_total", stage="fake"),
        "errors": value("lp_stage_errors_total", stage="fake"),
        "visible": value("lp_sink_event_to_visible_seconds_count", sink="fake", topic=TOPIC),
        "slow": value("lp_sink_event_to_visible_seconds_bucket", sink="fake", topic=TOPIC, le="10.0"),
    }
    runner.step()
    runner.step()  # the first batch (offsets 0-2) is written
    lag = {"consumer_group": "group", "topic": TOPIC, "partition": "0"}
    assert value("lp_kafka_consumer_lag_records", **lag) == 2  # two records behind the written batch
    assert 30 <= value("lp_kafka_consumer_lag_seconds", **lag) < 40  # the last written record's age
    assert value("lp_dead_letters_total", topic="things.test.dlq", code="TOO_BIG", rule="") - before["dead"] == 1
    assert value("lp_stage_records_in_total", stage="fake") - before["in"] == 3
    assert value("lp_stage_records_out_total", stage="fake") - before["out"] == 2
    assert value("lp_stage_errors_total", stage="fake") - before["errors"] == 1
    # one batch, one timestamp: one observation, 30 s old (not within 10 s)
    assert value("lp_sink_event_to_visible_seconds_count", sink="fake", topic=TOPIC) - before["visible"] == 1
    assert value("lp_sink_event_to_visible_seconds_bucket", sink="fake", topic=TOPIC, le="10.0") == before["slow"]
    consumer.revoke(TP)
    assert REGISTRY.get_sample_value("lp_kafka_consumer_lag_records", lag) is None  # the new owner exports it


SAMPLED = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
UNSAMPLED = b"00-5bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"


def test_a_sampled_record_gets_a_process_span_under_its_producer_and_its_dead_letter_ends_the_trace(monkeypatch):
    monkeypatch.setattr(tracing, "_message_ratio", 0.01)  # as a service with an exporter (setup_tracing)
    sink = FakeSink(reject={2: "too big"})
    runner, consumer, producer, _clock = make_runner(sink, batch_max_rows=3)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    runner.tracer = provider.get_tracer("test")
    for offset, traceparent in enumerate((SAMPLED, UNSAMPLED, SAMPLED)):
        consumer.log.setdefault(TP, []).append(
            Message(
                topic=TOPIC, partition=0, offset=offset, value=payload(offset), headers=[("traceparent", traceparent)]
            )
        )
    consumer.assign(TP)
    runner.step()
    spans = exporter.get_finished_spans()
    process = [s for s in spans if s.name == f"process {TOPIC}"]
    assert [s.attributes["messaging.kafka.offset"] for s in process] == [0, 2]  # none for the unsampled record
    for span in process:
        assert span.kind is SpanKind.CONSUMER and span.parent is not None
        assert span.parent.span_id == 0x00F067AA0BA902B7 and span.attributes["messaging.consumer.group.name"] == "group"
    (write,) = [s for s in spans if s.name == "fake.write"]
    assert write.parent is None and [link.context.span_id for link in write.links] == [0x00F067AA0BA902B7] * 2
    assert write.attributes["messaging.batch.message_count"] == 3
    (letter,) = [s for s in spans if s.name == f"send {TOPIC}.test.dlq"]
    assert letter.parent is not None and letter.parent.span_id == process[1].context.span_id
    assert letter.attributes["lp.dlq.code"] == "TOO_BIG"
    ((_topic, _key, _value, headers),) = producer.produced
    assert dict(headers)["traceparent"] == b"00-%032x-%016x-00" % (letter.context.trace_id, letter.context.span_id)
    assert dict(headers)["lp-dlq-trace-id"] == b"4bf92f3577b34da6a3ce929d0e0e4736"
