"""Kafka header names the services write and read. Values are bytes; numbers and times are decimal text.

The `lp-` prefix marks the platform's own headers. A record keeps the headers of its producer (trace context,
`producer`, ...) through every stage; bookkeeping headers (`lp-dlq-*`, `lp-retry-*`) are replaced by the stage
that writes them, so a record never carries a stale reason or retry count.
"""

from __future__ import annotations

from collections.abc import Sequence

# --- set by the producer of a record ------------------------------------------------------------------------
TRACEPARENT = "traceparent"  # W3C trace context: `00-<32 hex trace id>-<16 hex span id>-<flags>`
TRACESTATE = "tracestate"
TRACE_HEADERS = (TRACEPARENT, TRACESTATE)
PRODUCER = "producer"  # which service produced the record (`generator`, `ingest-api`)
INJECTED_FAULT = "lp-injected-fault"  # the generator broke this record on purpose (the fault's kind)
BATCH_ORIGIN = "lp-batch-origin"  # `<file>:<row>` of a record loaded from a batch file

# --- set by the validator's runtime on every output it produces ----------------------------------------------
# `<input topic>:<partition>:<offset>:<index>/<count>`: output `index` (from 0) of the `count` outputs the input
# record at that position gave. After a crash the runtime reads these from the output partitions' tails to
# produce no output twice (docs/validator-runtime.md, "Exactly once at the source").
SOURCE = "lp-source"

# --- change data capture (the local CDC service; Debezium Server in Kubernetes does not add them) -----------
CDC_LSN = "lp-cdc-lsn"  # source.lsn of the change (of the delete, for the tombstone that follows it)
CDC_OP = "lp-cdc-op"  # r, c, u, d, or `envelope.TOMBSTONE_OP`

# --- dead letters: why, where from, when --------------------------------------------------------------------
DLQ_PREFIX = "lp-dlq-"
DLQ_ERROR_CODE = "lp-dlq-error-code"
DLQ_RULE = "lp-dlq-rule"
DLQ_FIELD = "lp-dlq-field"
DLQ_MESSAGE = "lp-dlq-message"
DLQ_STAGE = "lp-dlq-stage"
DLQ_ORIGINAL_TOPIC = "lp-dlq-original-topic"
DLQ_ORIGINAL_PARTITION = "lp-dlq-original-partition"
DLQ_ORIGINAL_OFFSET = "lp-dlq-original-offset"
DLQ_TIME = "lp-dlq-time"
DLQ_TRACE_ID = "lp-dlq-trace-id"
DLQ_ATTEMPT = "lp-dlq-attempt"
DLQ_HEADERS = (  # every dead letter carries these, in this order
    DLQ_ERROR_CODE,
    DLQ_RULE,
    DLQ_FIELD,
    DLQ_MESSAGE,
    DLQ_STAGE,
    DLQ_ORIGINAL_TOPIC,
    DLQ_ORIGINAL_PARTITION,
    DLQ_ORIGINAL_OFFSET,
    DLQ_TIME,
    DLQ_TRACE_ID,
    DLQ_ATTEMPT,
)
# Only on a dead letter whose value was cut to fit the broker's record size limit.
DLQ_VALUE_TRUNCATED_FROM = "lp-dlq-value-truncated-from"  # the original value's size in bytes
DLQ_VALUE_SHA256 = "lp-dlq-value-sha256"  # hex SHA-256 of the original value

# --- late-reference retries (the validator's retry topic). Times are epoch milliseconds. ---------------------
RETRY_PREFIX = "lp-retry-"
RETRY_ATTEMPT = "lp-retry-attempt"  # the number of this retry: 1 for the first
RETRY_NOT_BEFORE = "lp-retry-not-before"
RETRY_FIRST_SEEN = "lp-retry-first-seen"
RETRY_RULE = "lp-retry-rule"
RETRY_ORIGINAL_TOPIC = "lp-retry-original-topic"
RETRY_ORIGINAL_PARTITION = "lp-retry-original-partition"
RETRY_ORIGINAL_OFFSET = "lp-retry-original-offset"
RETRY_HEADERS = (
    RETRY_ATTEMPT,
    RETRY_NOT_BEFORE,
    RETRY_FIRST_SEEN,
    RETRY_RULE,
    RETRY_ORIGINAL_TOPIC,
    RETRY_ORIGINAL_PARTITION,
    RETRY_ORIGINAL_OFFSET,
)

# --- replays (the validator's replay of a dead-letter topic, the archiver's replay of a table) --------------
REPLAY_PREFIX = "lp-replay-"
REPLAY_ID = "lp-replay-id"  # the replay run
REPLAY_SOURCE = "lp-replay-source"  # what was replayed; the validator processes each source once
REPLAY_SNAPSHOT = "lp-replay-snapshot"  # the archive snapshot a replay read (archiver replays only)

# Bookkeeping a new dead letter replaces: a replayed record carries no earlier reason or retry count.
STALE_ON_DEAD_LETTER = (DLQ_PREFIX, RETRY_PREFIX)


def trace_id_from_headers(headers: Sequence[tuple[str, bytes | None]] | None) -> str | None:
    """The trace id of a W3C `traceparent` header, lower case; None if absent, malformed or all zeros."""
    for key, value in headers or ():
        if key == TRACEPARENT and value:
            parts = value.decode("latin-1").strip().split("-")
            if len(parts) >= 4 and len(parts[1]) == 32 and parts[1] != "0" * 32:
                return parts[1].lower()
    return None
