"""The validator's streaming runtime, pure part: records in, outputs out, no Kafka and no Faust here.

The runtime hands a processor batches of `InputRecord`s and produces the `Output`s it returns, wherever they
point (processed, retry or dead-letter topics: the processor decides, the runtime never looks inside a
payload). What the runtime adds is the part no processor should have to get right:

- A batch whose processing raises is processed again record by record, and a record that still raises (or
  whose outputs are not well-formed) becomes a dead letter on `<input topic>.dlq` with stage `process`, so
  the worker never crashes on data.
- A processor that cannot work because a dependency is down (the schema store) raises `RetryBatchLater`: the
  batch is not dead-lettered, not committed, and handed over again after a backoff (its `prepare` hook does
  that part before any record is processed, so a retried batch was never half processed).
- Every output carries W3C trace context: the trace of the record it came from, else the batch's span.

`services.validator.stream_app` runs this on Faust; see docs/validator-runtime.md for the delivery semantics.
"""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from opentelemetry.trace import Span, Tracer
from pydantic import Field

from services.contracts.deadletter import ConsumedRecord, Stage, build_dead_letter
from services.contracts.headers import DLQ_ERROR_CODE, DLQ_RULE, DLQ_STAGE, TRACE_HEADERS, TRACEPARENT
from services.contracts.topics import CDC_TOPIC_PREFIX, EVENTS_RAW, dead_letter_topic, is_dead_letter_topic
from services.kit.config import ServiceSettings
from services.kit.tracing import DEAD_LETTER_SAMPLED, dead_letter_span, with_traceparent

Header = tuple[str, bytes]

# --- records ---------------------------------------------------------------------------------------------------


class InputRecord(ConsumedRecord, Protocol):
    """One consumed Kafka record, exactly as fetched (`value` is the raw payload, possibly garbage): the
    contracts' `ConsumedRecord` plus its Kafka timestamp.

    A protocol rather than a class so the worker can hand over aiokafka's `ConsumerRecord`s as they are:
    building a record object of our own costs ~2 us each, a tenth of the whole per-record budget.
    `Record` is the concrete class for tests and other sources."""

    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...
    @property
    def timestamp(self) -> int: ...  # the record's Kafka timestamp, epoch milliseconds


# Plain slotted dataclasses, not frozen ones: a frozen dataclass costs ~4x as much to build (2.3 vs 0.5 us
# here) and a worker builds one or more outputs per record. Treat them as read-only all the same.
@dataclass(slots=True)
class Record:
    """An `InputRecord` built by hand (tests, replays, batch sources)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]] = ()
    timestamp: int = -1


@dataclass(slots=True)
class Output:
    """One record to produce. `source` (the input it was made from) lends its trace context when `headers`
    carry none; outputs without a `source` get the batch span's context."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: Sequence[Header] = ()
    source: InputRecord | None = field(default=None, compare=False)


class Processor(Protocol):
    """Turns a batch of records of one topic (offset order within each partition) into outputs.

    Synchronous, CPU only, and deterministic per record: after an exception the runtime calls it again with
    one record at a time, and after a crash it processes the records after the last commit again, so a record
    may be processed twice. Its outputs are produced once all the same, provided each names its `source`:
    the runtime stamps them and does not produce again what is already in the log (recovery.py)."""

    def __call__(self, batch: list[InputRecord], /) -> list[Output]: ...


def _never_held(_record: InputRecord) -> float | None:
    return None


def hold_hooks(processor: object) -> tuple[frozenset[str], Callable[[InputRecord], float | None]]:
    """A processor may ask the runtime to hold records until they are due (delayed retries): it names the
    topics concerned in `hold_topics` and answers `not_before(record)` with a Unix time, or None when due.
    The runtime then pauses that partition at the record instead of handing it over early."""
    owner = getattr(processor, "__self__", processor)  # a bound `process` method: its object has the hooks
    topics = frozenset(getattr(owner, "hold_topics", ()) or ())
    not_before = getattr(owner, "not_before", None)
    if not topics or not callable(not_before):
        return frozenset(), _never_held
    return topics, not_before


@dataclass(frozen=True, slots=True)
class AcceptedMemory:
    """What a processor remembers of the records it accepted (a duplicate window), and where the runtime finds
    them again to rebuild that memory when it is given input partitions (after a restart or a rebalance)."""

    sources: Mapping[str, str]  # input topic -> the output topic holding the records it accepted
    window_s: float  # how far back, in record time, the memory reaches
    max_records: int  # the memory's size bound: older accepted records are not worth reading back
    remember: Callable[[Iterable[bytes | None]], int]  # feed accepted payloads (oldest first); returns how many


def accepted_memory(processor: object) -> AcceptedMemory | None:
    """A processor with state about what it accepted offers `accepted_memory()`: the runtime then rebuilds that
    state from the output topics before processing newly assigned partitions. None: nothing to rebuild."""
    owner = getattr(processor, "__self__", processor)  # a bound `process` method: its object has the hook
    offer = getattr(owner, "accepted_memory", None)
    if not callable(offer):
        return None
    memory = offer()
    return memory if isinstance(memory, AcceptedMemory) and memory.sources else None


class RetryBatchLater(Exception):
    """Raised by a processor (or its `prepare` hook) when a dependency it cannot do without is down right now,
    e.g. the schema store a writer schema must come from: no record is at fault, so nothing is dead-lettered;
    the runtime backs off and hands over the same records again. `dependency` names it for /readyz."""

    def __init__(self, dependency: str, message: str) -> None:
        super().__init__(f"{dependency}: {message}")
        self.dependency = dependency


def prepare_hook(processor: object) -> Callable[[list[InputRecord]], None] | None:
    """A processor may do, before a batch is processed, the part that can fail without any record being at fault
    (look up writer schemas): `prepare(records)` on its object, raising `RetryBatchLater`. The runtime calls it
    for every topic of a batch before processing any, in a thread (it may block on the network), so a retry
    never follows a half-processed batch. None when the processor has no such hook."""
    owner = getattr(processor, "__self__", processor)
    prepare = getattr(owner, "prepare", None)
    return prepare if callable(prepare) else None


def load_processor(spec: str) -> Processor:
    """`package.module:name` imports a processor; `package.module:name()` calls `name` to build one (for
    processors that load rules or reference data first). An object with a `process` method is accepted too."""
    module_name, _, attribute = spec.partition(":")
    build = attribute.endswith("()")
    attribute = attribute.removesuffix("()")
    if not module_name or not attribute.isidentifier():
        raise ValueError(f"processor {spec!r} is not of the form package.module:name or package.module:name()")
    target = getattr(importlib.import_module(module_name), attribute)
    if build:
        target = target()
    process = getattr(target, "process", target)
    if not callable(process):
        raise TypeError(f"processor {spec!r} is not callable")
    return process


# --- dead letters ----------------------------------------------------------------------------------------------
PROCESSOR_EXCEPTION = "PROCESSOR_EXCEPTION"  # the processor raised for this record alone
PROCESSOR_OUTPUT_INVALID = "PROCESSOR_OUTPUT_INVALID"  # it returned something the runtime cannot produce


def dead_letter(
    record: InputRecord,
    code: str,
    message: str,
    now: datetime,
    trace_id: str | None = None,
    max_record_bytes: int | None = None,
) -> Output:
    """The record, key and value unchanged, on `<topic>.dlq` with the reason in `lp-dlq-*` headers (stage
    `process`), in the platform's one dead-letter format, so one replay tool reads every dead letter.

    `trace_id` (the batch span's) stands in for a record without a traceparent. Last resort: if the dead letter
    would exceed `max_record_bytes`, its value is cut to fit (`lp-dlq-value-truncated-from` says so): a dead
    letter the broker refuses would stop the worker on every restart, losing far more."""
    letter = build_dead_letter(
        record,
        code=code,
        stage=Stage.PROCESS,
        message=message,
        now=now,
        fallback_trace_id=trace_id,
        max_record_bytes=max_record_bytes,
    )
    return Output(letter.topic, letter.key, letter.value, letter.headers, source=record)


# --- running a processor -----------------------------------------------------------------------------------------


class InvalidOutput(TypeError):
    """The processor returned something that is not a producible `Output`."""


def check_outputs(outputs: object, max_record_bytes: int) -> list[Output]:
    """`outputs` as a list of well-formed `Output`s, or `InvalidOutput` saying what is wrong.

    Checked before anything is produced because a malformed record would fail inside the Kafka client, after
    the batch's other outputs were sent, and a too large one would be refused by the broker on every retry."""
    if not isinstance(outputs, list):
        raise InvalidOutput(f"processor returned {type(outputs).__name__}, not a list of Output")
    for output in outputs:  # hot: once per output, so attributes are read once and no tuple is built
        if not isinstance(output, Output):
            raise InvalidOutput(f"processor returned a {type(output).__name__}, not an Output")
        topic, key, value = output.topic, output.key, output.value
        if type(topic) is not str or not topic:
            raise InvalidOutput(f"output topic {topic!r} is not a topic name")
        size = 0
        if key is not None:
            if type(key) is not bytes:
                raise InvalidOutput(f"output key/value is {type(key).__name__}, not bytes")
            size = len(key)
        if value is not None:
            if type(value) is not bytes:
                raise InvalidOutput(f"output key/value is {type(value).__name__}, not bytes")
            size += len(value)
        for header in output.headers:
            if type(header) is not tuple or len(header) != 2 or type(header[0]) is not str:
                raise InvalidOutput(f"output header {header!r} is not a (str, bytes) pair")
            if type(header[1]) is not bytes:
                raise InvalidOutput(f"output header {header[0]!r} value is {type(header[1]).__name__}, not bytes")
            size += len(header[0]) + len(header[1])
        if size > max_record_bytes:
            raise InvalidOutput(f"output to {output.topic} is {size} bytes, more than {max_record_bytes}")
    return outputs


@dataclass(slots=True)
class ProcessResult:
    outputs: list[Output]
    dead_letters: int = 0  # records the runtime dead-lettered itself (stage process)
    batch_failed: bool = False  # the whole-batch call raised and records were processed one by one


def utc_now() -> datetime:
    return datetime.now(UTC)


def run_processor(
    processor: Processor,
    batch: list[InputRecord],
    max_record_bytes: int = 1_000_000,
    now: Callable[[], datetime] = utc_now,
    trace_id: str | None = None,
) -> ProcessResult:
    """Process `batch`; never raises for a data problem (only `RetryBatchLater`, when no record is at fault).

    The whole batch first (the fast path); if that raises, each record on its own, so one bad record costs
    only itself: it goes to its topic's dead-letter topic with the exception text. `trace_id` (the batch
    span's) fills `lp-dlq-trace-id` for records that carry no traceparent of their own.
    """
    try:
        return ProcessResult(check_outputs(processor(batch), max_record_bytes))
    except RetryBatchLater:
        raise  # no record is at fault: the caller retries the batch, nothing is dead-lettered
    except Exception:  # whatever went wrong, the records below find out which record it was
        pass
    result = ProcessResult([], batch_failed=True)
    for record in batch:
        try:
            result.outputs += check_outputs(processor([record]), max_record_bytes)
        except RetryBatchLater:
            raise
        except InvalidOutput as error:
            result.outputs.append(
                dead_letter(record, PROCESSOR_OUTPUT_INVALID, str(error), now(), trace_id, max_record_bytes)
            )
            result.dead_letters += 1
        except Exception as error:
            text = f"{type(error).__name__}: {error}"
            result.outputs.append(dead_letter(record, PROCESSOR_EXCEPTION, text, now(), trace_id, max_record_bytes))
            result.dead_letters += 1
    return result


@dataclass(slots=True)
class Batch:
    """One fetch: its records per topic (each list in offset order per partition) and, per (topic, partition),
    the offset to commit once every output of the batch is acknowledged (the highest offset + 1)."""

    by_topic: dict[str, list[InputRecord]]
    next_offsets: dict[tuple[str, int], int]
    size: int

    @classmethod
    def of(cls, records: Iterable[InputRecord]) -> Batch:
        """Group records of any origin (the worker builds its batches per partition, without this loop)."""
        by_topic: dict[str, list[InputRecord]] = {}
        next_offsets: dict[tuple[str, int], int] = {}
        size = 0
        for record in records:
            by_topic.setdefault(record.topic, []).append(record)
            tp = (record.topic, record.partition)
            next_offsets[tp] = max(next_offsets.get(tp, 0), record.offset + 1)
            size += 1
        return cls(by_topic, next_offsets, size)


# --- trace context on outputs --------------------------------------------------------------------------------------


def trace_headers(record: InputRecord) -> list[Header]:
    """The record's own W3C trace context headers (for processors that build their outputs' headers)."""
    return [(name, value) for name, value in record.headers if name in TRACE_HEADERS and value is not None]


def headers_with_trace(output: Output, fallback: Sequence[Header]) -> list[Header]:
    """`output.headers` as a list, plus trace context if it has none: its source record's, else `fallback`.

    The source's context is copied rather than a new span made per record: spans per record would cost more
    than the processing itself at 10k+ records/s (see docs/validator-runtime.md). Sampled records are the
    exception: `trace_outputs` already put their `process` span's context in `headers`."""
    headers = list(output.headers)
    for name, _ in headers:
        if name == TRACEPARENT:
            return headers
    if output.source is not None:
        inherited = False
        for name, value in output.source.headers:
            if name in TRACE_HEADERS and value is not None:
                headers.append((name, value))
                inherited = True
        if inherited:
            return headers
    headers.extend(fallback)
    return headers


def trace_outputs(tracer: Tracer, outputs: Sequence[Output], record_spans: Mapping[int, Span]) -> None:
    """Outputs of sampled records (`record_spans`: their `process` spans by id() of the source record) carry
    that span's context, so the next hop is its child; a dead letter's carries a dead-letter span's, child of
    it, which ends the record's trace. Called only for batches with a sampled record."""
    for output in outputs:
        source = output.source
        span = record_spans.get(id(source)) if source is not None else None
        if span is None:
            continue
        parent = span.get_span_context()
        if not parent.is_valid:  # a no-op tracer
            continue
        dlq = {name: value for name, value in output.headers if name in _DLQ_TRACED and value is not None}
        if DLQ_ERROR_CODE in dlq:
            code = dlq[DLQ_ERROR_CODE].decode(errors="replace")
            rule = dlq[DLQ_RULE].decode(errors="replace") if DLQ_RULE in dlq else None
            stage = dlq[DLQ_STAGE].decode(errors="replace") if DLQ_STAGE in dlq else Stage.PROCESS.value
            letter = dead_letter_span(tracer, parent, output.topic, code, stage, rule or None)
            span.set_attribute("lp.dead_lettered", code)
            output.headers = with_traceparent(output.headers, letter.get_span_context(), DEAD_LETTER_SAMPLED)
            letter.end()
        else:
            output.headers = with_traceparent(output.headers, parent)


_DLQ_TRACED = (DLQ_ERROR_CODE, DLQ_RULE, DLQ_STAGE)


# --- settings ------------------------------------------------------------------------------------------------------


class StreamRuntimeSettings(ServiceSettings):
    """What the streaming runtime reads from the environment (field `x` from variable `X`)."""

    service_name: str = "validator"
    input_topics: str = Field(
        f"{EVENTS_RAW},{CDC_TOPIC_PREFIX}*",
        description="Comma-separated topics to consume; shell-style patterns (cdc.postgres.*) are matched against "
        "the broker's topics at start and never match a *.dlq topic.",
    )
    output_topics: str = Field(
        "", description="Comma-separated topics the processor writes to, checked at start (the .dlq of every input is)."
    )
    consumer_group: str = Field("lp-validator", min_length=1, description="Kafka consumer group (the Faust app id).")
    # 10,000: the column-wise validator's fixed cost per batch (Arrow calls, ~2 ms) is then ~0.2 us a record;
    # at 2,000 its processor ran at 0.6x the rate (`make bench`). A fetch hands over what has arrived, so at low
    # rates batches stay small and latency does not grow.
    batch_max_records: int = Field(10_000, ge=1, description="Most records handed to the processor at once.")
    max_in_flight_batches: int = Field(
        2, ge=1, le=16, description="Batches produced but not yet acknowledged; >1 overlaps processing and acks."
    )
    commit_interval_s: float = Field(1.0, gt=0, description="How often delivered offsets are committed.")
    broker_session_timeout_s: float = Field(
        6.0, ge=1, description="Kafka session timeout. Short: the local broker holds a JoinGroup for half of it."
    )
    broker_heartbeat_interval_s: float = Field(1.0, gt=0)
    producer_linger_ms: int = Field(10, ge=0, description="How long the producer waits to fill a batch.")
    producer_max_batch_bytes: int = Field(512 * 1024, ge=16 * 1024, description="Producer batch size per partition.")
    producer_max_request_bytes: int = Field(
        # Kafka's default message.max.bytes, which the declared topics inherit: so a dead letter keeps the original
        # bytes of any record the broker accepted from a producer with the common 1,000,000-byte limit.
        1_048_588,
        ge=64 * 1024,
        description="Largest produce request; bigger outputs are dead-lettered (match the broker's message.max.bytes).",
    )
    producer_compression: str | None = Field(
        None, description="none, gzip, snappy, lz4 or zstd (the last three need the cramjam package)."
    )
    producer_request_timeout_s: float = Field(
        30.0, gt=0, description="A batch not acknowledged by then fails the worker (it restarts from its commits)."
    )

    def input_patterns(self) -> list[str]:
        return _split(self.input_topics)

    def declared_outputs(self) -> list[str]:
        return _split(self.output_topics)


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


class TopicsMissing(RuntimeError):
    """Topics the runtime needs are not on the broker (they are declared by the operator, never created here)."""


def resolve_input_topics(patterns: Sequence[str], existing: Iterable[str]) -> list[str]:
    """Expand `patterns` against the broker's topics. A plain name must exist; a pattern must match something;
    patterns never match dead-letter topics (a `cdc.*` worker must not consume `cdc.x.dlq`)."""
    existing = sorted(existing)
    topics: list[str] = []
    missing: list[str] = []
    for pattern in patterns:
        if any(char in pattern for char in "*?["):
            matched = [
                t
                for t in existing
                if fnmatch.fnmatchcase(t, pattern) and not is_dead_letter_topic(t) and not t.startswith("__")
            ]
            if not matched:
                missing.append(f"{pattern} (no topic matches)")
            topics += matched
        elif pattern in existing:
            topics.append(pattern)
        else:
            missing.append(pattern)
    if missing:
        raise TopicsMissing(
            "input topics missing on the broker: " + ", ".join(missing) + "; declare them first "
            "(python -m services.declarations apply)"
        )
    return list(dict.fromkeys(topics))


def required_output_topics(inputs: Sequence[str], declared: Sequence[str]) -> list[str]:
    return list(dict.fromkeys([*(dead_letter_topic(t) for t in inputs), *declared]))
