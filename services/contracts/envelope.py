"""The Debezium change-event envelope of the `cdc.postgres.<table>` topics (JSON, `schemas.enable=false`)::

    {"before": {...} | null, "after": {...} | null, "op": "r|c|u|d", "ts_ms": ...,
     "source": {"lsn": ..., "ts_ms": ..., "snapshot": ..., "table": ..., ...}}

A Kafka tombstone (null value, same key) follows each delete. `source.lsn` orders the changes of one key and
is the same when a change is delivered again, so consumers deduplicate on it. The per-table contract is
schemas/avro/cdc_<table>.avsc (valueEncoding: json). The CDC service produces these envelopes as Debezium
writes them; the validator parses them (`services.validator.cdc`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

BEFORE = "before"
AFTER = "after"
SOURCE = "source"
OP = "op"
TS_MS = "ts_ms"  # when Debezium processed the change

# Fields of `source`.
SOURCE_LSN = "lsn"
SOURCE_TS_MS = "ts_ms"  # commit time at the source
SOURCE_TABLE = "table"
SOURCE_SNAPSHOT = "snapshot"

OP_READ = "r"  # a row read by the initial snapshot
OP_CREATE = "c"
OP_UPDATE = "u"
OP_DELETE = "d"
OPS = frozenset({OP_READ, OP_CREATE, OP_UPDATE, OP_DELETE})
TOMBSTONE_OP = "tombstone"  # the `lp-cdc-op` header of the null-value record that follows a delete

# `source.snapshot` of a record of the initial snapshot ("last": its final record). Streamed changes carry
# "false" (or no value); "incremental" marks a signal-driven incremental snapshot.
SNAPSHOT_MARKERS = frozenset({"true", "first", "first_in_data_collection", "last_in_data_collection", "last"})


def unwrap(document: Any) -> Any:
    """The envelope of a `{"schema": ..., "payload": ...}` wrapper (a connector with `schemas.enable=true`)."""
    if isinstance(document, Mapping) and "payload" in document and "schema" in document:
        return document["payload"]
    return document
