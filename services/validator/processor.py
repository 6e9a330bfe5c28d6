"""The validator's processor: the rule engine's pipeline (`services.validator.pipeline`) for the streaming runtime.

`make_processor()` builds one `ValidatorProcessor` holding one RuleBook, RuleEngine, ReferenceStore and
DedupeStore for every input topic, and `services.validator.stream_app` runs it (`python -m services.validator`):

    cdc.postgres.users, .products  -> ReferenceStore (only a dead letter is produced, on ....dlq)
    cdc.postgres.transactions      -> TransactionProcessor -> transactions.processed (+ status_history) | ....dlq
    events.raw                     -> EventProcessor -> events.processed | events.raw.retry | events.raw.dlq
    events.raw.retry               -> EventProcessor once `lp-retry-not-before` has passed; before that the
                                      record is produced again to events.raw.retry unchanged (see below)

Retry delay: `hold_topics`/`not_before` let the runtime pause a partition of `events.raw.retry` at its first
record that is not due, rewind to it and resume when it is due, so a delayed record waits in the log,
uncommitted (a crash loses nothing), instead of circulating. Records of one retry partition are held in order:
a record due sooner waits behind one due later (at most the policy's max delay). Without the hooks (the
batch tools) a record that is not due yet is produced again to `events.raw.retry` unchanged.

Replays (`python -m services.validator replay`) carry `lp-replay-id` and `lp-replay-source` (the dead letter's
`<dlq topic>:<partition>:<offset>`) headers; the processor processes each replay source once per process
(bounded memory) and the DUPLICATE_ALLOW_ONE rule on event_id catches a replay of an event already accepted.

Reference data is per worker and in memory, complete in every worker: a `ReferenceFeed` reads all partitions of
the users/products topics from the beginning, outside the consumer group, before the worker starts and while it
runs (see reference_feed.py). The group's share of those topics is only checked, to dead-letter a malformed
change once.
"""

from __future__ import annotations

import logging
import struct
from collections import Counter as Counter_
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from operator import attrgetter
from pathlib import Path
from time import monotonic
from typing import Any

from prometheus_client import Counter
from pydantic import Field

from services.contracts.deadletter import OriginalMessage
from services.contracts.headers import REPLAY_SOURCE
from services.contracts.schema_store import SchemaStoreSettings, writer_resolver
from services.contracts.topics import (
    CDC_TOPIC_PREFIX,
    EVENTS_RAW,
    EVENTS_RAW_RETRY,
    REFERENCE_TOPICS,
    dead_letter_topic,
)
from services.kit.avro import AvroDeserializer, Decoded, Schema, SchemaRepository, SchemaStoreUnavailable
from services.kit.avro_fast import RecordReader, compile_reader
from services.kit.kafka import client_config
from services.validator.dedupe import DedupeStore
from services.validator.engine import RuleEngine
from services.validator.pipeline import (
    DEFAULT_RETRY_POLICY,
    DEFAULT_TOPICS,
    EventProcessor,
    Output,
    Route,
    Topics,
    TransactionProcessor,
    apply_reference,
    retry_wait_seconds,
)
from services.validator.reference_feed import ReferenceFeed
from services.validator.references import ReferenceStore
from services.validator.retry import RetryPolicy, parse_retry_headers
from services.validator.rulebook import DEFAULT_RULES_DIR, CompiledRule, RuleBook, RuleType
from services.validator.runtime import AcceptedMemory, InputRecord, RetryBatchLater, StreamRuntimeSettings
from services.validator.runtime import Output as RuntimeOutput

log = logging.getLogger(__name__)

MAX_REPLAY_SOURCES = 100_000
# The runtime's produce-request overhead (1 KiB, stream_app) plus the trace headers it adds to outputs: a dead letter
# built to PRODUCER_MAX_REQUEST_BYTES minus this always passes `runtime.check_outputs` and the producer.
DEAD_LETTER_HEADROOM_BYTES = 2048

RULE_CHECKED = Counter("lp_validator_rule_checked_total", "Records a rule was evaluated on", ["rule"])
RULE_FAILED = Counter("lp_validator_rule_failed_total", "Records a rule failed on", ["rule"])
ROUTED = Counter("lp_validator_routed_total", "Records produced by the validator, by route", ["route"])
REFERENCE_APPLIED = Counter("lp_validator_reference_changes_total", "CDC reference changes", ["table", "result"])
REPLAYS_DROPPED = Counter("lp_validator_replays_dropped_total", "Replayed records seen before (not processed again)")
NOT_DUE = Counter("lp_validator_retry_not_due_total", "Retry records re-emitted because not yet due")

INPUT_TOPICS = f"{EVENTS_RAW},{EVENTS_RAW_RETRY},{CDC_TOPIC_PREFIX}*"


SCHEMA_STORE = "schema-store"  # the dependency named in /readyz while the store cannot be read


class ValidatorSettings(StreamRuntimeSettings, SchemaStoreSettings):
    """The streaming runtime's settings plus the validator's own (field `x` from variable `X`)."""

    input_topics: str = Field(INPUT_TOPICS, description=StreamRuntimeSettings.model_fields["input_topics"].description)
    validator_rules_dir: Path = Field(DEFAULT_RULES_DIR, description="Directory of the rule files (*.yaml).")
    validator_reload_interval_s: float = Field(10.0, gt=0, description="How often rule files are checked for changes.")
    validator_retry_base_delay_s: float = Field(
        DEFAULT_RETRY_POLICY.base_delay.total_seconds(), gt=0, description="First late-reference retry delay (doubles)."
    )
    validator_retry_max_attempts: int = Field(
        DEFAULT_RETRY_POLICY.max_attempts, ge=0, description="Late-reference retries before the dead-letter topic."
    )
    validator_retry_max_age_s: float = Field(
        DEFAULT_RETRY_POLICY.max_age.total_seconds(), gt=0, description="No retry for records older than this."
    )
    validator_max_event_bytes: int = Field(
        65_536, ge=1024, le=1_000_000, description="Larger raw events are dead-lettered as PAYLOAD_TOO_LARGE."
    )
    validator_reference_catch_up_timeout_s: float = Field(
        120.0, gt=0, description="Longest wait at start to read the users/products topics to their end."
    )

    def retry_policy(self) -> RetryPolicy:
        default = DEFAULT_RETRY_POLICY
        return RetryPolicy(
            base_delay=timedelta(seconds=self.validator_retry_base_delay_s),
            max_attempts=self.validator_retry_max_attempts,
            max_age=timedelta(seconds=self.validator_retry_max_age_s),
            multiplier=default.multiplier,
            max_delay=default.max_delay,
        )


def output_topics(topics: Topics = DEFAULT_TOPICS) -> list[str]:
    return [
        topics.events_processed,
        topics.events_retry,
        topics.events_dead_letter,
        topics.transactions_processed,
        topics.status_history,
        topics.transactions_dead_letter,
        *(dead_letter_topic(t) for t in REFERENCE_TOPICS),
    ]


def _header(headers: Sequence[tuple[str, bytes | None]], name: str) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


class ValidatorProcessor:
    """A `runtime.Processor`: one topic's batch in, the pipeline's outputs out."""

    def __init__(
        self,
        rulebook: RuleBook,
        schemas: SchemaRepository,
        *,
        topics: Topics = DEFAULT_TOPICS,
        references: ReferenceStore | None = None,
        dedupe: DedupeStore | None = None,
        reload_interval_s: float = 10.0,
        retry_policy: RetryPolicy = DEFAULT_RETRY_POLICY,
        feed: ReferenceFeed | None = None,
        max_event_bytes: int = 65_536,
        max_record_bytes: int | None = None,
    ) -> None:
        self.topics = topics
        self.schemas = schemas
        self._processed_decoder: AvroDeserializer | None = None
        self._prefix_for: object = None  # the ruleset `_prefix_reader` was made for
        self._prefix_reader: RecordReader | None = None
        self.max_record_bytes = max_record_bytes
        self.rulebook = rulebook
        self.feed = feed
        self.references = feed.store if feed is not None else references if references is not None else ReferenceStore()
        self.engine = RuleEngine(rulebook, self.references, dedupe if dedupe is not None else DedupeStore())
        self.events = EventProcessor(
            self.engine,
            schemas,
            topics=topics,
            retry_policy=retry_policy,
            max_event_bytes=max_event_bytes,
            max_record_bytes=max_record_bytes,
        )
        self.transactions = TransactionProcessor(self.engine, schemas, topics=topics, max_record_bytes=max_record_bytes)
        self.reload_interval_s = reload_interval_s
        self._next_reload = monotonic() + reload_interval_s
        self._replayed: OrderedDict[bytes, None] = OrderedDict()
        self._exported_rules: dict[str, tuple[int, int]] = {}
        self._exported_refs: dict[tuple[str, str], int] = {}  # when no feed counts them

    # -- the processor ------------------------------------------------------------------------------------------
    def __call__(self, batch: list[InputRecord]) -> list[RuntimeOutput]:
        self._maybe_reload()
        outputs: list[Output] = []
        try:
            if batch and batch[0].topic in (self.topics.events_raw, self.topics.events_retry):
                outputs = self._process_events(batch)
            elif batch and batch[0].topic == self.topics.transactions_cdc:
                outputs = self._process_transactions(batch)
            else:
                outputs = [out for record in batch for out in _from(record, self.process_one(record))]
        except SchemaStoreUnavailable as error:  # `prepare` resolved the writers; only a cache eviction gets here
            raise RetryBatchLater(SCHEMA_STORE, str(error)) from error
        finally:
            # counted per batch: a labelled metric per record costs more than a rule
            for route, count in Counter_(map(_ROUTE_OF, outputs)).items():
                ROUTED.labels(route.value).inc(count)
            self._export_metrics()
        return outputs  # type: ignore[return-value]  # pipeline outputs are runtime outputs with a route

    process = __call__

    def prepare(self, batch: list[InputRecord]) -> None:
        """The runtime's `prepare` hook: look up the writer schemas of the batch's raw events that the files do not
        have (a producer already on a newer version) before any record is processed, so that a schema store that
        cannot be read is `RetryBatchLater` for the whole batch, never a dead letter nor a half-processed batch."""
        if not batch or batch[0].topic not in (self.topics.events_raw, self.topics.events_retry):
            return
        try:
            self.events.resolve_writers(record.value for record in batch)
        except SchemaStoreUnavailable as error:
            raise RetryBatchLater(SCHEMA_STORE, str(error)) from error

    def _process_events(self, batch: list[InputRecord]) -> list[Output]:
        """A batch of events.raw or events.raw.retry (one topic): judged together, outputs in input order."""
        now = self.engine.clock()
        if batch[0].topic == self.topics.events_raw and not _any_replayed(batch):
            return _sourced(batch, self.events.process_batch(batch, now))  # no replay, no retry
        outputs: list[Output | None] = [None] * len(batch)
        due: list[int] = []
        for index, record in enumerate(batch):
            if record.headers and self._seen_replay(record.headers):
                REPLAYS_DROPPED.inc()
                continue
            if record.topic == self.topics.events_retry and retry_wait_seconds(record.headers, now) > 0:
                NOT_DUE.inc()
                headers = [(k, v if v is not None else b"") for k, v in record.headers]
                outputs[index] = Output(record.topic, record.key, record.value, headers, record, Route.RETRY)
                continue
            due.append(index)
        records = batch if len(due) == len(batch) else [batch[i] for i in due]
        for index, out in zip(due, self.events.process_batch(records, now), strict=True):
            out.source = batch[index]
            outputs[index] = out
        return [out for out in outputs if out is not None]

    def _process_transactions(self, batch: list[InputRecord]) -> list[Output]:
        """A batch of cdc.postgres.transactions: judged together, outputs in input order."""
        fresh = [r for r in batch if not (r.headers and self._seen_replay(r.headers))]
        if len(fresh) < len(batch):
            REPLAYS_DROPPED.inc(len(batch) - len(fresh))
        results = self.transactions.process_batch(fresh)
        return [out for record, outs in zip(fresh, results, strict=True) for out in _from(record, outs)]

    def process_one(self, record: InputRecord, now: datetime | None = None) -> list[Output]:
        topic = record.topic
        message = OriginalMessage(
            topic, record.partition, record.offset, record.key, record.value, list(record.headers)
        )
        if self._seen_replay(record.headers):
            REPLAYS_DROPPED.inc()
            return []
        if topic in REFERENCE_TOPICS:
            check_only = self.feed is not None  # the feed fills the store: only dead-letter unreadable changes
            result = apply_reference(
                self.references,
                message,
                now or self.engine.clock(),
                check_only=check_only,
                max_record_bytes=self.max_record_bytes,
            )
            return [result] if isinstance(result, Output) else []
        if topic == self.topics.transactions_cdc:
            return self.transactions.process(message)
        if topic == self.topics.events_retry:
            if retry_wait_seconds(record.headers, now or self.engine.clock()) > 0:
                NOT_DUE.inc()
                headers = [(k, v if v is not None else b"") for k, v in record.headers]
                return [Output(topic, record.key, record.value, headers, route=Route.RETRY)]
            return [self.events.process(message)]
        if topic == self.topics.events_raw:
            return [self.events.process(message)]
        raise ValueError(f"the validator does not consume topic {topic!r}")

    # -- holding retries until due (the runtime's hold hooks) ------------------------------------------------------
    @property
    def hold_topics(self) -> tuple[str, ...]:
        return (self.topics.events_retry,)

    def not_before(self, record: InputRecord) -> float | None:
        """When a retry record is due (Unix time), None if it is due now or carries no retry headers."""
        state = parse_retry_headers(record.headers)
        return None if state is None else state.not_before.timestamp()

    # -- the duplicate memory, rebuilt from what was accepted (the runtime's memory hook) -------------------------
    def accepted_memory(self) -> AcceptedMemory | None:
        """Events accepted from events.raw and events.raw.retry are on events.processed: the runtime reads those of
        the DUPLICATE_ALLOW_ONE window back into `remember_accepted` when it is given those partitions, so a
        duplicate of an event accepted before a restart or a rebalance is still one. None without such a rule."""
        window = self.engine.dedupe_window("event")
        if window is None:
            return None
        processed = self.topics.events_processed
        return AcceptedMemory(
            sources={self.topics.events_raw: processed, self.topics.events_retry: processed},
            window_s=window.total_seconds(),
            max_records=self.engine.dedupe.max_entries,
            remember=self.remember_accepted,
        )

    def remember_accepted(self, payloads: Iterable[bytes | None]) -> int:
        """Remember the events of `payloads` (events.processed values, oldest first) as accepted, as if this
        process had accepted them: same keys (canonical ids), same event-time window, the first one wins.
        Payloads that do not decode are skipped. Returns how many events were remembered."""
        decode = self._accepted_decoder()
        remember = self.engine.remember_accepted
        now = self.engine.clock()
        remembered = 0
        for payload in payloads:
            record = decode(payload)
            if record is not None and remember(record, "event", now=now):
                remembered += 1
        return remembered

    def _accepted_decoder(self) -> Callable[[bytes | None], Mapping[str, Any] | None]:
        """Decodes what the duplicate rules read of a processed event. A full decode costs ~45 us here, so
        payloads written with the current schema are read only up to the last field the rules need (its
        fields come first: event_id, event_type, event_time), ~5x faster; other writers are decoded whole."""
        full = self._processed_decoder
        if full is None:
            full = self._processed_decoder = AvroDeserializer(self.schemas, "processed_event")
        ruleset = self.rulebook.current
        if self._prefix_for is not ruleset:
            self._prefix_for, self._prefix_reader = ruleset, _prefix_reader(full.reader, ruleset.for_kind("event"))
        prefix, header = self._prefix_reader, full.reader.header

        def decode(payload: bytes | None) -> Mapping[str, Any] | None:
            if prefix is not None and payload is not None and payload.startswith(header):
                try:
                    return prefix(payload, len(header))[0]
                except (EOFError, IndexError, ValueError, UnicodeDecodeError, OverflowError, struct.error):
                    return None
            decoded = full(payload)
            return decoded.record if isinstance(decoded, Decoded) else None

        return decode

    # -- replays ------------------------------------------------------------------------------------------------
    def _seen_replay(self, headers: Sequence[tuple[str, bytes | None]]) -> bool:
        source = _header(headers, REPLAY_SOURCE)
        if not source:
            return False
        if source in self._replayed:
            return True
        self._replayed[source] = None
        while len(self._replayed) > MAX_REPLAY_SOURCES:
            self._replayed.popitem(last=False)
        return False

    # -- housekeeping -------------------------------------------------------------------------------------------
    def _maybe_reload(self) -> None:
        if monotonic() < self._next_reload:
            return
        self._next_reload = monotonic() + self.reload_interval_s
        result = self.rulebook.reload_if_changed()
        if result is None:
            return
        if result.ok and result.changed:
            log.info("rules reloaded", extra={"rules_version": result.version})
        elif not result.ok:
            log.error("rule reload failed, keeping %s: %s", result.version, result.error)

    def _export_metrics(self) -> None:
        for rule_id, counter in self.engine.rule_counters().items():
            checked, failed = self._exported_rules.get(rule_id, (0, 0))
            if counter.checked > checked:
                RULE_CHECKED.labels(rule_id).inc(counter.checked - checked)
            if counter.failed > failed:
                RULE_FAILED.labels(rule_id).inc(counter.failed - failed)
            self._exported_rules[rule_id] = (counter.checked, counter.failed)
        if self.feed is not None:
            return  # the feed counts its changes itself (on its own thread)
        for (table, result), count in self.references.results.items():
            done = self._exported_refs.get((table, result), 0)
            if count > done:
                REFERENCE_APPLIED.labels(table, str(result)).inc(count - done)
                self._exported_refs[(table, result)] = count


def _prefix_reader(schema: Schema, rules: Sequence[CompiledRule]) -> RecordReader | None:
    """A reader of `schema`'s fields up to the last one the DUPLICATE_ALLOW_ONE `rules` read (their keys and time
    field); None when a rule has a `when` (it may read any field) or a field is not in the schema."""
    wanted: set[str] = set()
    for rule in rules:
        if rule.type is RuleType.DUPLICATE_ALLOW_ONE:
            if rule.when is not None:
                return None
            wanted.update([*rule.spec.key, rule.spec.time_field])
    names = [field["name"] for field in schema.definition["fields"]]
    if not wanted or not wanted <= set(names):
        return None
    last = max(names.index(name) for name in wanted)
    return compile_reader({**schema.definition, "fields": schema.definition["fields"][: last + 1]})


def dead_letter_budget(settings: StreamRuntimeSettings) -> int:
    """The largest dead letter the processor builds whole: what the runtime lets through (the producer's request
    size less its request overhead) less room for the trace context it adds after checking. A larger one keeps its
    code (PAYLOAD_TOO_LARGE, ...) and has its value cut, instead of being replaced by PROCESSOR_OUTPUT_INVALID."""
    return settings.producer_max_request_bytes - DEAD_LETTER_HEADROOM_BYTES


def make_processor(settings: ValidatorSettings, *, follow_references: bool = True) -> ValidatorProcessor:
    """The service's processor. `follow_references`: load users/products from their topics first and keep
    following them (the service); without it the caller fills `processor.references` (tests, tools)."""
    feed = None
    if follow_references:
        feed = ReferenceFeed(
            ReferenceStore(),
            client_config(settings, client_id=f"{settings.service_name}-references"),
            REFERENCE_TOPICS,
            on_change=lambda table, result: REFERENCE_APPLIED.labels(table, result).inc(),
        ).start(settings.validator_reference_catch_up_timeout_s)
    return ValidatorProcessor(
        RuleBook(settings.validator_rules_dir),
        # Writer versions newer than the files baked into the image come from the operator's schema store.
        SchemaRepository.load(resolver=writer_resolver(settings)),
        reload_interval_s=settings.validator_reload_interval_s,
        retry_policy=settings.retry_policy(),
        feed=feed,
        max_event_bytes=settings.validator_max_event_bytes,
        max_record_bytes=dead_letter_budget(settings),
    )


_ROUTE_OF = attrgetter("route")


def _any_replayed(batch: Sequence[InputRecord]) -> bool:
    """Whether a record of `batch` carries a replay header (most carry only their trace context: one pass)."""
    for record in batch:
        for name, _ in record.headers:
            if name == REPLAY_SOURCE:
                return True
    return False


def _sourced(batch: Sequence[InputRecord], outputs: list[Output]) -> list[Output]:
    """`outputs`, one per record of `batch`, each naming its record as its source (trace context, stamps)."""
    for record, output in zip(batch, outputs, strict=True):
        output.source = record
    return outputs


def _from(record: InputRecord, outputs: Iterable[Output]) -> Iterable[Output]:
    for output in outputs:
        output.source = record
        yield output
