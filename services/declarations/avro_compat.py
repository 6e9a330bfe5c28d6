"""Avro schema compatibility, following the schema-resolution rules of the Avro specification.

``can_read(reader, writer)`` answers "can data written with ``writer`` be decoded with ``reader``?" and
returns every reason it cannot (empty list = compatible). ``check_compatibility`` applies one of the
registry-style modes (BACKWARD, FORWARD, FULL and their transitive forms) over a version history.

Rules implemented (Avro 1.11 spec, "Schema Resolution"):

* primitives must be equal or promotable: int -> long/float/double, long -> float/double,
  float -> double, string <-> bytes;
* records, enums and fixed match by unqualified name, or when the reader lists the writer's full name in
  its ``aliases``; fixed sizes must be equal;
* record fields match by name or by the reader field's ``aliases``; a reader field missing from the
  writer needs a default; writer fields unknown to the reader are skipped;
* enum symbols written but unknown to the reader need the reader enum's ``default`` (Avro >= 1.9);
* arrays and maps resolve their items / values;
* unions: every branch the writer can produce must resolve into the reader (into its union, the first
  matching branch, exact type before promotion), because compatibility is a property of all data.

Logical types are stricter than the spec (which resolves the underlying types only) because a change
there decodes fine and silently changes the meaning of values: two different logical types, a decimal
scale change or a decimal precision decrease are reported. Adding or removing a logical type annotation
is accepted (the stored value is unchanged). Logical types invalid for their base type are ignored, as
the spec requires.

Defaults are validated when a schema is parsed. For unions the default must match the FIRST branch:
Avro 1.12 relaxed this, but older readers (Java < 1.12 among them) reject or misread such schemas.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = [
    "AvroSchemaError",
    "AvroType",
    "Compatibility",
    "Incompatibility",
    "can_read",
    "check_compatibility",
    "parse",
]


class AvroSchemaError(ValueError):
    """The schema itself is invalid (not a compatibility problem)."""


class Compatibility(StrEnum):
    NONE = "NONE"
    BACKWARD = "BACKWARD"
    BACKWARD_TRANSITIVE = "BACKWARD_TRANSITIVE"
    FORWARD = "FORWARD"
    FORWARD_TRANSITIVE = "FORWARD_TRANSITIVE"
    FULL = "FULL"
    FULL_TRANSITIVE = "FULL_TRANSITIVE"

    @property
    def transitive(self) -> bool:
        return self.value.endswith("_TRANSITIVE")

    @property
    def new_reads_old(self) -> bool:
        """New consumers must read data already written (BACKWARD side)."""
        return self.value.startswith(("BACKWARD", "FULL"))

    @property
    def old_reads_new(self) -> bool:
        """Existing consumers must read data written with the new schema (FORWARD side)."""
        return self.value.startswith(("FORWARD", "FULL"))


@dataclass(frozen=True)
class Incompatibility:
    path: str
    reason: str
    context: str = ""

    def __str__(self) -> str:
        prefix = f"{self.context}: " if self.context else ""
        return f"{prefix}{self.path}: {self.reason}"


# --------------------------------------------------------------------------------------------------
# Schema model
# --------------------------------------------------------------------------------------------------

PRIMITIVE_TYPES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
# writer type -> reader types it may be promoted to
PROMOTIONS: dict[str, frozenset[str]] = {
    "int": frozenset({"long", "float", "double"}),
    "long": frozenset({"float", "double"}),
    "float": frozenset({"double"}),
    "string": frozenset({"bytes"}),
    "bytes": frozenset({"string"}),
}
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_INT_RANGE = (-(2**31), 2**31 - 1)
_LONG_RANGE = (-(2**63), 2**63 - 1)


class _NoDefault:
    def __repr__(self) -> str:
        return "NO_DEFAULT"


NO_DEFAULT: Any = _NoDefault()


@dataclass(frozen=True)
class LogicalType:
    name: str
    precision: int | None = None
    scale: int | None = None

    def __str__(self) -> str:
        if self.name == "decimal":
            return f"decimal({self.precision},{self.scale})"
        return self.name


@dataclass(eq=False)
class Primitive:
    type: str
    logical: LogicalType | None = None


@dataclass(eq=False)
class Field:
    name: str
    type: AvroType
    default: Any = NO_DEFAULT
    aliases: tuple[str, ...] = ()


@dataclass(eq=False)
class Record:
    fullname: str
    aliases: frozenset[str] = frozenset()
    fields: list[Field] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.fullname.rpartition(".")[2]


@dataclass(eq=False)
class Enum:
    fullname: str
    symbols: tuple[str, ...]
    aliases: frozenset[str] = frozenset()
    default: str | None = None

    @property
    def name(self) -> str:
        return self.fullname.rpartition(".")[2]


@dataclass(eq=False)
class Fixed:
    fullname: str
    size: int
    aliases: frozenset[str] = frozenset()
    logical: LogicalType | None = None

    @property
    def name(self) -> str:
        return self.fullname.rpartition(".")[2]


@dataclass(eq=False)
class Array:
    items: AvroType


@dataclass(eq=False)
class Map:
    values: AvroType


@dataclass(eq=False)
class Union:
    branches: tuple[AvroType, ...]


AvroType = Primitive | Record | Enum | Fixed | Array | Map | Union
NamedType = Record | Enum | Fixed


def describe(avro_type: AvroType) -> str:
    """Short human-readable type description used in messages."""
    match avro_type:
        case Primitive(type=name, logical=None):
            return name
        case Primitive(type=name, logical=logical):
            return f"{name} ({logical})"
        case Record():
            return f"record {avro_type.fullname}"
        case Enum():
            return f"enum {avro_type.fullname}"
        case Fixed():
            logical = f" ({avro_type.logical})" if avro_type.logical else ""
            return f"fixed {avro_type.fullname}[{avro_type.size}]{logical}"
        case Array():
            return f"array<{describe(avro_type.items)}>"
        case Map():
            return f"map<{describe(avro_type.values)}>"
        case Union():
            return "union [" + ", ".join(describe(branch) for branch in avro_type.branches) + "]"
    raise TypeError(avro_type)  # pragma: no cover


# --------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------


def parse(schema: Any) -> AvroType:
    """Parse an Avro schema given as JSON data (dict, list or str) into the model; validates it."""
    if isinstance(schema, Primitive | Record | Enum | Fixed | Array | Map | Union):
        return schema  # already parsed
    parser = _Parser()
    parsed = parser.parse(schema, namespace="", path="$")
    parser.validate_defaults()
    return parsed


class _Parser:
    def __init__(self) -> None:
        self.named: dict[str, NamedType] = {}
        self._fields_to_validate: list[tuple[str, Field]] = []

    def parse(self, schema: Any, namespace: str, path: str) -> AvroType:
        if isinstance(schema, str):
            if schema in PRIMITIVE_TYPES:
                return Primitive(schema)
            return self._reference(schema, namespace, path)
        if isinstance(schema, list):
            return self._union(schema, namespace, path)
        if not isinstance(schema, dict):
            raise AvroSchemaError(f"{path}: a schema must be a string, an object or an array, got {schema!r}")
        type_name = schema.get("type")
        if isinstance(type_name, dict | list):  # {"type": {...}} wraps a schema: unwrap it
            return self.parse(type_name, namespace, path)
        if not isinstance(type_name, str):
            raise AvroSchemaError(f"{path}: missing or invalid 'type'")
        if type_name in PRIMITIVE_TYPES:
            return Primitive(type_name, _logical_type(schema, type_name, size=None))
        if type_name in ("record", "error"):
            return self._record(schema, namespace, path)
        if type_name == "enum":
            return self._enum(schema, namespace, path)
        if type_name == "fixed":
            return self._fixed(schema, namespace, path)
        if type_name == "array":
            if "items" not in schema:
                raise AvroSchemaError(f"{path}: array without 'items'")
            return Array(self.parse(schema["items"], namespace, f"{path}.items"))
        if type_name == "map":
            if "values" not in schema:
                raise AvroSchemaError(f"{path}: map without 'values'")
            return Map(self.parse(schema["values"], namespace, f"{path}.values"))
        return self._reference(type_name, namespace, path)

    def _reference(self, name: str, namespace: str, path: str) -> NamedType:
        candidates = [name] if "." in name else ([f"{namespace}.{name}"] if namespace else []) + [name]
        for candidate in candidates:
            if candidate in self.named:
                return self.named[candidate]
        raise AvroSchemaError(f"{path}: unknown type {name!r}")

    def _union(self, branches: list[Any], namespace: str, path: str) -> Union:
        if not branches:
            raise AvroSchemaError(f"{path}: empty union")
        parsed: list[AvroType] = []
        seen: set[str] = set()
        for index, branch in enumerate(branches):
            branch_type = self.parse(branch, namespace, f"{path}[{index}]")
            if isinstance(branch_type, Union):
                raise AvroSchemaError(f"{path}[{index}]: unions may not immediately contain unions")
            key = _union_key(branch_type)
            if key in seen:
                raise AvroSchemaError(f"{path}: duplicate {key!r} in union")
            seen.add(key)
            parsed.append(branch_type)
        return Union(tuple(parsed))

    def _named(self, schema: dict[str, Any], namespace: str, path: str) -> tuple[str, str, frozenset[str]]:
        name = schema.get("name")
        if not isinstance(name, str) or not name:
            raise AvroSchemaError(f"{path}: {schema.get('type')} without a 'name'")
        if "." in name:
            own_namespace, _, short = name.rpartition(".")
        else:
            explicit = schema.get("namespace")
            own_namespace = explicit if isinstance(explicit, str) else namespace
            short = name
        _check_name(short, path)
        for part in filter(None, own_namespace.split(".")):
            _check_name(part, path)
        fullname = f"{own_namespace}.{short}" if own_namespace else short
        if fullname in self.named:
            raise AvroSchemaError(f"{path}: type {fullname!r} is defined twice")
        raw_aliases = schema.get("aliases", [])
        if not isinstance(raw_aliases, list) or not all(isinstance(a, str) for a in raw_aliases):
            raise AvroSchemaError(f"{path}: 'aliases' must be a list of strings")
        aliases = frozenset(
            alias if "." in alias or not own_namespace else f"{own_namespace}.{alias}" for alias in raw_aliases
        )
        return fullname, own_namespace, aliases

    def _record(self, schema: dict[str, Any], namespace: str, path: str) -> Record:
        fullname, own_namespace, aliases = self._named(schema, namespace, path)
        record = Record(fullname, aliases)
        self.named[fullname] = record  # registered before the fields: records may be recursive
        raw_fields = schema.get("fields")
        if not isinstance(raw_fields, list):
            raise AvroSchemaError(f"{path}: record {fullname} needs a 'fields' list")
        seen: set[str] = set()
        for index, raw_field in enumerate(raw_fields):
            field_path = f"{path}.fields[{index}]"
            if not isinstance(raw_field, dict) or not isinstance(raw_field.get("name"), str):
                raise AvroSchemaError(f"{field_path}: a field needs a 'name'")
            name = raw_field["name"]
            _check_name(name, field_path)
            if name in seen:
                raise AvroSchemaError(f"{field_path}: duplicate field {name!r}")
            seen.add(name)
            if "type" not in raw_field:
                raise AvroSchemaError(f"{field_path}: field {name!r} has no 'type'")
            field_aliases = raw_field.get("aliases", [])
            if not isinstance(field_aliases, list) or not all(isinstance(a, str) for a in field_aliases):
                raise AvroSchemaError(f"{field_path}: 'aliases' must be a list of strings")
            record_field = Field(
                name=name,
                type=self.parse(raw_field["type"], own_namespace, f"{path}.{name}"),
                default=raw_field.get("default", NO_DEFAULT),
                aliases=tuple(field_aliases),
            )
            record.fields.append(record_field)
            if record_field.default is not NO_DEFAULT:
                self._fields_to_validate.append((f"{fullname}.{name}", record_field))
        return record

    def _enum(self, schema: dict[str, Any], namespace: str, path: str) -> Enum:
        fullname, _, aliases = self._named(schema, namespace, path)
        symbols = schema.get("symbols")
        if not isinstance(symbols, list) or not all(isinstance(s, str) for s in symbols):
            raise AvroSchemaError(f"{path}: enum {fullname} needs a 'symbols' list of strings")
        if len(set(symbols)) != len(symbols):
            raise AvroSchemaError(f"{path}: enum {fullname} has duplicate symbols")
        for symbol in symbols:
            _check_name(symbol, path)
        default = schema.get("default")
        if default is not None and default not in symbols:
            raise AvroSchemaError(f"{path}: enum {fullname} default {default!r} is not one of its symbols")
        enum = Enum(fullname, tuple(symbols), aliases, default)
        self.named[fullname] = enum
        return enum

    def _fixed(self, schema: dict[str, Any], namespace: str, path: str) -> Fixed:
        fullname, _, aliases = self._named(schema, namespace, path)
        size = schema.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise AvroSchemaError(f"{path}: fixed {fullname} needs a non-negative integer 'size'")
        fixed = Fixed(fullname, size, aliases, _logical_type(schema, "fixed", size=size))
        self.named[fullname] = fixed
        return fixed

    def validate_defaults(self) -> None:
        # Done after parsing so that defaults of recursive or later-defined types can be checked.
        for where, record_field in self._fields_to_validate:
            problem = _default_problem(record_field.type, record_field.default)
            if problem:
                raise AvroSchemaError(f"{where}: invalid default {record_field.default!r}: {problem}")


def _check_name(name: str, path: str) -> None:
    if not _NAME_RE.match(name):
        raise AvroSchemaError(f"{path}: invalid Avro name {name!r}")


def _union_key(branch: AvroType) -> str:
    if isinstance(branch, Record | Enum | Fixed):
        return branch.fullname
    if isinstance(branch, Primitive):
        return branch.type
    return "array" if isinstance(branch, Array) else "map"


def _logical_type(schema: dict[str, Any], base: str, size: int | None) -> LogicalType | None:
    """The logical type if valid for ``base``; invalid ones are ignored, as the spec requires."""
    name = schema.get("logicalType")
    if not isinstance(name, str):
        return None
    valid_bases = {
        "date": {"int"},
        "time-millis": {"int"},
        "time-micros": {"long"},
        "timestamp-millis": {"long"},
        "timestamp-micros": {"long"},
        "timestamp-nanos": {"long"},
        "local-timestamp-millis": {"long"},
        "local-timestamp-micros": {"long"},
        "local-timestamp-nanos": {"long"},
        "uuid": {"string", "fixed"},
        "duration": {"fixed"},
        "decimal": {"bytes", "fixed"},
    }
    if name not in valid_bases:
        # Readers ignore unknown logical types, but they still carry the author's meaning: keep them so
        # that changing one into another is reported.
        return LogicalType(name)
    if base not in valid_bases[name]:
        return None
    if name == "uuid" and base == "fixed" and size != 16:
        return None
    if name == "duration" and size != 12:
        return None
    if name != "decimal":
        return LogicalType(name)
    precision, scale = schema.get("precision"), schema.get("scale", 0)
    if not isinstance(precision, int) or isinstance(precision, bool) or precision <= 0:
        return None
    if not isinstance(scale, int) or isinstance(scale, bool) or not 0 <= scale <= precision:
        return None
    if base == "fixed" and (not size or precision > math.floor(math.log10(2 ** (8 * size - 1) - 1))):
        return None
    return LogicalType("decimal", precision, scale)


def _default_problem(avro_type: AvroType, value: Any) -> str | None:
    """Why ``value`` (JSON) is not a valid default for ``avro_type``, or None when it is."""
    match avro_type:
        case Union(branches=branches):
            problem = _default_problem(branches[0], value)
            return f"must match the first union branch ({describe(branches[0])}): {problem}" if problem else None
        case Primitive(type="null"):
            return None if value is None else "expected null"
        case Primitive(type="boolean"):
            return None if isinstance(value, bool) else "expected a boolean"
        case Primitive(type="int" | "long" as name):
            low, high = _INT_RANGE if name == "int" else _LONG_RANGE
            if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
                return None
            return f"expected an {name}"
        case Primitive(type="float" | "double"):
            return None if isinstance(value, int | float) and not isinstance(value, bool) else "expected a number"
        case Primitive(type="string"):
            return None if isinstance(value, str) else "expected a string"
        case Primitive(type="bytes"):
            return None if _is_byte_string(value) else "expected a string of code points 0-255"
        case Fixed(size=size):
            if _is_byte_string(value) and len(value) == size:
                return None
            return f"expected a string of {size} code points 0-255"
        case Enum(symbols=symbols):
            return None if value in symbols else f"expected one of {list(symbols)}"
        case Array(items=items):
            if not isinstance(value, list):
                return "expected an array"
            return next((p for p in (_default_problem(items, v) for v in value) if p), None)
        case Map(values=values):
            if not isinstance(value, dict):
                return "expected an object"
            return next((p for p in (_default_problem(values, v) for v in value.values()) if p), None)
        case Record(fields=fields):
            if not isinstance(value, dict):
                return "expected an object"
            for record_field in fields:
                if record_field.name in value:
                    problem = _default_problem(record_field.type, value[record_field.name])
                    if problem:
                        return f"field {record_field.name!r}: {problem}"
                elif record_field.default is NO_DEFAULT:
                    return f"field {record_field.name!r} is missing"
            return None
    return f"unsupported type {describe(avro_type)}"  # pragma: no cover


def _is_byte_string(value: Any) -> bool:
    return isinstance(value, str) and all(ord(char) <= 0xFF for char in value)


# --------------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------------


def can_read(reader: Any, writer: Any) -> list[Incompatibility]:
    """Every reason data written with ``writer`` cannot be read with ``reader`` (empty = compatible)."""
    reader_type, writer_type = parse(reader), parse(writer)
    return _dedupe(_Resolver().resolve(reader_type, writer_type, _root_path(reader_type)))


def check_compatibility(
    new_schema: Any,
    history: Sequence[Any],
    mode: Compatibility | str,
    *,
    labels: Sequence[str] | None = None,
) -> list[Incompatibility]:
    """Check ``new_schema`` against ``history`` (oldest first) under ``mode``.

    ``labels`` name the history entries in messages (default ``version 1..N``). Non-transitive modes
    only look at the latest entry.
    """
    mode = Compatibility(mode)
    new_type = parse(new_schema)
    if mode is Compatibility.NONE or not history:
        return []
    names = list(labels) if labels is not None else [f"version {n}" for n in range(1, len(history) + 1)]
    if len(names) != len(history):
        raise ValueError("labels and history differ in length")
    indexes = range(len(history)) if mode.transitive else [len(history) - 1]
    problems: list[Incompatibility] = []
    for index in indexes:
        old_type = parse(history[index])
        if mode.new_reads_old:
            context = f"new schema cannot read data written with {names[index]}"
            for problem in can_read(new_type, old_type):
                problems.append(Incompatibility(problem.path, problem.reason, context))
        if mode.old_reads_new:
            context = f"{names[index]} cannot read data written with the new schema"
            for problem in can_read(old_type, new_type):
                problems.append(Incompatibility(problem.path, problem.reason, context))
    return problems


def _root_path(avro_type: AvroType) -> str:
    return avro_type.name if isinstance(avro_type, Record | Enum | Fixed) else "$"


def _dedupe(problems: Iterable[Incompatibility]) -> list[Incompatibility]:
    return list(dict.fromkeys(problems))


def _names_match(reader: NamedType, writer: NamedType) -> bool:
    return reader.name == writer.name or writer.fullname in reader.aliases


def _matches(reader: AvroType, writer: AvroType) -> bool:
    """The spec's shallow "match" test used to pick a branch; deep checks happen in ``resolve``."""
    if isinstance(reader, Primitive) and isinstance(writer, Primitive):
        return reader.type == writer.type or reader.type in PROMOTIONS.get(writer.type, ())
    if type(reader) is not type(writer):
        return False
    if isinstance(reader, Record | Enum | Fixed) and isinstance(writer, Record | Enum | Fixed):
        return _names_match(reader, writer)
    return True  # arrays with arrays, maps with maps


def _is_exact(reader: AvroType, writer: AvroType) -> bool:
    if isinstance(reader, Primitive) and isinstance(writer, Primitive):
        return reader.type == writer.type
    if isinstance(reader, Record | Enum | Fixed) and isinstance(writer, Record | Enum | Fixed):
        return reader.fullname == writer.fullname
    return type(reader) is type(writer)


class _Resolver:
    def __init__(self) -> None:
        # (reader, writer) record pairs being resolved: a recursive schema meets itself again, and the
        # pair is then assumed compatible (anything else is reported where it first occurs).
        self._in_progress: set[tuple[int, int]] = set()

    def resolve(self, reader: AvroType, writer: AvroType, path: str) -> list[Incompatibility]:
        if isinstance(writer, Union):
            problems: list[Incompatibility] = []
            for branch in writer.branches:
                problems += self.resolve(reader, branch, path)
            return problems
        if isinstance(reader, Union):
            return self._into_union(reader, writer, path)
        if not _matches(reader, writer):
            return [Incompatibility(path, _mismatch_reason(reader, writer))]
        match reader, writer:
            case Primitive(), Primitive():
                return _logical_problems(reader.logical, writer.logical, path)
            case Record(), Record():
                return self._record(reader, writer, path)
            case Enum(), Enum():
                return _enum_problems(reader, writer, path)
            case Fixed(), Fixed():
                return _fixed_problems(reader, writer, path)
            case Array(), Array():
                return self.resolve(reader.items, writer.items, f"{path}[]")
            case Map(), Map():
                return self.resolve(reader.values, writer.values, f"{path}{{}}")
        raise TypeError(reader)  # pragma: no cover

    def _into_union(self, reader: Union, writer: AvroType, path: str) -> list[Incompatibility]:
        candidates = [branch for branch in reader.branches if _matches(branch, writer)]
        if not candidates:
            return [
                Incompatibility(
                    path, f"writer type {describe(writer)} has no matching branch in reader {describe(reader)}"
                )
            ]
        # Prefer an exact match over a promotion, as the reference implementations do; then the first
        # candidate that resolves cleanly wins.
        candidates.sort(key=lambda branch: not _is_exact(branch, writer))
        first_problems: list[Incompatibility] | None = None
        for branch in candidates:
            problems = self.resolve(branch, writer, path)
            if not problems:
                return []
            first_problems = first_problems if first_problems is not None else problems
        return first_problems or []

    def _record(self, reader: Record, writer: Record, path: str) -> list[Incompatibility]:
        key = (id(reader), id(writer))
        if key in self._in_progress:
            return []
        self._in_progress.add(key)
        try:
            writer_fields = {writer_field.name: writer_field for writer_field in writer.fields}
            problems: list[Incompatibility] = []
            for reader_field in reader.fields:
                field_path = f"{path}.{reader_field.name}"
                writer_field = writer_fields.get(reader_field.name) or next(
                    (writer_fields[alias] for alias in reader_field.aliases if alias in writer_fields), None
                )
                if writer_field is not None:
                    problems += self.resolve(reader_field.type, writer_field.type, field_path)
                elif reader_field.default is NO_DEFAULT:
                    problems.append(
                        Incompatibility(
                            field_path,
                            "field is missing from the writer schema and the reader declares no default",
                        )
                    )
            return problems
        finally:
            self._in_progress.discard(key)


def _mismatch_reason(reader: AvroType, writer: AvroType) -> str:
    named = isinstance(reader, Record | Enum | Fixed) and isinstance(writer, Record | Enum | Fixed)
    if named and type(reader) is type(writer):
        return (
            f"name changed from {writer.fullname!r} to {reader.fullname!r} "
            f"(keep the name, or list the old full name in the reader's 'aliases')"
        )
    return f"writer type {describe(writer)} cannot be read as {describe(reader)}"


def _enum_problems(reader: Enum, writer: Enum, path: str) -> list[Incompatibility]:
    unknown = [symbol for symbol in writer.symbols if symbol not in reader.symbols]
    if not unknown or reader.default is not None:
        return []
    return [
        Incompatibility(
            path,
            f"writer symbols {unknown} are not in reader enum {reader.fullname} and it declares no default",
        )
    ]


def _fixed_problems(reader: Fixed, writer: Fixed, path: str) -> list[Incompatibility]:
    if reader.size != writer.size:
        return [Incompatibility(path, f"fixed size changed from {writer.size} to {reader.size}")]
    return _logical_problems(reader.logical, writer.logical, path)


def _logical_problems(reader: LogicalType | None, writer: LogicalType | None, path: str) -> list[Incompatibility]:
    if reader is None or writer is None or reader == writer:
        return []
    if reader.name == writer.name == "decimal":
        assert reader.precision is not None and writer.precision is not None
        if reader.scale != writer.scale:
            return [
                Incompatibility(
                    path, f"decimal scale changed from {writer.scale} to {reader.scale}: values would be rescaled"
                )
            ]
        if reader.precision < writer.precision:
            return [
                Incompatibility(
                    path,
                    f"decimal precision reduced from {writer.precision} to {reader.precision}: "
                    "written values may not fit",
                )
            ]
        return []
    return [Incompatibility(path, f"logical type changed from {writer} to {reader}: values would be misinterpreted")]
