"""Avro single-object payloads to Arrow columns, a whole batch at once.

fastavro decodes one record at a time, ~50 us for a ProcessedEvent here (about 19k records/s): alone it would
cap the archiver and the validator far below their goals. Avro's binary encoding is sequential inside a record, but
the records of a batch are independent, so this decoder walks the *schema* once and decodes each field for
all records together with numpy: a cursor array holds every record's read position, a varint is read for all
records in a few vector operations, strings become one Arrow buffer gathered in one go. About 1 us a record.

Safety: a record is decoded here only if its header names the writer schema this decoder was built for. Any
record whose bytes do not fit (bad union branch, a length past its end, bytes left over, invalid UTF-8) is
flagged in the returned `bad` mask and must go through the reference path (the kit's `AvroDeserializer`, which
either decodes it or explains why not). Reads never leave the batch buffer, and lengths are checked against
each record's own end, so garbage costs a flag, not a crash or a huge allocation. Unit tests compare the
result with fastavro's on random records.

Supported: null, boolean, int, long, float, double, string, bytes, enum, fixed, arrays, maps, records,
`[null, X]` unions, and the logical types date, time-*, timestamp-*, local-timestamp-*, decimal (<= 38
digits). Other schemas raise `FastPathUnsupported`: use the reference path for them.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from services.kit.avro import HEADER_SIZE, Schema

_U64_7F = np.uint64(0x7F)


class FastPathUnsupported(ValueError):
    """The schema has a shape the columnar decoder does not cover."""


@dataclass
class _Cursor:
    """Read positions of a set of records, with their ends and whether each one is still well-formed."""

    pos: np.ndarray  # int64
    end: np.ndarray  # int64
    bad: np.ndarray  # bool

    def subset(self, rows: np.ndarray) -> _Cursor:
        return _Cursor(self.pos[rows], self.end[rows], self.bad[rows])

    def merge(self, rows: np.ndarray, sub: _Cursor) -> None:
        self.pos[rows] = sub.pos
        self.bad[rows] = sub.bad

    def __len__(self) -> int:
        return len(self.pos)


class _Reader:
    """The batch buffer and the primitive reads over it."""

    def __init__(self, data: np.ndarray) -> None:
        self.data = data
        self.buffer = pa.py_buffer(data)
        self.last = max(len(data) - 1, 0)

    def byte_at(self, positions: np.ndarray) -> np.ndarray:
        return self.data[np.minimum(positions, self.last)] if len(self.data) else np.zeros(len(positions), np.uint8)

    def long(self, cur: _Cursor) -> np.ndarray:
        """Zig-zag varints (Avro int and long) at each cursor; cursors move past them."""
        n = len(cur)
        if n == 0:
            return np.zeros(0, np.int64)
        first = self.byte_at(cur.pos)
        if not (first & 0x80).any():  # the common case: every value fits one byte
            cur.pos += 1
            value = first.astype(np.int64)
            return (value >> 1) ^ -(value & 1)
        raw = np.zeros(n, np.uint64)
        width = np.ones(n, np.int64)
        active = np.arange(n)
        for k in range(10):
            byte = self.byte_at(cur.pos[active] + k)
            raw[active] |= (byte.astype(np.uint64) & _U64_7F) << np.uint64(7 * k)
            more = byte >= 0x80
            width[active[~more]] = k + 1
            active = active[more]
            if active.size == 0:
                break
        if active.size:  # more than 10 bytes: not a varint
            cur.bad[active] = True
        cur.pos += width
        value = (raw >> np.uint64(1)).astype(np.int64) ^ -(raw & np.uint64(1)).astype(np.int64)
        return value

    def fixed_width(self, cur: _Cursor, width: int) -> np.ndarray:
        """`width` raw bytes per cursor as an (n, width) uint8 array."""
        overrun = cur.pos + width > cur.end
        cur.bad |= overrun
        index = np.minimum(cur.pos[:, None] + np.arange(width), self.last)
        cur.pos += width
        if not len(self.data):
            return np.zeros((len(cur), width), np.uint8)
        return self.data[index]

    def blobs(self, cur: _Cursor, kind: pa.DataType) -> pa.Array:
        """Length-prefixed bytes (string, bytes) as an Arrow array of `kind` (binary or string, not validated)."""
        length = self.lengths(cur)
        start = np.minimum(cur.pos, cur.end)
        cur.pos += length
        return self.gather(start, length, kind)

    def lengths(self, cur: _Cursor) -> np.ndarray:
        """The length prefix of bytes/string values; a length past the record's end flags the record."""
        length = self.long(cur)
        invalid = (length < 0) | (cur.pos + length > cur.end)
        if invalid.any():
            cur.bad |= invalid
            length = np.where(invalid, 0, length)
        return length

    def gather(self, start: np.ndarray, length: np.ndarray, kind: pa.DataType) -> pa.Array:
        """The byte ranges [start, start + length) as an Arrow binary/string array, copied by Arrow.

        Over the whole batch buffer, an array whose elements alternate between our values and the gaps
        between them (offsets s0, e0, s1, e1, ... never decrease: rows are in buffer order and a bad record's
        start is pinned inside it), then a `take` of every other element.
        """
        n = len(start)
        if n == 0:
            return pa.array([], kind)
        bounds = np.empty(2 * n, np.int32)  # the batch buffer is < 2 GiB (ColumnarDecoder.decode)
        bounds[0::2] = start
        bounds[1::2] = start + length
        interleaved = pa.Array.from_buffers(pa.binary(), 2 * n - 1, [None, pa.py_buffer(bounds), self.buffer])
        taken = interleaved.take(pa.array(np.arange(0, 2 * n, 2, dtype=np.int32)))
        return taken if kind == pa.binary() else taken.view(kind)


def _offsets_and_values(array: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """The int64 offsets (rebased to 0) and the value bytes of a binary array."""
    _, offsets_buffer, data_buffer = array.buffers()
    offsets = np.frombuffer(offsets_buffer, np.int32)[array.offset : array.offset + len(array) + 1].astype(np.int64)
    values = np.frombuffer(data_buffer, np.uint8) if data_buffer is not None else np.zeros(0, np.uint8)
    values = values[offsets[0] : offsets[-1]]
    return offsets - offsets[0], values


# --- the schema, compiled to one decode function per node --------------------------------------------------------
Decode = Any  # Callable[[_Reader, _Cursor], pa.Array]


def _primitive(kind: str, logical: str | None, spec: dict[str, Any]) -> Decode:
    if logical == "decimal" and kind == "bytes":
        precision, scale = int(spec["precision"]), int(spec.get("scale", 0))
        if precision > 38:
            raise FastPathUnsupported("decimal precision > 38")
        target = pa.decimal128(precision, scale)

        def decimal_bytes(reader: _Reader, cur: _Cursor) -> pa.Array:
            offsets, values = _offsets_and_values(reader.blobs(cur, pa.binary()))
            return _decimal_from_big_endian(target, offsets, values, cur)

        return decimal_bytes
    if kind in ("string", "bytes"):
        arrow_kind = pa.string() if kind == "string" else pa.binary()

        def blob(reader: _Reader, cur: _Cursor) -> pa.Array:
            return _checked_utf8(reader.blobs(cur, arrow_kind), cur)

        def blob_masked(reader: _Reader, cur: _Cursor, present: np.ndarray) -> pa.Array:
            rows = np.nonzero(present)[0]
            sub = cur.subset(rows)
            length_present = reader.lengths(sub)
            start_present = np.minimum(sub.pos, sub.end)
            sub.pos += length_present
            start = np.minimum(cur.pos, cur.end)  # a null value takes no bytes: an empty range where it is
            cur.merge(rows, sub)
            start[rows] = start_present
            length = np.zeros(len(cur), np.int64)
            length[rows] = length_present
            taken = reader.gather(start, length, arrow_kind)
            return _checked_utf8(_with_validity(taken, present, rows.size), cur)

        blob.masked = blob_masked  # type: ignore[attr-defined]
        return blob
    if kind in ("int", "long"):
        arrow_kind = {
            ("int", None): pa.int32(),
            ("long", None): pa.int64(),
            ("int", "date"): pa.date32(),
            ("int", "time-millis"): pa.time32("ms"),
            ("long", "time-micros"): pa.time64("us"),
            ("long", "timestamp-millis"): pa.timestamp("ms", tz="UTC"),
            ("long", "timestamp-micros"): pa.timestamp("us", tz="UTC"),
            ("long", "local-timestamp-millis"): pa.timestamp("ms"),
            ("long", "local-timestamp-micros"): pa.timestamp("us"),
        }.get((kind, logical)) or (pa.int32() if kind == "int" else pa.int64())
        numpy_kind = np.int32 if arrow_kind.bit_width == 32 else np.int64
        low, high = (-(2**31), 2**31 - 1) if kind == "int" else (None, None)

        def values(reader: _Reader, cur: _Cursor) -> np.ndarray:
            value = reader.long(cur)
            if low is not None:
                out_of_range = (value < low) | (value > high)
                if out_of_range.any():
                    cur.bad |= out_of_range
                    value = np.where(out_of_range, 0, value)
            return value.astype(numpy_kind)

        def integer(reader: _Reader, cur: _Cursor) -> pa.Array:
            data = values(reader, cur)
            return pa.Array.from_buffers(arrow_kind, len(data), [None, pa.py_buffer(data)])

        integer.masked = _masked_fixed(values, arrow_kind, numpy_kind)  # type: ignore[attr-defined]
        return integer
    if kind in ("float", "double"):
        width, numpy_kind, arrow_kind = (4, "<f4", pa.float32()) if kind == "float" else (8, "<f8", pa.float64())

        def float_values(reader: _Reader, cur: _Cursor) -> np.ndarray:
            return np.ascontiguousarray(reader.fixed_width(cur, width)).view(numpy_kind).reshape(-1)

        def floating(reader: _Reader, cur: _Cursor) -> pa.Array:
            data = float_values(reader, cur)
            return pa.Array.from_buffers(arrow_kind, len(data), [None, pa.py_buffer(data)])

        floating.masked = _masked_fixed(float_values, arrow_kind, numpy_kind)  # type: ignore[attr-defined]
        return floating
    if kind == "boolean":

        def boolean(reader: _Reader, cur: _Cursor) -> pa.Array:
            raw = reader.fixed_width(cur, 1).reshape(-1)
            cur.bad |= raw > 1
            return pa.array(raw == 1, pa.bool_())

        return boolean
    if kind == "null":
        return lambda reader, cur: pa.nulls(len(cur))
    raise FastPathUnsupported(f"Avro type {kind!r}")


def _with_validity(array: pa.Array, present: np.ndarray, valid_count: int) -> pa.Array:
    """`array` (offset 0) with nulls where `present` is False."""
    if valid_count == len(present):
        return array
    validity = pa.py_buffer(np.packbits(present, bitorder="little"))
    return pa.Array.from_buffers(
        array.type, len(array), [validity, *array.buffers()[1:]], null_count=len(present) - valid_count
    )


def _checked_utf8(array: pa.Array, cur: _Cursor) -> pa.Array:
    """Flag the records whose string is not valid UTF-8 (and blank it, so the array is valid)."""
    if array.type != pa.string():
        return array
    try:
        array.validate(full=True)
        return array
    except pa.ArrowInvalid:
        pass
    cleaned = []
    for row, value in enumerate(array.view(pa.binary()).to_pylist()):
        if value is not None:
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                cur.bad[row] = True
                value = b""
        cleaned.append(value)
    return pa.array(cleaned, pa.binary()).view(pa.string())


def _masked_fixed(values: Any, arrow_kind: pa.DataType, numpy_kind: Any) -> Decode:
    """A fixed-width decoder for the rows where `present` holds (the others are null and take no bytes)."""

    def masked(reader: _Reader, cur: _Cursor, present: np.ndarray) -> pa.Array:
        rows = np.nonzero(present)[0]
        sub = cur.subset(rows)
        data = np.zeros(len(cur), numpy_kind)
        data[rows] = values(reader, sub)
        cur.merge(rows, sub)
        return _with_validity(
            pa.Array.from_buffers(arrow_kind, len(data), [None, pa.py_buffer(data)]), present, rows.size
        )

    return masked


def _decimal_from_big_endian(target: pa.DataType, offsets: np.ndarray, values: np.ndarray, cur: _Cursor) -> pa.Array:
    """Two's-complement big-endian bytes (Avro decimal) to Arrow decimal128 (16 bytes little-endian)."""
    n = len(offsets) - 1
    length = np.diff(offsets)
    too_long = length > 16
    if too_long.any():
        cur.bad |= too_long
        length = np.where(too_long, 0, length)
    start = offsets[:-1]
    out = np.zeros((n, 16), np.uint8)
    has_bytes = length > 0
    if len(values):
        negative = has_bytes & (values[np.minimum(start, len(values) - 1)] >= 0x80)
        out[negative] = 0xFF
        for j in range(16):
            rows = np.nonzero(length > j)[0]
            if rows.size == 0:
                break
            out[rows, j] = values[start[rows] + length[rows] - 1 - j]
    return pa.Array.from_buffers(target, n, [None, pa.py_buffer(out)])


def _take_with_nulls(values: pa.Array, rows: np.ndarray, n: int) -> pa.Array:
    """An array of length n holding `values` at `rows` and null elsewhere."""
    if len(rows) == n:
        return values
    index = np.full(n, -1, np.int64)
    index[rows] = np.arange(len(rows))
    return values.take(pa.array(index, mask=index < 0))


def _compile(node: Any, named: dict[str, Any]) -> Decode:
    if isinstance(node, str):
        if node in named:
            return named[node]
        return _primitive(node, None, {})
    if isinstance(node, list):
        return _union(node, named)
    kind = node["type"]
    if isinstance(kind, (dict, list)):
        return _compile(kind, named)
    logical = node.get("logicalType")
    if kind == "record":
        return _record(node, named)
    if kind == "enum":
        symbols = pa.array(node["symbols"], pa.string())
        count = len(symbols)

        def enum(reader: _Reader, cur: _Cursor) -> pa.Array:
            index = reader.long(cur)
            invalid = (index < 0) | (index >= count)
            if invalid.any():
                cur.bad |= invalid
                index = np.where(invalid, 0, index)
            return symbols.take(pa.array(index))

        _register(node, enum, named)
        return enum
    if kind == "fixed":
        size = int(node["size"])
        if logical == "decimal":
            precision, scale = int(node["precision"]), int(node.get("scale", 0))
            if precision > 38 or size > 16:
                raise FastPathUnsupported("decimal precision > 38")
            target = pa.decimal128(precision, scale)

            def fixed_decimal(reader: _Reader, cur: _Cursor) -> pa.Array:
                raw = reader.fixed_width(cur, size).reshape(-1)
                offsets = np.arange(len(cur) + 1, dtype=np.int64) * size
                return _decimal_from_big_endian(target, offsets, raw, cur)

            _register(node, fixed_decimal, named)
            return fixed_decimal

        def fixed(reader: _Reader, cur: _Cursor) -> pa.Array:
            raw = np.ascontiguousarray(reader.fixed_width(cur, size))
            return pa.Array.from_buffers(pa.binary(size), len(cur), [None, pa.py_buffer(raw)])

        _register(node, fixed, named)
        return fixed
    if kind == "array":
        items = _compile(node["items"], named)
        return _repeated(items, None)
    if kind == "map":
        values = _compile(node["values"], named)
        keys = _primitive("string", None, {})
        return _repeated(values, keys)
    return _primitive(kind, logical, node)


def _register(node: dict[str, Any], decode: Decode, named: dict[str, Any]) -> None:
    name = node.get("name")
    if name:
        named[name] = decode
        namespace = node.get("namespace")
        if namespace:
            named[f"{namespace}.{name}"] = decode


def _union(branches: list[Any], named: dict[str, Any]) -> Decode:
    if len(branches) != 2 or "null" not in branches or branches[0] == branches[1]:
        raise FastPathUnsupported(f"union {branches!r} (only [null, X])")
    null_index = branches.index("null")
    child = _compile(branches[1 - null_index], named)

    masked = getattr(child, "masked", None)

    def nullable(reader: _Reader, cur: _Cursor) -> pa.Array:
        branch = reader.long(cur)
        present = branch == 1 - null_index
        cur.bad |= ~(present | (branch == null_index))
        if present.all():
            return child(reader, cur)
        if masked is not None:  # scalar types: decode in place, nulls take no bytes
            return masked(reader, cur, present)
        rows = np.nonzero(present)[0]
        sub = cur.subset(rows)
        values = child(reader, sub)
        cur.merge(rows, sub)
        return _take_with_nulls(values, rows, len(cur))

    return nullable


def _record(node: dict[str, Any], named: dict[str, Any]) -> Decode:
    fields: list[tuple[str, Decode]] = []

    def record(reader: _Reader, cur: _Cursor) -> pa.Array:
        arrays = [decode(reader, cur) for _, decode in fields]
        return pa.StructArray.from_arrays(arrays, names=[name for name, _ in fields])

    _register(node, record, named)  # before the fields: a recursive reference finds it
    fields.extend((f["name"], _compile(f["type"], named)) for f in node["fields"])
    record.fields = fields  # type: ignore[attr-defined]
    return record


def _repeated(values: Decode, keys: Decode | None) -> Decode:
    """Avro arrays and maps: blocks of items (a negative count is followed by the block's size in bytes)."""

    def decode(reader: _Reader, cur: _Cursor) -> pa.Array:
        n = len(cur)
        counts = np.zeros(n, np.int64)
        remaining = _block_count(reader, cur)
        key_parts: list[pa.Array] = []
        value_parts: list[pa.Array] = []
        owners: list[np.ndarray] = []
        for _ in range(int(np.max(cur.end - cur.pos, initial=0)) + 1):  # an item takes >= 1 byte: bounded
            rows = np.nonzero(remaining > 0)[0]
            if rows.size == 0:
                break
            sub = cur.subset(rows)
            if keys is not None:
                key_parts.append(keys(reader, sub))
            value_parts.append(values(reader, sub))
            cur.merge(rows, sub)
            owners.append(rows)
            counts[rows] += 1
            remaining[rows] -= 1
            ended = rows[remaining[rows] == 0]
            if ended.size:
                sub = cur.subset(ended)
                remaining[ended] = _block_count(reader, sub)
                cur.merge(ended, sub)
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        if owners:
            # Items were read round by round (one item per record per round); sort them back into record order.
            order = pa.array(np.argsort(np.concatenate(owners), kind="stable"))
            flat_values = pa.concat_arrays(value_parts).take(order)
            flat_keys = pa.concat_arrays(key_parts).take(order) if keys is not None else None
        else:  # no items at all: empty arrays of the right types, from the item decoders themselves
            nothing = _Cursor(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool))
            flat_values = values(reader, nothing)
            flat_keys = keys(reader, nothing) if keys is not None else None
        arrow_offsets = pa.array(offsets.astype(np.int32), pa.int32())
        if keys is None:
            return pa.ListArray.from_arrays(arrow_offsets, flat_values)
        return pa.MapArray.from_arrays(arrow_offsets, flat_keys, flat_values)

    return decode


def _block_count(reader: _Reader, cur: _Cursor) -> np.ndarray:
    count = reader.long(cur)
    negative = count < 0
    if negative.any():
        rows = np.nonzero(negative)[0]
        sub = cur.subset(rows)
        reader.long(sub)  # the block's size in bytes: not needed
        cur.merge(rows, sub)
        count = np.abs(count)
    impossible = count > cur.end - cur.pos
    if impossible.any():
        cur.bad |= impossible
        count = np.where(impossible, 0, count)
    return np.where(cur.bad, 0, count)


# --- the decoder -------------------------------------------------------------------------------------------------
@dataclass
class ColumnBatch:
    """Decoded columns (natural Arrow types of the writer schema) and which payloads did not decode."""

    columns: dict[str, pa.Array]  # only rows not flagged bad, in payload order
    good: np.ndarray  # indices of the payloads the columns hold
    bad: np.ndarray  # indices of payloads to send through the reference path
    # field name -> for each good row, where that top-level field's encoding ends, as an offset into its payload
    # (only the fields asked for in `decode(ends_of=...)`): lets a caller copy encoded fields as they are
    ends: dict[str, np.ndarray] = field(default_factory=dict)


class ColumnarDecoder:
    """Decodes the single-object payloads written with one writer schema (record at the top level)."""

    def __init__(self, writer: Schema) -> None:
        definition = writer.definition
        if definition.get("type") != "record":
            raise FastPathUnsupported("the top-level type must be a record")
        self.writer = writer
        self._header = np.frombuffer(writer.header, np.uint8)
        self._root = _record(definition, {})
        self.field_names = [name for name, _ in self._root.fields]

    def decode(self, payloads: Sequence[bytes | None], *, ends_of: Collection[str] = ()) -> ColumnBatch:
        """`ends_of`: top-level fields whose end offsets to report (`ColumnBatch.ends`)."""
        values = [p or b"" for p in payloads]
        lengths = np.array(list(map(len, values)), np.int64)
        data = np.frombuffer(b"".join(values), np.uint8)
        if len(data) >= 2**31:
            raise OverflowError("a batch must hold less than 2 GiB of payloads: decode smaller batches")
        ends = np.cumsum(lengths)
        starts = ends - lengths
        reader = _Reader(data)
        bad = lengths < HEADER_SIZE
        candidates = np.nonzero(~bad)[0]
        if candidates.size:
            header = data[starts[candidates, None] + np.arange(HEADER_SIZE)]
            bad[candidates[(header != self._header).any(axis=1)]] = True
        rows = np.nonzero(~bad)[0]
        cur = _Cursor(starts[rows] + HEADER_SIZE, ends[rows], np.zeros(rows.size, bool))
        arrays = []
        ends: dict[str, np.ndarray] = {}
        for name, decode in self._root.fields:
            arrays.append(decode(reader, cur))
            if name in ends_of:
                ends[name] = cur.pos - starts[rows]
        cur.bad |= cur.pos != cur.end
        ok = ~cur.bad
        bad[rows[cur.bad]] = True
        if not ok.all():
            mask = pa.array(ok)
            arrays = [a.filter(mask) for a in arrays]
            ends = {name: end[ok] for name, end in ends.items()}
        return ColumnBatch(dict(zip(self.field_names, arrays, strict=True)), rows[ok], np.nonzero(bad)[0], ends)
