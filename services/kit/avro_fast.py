"""A faster Avro encoder for flat records, with fastavro as the referee.

fastavro's `schemaless_writer` spends most of its time picking union branches: on raw_event (17 nullable
fields) it costs ~25-30 us a record here, the largest CPU share of producing an event. For flat records (fields
of primitive types, `[null, X]` unions, maps and arrays of primitives, timestamp-millis and date) the encoding
is simple enough to compile into one small closure per field, ~3-4x faster. The fast path accepts only exact
Python types (str, int in range, float, bool, bytes, dict, list, aware datetime, date); anything else -- another
type, a missing field, a value out of range -- goes to fastavro, which either encodes it (same bytes) or raises
its usual error. Schemas with other shapes (nested records, enums, decimals, ...) always use fastavro. The unit
tests compare both byte for byte.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime, timedelta
from typing import Any

Append = Callable[[bytes], None]
FieldWriter = Callable[[Any, Append], None]

INT_RANGE = (-(2**31), 2**31 - 1)
LONG_RANGE = (-(2**63), 2**63 - 1)
_PACK_DOUBLE = struct.Struct("<d").pack
_PACK_FLOAT = struct.Struct("<f").pack
_NULL = b"\x00"


class _Unsupported(Exception):
    """The schema has a shape the fast path does not cover."""


def zigzag_varint(value: int) -> bytes:
    """Avro's int/long encoding: zig-zag, then base-128 little-endian varint."""
    value = (value << 1) ^ (value >> 63)
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_SMALL = [zigzag_varint(n) for n in range(16_384)]  # lengths and counts: a lookup instead of a loop


def _length(n: int) -> bytes:
    return _SMALL[n] if n < 16_384 else zigzag_varint(n)


_LARGE: dict[int, bytes] = {}  # timestamps and dates repeat (a batch's validated_at, a day's event_date)


def _large(value: int) -> bytes:
    encoded = _LARGE.get(value)
    if encoded is None:
        if len(_LARGE) >= 4096:
            _LARGE.clear()
        encoded = _LARGE[value] = zigzag_varint(value)
    return encoded


def _integer(low: int, high: int) -> FieldWriter:
    def write(value: Any, append: Append) -> None:
        if type(value) is not int or not low <= value <= high:
            raise TypeError("not an in-range int")
        append(_SMALL[value] if 0 <= value < 16_384 else _large(value))

    return write


def _string(value: Any, append: Append) -> None:
    if type(value) is not str:
        raise TypeError("not a str")
    data = value.encode()
    append(_length(len(data)))
    append(data)


def _bytes(value: Any, append: Append) -> None:
    if type(value) is not bytes:
        raise TypeError("not bytes")
    append(_length(len(value)))
    append(value)


def _double(value: Any, append: Append) -> None:
    if type(value) is not float:
        raise TypeError("not a float")
    append(_PACK_DOUBLE(value))


def _float(value: Any, append: Append) -> None:
    if type(value) is not float:
        raise TypeError("not a float")
    append(_PACK_FLOAT(value))


def _boolean(value: Any, append: Append) -> None:
    if type(value) is not bool:
        raise TypeError("not a bool")
    append(b"\x01" if value else b"\x00")


def _null(value: Any, append: Append) -> None:
    if value is not None:
        raise TypeError("not None")


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_long = _integer(*LONG_RANGE)


def _timestamp_millis(value: Any, append: Append) -> None:
    """An int as is, an aware datetime as whole milliseconds since the epoch (as fastavro computes them)."""
    if type(value) is datetime:
        if value.tzinfo is None:
            raise TypeError("naive datetime")  # fastavro's own rules decide
        delta = value - _EPOCH
        value = (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000
    _long(value, append)


_EPOCH_DATE = date(1970, 1, 1)
_int = _integer(*INT_RANGE)


def _date(value: Any, append: Append) -> None:
    """An int as is, a `date` (not a datetime: fastavro decides those) as days since the epoch."""
    if type(value) is date:
        value = (value - _EPOCH_DATE).days
    _int(value, append)


_PRIMITIVES: dict[str, FieldWriter] = {
    "null": _null,
    "boolean": _boolean,
    "int": _integer(*INT_RANGE),
    "long": _integer(*LONG_RANGE),
    "float": _float,
    "double": _double,
    "string": _string,
    "bytes": _bytes,
}


def _map(values: FieldWriter) -> FieldWriter:
    def write(value: Any, append: Append) -> None:
        if type(value) is not dict:
            raise TypeError("not a dict")
        if value:
            append(_length(len(value)))  # one block with all entries, then the empty block that ends the map
            for key, item in value.items():
                _string(key, append)
                values(item, append)
        append(_NULL)

    return write


def _array(items: FieldWriter) -> FieldWriter:
    def write(value: Any, append: Append) -> None:
        if type(value) is not list:
            raise TypeError("not a list")
        if value:
            append(_length(len(value)))  # one block with all items, then the empty block, as fastavro writes
            for item in value:
                items(item, append)
        append(_NULL)

    return write


def _nullable(null_index: int, inner: FieldWriter) -> FieldWriter:
    null_branch, value_branch = _SMALL[null_index], _SMALL[1 - null_index]

    def write(value: Any, append: Append) -> None:
        if value is None:
            append(null_branch)
        else:
            append(value_branch)
            inner(value, append)

    return write


def _writer(avro_type: Any, in_union: bool = False) -> FieldWriter:
    if isinstance(avro_type, str):
        if avro_type not in _PRIMITIVES:
            raise _Unsupported(f"named type {avro_type}")
        return _PRIMITIVES[avro_type]
    if isinstance(avro_type, dict):
        kind = avro_type.get("type")
        if kind == "map":
            values = avro_type["values"]
            if not isinstance(values, str) or values not in _PRIMITIVES:
                raise _Unsupported("map of a complex type")
            return _map(_PRIMITIVES[values])
        if kind == "array":
            items = avro_type["items"]
            if not isinstance(items, str) or items not in _PRIMITIVES:
                raise _Unsupported("array of a complex type")
            return _array(_PRIMITIVES[items])
        if kind == "long" and avro_type.get("logicalType") == "timestamp-millis":
            return _timestamp_millis
        if kind == "int" and avro_type.get("logicalType") == "date":
            return _date
        if kind in ("int", "long", "string"):
            # Another logical type (date, uuid, ...): the fast path takes only the underlying value (an int, a
            # str); a date, UUID, ... falls back to fastavro's conversions.
            return _PRIMITIVES[kind]
        raise _Unsupported(f"type {kind}")
    if isinstance(avro_type, list) and not in_union:
        if len(avro_type) == 2 and "null" in avro_type:
            null_index = avro_type.index("null")
            return _nullable(null_index, _writer(avro_type[1 - null_index], in_union=True))
        raise _Unsupported("union other than [null, X]")
    raise _Unsupported(repr(avro_type))


def compile_plan(definition: Mapping[str, Any]) -> list[tuple[str, FieldWriter]] | None:
    """(field name, writer) per field of a flat record schema, or None if any field needs fastavro."""
    if definition.get("type") != "record":
        return None
    try:
        return [(field["name"], _writer(field["type"])) for field in definition["fields"]]
    except _Unsupported:
        return None


# --- reading -------------------------------------------------------------------------------------------------------
# The same flat shapes, decoded by one closure per field over the payload's bytes and a position. fastavro's
# reader costs ~30 us a raw event here (a BytesIO and a generic dispatch per field); this one about a third.
# Values are exactly fastavro's (aware UTC datetimes for timestamp-millis, dates for date); the unit tests
# compare both on generated and on random, corrupt input. Truncated input raises EOFError, anything malformed
# ValueError (or UnicodeDecodeError for a string that is not UTF-8): the caller's error mapping applies.

FieldReader = Callable[[bytes, int], tuple[Any, int]]
_UNPACK_DOUBLE = struct.Struct("<d").unpack_from
_UNPACK_FLOAT = struct.Struct("<f").unpack_from


def _read_long(data: bytes, pos: int) -> tuple[int, int]:
    byte = data[pos]
    pos += 1
    if byte < 0x80:
        return (byte >> 1) ^ -(byte & 1), pos
    value, shift = byte & 0x7F, 7
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return (value >> 1) ^ -(value & 1), pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _read_int(data: bytes, pos: int) -> tuple[int, int]:
    value, pos = _read_long(data, pos)
    if not INT_RANGE[0] <= value <= INT_RANGE[1]:
        raise ValueError("int out of range")
    return value, pos


def _read_bytes(data: bytes, pos: int) -> tuple[bytes, int]:
    size, pos = _read_long(data, pos)
    end = pos + size
    if size < 0 or end > len(data):
        raise EOFError("bytes or string beyond the end of the payload")
    return data[pos:end], end


def _read_string(data: bytes, pos: int) -> tuple[str, int]:
    raw, pos = _read_bytes(data, pos)
    return raw.decode(), pos


def _read_double(data: bytes, pos: int) -> tuple[float, int]:
    if pos + 8 > len(data):
        raise EOFError("double beyond the end of the payload")
    return _UNPACK_DOUBLE(data, pos)[0], pos + 8


def _read_float(data: bytes, pos: int) -> tuple[float, int]:
    if pos + 4 > len(data):
        raise EOFError("float beyond the end of the payload")
    return _UNPACK_FLOAT(data, pos)[0], pos + 4


def _read_boolean(data: bytes, pos: int) -> tuple[bool, int]:
    byte = data[pos]
    if byte > 1:
        raise ValueError("boolean byte not 0 or 1")
    return byte == 1, pos + 1


def _read_null(_data: bytes, pos: int) -> tuple[None, int]:
    return None, pos


def _read_timestamp_millis(data: bytes, pos: int) -> tuple[datetime, int]:
    millis, pos = _read_long(data, pos)
    return _EPOCH + timedelta(milliseconds=millis), pos


def _read_date(data: bytes, pos: int) -> tuple[date, int]:
    days, pos = _read_int(data, pos)
    return _EPOCH_DATE + timedelta(days=days), pos


_PRIMITIVE_READERS: dict[str, FieldReader] = {
    "null": _read_null,
    "boolean": _read_boolean,
    "int": _read_int,
    "long": _read_long,
    "float": _read_float,
    "double": _read_double,
    "string": _read_string,
    "bytes": _read_bytes,
}


def _block_count(data: bytes, pos: int) -> tuple[int, int]:
    count, pos = _read_long(data, pos)
    if count < 0:  # a negative count is followed by the block's size in bytes
        _size, pos = _read_long(data, pos)
        count = -count
    return count, pos


def _read_map(values: FieldReader) -> FieldReader:
    def read(data: bytes, pos: int) -> tuple[dict[str, Any], int]:
        result: dict[str, Any] = {}
        count, pos = _block_count(data, pos)
        while count:
            for _ in range(count):
                key, pos = _read_string(data, pos)
                result[key], pos = values(data, pos)
            count, pos = _block_count(data, pos)
        return result, pos

    return read


def _read_array(items: FieldReader) -> FieldReader:
    def read(data: bytes, pos: int) -> tuple[list[Any], int]:
        result: list[Any] = []
        count, pos = _block_count(data, pos)
        while count:
            for _ in range(count):
                item, pos = items(data, pos)
                result.append(item)
            count, pos = _block_count(data, pos)
        return result, pos

    return read


def _read_nullable(null_index: int, inner: FieldReader) -> FieldReader:
    null_byte, value_byte = _SMALL[null_index][0], _SMALL[1 - null_index][0]

    def read(data: bytes, pos: int) -> tuple[Any, int]:
        branch = data[pos]
        if branch == null_byte:
            return None, pos + 1
        if branch == value_byte:
            return inner(data, pos + 1)
        raise ValueError(f"union branch byte {branch} out of range")

    return read


def _reader(avro_type: Any, in_union: bool = False) -> FieldReader:
    if isinstance(avro_type, str):
        if avro_type not in _PRIMITIVE_READERS:
            raise _Unsupported(f"named type {avro_type}")
        return _PRIMITIVE_READERS[avro_type]
    if isinstance(avro_type, dict):
        kind, logical = avro_type.get("type"), avro_type.get("logicalType")
        if kind in ("map", "array"):
            inner = avro_type["values" if kind == "map" else "items"]
            if not isinstance(inner, str) or inner not in _PRIMITIVE_READERS:
                raise _Unsupported(f"{kind} of a complex type")
            return (_read_map if kind == "map" else _read_array)(_PRIMITIVE_READERS[inner])
        if kind == "long" and logical == "timestamp-millis":
            return _read_timestamp_millis
        if kind == "int" and logical == "date":
            return _read_date
        if kind in ("int", "long", "string") and logical is None:
            return _PRIMITIVE_READERS[kind]
        raise _Unsupported(f"type {kind} ({logical})")  # other logical types: fastavro's conversions
    if isinstance(avro_type, list) and not in_union:
        if len(avro_type) == 2 and "null" in avro_type:
            null_index = avro_type.index("null")
            return _read_nullable(null_index, _reader(avro_type[1 - null_index], in_union=True))
        raise _Unsupported("union other than [null, X]")
    raise _Unsupported(repr(avro_type))


RecordReader = Callable[[bytes, int], tuple[dict[str, Any], int]]


def compile_reader(definition: Mapping[str, Any]) -> RecordReader | None:
    """A reader of a flat record schema (`read(payload, start) -> (record, end)`), or None for other shapes."""
    if definition.get("type") != "record":
        return None
    try:
        fields = [(field["name"], _reader(field["type"])) for field in definition["fields"]]
    except _Unsupported:
        return None

    def read(data: bytes, pos: int) -> tuple[dict[str, Any], int]:
        record: dict[str, Any] = {}
        for name, field_reader in fields:
            record[name], pos = field_reader(data, pos)
        return record, pos

    return read
