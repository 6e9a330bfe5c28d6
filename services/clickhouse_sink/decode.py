"""Columnar Avro decoding inside ClickHouse: a batch of single-object payloads becomes one Arrow table.

Decoding 35 fields per record with fastavro costs ~70 us here, seven times the whole budget of a 100k rows/s
sink. ClickHouse's Avro reader does it in a few microseconds, so the payloads are handed to it unchanged, as
one Avro object container file: the writer schema is the topic's contract wrapped between a leading
`fixed(10)` field (which swallows each payload's single-object header, so no record is copied or sliced) and a
trailing `fixed(4)` sentinel (the separator of the join). After decoding, every row must show the expected
header and sentinel: a payload with a corrupt or over-long body would shift its neighbours, and this is how
the shift is caught. The batch then goes record by record through the kit's `AvroDeserializer`, which names
the bad records with their `DecodeErrorCode`, and the rest is decoded again.

Records written with an older version of the contract are decoded by fastavro (schema resolution) and
re-encoded with the current one, so ClickHouse always reads a single writer schema.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from services.clickhouse_sink.tables import TableSpec, structure
from services.contracts.deadletter import Stage
from services.kit.avro import AvroSerializer, DecodeError, Schema
from services.kit.avro_fast import zigzag_varint
from services.kit.sink import Rejection, SinkRecord, messages_of

log = logging.getLogger(__name__)

HEADER_FIELD = "_lp_header"
SENTINEL_FIELD = "_lp_sentinel"
SENTINEL = b"LP\x00\x01"
_SYNC = b"lambda-pipeline!"  # the container's 16-byte sync marker: any constant will do for one block
REJECT_COLUMN = "_lp_reject"
ALIGNED_COLUMN = "_lp_aligned"
OFFSET_COLUMN = "_kafka_offset"
DECODE_FAILED = "STORE_DECODE_FAILED"

Query = Callable[[str], pa.Table]


class DecodeBackpressure(RuntimeError):
    """The decoding engine itself is unavailable (memory, ...): not the records' fault."""


def _avro_map(entries: dict[str, bytes]) -> bytes:
    out = zigzag_varint(len(entries))
    for key, value in entries.items():
        raw = key.encode()
        out += zigzag_varint(len(raw)) + raw + zigzag_varint(len(value)) + value
    return out + b"\x00"


def container_header(schema: Schema) -> bytes:
    """The header of an Avro object container file whose records are `schema` wrapped by header and sentinel."""
    definition = dict(schema.definition)
    definition["fields"] = [
        {"name": HEADER_FIELD, "type": {"type": "fixed", "name": "LpSingleObjectHeader", "size": 10}},
        *definition["fields"],
        {"name": SENTINEL_FIELD, "type": {"type": "fixed", "name": "LpSentinel", "size": len(SENTINEL)}},
    ]
    meta = {"avro.schema": json.dumps(definition).encode(), "avro.codec": b"null"}
    return b"Obj\x01" + _avro_map(meta) + _SYNC


def container_parts(header: bytes, payloads: Sequence[bytes]) -> tuple[bytes, ...]:
    """One data block holding every payload (each a complete single-object record), sentinel after each, as
    pieces to write one after the other: the payloads are copied once (a batch is tens of megabytes)."""
    data = SENTINEL.join(payloads)
    size = len(data) + len(SENTINEL)
    return (header, zigzag_varint(len(payloads)), zigzag_varint(size), data, SENTINEL, _SYNC)


def container(header: bytes, payloads: Sequence[bytes]) -> bytes:
    return b"".join(container_parts(header, payloads))


@dataclass
class Decoded:
    """The decoded rows (Arrow, one row per kept record, `_kafka_offset` added) and what was refused."""

    table: pa.Table | None  # None: no row to insert
    records: Sequence[SinkRecord]
    rejected: list[Rejection] = field(default_factory=list)


class BatchDecoder:
    """Decodes the records of one subject with ClickHouse (`query` runs SQL and returns an Arrow table)."""

    def __init__(self, query: Query, spec: TableSpec, schema: Schema, scratch_dir: Path | None = None) -> None:
        self.query = query
        self.spec = spec
        self.schema = schema
        self.serialize = AvroSerializer(schema)
        self.header = schema.header
        self.fields = [f["name"] for f in schema.definition["fields"]]
        self._container_header = container_header(schema)
        directory = scratch_dir or default_scratch_dir()
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"lp-clickhouse-sink-{os.getpid()}-{spec.table}.avro"
        if "'" in str(self.path) or "\\" in str(self.path):
            raise ValueError(f"scratch path {self.path} must not contain quotes or backslashes")
        wrapped = f"`{HEADER_FIELD}` FixedString(10), {structure(schema.definition)}, `{SENTINEL_FIELD}` FixedString(4)"
        aligned = f"`{HEADER_FIELD}` = unhex('{self.header.hex()}') AND `{SENTINEL_FIELD}` = unhex('{SENTINEL.hex()}')"
        self.sql = (
            f"SELECT * EXCEPT (`{HEADER_FIELD}`, `{SENTINEL_FIELD}`), {spec.reject_sql()} AS {REJECT_COLUMN}, "
            f"{aligned} AS {ALIGNED_COLUMN} FROM file('{self.path}', 'Avro', '{_escape(wrapped)}') "
            "SETTINGS max_threads = 1, input_format_avro_allow_missing_fields = 0"
        )

    def decode(self, records: Sequence[SinkRecord]) -> Decoded:
        """Decode; records ClickHouse cannot store are returned as rejections (never an exception for data)."""
        rejected: list[Rejection] = []
        header = self.header
        payloads = [m.value() for m in messages_of(records)]
        kept: Sequence[SinkRecord] = records
        if any(payload[:10] != header for payload in payloads):
            kept, payloads = self._current_version(records, payloads, rejected)
        table, kept = self._decode_checked(kept, payloads, rejected)
        if table is None:
            return Decoded(None, [], rejected)
        offsets = [m.offset() for m in messages_of(kept)]
        table = table.append_column(OFFSET_COLUMN, pa.array(offsets, pa.int64()))
        failed = self._failed_checks(table, kept)
        if failed:
            good = pc.equal(table.column(REJECT_COLUMN), "")
            kept = [r for r, ok in zip(kept, good.to_pylist(), strict=True) if ok]
            table = table.filter(good)
            rejected += failed
        table = table.drop_columns([REJECT_COLUMN, ALIGNED_COLUMN])
        return Decoded(table if table.num_rows else None, kept, rejected)

    def _current_version(
        self, records: Sequence[SinkRecord], payloads: list[bytes], rejected: list[Rejection]
    ) -> tuple[list[SinkRecord], list[bytes]]:
        """Records of an older writer version resolved with fastavro and re-encoded with the current one."""
        kept: list[SinkRecord] = []
        current: list[bytes] = []
        for record, payload in zip(records, payloads, strict=True):
            if payload[:10] == self.header:
                kept.append(record)
                current.append(payload)
                continue
            result = record.decode()
            if isinstance(result, DecodeError):
                rejected.append(Rejection(record, str(result.code), result.message, stage=Stage.DECODE))
                continue
            kept.append(record)
            current.append(self.serialize(result.record))
        return kept, current

    # -- decoding with its safety net --------------------------------------------------------------------------
    def _run(self, payloads: Sequence[bytes]) -> pa.Table:
        with self.path.open("wb") as scratch:
            scratch.writelines(container_parts(self._container_header, payloads))
        try:
            return self.query(self.sql)
        finally:
            with contextlib.suppress(OSError):
                self.path.unlink()

    @staticmethod
    def _aligned(table: pa.Table, expected: int) -> bool:
        if table.num_rows != expected:
            return False
        return pc.min(table.column(ALIGNED_COLUMN)).as_py() == 1

    def _decode_checked(
        self, records: Sequence[SinkRecord], payloads: list[bytes], rejected: list[Rejection]
    ) -> tuple[pa.Table | None, Sequence[SinkRecord]]:
        if not records:
            return None, []
        error: Exception | None = None
        try:
            table = self._run(payloads)
            if self._aligned(table, len(records)):
                return table, records
        except Exception as exc:  # ClickHouse refused the container: find out why, record by record
            if is_engine_unavailable(exc):
                raise DecodeBackpressure(first_line(exc)) from exc
            error = exc
        log.warning("batch did not decode as a whole (%s): checking record by record", error or "rows shifted")
        good_records, good_payloads = [], []
        for record, payload in zip(records, payloads, strict=True):
            result = record.decode()  # the kit's decoder: the reference for what a valid record is
            if isinstance(result, DecodeError):
                rejected.append(Rejection(record, str(result.code), result.message, stage=Stage.DECODE))
            else:
                good_records.append(record)
                good_payloads.append(payload)
        return self._bisect(good_records, good_payloads, rejected)

    def _bisect(
        self, records: list[SinkRecord], payloads: list[bytes], rejected: list[Rejection]
    ) -> tuple[pa.Table | None, list[SinkRecord]]:
        """Valid Avro that ClickHouse still does not read: isolate the records it refuses."""
        if not records:
            return None, []
        try:
            table = self._run(payloads)
            if self._aligned(table, len(records)):
                return table, records
            problem = "the rows came out shifted"
        except Exception as exc:
            if is_engine_unavailable(exc):
                raise DecodeBackpressure(first_line(exc)) from exc
            problem = first_line(exc)
        if len(records) == 1:
            rejected.append(Rejection(records[0], DECODE_FAILED, f"ClickHouse cannot read it: {problem}"))
            return None, []
        middle = len(records) // 2
        left, left_kept = self._bisect(records[:middle], payloads[:middle], rejected)
        right, right_kept = self._bisect(records[middle:], payloads[middle:], rejected)
        tables = [t for t in (left, right) if t is not None]
        return (pa.concat_tables(tables) if tables else None), left_kept + right_kept

    def _failed_checks(self, table: pa.Table, records: Sequence[SinkRecord]) -> list[Rejection]:
        column = table.column(REJECT_COLUMN)
        bad = pc.indices_nonzero(pc.not_equal(column, "")).to_pylist()
        rejections = []
        for index in bad:
            name = column[index].as_py()
            check = self.spec.check(name)
            value = table.column(name)[index].as_py() if name in table.column_names else None
            rejections.append(
                Rejection(
                    records[index],
                    "STORE_TYPE_MISMATCH",
                    f"{name} = {value!r}: {self.spec.table}.{name} takes {check.expects}",
                    field=name,
                )
            )
        return rejections


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")


def default_scratch_dir() -> Path:
    """RAM-backed when there is one: the container file is written and read once per batch."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm
    return Path(tempfile.gettempdir())


# --- ClickHouse errors ------------------------------------------------------------------------------------------
_CODE = re.compile(r"Code: (\d+)")

# Errors that say the store (not the data) is the problem: the batch waits and is retried as it is.
UNAVAILABLE_CODES = frozenset(
    {
        60,  # UNKNOWN_TABLE (being created, detached, a replica not ready)
        81,  # UNKNOWN_DATABASE
        159,  # TIMEOUT_EXCEEDED
        164,  # READONLY
        202,  # TOO_MANY_SIMULTANEOUS_QUERIES
        203,  # NO_FREE_CONNECTION
        209,  # SOCKET_TIMEOUT
        210,  # NETWORK_ERROR
        236,  # ABORTED
        241,  # MEMORY_LIMIT_EXCEEDED
        242,  # TABLE_IS_READ_ONLY
        243,  # NOT_ENOUGH_SPACE
        252,  # TOO_MANY_PARTS
        279,  # ALL_CONNECTION_TRIES_FAILED
        285,  # TOO_FEW_LIVE_REPLICAS
        286,  # UNSATISFIED_QUORUM_FOR_PREVIOUS_WRITE
        319,  # UNKNOWN_STATUS_OF_INSERT
        394,  # QUERY_WAS_CANCELLED
        425,  # SYSTEM_ERROR
        439,  # CANNOT_SCHEDULE_TASK
        999,  # KEEPER_EXCEPTION
        1000,  # POCO_EXCEPTION
    }
)
# Errors caused by the values of some rows: the batch is split to find and dead-letter them.
DATA_CODES = frozenset({6, 27, 38, 41, 53, 69, 70, 72, 117, 131, 190, 321, 349, 376, 407, 441, 691})


def error_code(error: BaseException) -> int | None:
    code = getattr(error, "code", None)
    if isinstance(code, int):
        return code
    match = _CODE.search(str(error))
    return int(match.group(1)) if match else None


def is_engine_unavailable(error: BaseException) -> bool:
    if isinstance(error, (ConnectionError, TimeoutError, EOFError)):
        return True
    code = error_code(error)
    return code is None or code in UNAVAILABLE_CODES


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:500] if text else type(error).__name__
