"""The Faust side of the runtime without a broker: how BatchRunner produces, acknowledges and fails, and how
BatchConsumer turns delivered offsets into commits."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Coroutine
from typing import Any, NamedTuple

import pytest
from faust.types import TP
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from services.kit import tracing
from services.kit.health import Health
from services.kit.lag import ConsumerLag
from services.validator import stream_app
from services.validator.recovery import Reread
from services.validator.runtime import (
    AcceptedMemory,
    Batch,
    InputRecord,
    Output,
    Record,
    StreamRuntimeSettings,
    TopicsMissing,
)
from services.validator.stream_app import BatchConsumer, BatchRunner, _remote_context

TRACEPARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
UNSAMPLED = b"00-5bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"


class RecordMetadata(NamedTuple):
    topic: str
    partition: int
    offset: int  # the base offset of the acknowledged record batch


class FakeBatch:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.records: list[tuple[Any, ...]] = []

    def append(self, *, key: Any, value: Any, timestamp: Any, headers: Any) -> object | None:
        if len(self.records) >= self.capacity:
            return None
        self.records.append((key, value, headers))
        return object()

    def record_count(self) -> int:
        return len(self.records)


class FakeProducer:
    def __init__(self, partitions: dict[str, int], capacity: int = 1000) -> None:
        self.partitions = partitions
        self.capacity = capacity
        self.sent: list[tuple[str, int, FakeBatch, asyncio.Future[Any]]] = []
        self.ends: dict[tuple[str, int], int] = {}
        self.client = self

    def create_batch(self) -> FakeBatch:
        return FakeBatch(self.capacity)

    async def send_batch(self, batch: FakeBatch, topic: str, *, partition: int) -> asyncio.Future[Any]:
        future = asyncio.get_running_loop().create_future()
        self.sent.append((topic, partition, batch, future))
        return future

    async def partitions_for(self, topic: str) -> set[int]:
        return set(range(self.partitions[topic]))

    async def fetch_all_metadata(self) -> Any:
        topics = set(self.partitions)
        return type("Cluster", (), {"topics": lambda self: topics})()

    def ack(self, sent: tuple[str, int, FakeBatch, asyncio.Future[Any]]) -> None:
        """The broker's answer to one record batch: its base offset in the partition's log."""
        topic, partition, batch, future = sent
        base = self.ends.get((topic, partition), 0)
        self.ends[(topic, partition)] = base + len(batch.records)
        future.set_result(RecordMetadata(topic, partition, base))

    def ack_all(self) -> None:
        for sent in self.sent:
            if not sent[3].done():
                self.ack(sent)


class FakeApp:
    def __init__(self, producer: FakeProducer) -> None:
        self.producer = type("FaustProducer", (), {"_ensure_producer": lambda _: producer})()
        self.consumer = type("Consumer", (), {})()
        self.delivered: list[dict[tuple[str, int], int]] = []
        self.consumer.mark_delivered = self.delivered.append
        self.crashes: list[BaseException] = []

    async def crash(self, error: BaseException) -> None:
        self.crashes.append(error)


def make_runner(
    processor: Any, partitions: dict[str, int], known: set[str] | None = None, capacity: int = 1000
) -> tuple[BatchRunner, FakeApp, FakeProducer]:
    settings = StreamRuntimeSettings(kafka_bootstrap_servers="k:9092", max_in_flight_batches=2)
    tracer = TracerProvider().get_tracer("test")  # recording spans, without touching the global provider
    runner = BatchRunner(processor, settings, Health(), known if known is not None else set(partitions), tracer)
    producer = FakeProducer(partitions, capacity)
    app = FakeApp(producer)
    runner.app = app  # type: ignore[assignment]
    return runner, app, producer


def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coroutine)


def copy_to(topic: str):
    def process(batch: list[InputRecord]) -> list[Output]:
        return [Output(topic, r.key, r.value, source=r) for r in batch]

    return process


def records(n: int, topic: str = "in", partitions: int = 3, **kw: Any) -> list[Record]:
    return [Record(topic, i % partitions, i // partitions, b"key-%d" % i, b"v%d" % i, **kw) for i in range(n)]


def test_outputs_go_out_as_one_record_batch_per_partition_keyed_like_librdkafka():
    async def scenario() -> None:
        runner, _, producer = make_runner(copy_to("out"), {"out": 4})
        batch = Batch.of(records(40))
        flight = await runner._start(batch)
        by_partition = {partition: b for topic, partition, b, _ in producer.sent}
        assert {topic for topic, *_ in producer.sent} == {"out"}
        assert sum(len(b.records) for b in by_partition.values()) == 40
        for partition, sent in by_partition.items():
            assert all(zlib.crc32(key) % 4 == partition for key, _, _ in sent.records)
        assert flight.offsets == batch.next_offsets and flight.records == {"in": 40} and flight.outputs == {"out": 40}

    run(scenario())


def test_a_full_record_batch_is_sent_and_a_new_one_started():
    async def scenario() -> None:
        runner, _, producer = make_runner(copy_to("out"), {"out": 1}, capacity=7)
        await runner._start(Batch.of(records(20)))
        assert [len(b.records) for _, _, b, _ in producer.sent] == [7, 7, 6]

    run(scenario())


def test_unkeyed_outputs_of_a_batch_share_one_partition():
    async def scenario() -> None:
        def unkeyed(batch: list[InputRecord]) -> list[Output]:
            return [Output("out", None, r.value) for r in batch]

        runner, _, producer = make_runner(unkeyed, {"out": 5})
        await runner._start(Batch.of(records(10)))
        await runner._start(Batch.of(records(10)))
        assert [(partition, len(b.records)) for _, partition, b, _ in producer.sent] == [(1, 10), (2, 10)]

    run(scenario())


@pytest.fixture
def tracing_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    """As in a service with an exporter and a ratio above 0 (`setup_tracing`)."""
    monkeypatch.setattr(tracing, "_message_ratio", 0.01)


def traced_runner(processor: Any) -> tuple[BatchRunner, FakeProducer, InMemorySpanExporter]:
    runner, _, producer = make_runner(processor, {"out": 1, "in.dlq": 1})
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    runner.tracer = provider.get_tracer("test")
    return runner, producer, exporter


def test_without_message_tracing_a_sampled_records_output_continues_its_producers_context():
    async def scenario() -> None:
        sampled = Record("in", 3, 41, b"a", b"1", [("traceparent", TRACEPARENT)])
        runner, producer, exporter = traced_runner(copy_to("out"))
        await runner._start(Batch.of([sampled]))
        (_, _, sent, _) = producer.sent[0]
        assert dict(sent.records[0][2])["traceparent"] == TRACEPARENT
        assert exporter.get_finished_spans() == ()

    run(scenario())


@pytest.mark.usefixtures("tracing_messages")
def test_a_sampled_record_gets_a_process_span_and_its_output_is_that_spans_child():
    async def scenario() -> None:
        sampled = Record("in", 3, 41, b"a", b"1", [("traceparent", TRACEPARENT)])
        untraced = Record("in", 0, 1, b"b", b"2")
        unsampled = Record("in", 0, 2, b"c", b"3", [("traceparent", UNSAMPLED)])
        runner, producer, exporter = traced_runner(copy_to("out"))
        flight = await runner._start(Batch.of([sampled, untraced, unsampled]))
        (_, _, sent, _) = producer.sent[0]
        first, second, third = (dict(headers) for _, _, headers in sent.records)
        spans = {span.name: span for span in exporter.get_finished_spans()}
        assert set(spans) == {"process in"}  # none for the unsampled records (the batch span ends on the acks)
        process = spans["process in"]
        assert process.kind is SpanKind.CONSUMER
        assert process.parent is not None and process.parent.span_id == int(TRACEPARENT.split(b"-")[2], 16)
        assert process.context.trace_id == int(TRACEPARENT.split(b"-")[1], 16)
        assert dict(process.attributes or {}) == {
            "messaging.system": "kafka",
            "messaging.destination.name": "in",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.partition.id": "3",
            "messaging.kafka.offset": 41,
            "messaging.consumer.group.name": runner.consumer_group,
        }
        assert first["traceparent"] == b"00-%032x-%016x-01" % (process.context.trace_id, process.context.span_id)
        # The batch span is a root linked to the sampled record; unsampled outputs carry it with flag 00.
        batch = flight.span
        assert batch.parent is None and [link.context.span_id for link in batch.links] == [process.parent.span_id]
        trace_id, _, flags = second["traceparent"].split(b"-")[1:]
        assert trace_id == b"%032x" % batch.context.trace_id and flags == b"00"
        assert third["traceparent"] == UNSAMPLED  # its own context, kept

    run(scenario())


@pytest.mark.usefixtures("tracing_messages")
def test_a_dead_lettered_sampled_record_ends_its_trace_in_a_dead_letter_span():
    def fail(batch: list[InputRecord]) -> list[Output]:
        raise ValueError("no")

    async def scenario() -> None:
        sampled = Record("in", 0, 0, b"a", b"1", [("traceparent", TRACEPARENT)])
        runner, producer, exporter = traced_runner(fail)
        await runner._start(Batch.of([sampled]))
        (topic, _, sent, _) = producer.sent[0]
        headers = dict(sent.records[0][2])
        spans = {span.name: span for span in exporter.get_finished_spans()}
        letter, process = spans["send in.dlq"], spans["process in"]
        assert topic == "in.dlq" and letter.kind is SpanKind.PRODUCER
        assert letter.parent is not None and letter.parent.span_id == process.context.span_id
        assert letter.attributes is not None and letter.attributes["lp.dlq.code"] == "PROCESSOR_EXCEPTION"
        assert headers["traceparent"] == b"00-%032x-%016x-00" % (letter.context.trace_id, letter.context.span_id)
        assert headers["lp-dlq-trace-id"] == TRACEPARENT.split(b"-")[1]  # the record's own trace, kept

    run(scenario())


def test_offsets_are_marked_delivered_only_after_every_ack_and_in_batch_order():
    async def scenario() -> None:
        runner, app, producer = make_runner(copy_to("out"), {"out": 2})
        first = Batch.of(records(6, partitions=1))
        second = Batch.of([Record("in", 0, 6 + i, b"k%d" % i, b"v") for i in range(6)])
        runner._in_flight.append(await runner._start(first))
        sent_by_first = len(producer.sent)
        runner._in_flight.append(await runner._start(second))
        for sent in producer.sent[sent_by_first:]:  # the second batch is acknowledged first
            producer.ack(sent)
        completing = asyncio.ensure_future(runner._complete_oldest())
        await asyncio.sleep(0.01)
        assert not completing.done() and app.delivered == []  # waits for the first batch
        producer.ack(producer.sent[0])
        await asyncio.sleep(0.01)
        assert app.delivered == [] and not completing.done()  # ... for all of its acks
        producer.ack_all()
        await completing
        await runner._complete_oldest()
        assert app.delivered == [{("in", 0): 6}, {("in", 0): 12}]
        assert runner.processed == 12 and not runner._in_flight

    run(scenario())


def test_a_failed_delivery_crashes_without_marking_it_or_any_later_batch_delivered():
    async def scenario() -> None:
        runner, app, producer = make_runner(copy_to("out"), {"out": 1})
        runner._in_flight.append(await runner._start(Batch.of(records(3))))
        runner._in_flight.append(await runner._start(Batch.of(records(3))))
        producer.sent[0][3].set_exception(TimeoutError("no ack"))
        producer.ack(producer.sent[1])
        await runner._complete_oldest()
        assert app.delivered == [] and not runner._in_flight
        assert [type(e).__name__ for e in app.crashes] == ["DeliveryFailed"]
        assert "TimeoutError: no ack" in str(app.crashes[0])
        assert runner._idle.is_set()  # a shutdown waiting on the runner is not held up
        await runner.submit(Batch.of(records(1)), asyncio.Event())
        assert runner._queue.empty()  # nothing more is taken on

    run(scenario())


def test_writing_to_a_missing_topic_fails_before_anything_names_it_to_the_broker():
    async def scenario() -> None:
        runner, _, producer = make_runner(copy_to("typo"), {"out": 1}, known=set())
        with pytest.raises(TopicsMissing, match="'typo'"):
            await runner._start(Batch.of(records(1)))
        assert producer.sent == []

    run(scenario())


def test_drain_drops_queued_batches_and_waits_for_the_one_in_flight():
    async def scenario() -> None:
        runner, app, producer = make_runner(copy_to("out"), {"out": 1})
        runner._in_flight.append(await runner._start(Batch.of(records(2))))
        await runner.submit(Batch.of(records(5)), asyncio.Event())
        draining = asyncio.ensure_future(runner.drain())
        await asyncio.sleep(0.01)
        assert runner._queue.empty() and not draining.done()
        producer.ack_all()
        await runner._complete_oldest()
        await asyncio.wait_for(draining, 1)
        assert len(app.delivered) == 1

    run(scenario())


def test_a_fetch_waiting_for_room_when_a_rebalance_drains_is_dropped_not_delivered_past_the_dropped_ones():
    """The race behind a lost tail in the rebalance test: the fetcher waits to queue a third fetch, the revoke
    drains the queue (which makes room), and the waiting fetch used to land after the drain, be processed and
    have its offsets committed over the records the drain had dropped."""

    async def scenario() -> None:
        runner, app, producer = make_runner(copy_to("out"), {"out": 1})  # at most 2 batches in flight
        batches = [Batch.of([Record("in", 0, start + i, b"k", b"v") for i in range(3)]) for start in range(0, 15, 3)]
        for batch in batches[:2]:
            runner._in_flight.append(await runner._start(batch))
        suspend_flow = asyncio.Event()
        for batch in batches[2:4]:
            await runner.submit(batch, suspend_flow)
        submitting = asyncio.ensure_future(runner.submit(batches[4], suspend_flow))
        loop = asyncio.ensure_future(runner._run(runner))
        await asyncio.sleep(0.01)
        assert not submitting.done()  # the queue is full

        suspend_flow.set()  # the revoke stops the flow, then drains
        draining = asyncio.ensure_future(runner.drain())
        for _ in range(5):
            await asyncio.sleep(0.01)
            producer.ack_all()
        await asyncio.wait_for(draining, 1)
        await asyncio.sleep(0.05)
        assert submitting.done()
        # Only the batches in flight are delivered: the commit stays below the dropped records (offsets 6-11).
        assert app.delivered == [{("in", 0): 3}, {("in", 0): 6}]
        assert runner._queue.empty() and len(producer.sent) == 2
        await runner.submit(batches[2], suspend_flow)  # the flow is still stopped: nothing is taken on
        assert runner._queue.empty()
        loop.cancel()

    run(scenario())


def test_the_consumer_commits_the_delivered_offsets():
    consumer = BatchConsumer.__new__(BatchConsumer)  # only the offset bookkeeping, no Faust app behind it
    consumer._delivered = {}
    consumer._new_topicpartition = TP  # type: ignore[method-assign]
    consumer.app = type("App", (), {"monitor": None})()
    consumer._fetched_times = {("in", 0): {10: 1_000}}  # the fetch that ended at offset 10: its last record's time
    consumer._lag = ConsumerLag("g-unit", clock=lambda: 4.0)
    consumer.mark_delivered({("in", 0): 10, ("in", 1): 4})
    assert consumer._lag.lag() == {("in", 0): (0, 0.0), ("in", 1): (0, 0.0)}  # the delivered position, caught up
    assert consumer._fetched_times == {("in", 0): {}}
    consumer.mark_delivered({("in", 0): 7})  # never backwards
    assert consumer._new_offset(TP("in", 0)) == 10
    assert consumer._new_offset(TP("in", 2)) is None
    assert sorted(consumer._filter_tps_with_pending_acks()) == [TP("in", 0), TP("in", 1)]
    assert list(consumer._filter_tps_with_pending_acks({"other"})) == []
    assert list(consumer._filter_tps_with_pending_acks({TP("in", 1)})) == [TP("in", 1)]


@pytest.mark.parametrize(
    ("header", "valid"),
    [
        (TRACEPARENT, True),
        (b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7", False),
        (b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01", False),
        (b"00-zzf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", False),
    ],
)
def test_remote_context_parses_traceparent(header, valid):
    context = _remote_context([("other", b"x"), ("traceparent", header)])
    assert (context is not None) == valid
    if context is not None:
        assert f"{context.trace_id:032x}" == "4bf92f3577b34da6a3ce929d0e0e4736" and context.is_remote


class RememberingProcessor:
    """A processor with an accepted-records memory (the validator's duplicate window, in miniature)."""

    def __init__(self) -> None:
        self.remembered: list[bytes | None] = []

    def __call__(self, batch: list[InputRecord]) -> list[Output]:
        return [Output("out", r.key, r.value, source=r) for r in batch]

    def accepted_memory(self) -> AcceptedMemory:
        return AcceptedMemory({"in": "out"}, 900.0, 1000, self.remember)

    def remember(self, payloads: Any) -> int:
        self.remembered += list(payloads)
        return len(self.remembered)


def test_a_failed_memory_rebuild_is_retried_with_readiness_down_then_the_worker_fails(monkeypatch):
    calls: list[list[tuple[str, int]]] = []
    readiness: list[bool] = []

    def broken(config: Any, inputs: list[tuple[str, int]], memory: AcceptedMemory) -> Any:
        calls.append(list(inputs))
        readiness.append(runner.health.readiness()[0])
        raise ConnectionError("broker down")

    async def no_wait(_seconds: float) -> None:
        return None

    processor = RememberingProcessor()
    runner, _, _ = make_runner(processor, {"out": 3})
    runner.health.set_ready(True)
    monkeypatch.setattr(stream_app, "rebuild_memory", broken)
    monkeypatch.setattr(stream_app.asyncio, "sleep", no_wait)
    with pytest.raises(stream_app.MemoryNotRebuilt, match="broker down"):
        run(runner._rebuild_memory([("in", 0), ("other", 0)]))
    assert calls == [[("in", 0)]] * stream_app.MEMORY_ATTEMPTS  # only the partitions whose topic it remembers
    assert readiness == [True, False, False, False]  # down from the first failure on
    assert runner.health.readiness()[0] is False

    def works(config: Any, inputs: list[tuple[str, int]], memory: AcceptedMemory) -> Any:
        memory.remember([b"a", b"b"])
        return Reread(1, 2, 2, 0.01, False)

    attempts = iter([broken, works])
    monkeypatch.setattr(stream_app, "rebuild_memory", lambda *args: next(attempts)(*args))
    calls.clear()
    run(runner._rebuild_memory([("in", 1)]))
    assert processor.remembered == [b"a", b"b"] and runner.health.readiness()[0] is True  # ready again
