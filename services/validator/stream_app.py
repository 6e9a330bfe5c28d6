"""The validator's streaming runtime on Faust: consume, process in batches, produce, commit after the acks.

    python -m services.validator.stream_app --processor package.module:function

runs a worker that consumes INPUT_TOPICS with consumer group CONSUMER_GROUP, hands each fetched batch to the
processor (see `services.validator.runtime.Processor`) and produces what it returns. An input offset is
committed only after every output of its batch has been acknowledged by the broker (acks=all), and a crash
replays at most the records after the last commit; their outputs already in the log are not produced again
(services/validator/recovery.py), so every output is in the log once.

Why not Faust agents: a Faust agent gets one event at a time through the conductor, a channel queue and the
stream iterator, and `Consumer._drain_messages` awaits `mode.Service.wait_first` (four tasks) per message.
On the 2-core reference machine that is ~230 us of event-loop work per record, ~4k records/s for a consume-only
agent, while the goal is 10k/s with production. So the worker keeps Faust's App, Worker, aiokafka consumer
thread, group membership and rebalance protocol, commit scheduling and producer, and replaces the per-message
path by `BatchConsumer`: each fetch goes to the `BatchRunner` whole. docs/validator-runtime.md has the
measurements and the source references behind every guarantee.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter as Counter_
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from time import monotonic
from typing import Any, cast
from zlib import crc32

import faust
from confluent_kafka.admin import AdminClient
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP
from mode import Service
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanContext, TraceFlags
from prometheus_client import Counter, Gauge, Histogram

from services.contracts.headers import DLQ_ERROR_CODE, DLQ_RULE, TRACEPARENT
from services.contracts.topics import RETRY_SUFFIX, is_dead_letter_topic
from services.kit import metrics as shared_metrics  # the metrics every stage exports under one name
from services.kit.config import load_settings
from services.kit.exits import ExitCode
from services.kit.health import Health, HealthServer, HealthSettings
from services.kit.kafka import client_config, wait_for_broker
from services.kit.lag import ConsumerLag
from services.kit.logs import configure_logging
from services.kit.memory import tune_gc_for_throughput
from services.kit.metrics import LATENCY_BUCKETS, WindowedShare
from services.kit.reconnect import Backoff, one_line
from services.kit.tracing import (
    consumer_span,
    sampled_context,
    setup_tracing,
    shutdown_tracing,
    traces_messages,
    unsampled_headers,
)
from services.validator.recovery import (
    Emitted,
    Floors,
    FloorStore,
    Partition,
    drop_emitted,
    produced_headers,
    rebuild_memory,
    recover,
    stamp_outputs,
)
from services.validator.runtime import (
    Batch,
    InputRecord,
    Output,
    Processor,
    ProcessResult,
    RetryBatchLater,
    StreamRuntimeSettings,
    TopicsMissing,
    accepted_memory,
    hold_hooks,
    load_processor,
    prepare_hook,
    required_output_topics,
    resolve_input_topics,
    run_processor,
    trace_outputs,
)

log = logging.getLogger("services.validator.stream_app")
# Faust's and mode's services log each start and stop at INFO under their class's module name; these keep the
# runtime's own services in the "faust" hierarchy, which `main` quiets, whatever module runs as __main__.
_FAUST_LOG = logging.getLogger("faust.lp_runtime")

RECORDS = Counter("lp_validator_runtime_records_total", "Input records processed (outputs acknowledged)", ["topic"])
OUTPUTS = Counter("lp_validator_runtime_outputs_total", "Output records acknowledged by the broker", ["topic"])
DEAD_LETTERS = Counter(
    "lp_validator_runtime_dead_letters_total", "Records dead-lettered by the runtime (stage process)", ["topic"]
)
FALLBACKS = Counter(
    "lp_validator_runtime_batch_fallbacks_total", "Batches whose processing raised, retried record by record", ["topic"]
)
BATCH_SECONDS = Histogram(
    "lp_validator_runtime_batch_seconds", "Batch processed to every output acknowledged", buckets=LATENCY_BUCKETS
)
HELD = Gauge("lp_validator_runtime_held_partitions", "Partitions paused until their next record is due (retries)")
IN_FLIGHT = Gauge("lp_validator_runtime_in_flight_batches", "Batches produced, not yet acknowledged")
ASSIGNED = Gauge("lp_validator_runtime_assigned_partitions", "Input partitions assigned to this worker")
SUPPRESSED = Counter(
    "lp_validator_runtime_outputs_suppressed_total",
    "Outputs not produced again: found in the output topics for an input read again after a crash",
    ["topic"],
)
BATCH_RETRIES = Counter(
    "lp_validator_runtime_batch_retries_total",
    "Batches handed to the processor again because a dependency was down (RetryBatchLater)",
    ["dependency"],
)
RECOVERY_SECONDS = Histogram(
    "lp_validator_runtime_recovery_seconds",
    "Reading floors and output tails for newly assigned input partitions",
    buckets=LATENCY_BUCKETS,
)
MEMORY_SECONDS = Histogram(
    "lp_validator_runtime_memory_rebuild_seconds",
    "Reading back the records newly assigned input partitions accepted (the processor's duplicate memory)",
    buckets=LATENCY_BUCKETS,
)
MEMORY_RECORDS = Counter(
    "lp_validator_runtime_memory_rebuilt_records_total", "Accepted records read back into the processor's memory"
)
VERDICTS = Counter(
    "lp_validator_verdicts_total",
    "Input records decided, by verdict: accepted (not dead-lettered) or rejected (dead-lettered); "
    "records sent to a retry topic are decided when they come back",
    ["verdict"],
)
DATA_QUALITY_WINDOW_S = 300.0
DATA_QUALITY = Gauge(
    "lp_validator_data_quality_ratio",
    f"Share of decided input records accepted over the last {DATA_QUALITY_WINDOW_S:g} s (NaN when none)",
)
STAGE = "validator"  # the `stage` label of the shared lp_stage_* metrics
MEMORY_ATTEMPTS = 4  # reading back accepted records: tries before the worker fails

MAX_SPAN_LINKS = 64  # per batch span; the SDK keeps 128 at most anyway
_REQUEST_OVERHEAD = 1024  # produce request and batch headers around a single record


DEPENDENCY_BACKOFF = Backoff(initial_s=0.5, max_s=15.0)  # between tries of a batch while a dependency is down
_DROP_CHECK_S = 0.2  # how often a batch waiting for a dependency looks for a rebalance or a stop


class MemoryNotRebuilt(RuntimeError):
    """The processor's accepted-records memory could not be read back: the worker stops rather than go on
    without it (a duplicate of an event accepted before would be accepted again)."""


class DeliveryFailed(RuntimeError):
    """The broker did not acknowledge a batch's outputs: the worker stops without committing its inputs."""


class _BatchDropped(Exception):
    """A rebalance or a stop came while the batch waited for a dependency: it is re-read from the commit."""


# --- the consumer: whole fetches to the runner, commits from delivered offsets -------------------------------------


# How long the broker may hold a fetch of partitions with nothing new. Faust fixes 1,500 ms, and aiokafka sends one
# fetch per broker at a time, leaving out partitions with records still buffered: at the end of a burst that
# long-poll of the drained partitions held back the last records of the others for up to 1.5 s (0.6 s measured:
# a sixth of a 200,000-event run). 100 ms costs an idle worker ten small requests a second.
FETCH_MAX_WAIT_MS = 100


class BatchConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS  # read by aiokafka when the consumer starts
        return consumer


class BatchConsumer(faust_aiokafka.Consumer):
    """Faust's aiokafka consumer with two replacements (everything else, rebalancing included, is Faust's).

    1. `_drain_messages` (the fetcher task) hands each fetch, as `InputRecord`s, to the `BatchRunner` instead of
       sending every message through `wait_first` + conductor + stream.
    2. The commit offset of a partition is the runner's *delivered* offset (last offset of a batch whose outputs
       were all acknowledged, + 1) instead of Faust's per-message ack ledger (`_new_offset`): a partition's
       records are processed in offset order by one task, so everything below that offset is delivered.
       Faust's commit loop (every `broker_commit_interval`, on rebalance and on stop) commits it.
    """

    logger = _FAUST_LOG

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._delivered: dict[TP, int] = {}
        self._held: dict[TP, asyncio.TimerHandle] = {}  # partitions paused until their first record is due
        self._lag: ConsumerLag | None = None
        # per partition: next offset of a fetched batch -> its last record's timestamp, until the batch is delivered
        self._fetched_times: dict[tuple[str, int], dict[int, int]] = {}

    @property
    def lag(self) -> ConsumerLag:
        """lp_kafka_consumer_lag_*: per partition, from the delivered offsets (the group is Faust's app id)."""
        if self._lag is None:
            self._lag = ConsumerLag(str(self.app.conf.id), highwater=self._current_highwater)
        return self._lag

    def _note_fetched(self, tp: TP, first: Any, last: Any) -> None:
        """Per partition per fetch: remember the last record's time for `mark_delivered`. A partition fetched for
        the first time starts its lag at its first record (not handled yet: its age is the lag)."""
        key = (tp.topic, tp.partition)
        times = self._fetched_times.get(key)
        if times is None:
            times = self._fetched_times[key] = {}
            self.lag.update(tp.topic, tp.partition, first.offset, self.highwater(tp), first.timestamp)
        times[last.offset + 1] = last.timestamp
        if len(times) > 64:  # batches dropped by a rebalance never come back: forget the oldest
            del times[next(iter(times))]

    def _current_highwater(self, topic: str, partition: int) -> int | None:
        """aiokafka's high watermark from its latest fetch response (its fetcher goes on while a batch is stuck)."""
        return cast(int | None, self.highwater(TP(topic, partition)))

    @property
    def runner(self) -> BatchRunner:
        return cast(RuntimeApp, self.app).runner

    def _new_consumer_thread(self) -> BatchConsumerThread:
        return BatchConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def _drain_messages(self, fetcher: Service) -> None:  # type: ignore[override]
        consumer_stopped = self._stopped.is_set
        fetcher_stopped = fetcher._stopped.is_set
        try:
            while not (consumer_stopped() or fetcher_stopped()):
                batch = await self._fetch()
                if batch is not None:
                    await self.runner.submit(batch, self.suspend_flow)
                else:
                    await asyncio.sleep(0)
        except self.consumer_stopped_errors:
            if not self.app.should_stop:
                raise
        except asyncio.CancelledError:
            if not self.app.should_stop:
                raise

    async def _fetch(self) -> Batch | None:
        """One fetch as a Batch of aiokafka's own records: Faust's `getmany` with its checks made once per fetch,
        not per record (per record it looks up the highwater, updates the monitor and builds a message object,
        which together cost more than the pass-through processing of the record)."""
        fetched, active = await self._wait_next_records(1.0)  # waits while a rebalance has the flow stopped
        if not fetched or self.should_stop:
            return None
        if not self.flow_active:
            # A rebalance began during the fetch: the fetch position moved past records we drop, so seek back
            # to the committed offsets, as getmany does. (Faust seeks there again before the flow resumes.)
            await self.perform_seek()
            return None
        generation = self.app.consumer_generation_id
        monitor = self.app.monitor
        hold_topics, not_before = hold_hooks(self.runner.processor)
        by_topic: dict[str, list[InputRecord]] = {}
        next_offsets: dict[tuple[str, int], int] = {}
        size = 0
        for tp, records in fetched.items():
            if not records:
                continue
            if active is not None and tp not in active and tp not in self._buffered_partitions:
                # Paused meanwhile: leave its records for later. getmany would drop them and move on; the
                # delivered offset must not pass over records nobody processed, so seek back to them instead.
                await self.seek(tp, records[0].offset)
                continue
            if tp.topic in hold_topics:
                records = await self._due_records(tp, records, not_before)
                if not records:
                    continue
            by_topic.setdefault(tp.topic, []).extend(records)  # aiokafka fetches each partition in offset order
            next_offsets[(tp.topic, tp.partition)] = records[-1].offset + 1
            size += len(records)
            self._note_fetched(tp, records[0], records[-1])
            if monitor is not None:
                monitor.track_tp_end_offset(tp, self.highwater(tp))
        if not size or generation != self.app.consumer_generation_id or not self.flow_active:
            return None
        return Batch(by_topic, next_offsets, size)

    async def _due_records(
        self, tp: TP, records: list[Any], not_before: Callable[[InputRecord], float | None]
    ) -> list[Any]:
        """The records before the first one that is not due yet; from that one on, the partition is paused and
        rewound until it is due, so a delayed retry waits in the log (uncommitted) instead of circulating."""
        now = time.time()
        for index, record in enumerate(records):
            due = not_before(record)
            if due is not None and due > now:
                await self.seek(tp, record.offset)
                held = TP(tp.topic, tp.partition)  # Faust asserts its own TP type in its partition sets
                self.pause_partitions([held])
                self._held[held] = asyncio.get_running_loop().call_later(due - now, self._release, held)
                HELD.set(len(self._held))
                return records[:index]
        return records

    def _release(self, tp: TP) -> None:
        self._held.pop(tp, None)
        HELD.set(len(self._held))
        if tp in self.assignment():  # revoked meanwhile: its new owner reads it from the commit
            self.resume_partitions([tp])

    def mark_delivered(self, offsets: dict[tuple[str, int], int]) -> None:
        """Called by the runner once every output of a batch is acknowledged: these offsets may be committed."""
        now = monotonic()
        inbound = self.app.monitor.stream_inbound_time if self.app.monitor is not None else {}
        for (topic, partition), offset in offsets.items():
            tp = self._new_topicpartition(topic, partition)
            if offset > self._delivered.get(tp, -1):
                self._delivered[tp] = offset
            inbound[tp] = now  # keeps Faust's livelock warnings ("stream idle") truthful
            # the lag counts from what is delivered, not fetched: a batch stuck in processing is lag
            timestamp = self._fetched_times.get((topic, partition), {}).pop(offset, None)
            self.lag.update(topic, partition, offset, None, timestamp)

    # Faust's commit path: force_commit -> _filter_tps_with_pending_acks -> _filter_committable_offsets ->
    # _new_offset + _should_commit (offset > committed) -> _commit_offsets (producer.flush, commit).
    def _filter_tps_with_pending_acks(self, topics: Any = None) -> Iterator[TP]:
        return (tp for tp in list(self._delivered) if topics is None or tp in topics or tp.topic in topics)

    def _new_offset(self, tp: TP) -> int | None:
        return self._delivered.get(tp)

    async def _commit_tps(self, tps: Iterable[TP], start_new_transaction: bool) -> bool:
        """Faust's, plus the floors: the runner's floors and the delivered offsets are read in one step (no await
        between), the offsets are committed, and only then the floors are stored for the input partitions whose
        committed offset reached the snapshot (see services/validator/recovery.py)."""
        floors = dict(self.runner.floors)
        version = self.runner.floors_version
        delivered = dict(self._delivered)
        commit_offsets = self._filter_committable_offsets(tps)
        did_commit = False
        if commit_offsets:
            await self._handle_attached(commit_offsets)
            did_commit = await self._commit_offsets(commit_offsets, start_new_transaction=start_new_transaction)
            if not did_commit:
                return False
        ready: dict[Partition, int | None] = {}
        for tp in self.assignment():
            committed = self._committed_offset.get(tp)
            if tp not in delivered or (committed is not None and committed >= delivered[tp]):
                ready[(tp.topic, tp.partition)] = committed
        self.runner.store_floors(ready, floors, version)
        return did_commit

    async def wait_empty(self) -> None:
        """Faust calls this on rebalance (revoke) and on stop before committing: batches not started are dropped
        (their partitions are re-read from the commit by whoever owns them next), batches being processed or
        produced are finished, then the delivered offsets are committed."""
        await self.runner.drain()
        # Consumer.commit returns without committing when another commit (the timer's) is in progress: wait
        # for that one first, so the offsets delivered by the drained batches are committed here, not skipped.
        while await self.maybe_wait_for_commit_to_finish():
            pass
        await self.commit_and_end_transactions()

    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        self.runner.health.set_ready(False, "rebalancing")
        await super().on_partitions_revoked(revoked)  # runs the app's handler: wait_empty, commit
        self.runner.forget([(tp.topic, tp.partition) for tp in revoked])
        self.lag.forget([(tp.topic, tp.partition) for tp in revoked])
        for tp in revoked:
            self._fetched_times.pop((tp.topic, tp.partition), None)
        for tp in revoked:
            self._delivered.pop(tp, None)
            held = self._held.pop(tp, None)
            if held is not None:
                held.cancel()
        HELD.set(len(self._held))

    async def on_partitions_assigned(self, assigned: set[TP], generation_id: int = 0) -> None:
        await super().on_partitions_assigned(assigned, generation_id)
        self.runner.to_recover([(tp.topic, tp.partition) for tp in assigned])
        ASSIGNED.set(len(assigned))
        log.info("assigned %d partitions", len(assigned), extra={"partitions": sorted(map(str, assigned))})
        self.runner.health.set_ready(True)


class BatchTransport(faust_aiokafka.Transport):
    Consumer = BatchConsumer


class RuntimeApp(faust.App):
    """A Faust app whose consumer is `BatchConsumer`; `runner` is attached by `create_app`."""

    logger = _FAUST_LOG
    runner: BatchRunner

    def _new_transport(self) -> BatchTransport:
        return BatchTransport(self.conf.broker_consumer, self)

    def on_init_dependencies(self) -> Iterable[Any]:
        # Started after (and stopped before) the producer and the consumer.
        return [*super().on_init_dependencies(), self.runner]


# --- the runner: process, produce, acknowledge -------------------------------------------------------------------


@dataclass(slots=True)
class _Flight:
    """A batch whose outputs are handed to the producer, waiting for the broker's acknowledgements."""

    acks: list[asyncio.Future[Any]]
    ack_counts: list[int]  # records in each acknowledged batch (its RecordMetadata has the base offset)
    offsets: dict[tuple[str, int], int]
    records: dict[str, int]
    outputs: dict[str, int]
    started: float
    span: Span
    dead_letter_reasons: dict[tuple[str, str, str], int] | None = None  # (topic, code, rule) -> dead letters


class BatchRunner(Service):
    """Takes fetched batches in order; per batch: process (per topic), produce, await acks, mark delivered.

    Up to `max_in_flight_batches` batches wait for acks while the next one is processed; they complete in
    order, so a partition's delivered offset only moves over records whose outputs are all acknowledged. A
    failed delivery crashes the worker (exit 1) without marking that batch or any later one delivered.
    """

    logger = _FAUST_LOG

    def __init__(
        self,
        processor: Processor,
        settings: StreamRuntimeSettings,
        health: Health,
        known_topics: Iterable[str],
        tracer: trace.Tracer | None = None,
        *,
        floor_store: FloorStore | None = None,
        floors: Floors | None = None,
        client_config: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.processor = processor
        self.prepare = prepare_hook(processor)
        self.health = health
        self.tracer = tracer or trace.get_tracer(__name__)
        self.consumer_group = settings.consumer_group
        self.max_in_flight = settings.max_in_flight_batches
        self.max_record_bytes = settings.producer_max_request_bytes - _REQUEST_OVERHEAD
        self.app: RuntimeApp | None = None
        # Queued with the epoch of their submission; a drain (rebalance, stop) starts a new epoch, so a fetch that
        # was still waiting for room when the drain dropped the queue is dropped too, not processed after it:
        # its offsets would otherwise be delivered over the dropped records and committed past them.
        self._queue: asyncio.Queue[tuple[int, Batch]] = asyncio.Queue(maxsize=2)
        self._epoch = 0
        self._in_flight: deque[_Flight] = deque()
        self._starting = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._failure: BaseException | None = None
        self._known_topics = set(known_topics)
        self._partition_counts: dict[str, int] = {}
        self._null_key_turn = 0
        self.processed = 0  # input records whose outputs are acknowledged (for tests and benchmarks)
        self._down: set[str] = set()  # dependencies a batch is waiting for (RetryBatchLater), marked down
        # Exactly once at the source (recovery.py). Without a floor store (unit tests) nothing is recovered.
        self.floor_store = floor_store
        self.client_config = client_config or {}
        self.floors: Floors = dict(floors or {})  # per output partition: end of outputs of delivered batches
        self._unrecovered: set[Partition] = set()  # assigned, not yet recovered: no floors may be stored for them
        self._emitted: Emitted = {}  # input partition -> input offset -> its outputs already in the log
        self._newest: dict[Partition, int] = {}  # input partition -> highest offset found by its recovery
        self._floor_task: asyncio.Task[None] | None = None
        self._floors_version = 0  # moves with the floors; per input partition, the version last stored
        self._stored_version: dict[Partition, int] = {}
        self.suppressed = 0  # outputs not produced again (for tests)
        self.quality = WindowedShare(DATA_QUALITY_WINDOW_S)
        DATA_QUALITY.set_function(self.quality.share)  # computed at scrape: the window empties while idle

    # exactly once at the source --------------------------------------------------------------------------------
    def to_recover(self, partitions: Iterable[Partition]) -> None:
        """Newly assigned input partitions: recovered before any of their records is processed."""
        if self.floor_store is not None:
            self._unrecovered.update(partitions)

    def forget(self, partitions: Iterable[Partition]) -> None:
        for tp in partitions:
            self._stored_version.pop(tp, None)
            self._unrecovered.discard(tp)
            self._emitted.pop(tp, None)
            self._newest.pop(tp, None)

    async def _recover(self) -> None:
        assert self.floor_store is not None
        inputs = sorted(self._unrecovered)
        started = monotonic()
        found = await asyncio.to_thread(recover, self.client_config, self.floor_store, inputs, dict(self.floors))
        for tp in inputs:
            self._unrecovered.discard(tp)
        self._emitted.update(found.emitted)
        self._newest.update(found.newest)
        RECOVERY_SECONDS.observe(monotonic() - started)
        outputs = sum(len(logged.topics) for by_offset in found.emitted.values() for logged in by_offset.values())
        log.info(
            "recovered %d input partitions: %d outputs of %d records after their commits are in the log already",
            len(inputs),
            outputs,
            sum(len(by_offset) for by_offset in found.emitted.values()),
            extra={"partitions": len(inputs), "outputs_in_log": outputs, "without_floors": found.without_floors},
        )
        await self._rebuild_memory(inputs)

    async def _rebuild_memory(self, inputs: Sequence[Partition]) -> None:
        """The processor's memory of what it accepted (the duplicate window) for newly assigned input partitions,
        read back from the output topics before any of their records is processed. A read that fails is retried
        (readiness down meanwhile); after MEMORY_ATTEMPTS the worker fails (exit 1, nothing of those partitions
        processed or committed): it never goes on without the memory."""
        memory = accepted_memory(self.processor)
        wanted = [tp for tp in inputs if memory is not None and tp[0] in memory.sources]
        if memory is None or not wanted:
            return
        unready = False
        for attempt in range(1, MEMORY_ATTEMPTS + 1):
            try:
                reread = await asyncio.to_thread(rebuild_memory, self.client_config, wanted, memory)
                break
            except Exception as error:
                if attempt == MEMORY_ATTEMPTS:
                    raise MemoryNotRebuilt(f"{type(error).__name__}: {error}") from error
                unready = True
                self.health.set_ready(False, "rebuilding the duplicate memory")
                log.warning(
                    "reading back accepted records failed (attempt %d of %d): %s: %s",
                    attempt,
                    MEMORY_ATTEMPTS,
                    type(error).__name__,
                    error,
                )
                await asyncio.sleep(min(2.0**attempt, 10.0))
        if unready:
            self.health.set_ready(True)
        MEMORY_SECONDS.observe(reread.seconds)
        MEMORY_RECORDS.inc(reread.remembered)
        log.info(
            "duplicate memory rebuilt for %d input partitions: %d accepted records read back from %d output "
            "partitions in %.1fs",
            len(wanted),
            reread.records,
            reread.partitions,
            reread.seconds,
            extra={"records": reread.records, "remembered": reread.remembered, "seconds": round(reread.seconds, 3)},
        )

    @property
    def floors_version(self) -> int:
        return self._floors_version

    def store_floors(self, ready: dict[Partition, int | None], floors: Floors, version: int = -1) -> None:
        """Store `floors` (a snapshot taken with the offsets just committed) for the input partitions in `ready`
        (partition -> committed offset) that no output of an uncommitted record can lie under: recovered, and
        committed past every record whose outputs their recovery found. In the background; one write at a time
        (a skipped write leaves older, lower floors: still valid)."""
        if self.floor_store is None or (self._floor_task is not None and not self._floor_task.done()):
            return
        partitions = [
            tp
            for tp, committed in ready.items()
            if tp not in self._unrecovered
            and (tp not in self._newest or (committed is not None and committed > self._newest[tp]))
            and (version < 0 or self._stored_version.get(tp, -1) < version)  # unchanged floors: nothing to store
        ]
        if partitions:
            self._floor_task = asyncio.ensure_future(self._write_floors(partitions, floors, version))

    async def _write_floors(self, partitions: list[Partition], floors: Floors, version: int) -> None:
        assert self.floor_store is not None
        try:
            await asyncio.to_thread(self.floor_store.write, partitions, floors)
        except Exception as error:  # older floors stay: recovery reads further back, nothing more
            log.warning("storing output floors failed: %s: %s", type(error).__name__, error)
            return
        for tp in partitions:
            self._stored_version[tp] = version

    # called by the consumer -----------------------------------------------------------------------------------
    async def submit(self, batch: Batch, suspend_flow: asyncio.Event) -> None:
        """Queue a fetch; waits while two batches are already queued. Dropped if a rebalance or stop suspends
        the flow meanwhile (the partitions are then re-read from their committed offsets)."""
        if self._failure is not None or suspend_flow.is_set():
            return
        self._idle.clear()
        entry = (self._epoch, batch)
        if self._queue.full():
            await self.wait_first(self._queue.put(entry), suspend_flow)
        else:
            self._queue.put_nowait(entry)
        self._update_idle()

    async def drain(self) -> None:
        self._epoch += 1
        dropped = 0
        while not self._queue.empty():
            dropped += self._queue.get_nowait()[1].size
        if dropped:
            log.info("dropped %d fetched records not yet processed (re-read after the commit)", dropped)
        self._update_idle()
        if not self.should_stop:
            await self._idle.wait()

    # the loop ------------------------------------------------------------------------------------------------
    def _update_idle(self) -> None:
        if self._queue.empty() and not self._starting and not self._in_flight:
            self._idle.set()
        else:
            self._idle.clear()

    async def on_started(self) -> None:
        tune_gc_for_throughput()  # a third of a pass-through worker's time went to cyclic-GC passes

    @Service.timer(1.0)
    async def _beat(self) -> None:
        self.health.beat()  # liveness: the event loop is turning

    @Service.task
    async def _run(self) -> None:
        while not self.should_stop and self._failure is None:
            if self._in_flight and (len(self._in_flight) >= self.max_in_flight or self._queue.empty()):
                await self._complete_oldest()
                continue
            self._update_idle()
            epoch, batch = await self._queue.get()
            if epoch != self._epoch:  # submitted before a drain that had already emptied the queue
                log.info("dropped %d fetched records not yet processed (re-read after the commit)", batch.size)
                self._update_idle()
                continue
            self._starting = True
            try:
                self._in_flight.append(await self._start(batch, epoch))
                IN_FLIGHT.set(len(self._in_flight))
            except _BatchDropped:
                log.info("dropped %d fetched records waiting for a dependency (re-read after the commit)", batch.size)
            except Exception as error:  # not a data problem (those are dead-lettered): an unknown topic, a bug
                await self._fail(error)
            finally:
                self._starting = False
                self._update_idle()

    async def _start(self, batch: Batch, epoch: int | None = None) -> _Flight:
        started = monotonic()
        span, record_spans = self._batch_span(batch)
        span_context = span.get_span_context()
        fallback_headers = unsampled_headers(span_context)  # flag cleared: no per-message span downstream
        batch_trace_id = f"{span_context.trace_id:032x}" if span_context.is_valid else None
        outputs: list[Output] = []
        counts: dict[str, int] = {}
        try:
            if self._unrecovered and not self._unrecovered.isdisjoint(batch.next_offsets):
                await self._recover()
            await self._prepare(batch, epoch)
            for topic, topic_records in batch.by_topic.items():
                result = await self._process(topic_records, batch_trace_id, epoch)
                outputs += result.outputs
                counts[topic] = len(topic_records)
                if result.batch_failed:
                    FALLBACKS.labels(topic).inc()
                    log.warning(
                        "processing a batch of %s raised: processed record by record, %d dead-lettered",
                        topic,
                        result.dead_letters,
                        extra={"topic": topic, "records": len(topic_records), "dead_letters": result.dead_letters},
                    )
                if result.dead_letters:
                    DEAD_LETTERS.labels(topic).inc(result.dead_letters)
                    shared_metrics.STAGE_ERRORS.labels(STAGE).inc(result.dead_letters)
            stamps = stamp_outputs(outputs)
            if self._emitted:
                outputs, stamps = self._drop_emitted(outputs, stamps, batch)
            if record_spans:
                trace_outputs(self.tracer, outputs, record_spans)
            acks, ack_counts, per_topic = await self._produce(outputs, stamps, fallback_headers)
        except BaseException:
            span.end()
            raise
        finally:
            for record_span in record_spans.values():
                record_span.end()
        span.set_attribute("lp.outputs", len(outputs))
        # Only a batch that has dead letters looks at its outputs again (their reason is in their headers).
        dead_letter_topics = {topic for topic in per_topic if is_dead_letter_topic(topic)}
        reasons = _dead_letter_reasons(outputs, dead_letter_topics) if dead_letter_topics else None
        return _Flight(acks, ack_counts, batch.next_offsets, counts, per_topic, started, span, reasons)

    # a dependency down: the same records again, later ------------------------------------------------------------
    async def _prepare(self, batch: Batch, epoch: int | None) -> None:
        """The processor's `prepare` hook for every topic of the batch, before any is processed (in a thread: it
        may wait on the network), until it no longer raises `RetryBatchLater`."""
        if self.prepare is None:
            return
        prepare = self.prepare

        def prepare_all() -> None:
            for topic_records in batch.by_topic.values():
                prepare(topic_records)

        attempt = 0
        while True:
            try:
                await asyncio.to_thread(prepare_all)  # one thread hop per batch
            except RetryBatchLater as error:
                attempt += 1
                await self._wait_for_dependency(error, attempt, epoch)
                continue
            self._dependencies_up()
            return

    async def _process(self, records: list[InputRecord], trace_id: str | None, epoch: int | None) -> ProcessResult:
        """`run_processor`, again after a backoff while it raises `RetryBatchLater` (the records are never
        dead-lettered for it). `prepare` normally did that part already; this covers a processor without it."""
        attempt = 0
        while True:
            try:
                result = run_processor(self.processor, records, self.max_record_bytes, trace_id=trace_id)
            except RetryBatchLater as error:
                attempt += 1
                await self._wait_for_dependency(error, attempt, epoch)
                continue
            self._dependencies_up()
            return result

    async def _wait_for_dependency(self, error: RetryBatchLater, attempt: int, epoch: int | None) -> None:
        """Mark the dependency down (/readyz 503) and wait a backoff; raises `_BatchDropped` if a rebalance or a
        stop comes meanwhile (the batch is then neither processed nor committed: it is read again)."""
        self.health.dependency_down(error.dependency, one_line(error))
        self._down.add(error.dependency)
        BATCH_RETRIES.labels(error.dependency).inc()
        delay = DEPENDENCY_BACKOFF.delay(attempt)
        log.warning(
            "batch not processed, %s; trying the same records again in %.1fs (attempt %d)",
            error,
            delay,
            attempt,
            extra={"dependency": error.dependency, "attempt": attempt, "retry_in_s": round(delay, 3)},
        )
        until = monotonic() + delay
        while True:
            if self.should_stop or self._failure is not None or (epoch is not None and epoch != self._epoch):
                raise _BatchDropped()
            left = until - monotonic()
            if left <= 0:
                return
            await asyncio.sleep(min(left, _DROP_CHECK_S))

    def _dependencies_up(self) -> None:
        for dependency in self._down:
            self.health.dependency_up(dependency)
            log.info("%s is back: processing resumed", dependency, extra={"dependency": dependency})
        self._down.clear()

    def _drop_emitted(
        self, outputs: list[Output], stamps: list[bytes | None], batch: Batch
    ) -> tuple[list[Output], list[bytes | None]]:
        """Outputs already in the log (recovery found them) are not produced again; recovered partitions that
        this batch has read past are forgotten."""
        kept, kept_stamps, dropped = drop_emitted(outputs, stamps, self._emitted)
        if dropped:
            self.suppressed += dropped
            per_topic = Counter_(output.topic for output in outputs)
            per_topic.subtract(output.topic for output in kept)
            for topic, count in per_topic.items():
                if count:
                    SUPPRESSED.labels(topic).inc(count)
        for tp, next_offset in batch.next_offsets.items():
            by_offset = self._emitted.get(tp)
            if by_offset is not None and (not by_offset or next_offset > max(by_offset)):
                del self._emitted[tp]  # what is left was never read again: offsets below the commit
        return kept, kept_stamps

    async def _complete_oldest(self) -> None:
        flight = self._in_flight[0]
        try:
            results = await asyncio.gather(*flight.acks)
        except Exception as error:
            await self._fail(DeliveryFailed(f"outputs not acknowledged: {type(error).__name__}: {error}"))
            return
        self._in_flight.popleft()
        IN_FLIGHT.set(len(self._in_flight))
        # Floors move with the delivered offsets, in the same step (the commit reads both together).
        floors = self.floors
        for metadata, count in zip(results, flight.ack_counts, strict=True):
            end = metadata.offset + count
            position = (metadata.topic, metadata.partition)
            if end > floors.get(position, 0):
                floors[position] = end
                self._floors_version += 1
        self.consumer.mark_delivered(flight.offsets)
        for topic, count in flight.records.items():
            RECORDS.labels(topic).inc(count)
            self.processed += count
        for topic, count in flight.outputs.items():
            OUTPUTS.labels(topic).inc(count)
        self._account_verdicts(flight)
        BATCH_SECONDS.observe(monotonic() - flight.started)
        flight.span.end()
        self._update_idle()

    def _account_verdicts(self, flight: _Flight) -> None:
        """Per acknowledged batch: verdicts and the data-quality window from per-topic counts (no record is
        looked at), the shared stage counters, dead letters by reason."""
        records_in = sum(flight.records.values())
        rejected = deferred = produced = 0
        for topic, count in flight.outputs.items():
            if is_dead_letter_topic(topic):
                rejected += count
            elif topic.endswith(RETRY_SUFFIX):
                deferred += count
            else:
                produced += count
        decided = max(0, records_in - deferred)
        accepted = max(0, decided - rejected)
        VERDICTS.labels("accepted").inc(accepted)
        VERDICTS.labels("rejected").inc(rejected)
        self.quality.add(accepted, accepted + rejected)
        shared_metrics.STAGE_RECORDS_IN.labels(STAGE).inc(records_in)
        shared_metrics.STAGE_RECORDS_OUT.labels(STAGE).inc(produced)
        for (topic, code, rule), count in (flight.dead_letter_reasons or {}).items():
            shared_metrics.DEAD_LETTERS.labels(topic, code, rule).inc(count)

    async def _fail(self, error: BaseException) -> None:
        """Stop processing for good: nothing from this batch on is marked delivered, so nothing of it is committed."""
        self._failure = error
        for flight in self._in_flight:
            flight.span.end()
        self._in_flight.clear()
        while not self._queue.empty():
            self._queue.get_nowait()
        self._update_idle()
        log.error("worker failing: %s (uncommitted records are processed again after a restart)", error)
        self.health.set_ready(False, f"failed: {error}")
        app = self.app
        if app is not None:
            await app.crash(error)

    @property
    def consumer(self) -> BatchConsumer:
        assert self.app is not None
        return cast(BatchConsumer, self.app.consumer)

    # producing -------------------------------------------------------------------------------------------------
    async def _produce(
        self, outputs: Sequence[Output], stamps: Sequence[bytes | None], fallback_headers: Sequence[tuple[str, bytes]]
    ) -> tuple[list[asyncio.Future[Any]], list[int], dict[str, int]]:
        """Hand `outputs` to aiokafka as one record batch per (topic, partition): its batch API costs a fraction
        of `send()` per record (no per-record future, partitioner call and accumulator lookup)."""
        assert self.app is not None
        producer = self.app.producer._ensure_producer()
        builders: dict[tuple[str, int], Any] = {}
        acks: list[asyncio.Future[Any]] = []
        ack_counts: list[int] = []
        per_topic: dict[str, int] = {}
        self._null_key_turn += 1
        for output, stamp in zip(outputs, stamps, strict=True):
            topic = output.topic
            count = self._partition_counts.get(topic)
            if count is None:
                count = await self._partition_count(producer, topic)
            partition = self._partition_for(output.key, count)
            headers = produced_headers(output, fallback_headers, stamp)
            builder = builders.get((topic, partition))
            if builder is None:
                builder = builders[(topic, partition)] = producer.create_batch()
            if builder.append(key=output.key, value=output.value, timestamp=None, headers=headers) is None:
                ack_counts.append(builder.record_count())
                acks.append(await producer.send_batch(builder, topic, partition=partition))  # full: send it
                builder = builders[(topic, partition)] = producer.create_batch()
                builder.append(key=output.key, value=output.value, timestamp=None, headers=headers)
            per_topic[topic] = per_topic.get(topic, 0) + 1
        for (topic, partition), builder in builders.items():
            ack_counts.append(builder.record_count())
            acks.append(await producer.send_batch(builder, topic, partition=partition))
        return acks, ack_counts, per_topic

    def _partition_for(self, key: bytes | None, count: int) -> int:
        if key is None:
            return self._null_key_turn % count  # one partition per batch for unkeyed records (sticky)
        # CRC-32 of the key, as librdkafka's default partitioner (the platform's confluent-kafka producers):
        # the same key lands on the same partition number whoever produced it, at 0.3 us a key where the
        # Java-compatible murmur2 of aiokafka (pure Python) takes 14 us.
        return crc32(key) % count

    async def _partition_count(self, producer: Any, topic: str) -> int:
        # A metadata request naming a missing topic creates it on brokers with auto-create (the local one
        # does), so a topic not seen at start is first looked up in the full, non-creating topic list.
        if topic not in self._known_topics:
            cluster = await producer.client.fetch_all_metadata()
            if topic not in cluster.topics():
                raise TopicsMissing(f"the processor wrote to topic {topic!r}, which does not exist")
            self._known_topics.add(topic)
        count = len(await producer.partitions_for(topic))
        if self.floor_store is not None and any((topic, p) not in self.floors for p in range(count)):
            # An output partition first written now: its end before the first write is its floor.
            store = self.floor_store
            latest = await asyncio.to_thread(store.latest, [(topic, p) for p in range(count)])
            for position, floor in latest.items():
                self.floors.setdefault(position, floor)
        self._partition_counts[topic] = count
        return count

    # tracing -------------------------------------------------------------------------------------------------
    def _batch_span(self, batch: Batch) -> tuple[Span, dict[int, Span]]:
        """One span per batch (a root, linked to its first MAX_SPAN_LINKS sampled records) and a `process` span
        per sampled record, child of the record's producer context, keyed by the record's id(). An unsampled
        record costs the header scan only."""
        sampled: list[SpanContext] = []
        record_spans: dict[int, Span] = {}
        traced = batch.by_topic.values() if traces_messages() else ()
        for record in (record for records in traced for record in records):
            parent = sampled_context(record.headers)
            if parent is None:
                continue
            sampled.append(parent)
            record_spans[id(record)] = consumer_span(
                self.tracer, parent, record.topic, record.partition, record.offset, self.consumer_group
            )
        span = self.tracer.start_span(
            "validator.process_batch",
            context=Context(),
            links=[Link(context) for context in sampled[:MAX_SPAN_LINKS]],
            kind=trace.SpanKind.CONSUMER,
            attributes={"messaging.system": "kafka", "messaging.batch.message_count": batch.size},
        )
        return span, record_spans


def _dead_letter_reasons(outputs: Sequence[Output], topics: set[str]) -> dict[tuple[str, str, str], int]:
    """(dead-letter topic, lp-dlq-error-code, lp-dlq-rule) -> count, over the outputs to `topics`."""
    reasons: dict[tuple[str, str, str], int] = {}
    for output in [output for output in outputs if output.topic in topics]:
        code = rule = ""
        for name, value in output.headers:  # the dead-letter builder writes the code, then the rule
            if name == DLQ_ERROR_CODE:
                code = value.decode("utf-8", "replace")
            elif name == DLQ_RULE:
                rule = value.decode("utf-8", "replace")
                break
        key = (output.topic, code, rule)
        reasons[key] = reasons.get(key, 0) + 1
    return reasons


def _remote_context(headers: Sequence[tuple[str, bytes]]) -> SpanContext | None:
    """A W3C traceparent header as a remote SpanContext, parsed by hand (cheaper than the propagator)."""
    for name, value in headers:
        if name == TRACEPARENT and value:
            parts = value.split(b"-")
            if len(parts) != 4 or len(parts[1]) != 32 or len(parts[2]) != 16:
                return None
            try:
                trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3][:2], 16)
            except ValueError:
                return None
            if not trace_id or not span_id:
                return None
            return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags))
    return None


# --- the app and the worker ----------------------------------------------------------------------------------------


def _broker_credentials(settings: StreamRuntimeSettings) -> Any:
    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return None
    import ssl

    context = ssl.create_default_context() if protocol in ("SSL", "SASL_SSL") else None
    if protocol == "SSL":
        return faust.SSLCredentials(context)
    return faust.SASLCredentials(
        username=settings.kafka_sasl_username,
        password=settings.kafka_sasl_password.get_secret_value() if settings.kafka_sasl_password else None,
        mechanism=settings.kafka_sasl_mechanism or "PLAIN",
        ssl_context=context,
    )


def create_app(
    settings: StreamRuntimeSettings,
    processor: Processor,
    input_topics: Sequence[str],
    *,
    health: Health,
    datadir: str,
    known_topics: Iterable[str] = (),
    tracer: trace.Tracer | None = None,
    floor_store: FloorStore | None = None,
    floors: Floors | None = None,
) -> RuntimeApp:
    """The Faust app: consumer group `settings.consumer_group` over `input_topics`, tuned for the local broker."""
    app = RuntimeApp(
        settings.consumer_group,
        # Faust reads BROKER_URL, WEB_PORT, PROCESSING_GUARANTEE, ... from the environment and lets them win over
        # arguments; env={} keeps StreamRuntimeSettings the only source of configuration.
        env={},
        broker=[f"kafka://{server.strip()}" for server in settings.kafka_bootstrap_servers.split(",")],
        broker_credentials=_broker_credentials(settings),
        datadir=datadir,  # Faust creates <datadir>/<app id>-data even with an in-memory store
        store="memory://",  # no tables: their recovery loses data on the local broker
        processing_guarantee="at_least_once",  # exactly_once needs Kafka transactions: broken on the local broker
        topic_allow_declare=False,  # topics are declared by the operator, never by a worker
        topic_disable_leader=True,  # no leader-election topic (it would have to be declared too)
        web_enabled=False,  # /healthz /readyz /metrics come from the kit's HealthServer (own thread)
        key_serializer="raw",
        value_serializer="raw",
        consumer_auto_offset_reset="earliest",  # a new group starts at the beginning ("latest" is wrong locally)
        # The local coordinator holds a JoinGroup for session_timeout / 2: short sessions, frequent heartbeats.
        broker_session_timeout=settings.broker_session_timeout_s,
        broker_heartbeat_interval=settings.broker_heartbeat_interval_s,
        broker_rebalance_timeout=max(20.0, 3 * settings.broker_session_timeout_s),
        broker_commit_interval=settings.commit_interval_s,
        broker_max_poll_records=settings.batch_max_records,
        producer_acks=-1,  # acks=all: an acknowledged output is on every in-sync replica
        producer_linger=settings.producer_linger_ms / 1000.0,
        producer_max_batch_size=min(settings.producer_max_batch_bytes, settings.producer_max_request_bytes),
        producer_max_request_size=settings.producer_max_request_bytes,
        producer_compression_type=settings.producer_compression,
        producer_request_timeout=settings.producer_request_timeout_s,
    )
    app.runner = BatchRunner(
        processor,
        settings,
        health,
        known_topics,
        tracer=tracer,
        floor_store=floor_store,
        floors=floors,
        client_config=client_config(settings, client_id=f"{settings.service_name}-recovery"),
    )
    app.runner.app = app
    for topic in input_topics:
        app.topics.add(app.topic(topic, key_serializer="raw", value_serializer="raw"))  # subscribe, no agent
    return app


class RuntimeWorker(faust.Worker):
    """Faust's worker (signal handling, start/stop order, exit codes) plus a shutdown deadline.

    On SIGTERM or SIGINT Faust stops the app: the flow stops, the fetcher stops, `BatchConsumer.wait_empty`
    finishes the batches in flight and commits, then the consumer commits once more and leaves the group and
    the producer flushes. If that takes longer than `shutdown_timeout_s` the process exits with status 3."""

    logger = _FAUST_LOG

    def __init__(self, app: RuntimeApp, *, health: Health, shutdown_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.spinner = None  # Faust's terminal spinner writes escape codes to stdout
        self.health = health
        self.shutdown_timeout_s = shutdown_timeout_s
        self._deadline: threading.Timer | None = None

    def _on_sigterm(self) -> None:
        self._begin_shutdown("SIGTERM")
        super()._on_sigterm()

    def _on_sigint(self) -> None:
        self._begin_shutdown("SIGINT")
        super()._on_sigint()

    def _begin_shutdown(self, signal_name: str) -> None:
        if self._deadline is not None:
            return
        log.info("received %s: finishing the batches in flight, committing, leaving the group", signal_name)
        self.health.set_ready(False, "shutting down")
        self._deadline = threading.Timer(self.shutdown_timeout_s, _exit_after_deadline)
        self._deadline.daemon = True
        self._deadline.start()

    def cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()


def _exit_after_deadline() -> None:
    log.error("shutdown took longer than SHUTDOWN_TIMEOUT_S: exiting without a clean commit")
    logging.shutdown()
    os._exit(ExitCode.SHUTDOWN_TIMEOUT)


def _broker_topics(settings: StreamRuntimeSettings) -> dict[str, int]:
    """Every topic on the broker with its partition count, from a metadata request that names none (so it
    creates none)."""
    metadata = AdminClient(client_config(settings)).list_topics(timeout=10)
    return {name: len(entry.partitions) for name, entry in metadata.topics.items() if entry.error is None}


def run(settings: StreamRuntimeSettings, processor: Processor) -> int:
    """Check the broker and the topics, then run the worker until SIGTERM; returns the exit status."""
    wait_for_broker(client_config(settings), settings.dependency_wait_s)
    existing = _broker_topics(settings)
    inputs = resolve_input_topics(settings.input_patterns(), existing)
    outputs = required_output_topics(inputs, settings.declared_outputs())
    missing = [t for t in outputs if t not in existing]
    if missing:
        raise TopicsMissing(
            "output topics missing on the broker: " + ", ".join(missing) + "; declare them first "
            "(python -m services.declarations apply)"
        )
    tracer = setup_tracing(
        settings.service_name,
        settings.otel_exporter_otlp_endpoint,
        settings.otel_traces_file,
        settings.otel_sample_ratio,
    )
    health = Health.from_settings(load_settings(HealthSettings))  # HEALTH_* as in every kit service
    http = HealthServer(health, settings.http_port).start()
    log.info(
        "consuming %s as group %s; health endpoint on :%d",
        ",".join(inputs),
        settings.consumer_group,
        http.port,
        extra={"input_topics": inputs, "http_port": http.port},
    )
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    datadir = tempfile.mkdtemp(prefix="lp-faust-")
    # Exactly once at the source: the output partitions' ends now are the floors until outputs are delivered.
    floor_store = FloorStore(
        client_config(settings, client_id=f"{settings.service_name}-floors"), settings.consumer_group
    )
    floors = floor_store.latest((topic, p) for topic in outputs for p in range(existing[topic]))
    app = create_app(
        settings,
        processor,
        inputs,
        health=health,
        datadir=datadir,
        known_topics=existing,
        tracer=tracer,
        floor_store=floor_store,
        floors=floors,
    )
    worker = RuntimeWorker(
        app,
        health=health,
        shutdown_timeout_s=settings.shutdown_timeout_s,
        loop=loop,
        quiet=True,
        override_logging=False,  # the kit's JSON logging stays in place
        redirect_stdouts=False,
    )
    status: int = ExitCode.OK
    try:
        worker.execute_from_commandline()
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else (ExitCode.OK if exit_.code is None else ExitCode.FAILED)
    finally:
        worker.cancel_deadline()
        health.set_ready(False, "stopped")
        shutdown_tracing()
        http.stop()
        shutil.rmtree(datadir, ignore_errors=True)
    log.info(
        "stopped",
        extra={"exit_code": status, "processed": app.runner.processed},
    )
    return status


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.validator.stream_app",
        description="Run the streaming runtime with a processor; configuration from the environment "
        "(KAFKA_BOOTSTRAP_SERVERS, INPUT_TOPICS, CONSUMER_GROUP, ...: see StreamRuntimeSettings).",
    )
    parser.add_argument("--processor", required=True, help="package.module:function, or package.module:factory()")
    args = parser.parse_args(argv)
    settings = load_settings(StreamRuntimeSettings)
    configure_logging(settings.service_name, settings.log_level, settings.log_format)
    # Faust and mode log every service start and stop at INFO; the runtime logs what matters itself.
    for chatty in ("faust", "mode"):
        logging.getLogger(chatty).setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        processor = load_processor(args.processor)
    except (ImportError, AttributeError, ValueError, TypeError) as error:
        log.error("cannot load processor %s: %s: %s", args.processor, type(error).__name__, error)
        return ExitCode.FAILED
    try:
        return run(settings, processor)
    except (TopicsMissing, ConnectionError) as error:
        log.error("cannot start: %s", error)
        return ExitCode.FAILED


if __name__ == "__main__":
    sys.exit(main())
