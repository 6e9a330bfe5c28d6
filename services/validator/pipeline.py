"""One consumed message in, the messages to produce out: the validator's routing, pure and synchronous.

The Faust agents only consume, call one of these, produce what comes back, and commit. Every input ends in
exactly one of: processed (plus a status-history record for transactions), retry, or dead-letter.

    events.raw, events.raw.retry   -> EventProcessor.process
                                   -> events.processed | events.raw.retry | events.raw.dlq
    cdc.postgres.transactions      -> TransactionProcessor.process
                                   -> transactions.processed (+ transactions.status_history) | ....dlq
    cdc.postgres.users, .products  -> apply_reference -> ReferenceStore (or ....dlq)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum
from typing import Any

import numpy as np
import pyarrow as pa

from services.contracts import topics
from services.contracts.deadletter import ConsumedRecord, DeadLetterRecord, OriginalMessage, Stage
from services.contracts.envelope import OP_DELETE
from services.contracts.headers import STALE_ON_DEAD_LETTER
from services.kit.avro import HEADER_SIZE, AvroDeserializer, AvroSerializer, DecodeError, SchemaRepository
from services.kit.avro_columnar import ColumnarDecoder
from services.kit.avro_columnar import ColumnBatch as DecodedColumns  # not columns.ColumnBatch: the decode
from services.validator import rejections
from services.validator.cdc import CdcFormatError, ChangeEvent, parse_envelope, table_of_topic
from services.validator.columns import as_mask, canonical_columns, records_of
from services.validator.engine import Outcome, RuleEngine, Verdict
from services.validator.enrich import enrich_event
from services.validator.outputs import processed_event, processed_transaction, status_change
from services.validator.references import ApplyResult, ReferenceStore
from services.validator.retry import (
    Retry,
    RetryPolicy,
    RetryState,
    parse_retry_headers,
    retry_decision,
    retry_headers,
)
from services.validator.runtime import Output as RuntimeOutput
from services.validator.splice import ENDS_NEEDED, LEADING_UNIONS, ProcessedEventEncoder, email_keyed_rows

Headers = list[tuple[str, bytes]]


class Route(StrEnum):
    PROCESSED = "processed"
    STATUS_HISTORY = "status_history"
    RETRY = "retry"
    DEAD_LETTER = "dead_letter"


@dataclass(slots=True)  # not frozen: one is made per record, and a frozen dataclass's __init__ costs ~3x
class Output(RuntimeOutput):
    """A record for the runtime to produce (its `source` is set by the processor, which knows the input record),
    and the route it took: made once per record, so the runtime takes it as it is."""

    route: Route = Route.PROCESSED


@dataclass(frozen=True)
class Topics:
    events_raw: str = topics.EVENTS_RAW
    events_retry: str = topics.EVENTS_RAW_RETRY
    events_dead_letter: str = topics.dead_letter_topic(topics.EVENTS_RAW)  # also of retried events
    events_processed: str = topics.EVENTS_PROCESSED
    transactions_cdc: str = topics.CDC_TRANSACTIONS
    transactions_dead_letter: str = topics.dead_letter_topic(topics.CDC_TRANSACTIONS)
    transactions_processed: str = topics.TRANSACTIONS_PROCESSED
    status_history: str = topics.TRANSACTIONS_STATUS_HISTORY


DEFAULT_TOPICS = Topics()
DEFAULT_RETRY_POLICY = RetryPolicy()


def _passthrough_headers(headers: Sequence[tuple[str, bytes | None]]) -> Headers:
    """The producer's own headers (trace context, ...), without retry/dead-letter bookkeeping."""
    if not headers:
        return []
    return [(k, v if v is not None else b"") for k, v in headers if not k.startswith(STALE_ON_DEAD_LETTER)]


def _dead(record: DeadLetterRecord) -> Output:
    return Output(record.topic, record.key, record.value, record.headers, route=Route.DEAD_LETTER)


@dataclass(slots=True)
class _EventBatch:
    """A batch being judged: its table (row i is message `rows[i]`), the messages, and the outputs being filled."""

    table: pa.Table
    rows: list[int]
    messages: Sequence[ConsumedRecord]
    outputs: list[Output | None]
    now: datetime


class EventProcessor:
    """events.raw and events.raw.retry: decode, validate, retry late references, enrich, serialize."""

    def __init__(
        self,
        engine: RuleEngine,
        schemas: SchemaRepository,
        *,
        topics: Topics = DEFAULT_TOPICS,
        retry_policy: RetryPolicy = DEFAULT_RETRY_POLICY,
        max_event_bytes: int = 65_536,
        max_record_bytes: int | None = None,
    ) -> None:
        self.engine = engine
        self.topics = topics
        # The largest record the producer may send: a dead letter over it keeps its code and has its value cut
        # (`build_dead_letter`), instead of being refused by the producer (or replaced by the runtime's own).
        self.max_record_bytes = max_record_bytes
        self.retry_policy = retry_policy
        # Larger events are dead-lettered (PAYLOAD_TOO_LARGE) before decoding: no real event is near it, and it
        # keeps one hostile record from becoming a processed record other stages choke on.
        self.decode = AvroDeserializer(schemas, "raw_event", max_bytes=max_event_bytes)
        self.serialize = AvroSerializer(schemas["processed_event"])
        self._columnar = ColumnarDecoder(schemas["raw_event"])
        nothing = self._columnar.decode([])
        self._raw_arrow = pa.schema([(name, array.type) for name, array in nothing.columns.items()])
        self._encoder = ProcessedEventEncoder(schemas["processed_event"], engine.references)

    def resolve_writers(self, values: Iterable[bytes | None]) -> None:
        """Look up now the writer schema of every payload not written with the current one (cached by the
        repository, so decoding them later asks nothing). Raises `SchemaStoreUnavailable` when one must come
        from the schema store and the store cannot be read; a payload that is garbage is left to `process`."""
        current = self.decode.reader.header
        # one payload per distinct header: a batch has one or a few writers, and this runs once per batch
        limit = self.decode.max_bytes  # an oversized payload is dead-lettered unread: its writer does not matter
        by_header = {value[:HEADER_SIZE]: value for value in values if value is not None and len(value) <= limit}
        for header, value in by_header.items():
            if header != current:
                self.decode.writer_of(value)

    # -- batches: the service's path ------------------------------------------------------------------------------
    def process_batch(self, messages: Sequence[ConsumedRecord], now: datetime | None = None) -> list[Output]:
        """Messages of events.raw or events.raw.retry, in arrival order: one output each, in the same order.

        Payloads written with the current raw_event schema are decoded column-wise (`kit.avro_columnar`); any
        other payload -- another writer, oversized, undecodable, bad UTF-8 -- is decoded alone by the reference
        decoder, which either yields its record (it joins the batch) or the reason it is dead-lettered. The
        whole batch is then judged at once, and accepted rows are encoded from their raw bytes (`splice`)."""
        now = now if now is not None else self.engine.clock()
        size = len(messages)
        if size == 0:
            return []
        outputs: list[Output | None] = [None] * size
        payloads = [m.value or b"" for m in messages]
        small = np.fromiter(map(len, payloads), np.int64, size) <= self.decode.max_bytes
        if small.all():
            columns = self._columnar.decode(payloads, ends_of=ENDS_NEEDED)
            fast = columns.good
        else:
            small_rows = np.nonzero(small)[0]
            columns = self._columnar.decode([payloads[i] for i in small_rows.tolist()], ends_of=ENDS_NEEDED)
            fast = small_rows[columns.good]
        is_fast = np.zeros(size, bool)
        is_fast[fast] = True
        fast_rows = fast.tolist()
        slow_rows = np.nonzero(~is_fast)[0].tolist()
        slow_records: list[dict[str, Any]] = []
        slow_kept: list[int] = []
        for row in slow_rows:
            decoded = self.decode(messages[row].value)
            if isinstance(decoded, DecodeError):
                message = messages[row]
                outputs[row] = _dead(
                    rejections.from_decode_error(
                        message,
                        decoded,
                        now=now,
                        topic=self.topics.events_dead_letter,
                        retry_state=parse_retry_headers(message.headers),
                        max_record_bytes=self.max_record_bytes,
                    )
                )
            else:
                slow_records.append(decoded.record)
                slow_kept.append(row)
        table = pa.table(columns.columns, schema=self._raw_arrow)
        rows = fast_rows
        if slow_kept:  # join the batch in arrival order: the first copy of an event wins, in the batch too
            slow_table = pa.Table.from_pylist(slow_records, schema=self._raw_arrow)
            rows = fast_rows + slow_kept
            order = np.argsort(np.asarray(rows, np.int64), kind="stable")
            table = pa.concat_tables([table, slow_table]).take(pa.array(order))
            rows = [rows[i] for i in order.tolist()]
        spliceable = is_fast[np.asarray(rows, np.int64)] if slow_kept else np.ones(len(rows), bool)
        self._judge_and_emit(_EventBatch(table, rows, messages, outputs, now), spliceable, columns, fast)
        return outputs  # type: ignore[return-value]  # every row has its output now

    def process_records(
        self, records: Sequence[Mapping[str, Any]], messages: Sequence[ConsumedRecord], now: datetime | None = None
    ) -> list[Output]:
        """Decoded raw_event records (a batch file's rows) and where each came from: one output each, in order."""
        now = now if now is not None else self.engine.clock()
        outputs: list[Output | None] = [None] * len(records)
        table = pa.Table.from_pylist(list(records), schema=self._raw_arrow)
        rows = list(range(len(records)))
        judged = _EventBatch(table, rows, messages, outputs, now)
        self._judge_and_emit(judged, np.zeros(len(rows), bool), None, np.zeros(0, np.int64))
        return outputs  # type: ignore[return-value]

    def _judge_and_emit(
        self, batch: _EventBatch, spliceable: np.ndarray, columns: DecodedColumns | None, fast_rows: np.ndarray
    ) -> None:
        """Judge the batch's table and put each row's output at its message's place. `spliceable`: rows whose
        payload `columns` decoded (`fast_rows`: their message indices, sorted)."""
        rows, messages, outputs, now = batch.rows, batch.messages, batch.outputs, batch.now
        if not rows:
            return
        table, rewritten, canonical = canonical_columns(batch.table, self.engine.rulebook.current.uuid_fields("event"))
        batch.table = table
        spliceable &= ~rewritten
        states: list[RetryState | None] = [None] * len(rows)
        attempts: list[int] | None = None  # first attempts all (no headers: the usual batch of events.raw)
        if any(messages[row].headers for row in rows):
            states = [parse_retry_headers(h) if (h := messages[row].headers) else None for row in rows]
            attempts = [state.attempt if state is not None else 0 for state in states]
        verdicts = self.engine.evaluate_batch(table, "event", attempts=attempts, now=now, canonical_ids=canonical)
        accepted = self.engine.accepted(verdicts)
        dead_topic = self.topics.events_dead_letter
        for index in np.nonzero(~accepted)[0].tolist():
            message, verdict, state = messages[rows[index]], verdicts[index], states[index]
            if verdict.outcome is Outcome.REJECT:
                outputs[rows[index]] = _dead(
                    rejections.from_failures(
                        message,
                        verdict.errors,
                        now=now,
                        topic=dead_topic,
                        retry_state=state,
                        max_record_bytes=self.max_record_bytes,
                    )
                )
            else:
                outputs[rows[index]] = self._retry(message, verdict, state, now)
        if not accepted.any():
            return
        splice = accepted & spliceable
        if splice.any():
            for name in LEADING_UNIONS:  # a rule set without MANDATORY ids lets nulls through: those the slow way
                splice &= as_mask(table.column(name).is_valid())
            splice &= ~email_keyed_rows(table.column("properties").combine_chunks())
        if splice.any():
            self._emit_spliced(batch, verdicts, splice, columns, fast_rows)
        slow = np.nonzero(accepted & ~splice)[0].tolist()
        if slow:
            records = records_of(table.take(pa.array(slow, pa.int64())))
            for index, record in zip(slow, records, strict=True):
                outputs[rows[index]] = self._encode_one(messages[rows[index]], record, verdicts[index], now)

    def _emit_spliced(
        self,
        batch: _EventBatch,
        verdicts: list[Verdict],
        splice: np.ndarray,
        columns: DecodedColumns | None,
        fast_rows: np.ndarray,
    ) -> None:
        """The accepted rows in `splice`, encoded from their raw payloads (`splice.ProcessedEventEncoder`)."""
        assert columns is not None
        table, rows, messages, outputs, now = batch.table, batch.rows, batch.messages, batch.outputs, batch.now
        picked = np.nonzero(splice)[0]
        picked_at = np.asarray(rows, np.int64)[picked]
        picked_rows = picked_at.tolist()
        at = np.searchsorted(fast_rows, picked_at)  # each picked row's place among the decoded ones (sorted)
        ends = {name: columns.ends[name][at] for name in ENDS_NEEDED}
        take = pa.array(picked, pa.int64())
        version = self.engine.rulebook.current.version
        values = self._encoder.encode(
            [messages[row].value for row in picked_rows],  # type: ignore[misc]  # fast rows have payloads
            ends,
            table.column("user_id").take(take).combine_chunks(),
            table.column("product_id").take(take).combine_chunks(),
            table.column("event_time").take(take).combine_chunks(),
            self._flags_of(verdicts, picked),
            now,
            version,
        )
        topic = self.topics.events_processed
        for row, value in zip(picked_rows, values, strict=True):
            message = messages[row]
            headers = message.headers
            outputs[row] = Output(topic, message.key, value, _passthrough_headers(headers) if headers else [])

    def _flags_of(self, verdicts: list[Verdict], picked: np.ndarray) -> list[tuple[str, ...]]:
        """The quality flags of the `picked` rows' verdicts; rows no rule failed have none."""
        flags: list[tuple[str, ...]] = [()] * len(picked)
        clean = self.engine.is_clean
        for at, row in enumerate(picked.tolist()):
            verdict = verdicts[row]
            if not clean(verdict) and verdict.warnings:
                flags[at] = tuple(verdict.flags)
        return flags

    def _encode_one(
        self, message: ConsumedRecord, record: Mapping[str, Any], verdict: Verdict, now: datetime
    ) -> Output:
        """An accepted record the reference way: enrich a dict, build the output record, serialize it."""
        try:
            enriched = enrich_event(record, self.engine.references)
            out = processed_event(
                enriched, quality_flags=verdict.flags, validated_at=now, rules_version=verdict.rules_version
            )
            value = self.serialize(out)
        except (ValueError, TypeError, OverflowError) as error:  # OutputContractError, or fastavro refusing
            dead = rejections.from_exception(
                message,
                rejections.OUTPUT_CONTRACT,
                error,
                stage=Stage.ENRICH,
                now=now,
                topic=self.topics.events_dead_letter,
                retry_state=parse_retry_headers(message.headers),
                max_record_bytes=self.max_record_bytes,
            )
            return _dead(dead)
        return Output(self.topics.events_processed, message.key, value, _passthrough_headers(message.headers))

    # -- one message (tools, tests): a batch of one ----------------------------------------------------------------
    def process(self, message: OriginalMessage) -> Output:
        """A message of events.raw or events.raw.retry (its `lp-retry-*` headers say which attempt it is)."""
        return self.process_batch([message])[0]

    def process_record(
        self, record: Mapping[str, Any], message: OriginalMessage, *, now: datetime | None = None
    ) -> Output:
        """A decoded raw_event and where it came from (a batch of one)."""
        return self.process_records([record], [message], now=now)[0]

    def _retry(self, message: OriginalMessage, verdict: Verdict, state: RetryState | None, now: datetime) -> Output:
        first_seen = state.first_seen if state is not None else now
        decision = retry_decision(verdict.attempt, first_seen, now, self.retry_policy)
        if not isinstance(decision, Retry):
            dead = rejections.from_retry_exhausted(
                message,
                decision,
                state,
                verdict.errors,
                now=now,
                topic=self.topics.events_dead_letter,
                max_record_bytes=self.max_record_bytes,
            )
            return _dead(dead)
        headers = retry_headers(
            message.headers,
            decision,
            first_seen=first_seen,
            rule=verdict.errors[0].rule_id,
            original_topic=state.original_topic if state else message.topic,
            original_partition=state.original_partition if state else message.partition,
            original_offset=state.original_offset if state else message.offset,
        )
        return Output(self.topics.events_retry, message.key, message.value, headers, route=Route.RETRY)


class TransactionProcessor:
    """cdc.postgres.transactions: validate the row, emit transactions.processed and the status history."""

    def __init__(
        self,
        engine: RuleEngine,
        schemas: SchemaRepository,
        *,
        topics: Topics = DEFAULT_TOPICS,
        max_record_bytes: int | None = None,
    ) -> None:
        self.engine = engine
        self.topics = topics
        self.max_record_bytes = max_record_bytes  # as EventProcessor's
        self.serialize_transaction = AvroSerializer(schemas["processed_transaction"])
        self.serialize_status = AvroSerializer(schemas["transaction_status_change"])

    def process(self, message: ConsumedRecord) -> list[Output]:
        """One change (a batch of one)."""
        return self.process_batch([message])[0]

    def process_batch(self, messages: Sequence[ConsumedRecord], now: datetime | None = None) -> list[list[Output]]:
        """Changes in arrival order: each one's outputs (none for a tombstone), in the same order. The rows are
        judged together; a delete only by the id rules (a fact at the source, but its ids go to every store)."""
        now = now if now is not None else self.engine.clock()
        results: list[list[Output]] = [[] for _ in messages]
        changes: list[tuple[int, ChangeEvent]] = []
        for index, message in enumerate(messages):
            try:
                change = parse_envelope(message.value, "transactions")
            except CdcFormatError as error:
                results[index] = [self._refused(message, error.code, error, Stage.DECODE, now)]
                continue
            if change is None:
                continue  # the tombstone after a delete: the delete envelope already said everything
            row = self.engine.canonical(change.row, "transaction")
            if row is not change.row:  # the row is `after`, or `before` for a delete
                change = replace(change, after=row) if change.after is not None else replace(change, before=row)
            changes.append((index, change))
        verdicts: dict[int, Verdict] = {}
        for deletes in (False, True):
            group = [(index, change) for index, change in changes if (change.op == OP_DELETE) is deletes]
            if group:
                judged = self.engine.evaluate_records(
                    [change.row for _, change in group], "transaction", now=now, ids_only=deletes
                )
                verdicts.update(zip((index for index, _ in group), judged, strict=True))
        for index, change in changes:
            results[index] = self._outputs(messages[index], change, verdicts[index], now)
        return results

    def _outputs(self, message: ConsumedRecord, change: ChangeEvent, verdict: Verdict, now: datetime) -> list[Output]:
        dead_topic = self.topics.transactions_dead_letter
        if verdict.outcome is not Outcome.ACCEPT:  # never retried: a CDC row's changes must stay in order
            dead = rejections.from_failures(
                message, verdict.errors, now=now, topic=dead_topic, max_record_bytes=self.max_record_bytes
            )
            return [_dead(dead)]
        flags, version = verdict.flags, verdict.rules_version
        headers = _passthrough_headers(message.headers)
        try:
            processed = processed_transaction(change, quality_flags=flags, validated_at=now, rules_version=version)
            key = str(processed["transaction_id"]).encode()
            value = self.serialize_transaction(processed)
            outputs = [Output(self.topics.transactions_processed, key, value, headers)]
            history = status_change(change)
            if history is not None:
                value = self.serialize_status(history)
                outputs.append(Output(self.topics.status_history, key, value, headers, route=Route.STATUS_HISTORY))
        except (ValueError, TypeError, OverflowError) as error:
            return [self._refused(message, rejections.OUTPUT_CONTRACT, error, Stage.ENRICH, now)]
        return outputs

    def _refused(self, message: ConsumedRecord, code: str, error: Exception, stage: Stage, now: datetime) -> Output:
        """A transaction change refused outside the rules (bad envelope, output contract), as its dead letter."""
        dead = rejections.from_exception(
            message,
            code,
            error,
            stage=stage,
            now=now,
            topic=self.topics.transactions_dead_letter,
            max_record_bytes=self.max_record_bytes,
        )
        return _dead(dead)


def apply_reference(
    references: ReferenceStore,
    message: OriginalMessage,
    now: datetime,
    *,
    check_only: bool = False,
    max_record_bytes: int | None = None,
) -> ApplyResult | Output | None:
    """A message of cdc.postgres.users / .products into the store, or its dead letter if unreadable.

    `check_only`: a `ReferenceFeed` fills the store; only the dead letter of an unreadable change is wanted.
    `max_record_bytes`: as `EventProcessor`'s."""
    table = table_of_topic(message.topic)
    try:
        if check_only:
            references.check_envelope(table, message.key, message.value)
            return None
        return references.apply_envelope(table, message.key, message.value)
    except CdcFormatError as error:
        dead = rejections.from_exception(
            message, error.code, error, stage=Stage.DECODE, now=now, max_record_bytes=max_record_bytes
        )
        return _dead(dead)


def retry_wait_seconds(headers: Sequence[tuple[str, bytes | None]], now: datetime) -> float:
    """How long the retry consumer must hold a record (and its partition) before processing it: 0 when due."""
    state = parse_retry_headers(headers)
    return 0.0 if state is None else max(0.0, (state.not_before - now).total_seconds())
