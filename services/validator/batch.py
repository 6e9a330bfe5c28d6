"""Batch files (CSV, JSON Lines, Parquet, Avro) read into raw_event records: the one validation path for files too.

The rows are judged in batches by the same compiled rulebook as the stream (`EventProcessor.process_records`
builds the same Arrow batch the stream's decoder does); this module only reads and types them.

Each reader streams (CSV and JSONL line by line, Parquet by record batches) and yields, per row, either a
`BatchRow` whose `record` is exactly what decoding an events.raw payload yields (same fields, same Python
types: aware UTC datetimes at millisecond precision, ints, floats, a str->str map), or a `BatchError`
carrying the row's original text (CSV line(s), JSON line) or JSON (Parquet) for the dead-letter topic with
code BATCH_PARSE_ERROR. Types are coerced per the raw_event contract, read from its .avsc at start.

CSV: the first line is the header; an empty cell is null (or the field's default); `properties` is a JSON
object; `event_time` is ISO-8601 (naive = UTC) or epoch milliseconds. Unknown columns are ignored (counted in
`BatchStats.unknown_columns`). Every record's `source` is set to "batch-file".
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from services.contracts.deadletter import DeadLetterRecord, OriginalMessage, Stage, build_dead_letter
from services.contracts.topics import EVENTS_RAW, dead_letter_topic
from services.kit.paths import avro_schema_dir
from services.validator.cdc import to_timestamp
from services.validator.rejections import BATCH_PARSE_ERROR

BATCH_SOURCE = "batch-file"
BATCH_DLQ_TOPIC = dead_letter_topic(EVENTS_RAW)  # rows of a file are raw events
INT_RANGE = (-(2**31), 2**31 - 1)
LONG_RANGE = (-(2**63), 2**63 - 1)
FORMATS = {
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".avro": "avro",
}


class CoercionError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


# --- coercion, per Avro type -----------------------------------------------------------------------------------
def _string(value: Any) -> str:
    if isinstance(value, str):
        if not value.isascii():
            value.encode("utf-8")  # raises on lone surrogates (undecodable bytes in the file)
        return value
    raise ValueError(f"expected text, got {type(value).__name__}")


def _integer(bounds: tuple[int, int]) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError("expected an integer, got a boolean")
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        elif isinstance(value, str):
            text = value.strip()
            if not text.lstrip("+-").isdigit():
                raise ValueError(f"expected an integer, got {value!r}")
            value = int(text)
        if not isinstance(value, int):
            raise ValueError(f"expected an integer, got {value!r}")
        if not bounds[0] <= value <= bounds[1]:
            raise ValueError(f"{value} is out of range")
        return value

    return convert


def _double(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a number, got a boolean")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
    if not isinstance(value, int | float):
        raise ValueError(f"expected a number, got {value!r}")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"{value!r} is not a finite number")
    return result


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise ValueError(f"expected true or false, got {value!r}")


def _timestamp_millis(value: Any) -> datetime:
    if isinstance(value, date) and not isinstance(value, datetime):
        raise ValueError(f"expected a timestamp, got the date {value}")
    stamp = to_timestamp(value)
    return stamp.astimezone(UTC).replace(microsecond=stamp.microsecond // 1000 * 1000)


def _string_map(value: Any) -> dict[str, str]:
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as error:
            raise ValueError(f"not a JSON object: {error}") from None
    if isinstance(value, list):  # pyarrow gives a map column as [(key, value), ...]
        try:
            value = dict(value)
        except (TypeError, ValueError):
            raise ValueError("expected a map") from None
    if not isinstance(value, dict):
        raise ValueError(f"expected a map, got {type(value).__name__}")
    result = {}
    for key, item in value.items():
        if isinstance(item, dict | list) or item is None:
            raise ValueError(f"map value of {key!r} must be a scalar")
        result[str(key)] = item if isinstance(item, str) else json.dumps(item)
    return result


_LOGICAL = {"timestamp-millis": _timestamp_millis, "timestamp-micros": _timestamp_millis}
_PRIMITIVE: dict[str, Callable[[Any], Any]] = {
    "string": _string,
    "int": _integer(INT_RANGE),
    "long": _integer(LONG_RANGE),
    "double": _double,
    "float": _double,
    "boolean": _boolean,
}


def _converter(avro_type: Any, name: str) -> tuple[bool, Callable[[Any], Any]]:
    """(nullable, convert) for a field type of the contract."""
    if isinstance(avro_type, list):
        branches = [b for b in avro_type if b != "null"]
        if len(branches) != 1:
            raise ValueError(f"field {name}: unions other than [null, T] are not supported by the batch reader")
        return "null" in avro_type, _converter(branches[0], name)[1]
    if isinstance(avro_type, dict):
        logical = avro_type.get("logicalType")
        if logical in _LOGICAL:
            return False, _LOGICAL[logical]
        if avro_type.get("type") == "map" and avro_type.get("values") == "string":
            return False, _string_map
        return _converter(avro_type.get("type"), name)
    if avro_type in _PRIMITIVE:
        return False, _PRIMITIVE[avro_type]
    raise ValueError(f"field {name}: type {avro_type!r} is not supported by the batch reader")


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    nullable: bool
    convert: Callable[[Any], Any]
    default: Any
    has_default: bool


class RecordCoercer:
    """Turns a loosely typed row (CSV strings, JSON values, Parquet values) into a contract record."""

    def __init__(self, schema: Mapping[str, Any], *, source: str = BATCH_SOURCE, empty_is_null: bool = True):
        fields = []
        for avro_field in schema["fields"]:
            nullable, convert = _converter(avro_field["type"], avro_field["name"])
            fields.append(
                _Field(avro_field["name"], nullable, convert, avro_field.get("default"), "default" in avro_field)
            )
        self.fields = tuple(fields)
        self.names = frozenset(f.name for f in fields)
        self.source = source
        self.empty_is_null = empty_is_null

    @classmethod
    def for_raw_event(cls, **kwargs: Any) -> RecordCoercer:
        return cls(json.loads((avro_schema_dir() / "raw_event.avsc").read_text()), **kwargs)

    def __call__(self, row: Mapping[str, Any]) -> dict[str, Any]:
        record: dict[str, Any] = {}
        empty_is_null = self.empty_is_null
        for spec in self.fields:
            value = row.get(spec.name)
            if value is None or (empty_is_null and value == ""):
                if spec.nullable:
                    record[spec.name] = None
                elif spec.has_default:
                    record[spec.name] = dict(spec.default) if isinstance(spec.default, dict) else spec.default
                else:
                    raise CoercionError(spec.name, "is required")
                continue
            try:
                record[spec.name] = spec.convert(value)
            except (ValueError, UnicodeError, OverflowError) as error:
                raise CoercionError(spec.name, str(error)) from None
        if "source" in self.names:
            record["source"] = self.source
        return record


# --- results ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class BatchRow:
    record: dict[str, Any]
    position: int  # CSV: line the row starts on; JSONL: line; Parquet: row number (all 1-based)
    origin: str  # "file:<path>"


@dataclass(frozen=True, slots=True)
class BatchError:
    position: int
    field: str | None
    message: str
    raw: bytes  # the row's original text (CSV, JSONL) or its JSON (Parquet)
    origin: str
    code: str = BATCH_PARSE_ERROR

    def to_dead_letter(self, now: datetime, *, topic: str = BATCH_DLQ_TOPIC) -> DeadLetterRecord:
        original = OriginalMessage(self.origin, -1, self.position, None, self.raw)
        return build_dead_letter(
            original, code=self.code, stage=Stage.DECODE, message=self.message, now=now, field=self.field, topic=topic
        )


@dataclass
class BatchStats:
    rows: int = 0
    errors: int = 0
    unknown_columns: Counter[str] = field(default_factory=Counter)


def _origin(path: Path) -> str:
    return f"file:{path}"


def _coerce(
    coercer: RecordCoercer, row: Mapping[str, Any], position: int, raw: Callable[[], bytes], origin: str
) -> BatchRow | BatchError:
    try:
        return BatchRow(coercer(row), position, origin)
    except CoercionError as error:
        return BatchError(position, error.field, str(error), raw(), origin)


# --- readers ---------------------------------------------------------------------------------------------------
def read_csv(
    path: str | Path, *, coercer: RecordCoercer | None = None, stats: BatchStats | None = None
) -> Iterator[BatchRow | BatchError]:
    path = Path(path)
    coercer = coercer or RecordCoercer.for_raw_event()
    stats = stats if stats is not None else BatchStats()
    origin = _origin(path)
    consumed: list[str] = []  # lines the csv reader pulled for the current row: its original text
    line_number = 0

    with path.open(newline="", encoding="utf-8", errors="surrogateescape") as handle:

        def lines() -> Iterator[str]:
            nonlocal line_number
            for line in handle:
                line_number += 1
                consumed.append(line)
                yield line

        reader = csv.reader(lines())
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            raise ValueError(f"{path}: unreadable CSV header: {error}") from None
        header = [name.strip() for name in header]
        stats.unknown_columns.update(name for name in header if name not in coercer.names)
        while True:
            consumed.clear()
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as error:
                stats.errors += 1
                raw = "".join(consumed)
                yield BatchError(line_number - len(consumed) + 1, None, f"CSV: {error}", _bytes(raw), origin)
                continue
            if not cells:
                continue  # blank line
            start = line_number - len(consumed) + 1
            text = "".join(consumed)
            stats.rows += 1
            if len(cells) != len(header):
                stats.errors += 1
                message = f"{len(cells)} cells, the header has {len(header)}"
                yield BatchError(start, None, message, _bytes(text), origin)
                continue
            result = _coerce(coercer, dict(zip(header, cells, strict=True)), start, lambda t=text: _bytes(t), origin)
            if isinstance(result, BatchError):
                stats.errors += 1
            yield result


def _bytes(text: str) -> bytes:
    return text.rstrip("\r\n").encode("utf-8", "surrogateescape")


def read_jsonl(
    path: str | Path, *, coercer: RecordCoercer | None = None, stats: BatchStats | None = None
) -> Iterator[BatchRow | BatchError]:
    path = Path(path)
    coercer = coercer or RecordCoercer.for_raw_event()
    stats = stats if stats is not None else BatchStats()
    origin = _origin(path)
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            raw = line.rstrip(b"\r\n")
            if not raw.strip():
                continue
            stats.rows += 1
            try:
                row = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                stats.errors += 1
                yield BatchError(number, None, f"JSON: {error}", raw, origin)
                continue
            if not isinstance(row, dict):
                stats.errors += 1
                yield BatchError(number, None, f"JSON: a {type(row).__name__}, not an object", raw, origin)
                continue
            stats.unknown_columns.update(k for k in row if k not in coercer.names)
            result = _coerce(coercer, row, number, lambda r=raw: r, origin)
            if isinstance(result, BatchError):
                stats.errors += 1
            yield result


def read_parquet(
    path: str | Path,
    *,
    coercer: RecordCoercer | None = None,
    stats: BatchStats | None = None,
    batch_size: int = 10_000,
) -> Iterator[BatchRow | BatchError]:
    import pyarrow.parquet as pq  # heavy; only batch jobs pay for it

    path = Path(path)
    coercer = coercer or RecordCoercer.for_raw_event()
    stats = stats if stats is not None else BatchStats()
    origin = _origin(path)
    parquet = pq.ParquetFile(path)
    stats.unknown_columns.update(name for name in parquet.schema_arrow.names if name not in coercer.names)
    columns = [name for name in parquet.schema_arrow.names if name in coercer.names]
    position = 0
    for batch in parquet.iter_batches(batch_size=batch_size, columns=columns):
        for row in batch.to_pylist():
            position += 1
            stats.rows += 1
            result = _coerce(coercer, row, position, lambda r=row: json.dumps(r, default=str).encode(), origin)
            if isinstance(result, BatchError):
                stats.errors += 1
            yield result


def read_avro(
    path: str | Path, *, coercer: RecordCoercer | None = None, stats: BatchStats | None = None
) -> Iterator[BatchRow | BatchError]:
    """An Avro object container file (any writer schema: its records are coerced like JSON rows). A file that
    breaks off mid-way yields the rows before the break, then one error for the rest."""
    import fastavro

    path = Path(path)
    coercer = coercer or RecordCoercer.for_raw_event()
    stats = stats if stats is not None else BatchStats()
    origin = _origin(path)
    position = 0
    with path.open("rb") as handle:
        try:
            for row in fastavro.reader(handle):
                position += 1
                stats.rows += 1
                if not isinstance(row, dict):
                    stats.errors += 1
                    yield BatchError(position, None, "Avro: a record must be a record", b"", origin)
                    continue
                stats.unknown_columns.update(k for k in row if k not in coercer.names)
                result = _coerce(coercer, row, position, lambda r=row: json.dumps(r, default=str).encode(), origin)
                if isinstance(result, BatchError):
                    stats.errors += 1
                yield result
        except (ValueError, EOFError, OSError, StopIteration) as error:  # not Avro, or cut off
            stats.rows += 1
            stats.errors += 1
            yield BatchError(position + 1, None, f"Avro: {type(error).__name__}: {error}", b"", origin)


def read_file(
    path: str | Path,
    *,
    file_format: str | None = None,
    coercer: RecordCoercer | None = None,
    stats: BatchStats | None = None,
) -> Iterator[BatchRow | BatchError]:
    """Dispatch on `file_format` ("csv", "jsonl", "parquet", "avro") or the file extension."""
    path = Path(path)
    kind = file_format or FORMATS.get(path.suffix.lower())
    readers = {"csv": read_csv, "jsonl": read_jsonl, "parquet": read_parquet, "avro": read_avro}
    if kind not in readers:
        raise ValueError(f"{path}: unknown batch format {kind or path.suffix!r}; use one of {sorted(readers)}")
    return readers[kind](path, coercer=coercer, stats=stats)
