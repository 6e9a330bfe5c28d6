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

from services.contracts import topics
from services.contracts.deadletter import DeadLetterRecord, OriginalMessage, Stage
from services.contracts.envelope import OP_DELETE
from services.contracts.headers import STALE_ON_DEAD_LETTER
from services.kit.avro import HEADER_SIZE, AvroDeserializer, AvroSerializer, DecodeError, SchemaRepository
from services.validator import rejections
from services.validator.cdc import CdcFormatError, parse_envelope, table_of_topic
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

Headers = list[tuple[str, bytes]]


class Route(StrEnum):
    PROCESSED = "processed"
    STATUS_HISTORY = "status_history"
    RETRY = "retry"
    DEAD_LETTER = "dead_letter"


@dataclass(frozen=True, slots=True)
class Output:
    route: Route
    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers


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
    return [(k, v if v is not None else b"") for k, v in headers if not k.startswith(STALE_ON_DEAD_LETTER)]


def _dead(record: DeadLetterRecord) -> Output:
    return Output(Route.DEAD_LETTER, record.topic, record.key, record.value, record.headers)


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

    def resolve_writers(self, values: Iterable[bytes | None]) -> None:
        """Look up now the writer schema of every payload not written with the current one (cached by the
        repository, so decoding them later asks nothing). Raises `SchemaStoreUnavailable` when one must come
        from the schema store and the store cannot be read; a payload that is garbage is left to `process`."""
        current = self.decode.reader.header
        for value in values:
            if value is not None and value[:HEADER_SIZE] != current:
                self.decode.writer_of(value)

    def process(self, message: OriginalMessage) -> Output:
        """A message of events.raw or events.raw.retry (its `lp-retry-*` headers say which attempt it is)."""
        now = self.engine.clock()
        decoded = self.decode(message.value)
        if isinstance(decoded, DecodeError):
            state = parse_retry_headers(message.headers)
            dead = rejections.from_decode_error(
                message,
                decoded,
                now=now,
                topic=self.topics.events_dead_letter,
                retry_state=state,
                max_record_bytes=self.max_record_bytes,
            )
            return _dead(dead)
        return self.process_record(decoded.record, message, now=now)

    def process_record(
        self, record: Mapping[str, Any], message: OriginalMessage, *, now: datetime | None = None
    ) -> Output:
        """A decoded raw_event (from Kafka, or a batch file's `BatchRow.record`) and where it came from."""
        now = now if now is not None else self.engine.clock()
        state = parse_retry_headers(message.headers)
        dead_topic = self.topics.events_dead_letter
        record = self.engine.canonical(record, "event")  # ids in canonical form: for the rules and the output
        verdict = self.engine.evaluate(record, "event", attempt=state.attempt if state else 0, now=now)
        if verdict.outcome is Outcome.REJECT:
            return _dead(
                rejections.from_failures(
                    message,
                    verdict.errors,
                    now=now,
                    topic=dead_topic,
                    retry_state=state,
                    max_record_bytes=self.max_record_bytes,
                )
            )
        if verdict.outcome is Outcome.RETRY:
            return self._retry(message, verdict, state, now)
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
                topic=dead_topic,
                retry_state=state,
                max_record_bytes=self.max_record_bytes,
            )
            return _dead(dead)
        return Output(
            Route.PROCESSED, self.topics.events_processed, message.key, value, _passthrough_headers(message.headers)
        )

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
        return Output(Route.RETRY, self.topics.events_retry, message.key, message.value, headers)


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

    def process(self, message: OriginalMessage) -> list[Output]:
        now = self.engine.clock()
        dead_topic = self.topics.transactions_dead_letter
        try:
            change = parse_envelope(message.value, "transactions")
        except CdcFormatError as error:
            return [self._refused(message, error.code, error, Stage.DECODE, now)]
        if change is None:
            return []  # the tombstone after a delete: the delete envelope already said everything
        row = self.engine.canonical(change.row, "transaction")
        if row is not change.row:  # the row is `after`, or `before` for a delete
            change = replace(change, after=row) if change.after is not None else replace(change, before=row)
        if change.op != OP_DELETE:
            verdict = self.engine.evaluate(row, "transaction", now=now)
        else:  # a delete is a fact at the source: nothing left to judge but the ids every store keys on
            verdict = self.engine.check_ids(row, "transaction", now=now)
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
            outputs = [Output(Route.PROCESSED, self.topics.transactions_processed, key, value, headers)]
            history = status_change(change)
            if history is not None:
                value = self.serialize_status(history)
                outputs.append(Output(Route.STATUS_HISTORY, self.topics.status_history, key, value, headers))
        except (ValueError, TypeError, OverflowError) as error:
            return [self._refused(message, rejections.OUTPUT_CONTRACT, error, Stage.ENRICH, now)]
        return outputs

    def _refused(self, message: OriginalMessage, code: str, error: Exception, stage: Stage, now: datetime) -> Output:
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
