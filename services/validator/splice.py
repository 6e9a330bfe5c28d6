"""events.processed payloads built from columns and from the raw payloads' own bytes, a batch at once.

An Avro record is the concatenation of its fields' encodings, and processed_event begins with raw_event's
fields in raw_event's order. Fields 4 to 17 (session_id ... properties) have the same types in both, so their
bytes are copied from the raw payload as they are; fields 0 to 3 (event_id, event_type, event_time, user_id)
are `[null, X]` unions in raw_event and plain `X` in processed_event, so each is copied without its one-byte
branch index. What follows is built once per distinct value and gathered per row: the user and the product
blocks (per reference row), the event-time block (per UTC hour), the quality flags (per set of flags), and the
batch's validated_at and rules_version. Every block is encoded by the same serializer as a whole record would
be, so the payload is byte for byte what `AvroSerializer(processed_event)` writes (a unit test compares them).

A row qualifies only if its payload was decoded column-wise with the current raw writer, none of its ids was
rewritten to canonical form, and no key of its properties names an e-mail address (those values are hashed).
The caller encodes the others from dicts, the reference way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from services.kit.avro import HEADER_SIZE, AvroSerializer, Schema
from services.validator.enrich import PRODUCT_FIELDS, USER_FIELDS, is_email_key
from services.validator.references import ReferenceStore

# raw_event's leading [null, X] fields, which processed_event has as plain X, then the rest copied as it is
LEADING_UNIONS = ("event_id", "event_type", "event_time", "user_id")
COPIED_UNTIL = "properties"  # the last raw field; fields after user_id up to it are copied verbatim
ENDS_NEEDED = (*LEADING_UNIONS, COPIED_UNTIL)
TIME_FIELDS = ("event_date", "event_hour", "day_of_week", "is_weekend")
_MS_PER_DAY = 86_400_000
_MS_PER_HOUR = 3_600_000
MAX_CACHED_BLOCKS = 200_000


def _part_serializer(processed: Schema, names: Sequence[str]) -> Callable[[Mapping[str, Any]], bytes]:
    """The encoding of `names` (consecutive fields of processed_event) for one record, without a header."""
    fields = [f for f in processed.definition["fields"] if f["name"] in names]
    schema = Schema.from_definition(f"{processed.name}_part", {**processed.definition, "fields": fields})
    serialize = AvroSerializer(schema)
    return lambda record: serialize(record)[HEADER_SIZE:]


def email_keyed_rows(properties: pa.Array) -> np.ndarray:
    """Rows whose properties map has a key naming an e-mail address (their values must be hashed)."""
    offsets = np.asarray(properties.offsets.to_numpy(zero_copy_only=False), np.int64)
    keys = properties.keys
    if len(keys) == 0:
        return np.zeros(len(properties), bool)
    encoded = pc.dictionary_encode(keys)
    named = np.fromiter((is_email_key(k) for k in encoded.dictionary.to_pylist()), bool)
    flagged = named[np.asarray(encoded.indices.to_numpy(zero_copy_only=False), np.int64)]
    counts = np.concatenate(([0], np.cumsum(flagged)))
    return counts[offsets[1:]] - counts[offsets[:-1]] > 0


class ProcessedEventEncoder:
    """Builds processed_event payloads for accepted rows from their raw payloads and the batch's columns."""

    def __init__(self, processed: Schema, references: ReferenceStore) -> None:
        self.header = processed.header
        self.references = references
        self._user = _part_serializer(processed, tuple(USER_FIELDS))
        self._product = _part_serializer(processed, tuple(PRODUCT_FIELDS))
        self._time = _part_serializer(processed, TIME_FIELDS)
        self._flags = _part_serializer(processed, ("quality_flags",))
        self._tail = _part_serializer(processed, ("validated_at", "rules_version"))
        self._no_user = self._user(dict.fromkeys(USER_FIELDS))
        self._no_product = self._product(dict.fromkeys(PRODUCT_FIELDS))
        self._blocks: dict[tuple[str, Any], tuple[Any, bytes]] = {}  # (table, key) -> (the view it encodes, bytes)
        self._time_blocks: dict[int, bytes] = {}
        self._flag_blocks: dict[tuple[str, ...], bytes] = {(): self._flags({"quality_flags": []})}

    def encode(
        self,
        payloads: Sequence[bytes],
        ends: Mapping[str, np.ndarray],
        user_ids: pa.Array,
        product_ids: pa.Array,
        event_times: pa.Array,
        flags: Sequence[tuple[str, ...]],
        validated_at: datetime,
        rules_version: str,
    ) -> list[bytes]:
        """The payload of each row. `payloads`: the rows' raw payloads (current writer); `ends`: where each of
        `ENDS_NEEDED` ends in them (`ColumnarDecoder.decode(ends_of=...)`); the id columns are canonical and
        `event_times` is non-null (accepted rows)."""
        size = len(payloads)
        if size == 0:
            return []
        data = np.frombuffer(b"".join(payloads), np.uint8)
        lengths = np.fromiter(map(len, payloads), np.int64, size)
        starts = np.cumsum(lengths) - lengths
        buffer = pa.py_buffer(data)
        # [after the header and event_id's branch, event_id's end), then each next union field without its branch
        segments = []
        begin = starts + HEADER_SIZE + 1
        for name in LEADING_UNIONS:
            end = starts + ends[name]
            segments.append((begin, end))
            begin = end + 1
        segments.append((starts + ends[LEADING_UNIONS[-1]], starts + ends[COPIED_UNTIL]))
        copied = _gather_rows(buffer, segments)
        parts = [
            pa.scalar(self.header, pa.binary()),
            copied,
            self._reference_blocks("users", user_ids, self._no_user),
            self._reference_blocks("products", product_ids, self._no_product),
            self._time_column(event_times),
            pa.array([self._flag_block(f) for f in flags], pa.binary()),
            pa.scalar(self._tail({"validated_at": validated_at, "rules_version": rules_version}), pa.binary()),
        ]
        return pc.binary_join_element_wise(*parts, pa.scalar(b"", pa.binary())).to_pylist()

    # -- blocks ----------------------------------------------------------------------------------------------------
    def _reference_blocks(self, table: str, keys: pa.Array, missing: bytes) -> pa.Array:
        encoded = pc.dictionary_encode(keys)
        view, blocks, cache = self.references.view, [], self._blocks
        encode = self._user if table == "users" else self._product
        for key in encoded.dictionary.to_pylist():
            row = view(table, key)
            if row is None:
                blocks.append(missing)
                continue
            cached = cache.get((table, key))
            if cached is None or cached[0] is not row:  # the store replaces a view when its row changes
                if len(cache) >= MAX_CACHED_BLOCKS:
                    cache.clear()
                cached = cache[(table, key)] = (row, encode(row))
            blocks.append(cached[1])
        indices = encoded.indices
        if indices.null_count:  # a null id: no reference (the null block)
            blocks.append(missing)
            indices = pc.fill_null(indices, len(blocks) - 1)
        return pa.array(blocks, pa.binary()).take(indices)

    def _time_column(self, event_times: pa.Array) -> pa.Array:
        millis = np.asarray(pc.cast(event_times, pa.int64()).to_numpy(zero_copy_only=False), np.int64)
        hours = millis // _MS_PER_HOUR  # floor: correct before 1970 too
        unique, inverse = np.unique(hours, return_inverse=True)
        blocks = []
        for hour in unique.tolist():
            block = self._time_blocks.get(hour)
            if block is None:
                moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(hours=hour)
                weekday = moment.isoweekday()
                fields = {
                    "event_date": moment.date(),
                    "event_hour": moment.hour,
                    "day_of_week": weekday,
                    "is_weekend": weekday >= 6,
                }
                if len(self._time_blocks) >= MAX_CACHED_BLOCKS:
                    self._time_blocks.clear()
                block = self._time_blocks[hour] = self._time(fields)
            blocks.append(block)
        return pa.array(blocks, pa.binary()).take(pa.array(inverse.reshape(-1)))

    def _flag_block(self, flags: tuple[str, ...]) -> bytes:
        block = self._flag_blocks.get(flags)
        if block is None:
            if len(self._flag_blocks) >= 10_000:
                self._flag_blocks = {(): self._flag_blocks[()]}
            block = self._flag_blocks[flags] = self._flags({"quality_flags": list(flags)})
        return block


def _gather_rows(buffer: pa.Buffer, segments: Sequence[tuple[np.ndarray, np.ndarray]]) -> pa.Array:
    """Per row, the concatenation of its byte ranges [begin, end) of `buffer`, in order, as one binary array.

    The ranges of all rows, in buffer order, interleaved with the gaps between them, form one binary array over
    the buffer (offsets never decrease); taking every other element and joining each row's pieces in Arrow
    copies the bytes without a Python object per piece."""
    pieces = len(segments)
    size = len(segments[0][0])
    bounds = np.empty((size, pieces, 2), np.int64)
    for index, (begin, end) in enumerate(segments):
        bounds[:, index, 0] = begin
        bounds[:, index, 1] = end
    flat = bounds.reshape(-1)
    offsets = pa.py_buffer(flat.astype(np.int32))
    interleaved = pa.Array.from_buffers(pa.binary(), len(flat) - 1, [None, offsets, buffer])
    taken = interleaved.take(pa.array(np.arange(0, len(flat), 2, dtype=np.int32)))
    # every row's pieces as a list, joined
    lists = pa.ListArray.from_arrays(pa.array(np.arange(0, size * pieces + 1, pieces, dtype=np.int32)), taken)
    return pc.binary_join(lists, pa.scalar(b"", pa.binary()))


__all__ = ["ENDS_NEEDED", "ProcessedEventEncoder", "email_keyed_rows"]
