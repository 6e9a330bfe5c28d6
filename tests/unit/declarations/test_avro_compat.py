"""Avro schema resolution and compatibility modes.

Every case states whether ``reader`` can read data written with ``writer``, with a datum written with
``writer``: for a compatible pair fastavro must decode it with ``reader``, for an incompatible one fastavro
must refuse to resolve it. So the checker is held to a real Avro implementation, not only to this file's
expectations. Logical-type cases carry no datum: there this checker is deliberately stricter than the spec.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import fastavro
import pytest

from services.declarations.avro_compat import (
    AvroSchemaError,
    Compatibility,
    Incompatibility,
    can_read,
    check_compatibility,
    parse,
)

REPO_ROOT = Path(__file__).resolve().parents[3]


def record(name: str, *fields: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "record", "name": name, "fields": list(fields), **extra}


def f(name: str, type_: Any, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": type_, **extra}


def roundtrip(writer: Any, reader: Any, datum: Any) -> Any:
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, fastavro.parse_schema(writer), datum)
    buffer.seek(0)
    return fastavro.schemaless_reader(buffer, fastavro.parse_schema(writer), fastavro.parse_schema(reader))


def reasons(problems: list[Incompatibility]) -> str:
    return "\n".join(str(problem) for problem in problems)


_NO_DATUM = object()

# (id, reader, writer, compatible, datum written with writer, or _NO_DATUM)
CASES: list[tuple[str, Any, Any, bool, Any]] = [
    # --- primitives and promotions ---------------------------------------------------------------
    ("same-int", "int", "int", True, 7),
    ("int-to-long", "long", "int", True, 7),
    ("int-to-float", "float", "int", True, 7),
    ("int-to-double", "double", "int", True, 7),
    ("long-to-float", "float", "long", True, 2**40),
    ("long-to-double", "double", "long", True, 2**40),
    ("float-to-double", "double", "float", True, 1.5),
    ("string-to-bytes", "bytes", "string", True, "abc"),
    ("bytes-to-string", "string", "bytes", True, b"abc"),
    ("long-to-int", "int", "long", False, 2**40),
    ("double-to-float", "float", "double", False, 1.5),
    ("double-to-long", "long", "double", False, 1.5),
    ("float-to-long", "long", "float", False, 1.5),
    ("int-to-string", "string", "int", False, 1),
    ("string-to-int", "int", "string", False, "x"),
    ("boolean-to-int", "int", "boolean", False, True),
    ("null-to-string", "string", "null", False, None),
    ("null-to-null", "null", "null", True, None),
    # --- records ---------------------------------------------------------------------------------
    (
        "record-add-field-with-default",
        record("R", f("a", "int"), f("b", "string", default="x")),
        record("R", f("a", "int")),
        True,
        {"a": 1},
    ),
    (
        "record-add-field-without-default",
        record("R", f("a", "int"), f("b", "string")),
        record("R", f("a", "int")),
        False,
        {"a": 1},
    ),
    (
        "record-remove-field",
        record("R", f("a", "int")),
        record("R", f("a", "int"), f("b", "string")),
        True,
        {"a": 1, "b": "gone"},
    ),
    (
        "record-field-promoted",
        record("R", f("a", "long")),
        record("R", f("a", "int")),
        True,
        {"a": 1},
    ),
    (
        "record-field-type-changed",
        record("R", f("a", "string")),
        record("R", f("a", "int")),
        False,
        {"a": 1},
    ),
    (
        "record-renamed-without-alias",
        record("S", f("a", "int")),
        record("R", f("a", "int")),
        False,
        {"a": 1},
    ),
    (
        "record-renamed-with-alias",
        record("S", f("a", "int"), aliases=["R"]),
        record("R", f("a", "int")),
        True,
        {"a": 1},
    ),
    (
        "record-namespace-changed",  # resolution compares unqualified names
        record("R", f("a", "int"), namespace="new.ns"),
        record("R", f("a", "int"), namespace="old.ns"),
        True,
        {"a": 1},
    ),
    (
        "record-renamed-with-namespaced-alias",
        record("S", f("a", "int"), namespace="new", aliases=["old.R"]),
        record("R", f("a", "int"), namespace="old"),
        True,
        {"a": 1},
    ),
    (
        "field-renamed-with-alias",
        record("R", f("b", "int", aliases=["a"])),
        record("R", f("a", "int")),
        True,
        {"a": 1},
    ),
    (
        "field-renamed-without-alias-no-default",
        record("R", f("b", "int")),
        record("R", f("a", "int")),
        False,
        {"a": 1},
    ),
    (
        "nested-record-field-added-with-default",
        record("Outer", f("inner", record("Inner", f("x", "int"), f("y", "int", default=0)))),
        record("Outer", f("inner", record("Inner", f("x", "int")))),
        True,
        {"inner": {"x": 1}},
    ),
    (
        "nested-record-field-added-without-default",
        record("Outer", f("inner", record("Inner", f("x", "int"), f("y", "int")))),
        record("Outer", f("inner", record("Inner", f("x", "int")))),
        False,
        {"inner": {"x": 1}},
    ),
    (
        "recursive-record-compatible",
        record("Node", f("value", "long"), f("next", ["null", "Node"], default=None)),
        record("Node", f("value", "int"), f("next", ["null", "Node"], default=None)),
        True,
        {"value": 1, "next": {"value": 2, "next": None}},
    ),
    (
        "recursive-record-incompatible",
        record("Node", f("value", "int"), f("next", ["null", "Node"], default=None)),
        record("Node", f("value", "long"), f("next", ["null", "Node"], default=None)),
        False,
        {"value": 1, "next": None},
    ),
    # --- enums -----------------------------------------------------------------------------------
    (
        "enum-symbol-added-in-reader",
        {"type": "enum", "name": "E", "symbols": ["A", "B", "C"]},
        {"type": "enum", "name": "E", "symbols": ["A", "B"]},
        True,
        "B",
    ),
    (
        "enum-symbol-removed-from-reader",
        {"type": "enum", "name": "E", "symbols": ["A"]},
        {"type": "enum", "name": "E", "symbols": ["A", "B"]},
        False,
        "B",
    ),
    (
        "enum-symbol-removed-reader-has-default",
        {"type": "enum", "name": "E", "symbols": ["A", "UNKNOWN"], "default": "UNKNOWN"},
        {"type": "enum", "name": "E", "symbols": ["A", "B"]},
        True,
        "B",
    ),
    (
        "enum-renamed",
        {"type": "enum", "name": "F", "symbols": ["A"]},
        {"type": "enum", "name": "E", "symbols": ["A"]},
        False,
        "A",
    ),
    (
        "enum-renamed-with-alias",
        {"type": "enum", "name": "F", "symbols": ["A"], "aliases": ["E"]},
        {"type": "enum", "name": "E", "symbols": ["A"]},
        True,
        "A",
    ),
    ("enum-to-string", "string", {"type": "enum", "name": "E", "symbols": ["A"]}, False, "A"),
    # --- fixed -----------------------------------------------------------------------------------
    (
        "fixed-same",
        {"type": "fixed", "name": "H", "size": 4},
        {"type": "fixed", "name": "H", "size": 4},
        True,
        b"abcd",
    ),
    (
        "fixed-size-changed",
        {"type": "fixed", "name": "H", "size": 8},
        {"type": "fixed", "name": "H", "size": 4},
        False,
        b"abcd",
    ),
    (
        "fixed-renamed",
        {"type": "fixed", "name": "G", "size": 4},
        {"type": "fixed", "name": "H", "size": 4},
        False,
        b"abcd",
    ),
    ("fixed-to-bytes", "bytes", {"type": "fixed", "name": "H", "size": 4}, False, b"abcd"),
    # --- arrays and maps -------------------------------------------------------------------------
    (
        "array-items-promoted",
        {"type": "array", "items": "long"},
        {"type": "array", "items": "int"},
        True,
        [1, 2],
    ),
    (
        "array-items-incompatible",
        {"type": "array", "items": "int"},
        {"type": "array", "items": "string"},
        False,
        ["x"],
    ),
    (
        "map-values-promoted",
        {"type": "map", "values": "double"},
        {"type": "map", "values": "float"},
        True,
        {"k": 1.5},
    ),
    (
        "map-values-incompatible",
        {"type": "map", "values": "int"},
        {"type": "map", "values": "long"},
        False,
        {"k": 2**40},
    ),
    ("array-to-map", {"type": "map", "values": "int"}, {"type": "array", "items": "int"}, False, [1]),
    (
        "array-of-records-field-added-with-default",
        {"type": "array", "items": record("I", f("a", "int"), f("b", "int", default=1))},
        {"type": "array", "items": record("I", f("a", "int"))},
        True,
        [{"a": 1}],
    ),
    # --- unions ----------------------------------------------------------------------------------
    ("non-union-into-union", ["null", "string"], "string", True, "x"),
    ("non-union-into-union-promoted", ["null", "long"], "int", True, 3),
    ("non-union-not-in-union", ["null", "string"], "int", False, 1),
    ("union-to-non-union-partial", "string", ["null", "string"], False, None),
    ("union-to-non-union-all-branches-ok", "double", ["int", "long", "float"], True, 3),
    ("union-branch-added-in-reader", ["null", "string", "int"], ["null", "string"], True, "x"),
    ("union-branch-removed-from-reader", ["null", "string"], ["null", "string", "int"], False, 1),
    ("union-reordered", ["string", "null"], ["null", "string"], True, None),
    ("union-branch-promoted", ["null", "double"], ["null", "int"], True, 5),
    (
        "union-of-records-by-name",
        ["null", record("A", f("x", "int")), record("B", f("y", "long"), f("z", "int", default=0))],
        ["null", record("A", f("x", "int")), record("B", f("y", "int"))],
        True,
        {"y": 1},
    ),
    (
        "union-record-missing-from-reader",
        ["null", record("A", f("x", "int"))],
        ["null", record("A", f("x", "int")), record("B", f("y", "int"))],
        False,
        {"y": 1},
    ),
    (
        "union-exact-match-preferred-over-promotion",
        ["null", "double", "long"],
        "long",
        True,
        5,
    ),
    # --- logical types ---------------------------------------------------------------------------
    (
        "logical-same",
        {"type": "long", "logicalType": "timestamp-millis"},
        {"type": "long", "logicalType": "timestamp-millis"},
        True,
        _NO_DATUM,
    ),
    (
        "logical-millis-to-micros",
        {"type": "long", "logicalType": "timestamp-micros"},
        {"type": "long", "logicalType": "timestamp-millis"},
        False,
        _NO_DATUM,
    ),
    ("logical-annotation-added", {"type": "long", "logicalType": "timestamp-millis"}, "long", True, _NO_DATUM),
    ("logical-annotation-removed", "long", {"type": "long", "logicalType": "timestamp-millis"}, True, _NO_DATUM),
    (
        "logical-date-to-timestamp-via-promotion",
        {"type": "long", "logicalType": "timestamp-millis"},
        {"type": "int", "logicalType": "date"},
        False,
        _NO_DATUM,
    ),
    (
        "decimal-scale-changed",
        {"type": "bytes", "logicalType": "decimal", "precision": 10, "scale": 3},
        {"type": "bytes", "logicalType": "decimal", "precision": 10, "scale": 2},
        False,
        _NO_DATUM,
    ),
    (
        "decimal-precision-increased",
        {"type": "bytes", "logicalType": "decimal", "precision": 12, "scale": 2},
        {"type": "bytes", "logicalType": "decimal", "precision": 10, "scale": 2},
        True,
        _NO_DATUM,
    ),
    (
        "decimal-precision-decreased",
        {"type": "bytes", "logicalType": "decimal", "precision": 8, "scale": 2},
        {"type": "bytes", "logicalType": "decimal", "precision": 10, "scale": 2},
        False,
        _NO_DATUM,
    ),
    (
        "invalid-logical-type-ignored",  # decimal on int is invalid: both sides are plain ints
        {"type": "int", "logicalType": "decimal", "precision": 4},
        {"type": "int", "logicalType": "date"},
        True,
        _NO_DATUM,
    ),
    (
        "uuid-fixed-to-fixed-without-logical",
        {"type": "fixed", "name": "U", "size": 16},
        {"type": "fixed", "name": "U", "size": 16, "logicalType": "uuid"},
        True,
        _NO_DATUM,
    ),
    (
        "logical-in-record-field",
        record("R", f("t", {"type": "long", "logicalType": "timestamp-micros"})),
        record("R", f("t", {"type": "long", "logicalType": "timestamp-millis"})),
        False,
        _NO_DATUM,
    ),
]


@pytest.mark.parametrize(("reader", "writer", "compatible", "datum"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_resolution(reader: Any, writer: Any, compatible: bool, datum: Any) -> None:
    problems = can_read(reader, writer)
    assert (not problems) == compatible, reasons(problems) or "expected incompatibilities, got none"
    if datum is _NO_DATUM:
        return
    if compatible:
        roundtrip(writer, reader, datum)  # a real Avro implementation agrees...
    else:
        with pytest.raises(fastavro.read.SchemaResolutionError):
            roundtrip(writer, reader, datum)  # ...in both directions


def test_incompatibilities_name_path_and_reason() -> None:
    reader = record("R", f("inner", record("I", f("a", "string"), f("b", "int"))))
    writer = record("R", f("inner", record("I", f("a", "int"))))
    problems = {problem.path: problem.reason for problem in can_read(reader, writer)}
    assert set(problems) == {"R.inner.a", "R.inner.b"}
    assert "int" in problems["R.inner.a"] and "string" in problems["R.inner.a"]
    assert "no default" in problems["R.inner.b"]


def test_paths_through_arrays_maps_and_unions() -> None:
    reader = record("R", f("xs", {"type": "array", "items": "int"}), f("m", {"type": "map", "values": "int"}))
    writer = record("R", f("xs", {"type": "array", "items": "long"}), f("m", {"type": "map", "values": "long"}))
    assert {p.path for p in can_read(reader, writer)} == {"R.xs[]", "R.m{}"}
    problems = can_read(["null", "string"], ["null", "string", "int"])
    assert len(problems) == 1 and "int" in problems[0].reason and problems[0].path == "$"


def test_enum_message_lists_unknown_symbols() -> None:
    (problem,) = can_read(
        {"type": "enum", "name": "E", "symbols": ["A"]}, {"type": "enum", "name": "E", "symbols": ["A", "B", "C"]}
    )
    assert "['B', 'C']" in problem.reason


def test_rename_message_suggests_alias() -> None:
    (problem,) = can_read(record("New", f("a", "int")), record("Old", f("a", "int")))
    assert "aliases" in problem.reason and "'Old'" in problem.reason


def test_kind_change_is_not_reported_as_a_rename() -> None:
    (problem,) = can_read({"type": "enum", "name": "E", "symbols": ["A"]}, record("E"))
    assert problem.reason == "writer type record E cannot be read as enum E"


def test_every_problem_is_reported_not_just_the_first() -> None:
    reader = record("R", f("a", "string"), f("b", "string"), f("c", "int"))
    writer = record("R", f("a", "int"), f("b", "int"))
    assert len(can_read(reader, writer)) == 3


# --- modes -----------------------------------------------------------------------------------------

V1 = record("E", f("id", "string"), f("n", "int"))
V2_ADD_OPTIONAL = record("E", f("id", "string"), f("n", "int"), f("note", ["null", "string"], default=None))
V2_ADD_REQUIRED = record("E", f("id", "string"), f("n", "int"), f("note", "string"))
V2_REMOVE_N = record("E", f("id", "string"))
V1_N_DEFAULT = record("E", f("id", "string"), f("n", "int", default=0))


@pytest.mark.parametrize(
    ("mode", "history", "new", "compatible"),
    [
        ("BACKWARD", [V1], V2_ADD_OPTIONAL, True),
        ("BACKWARD", [V1], V2_ADD_REQUIRED, False),
        ("BACKWARD", [V1], V2_REMOVE_N, True),
        ("FORWARD", [V1], V2_ADD_REQUIRED, True),  # old readers skip the new field
        ("FORWARD", [V1], V2_REMOVE_N, False),  # old readers need n, which has no default
        ("FORWARD", [V1_N_DEFAULT], V2_REMOVE_N, True),
        ("FULL", [V1], V2_ADD_OPTIONAL, True),
        ("FULL", [V1], V2_ADD_REQUIRED, False),
        ("FULL", [V1], V2_REMOVE_N, False),
        ("FULL", [V1_N_DEFAULT], V2_REMOVE_N, True),
        ("NONE", [V1], record("E", f("id", "int")), True),
        ("BACKWARD", [], V2_ADD_REQUIRED, True),  # nothing to be compatible with
    ],
)
def test_modes(mode: str, history: list[Any], new: Any, compatible: bool) -> None:
    problems = check_compatibility(new, history, mode)
    assert (not problems) == compatible, reasons(problems)


def test_transitive_modes_check_every_version() -> None:
    # v1 -> v2 drops n; v3 re-adds n as a string without a default... a chain where each step is fine
    # but v3 cannot read v1 data.
    v1 = record("E", f("id", "string"), f("n", "int"))
    v2 = record("E", f("id", "string"))
    v3 = record("E", f("id", "string"), f("n", "string", default=""))
    assert check_compatibility(v2, [v1], "BACKWARD") == []
    assert check_compatibility(v3, [v1, v2], "BACKWARD") == []
    problems = check_compatibility(v3, [v1, v2], "BACKWARD_TRANSITIVE")
    assert len(problems) == 1
    assert problems[0].context == "new schema cannot read data written with version 1"
    assert problems[0].path == "E.n"


def test_forward_transitive() -> None:
    v1 = record("E", f("id", "string"), f("n", "int"))
    v2 = record("E", f("id", "string"), f("n", "int", default=0))
    v3 = record("E", f("id", "string"))
    assert check_compatibility(v3, [v1, v2], "FORWARD") == []
    problems = check_compatibility(v3, [v1, v2], "FORWARD_TRANSITIVE")
    assert [p.context for p in problems] == ["version 1 cannot read data written with the new schema"]


def test_full_transitive_reports_both_directions_and_labels() -> None:
    v1 = record("E", f("id", "string"))
    new = record("E", f("id", "int"))
    problems = check_compatibility(new, [v1, v1], "FULL_TRANSITIVE", labels=["a@1", "a@2"])
    contexts = {p.context for p in problems}
    assert contexts == {
        "new schema cannot read data written with a@1",
        "new schema cannot read data written with a@2",
        "a@1 cannot read data written with the new schema",
        "a@2 cannot read data written with the new schema",
    }
    assert str(problems[0]).startswith("new schema cannot read data written with a@1: E.id: ")


def test_mode_properties() -> None:
    assert Compatibility.FULL_TRANSITIVE.transitive and not Compatibility.FULL.transitive
    assert Compatibility.BACKWARD.new_reads_old and not Compatibility.BACKWARD.old_reads_new
    assert Compatibility.FORWARD.old_reads_new and not Compatibility.FORWARD.new_reads_old
    with pytest.raises(ValueError):
        check_compatibility(V1, [V1], "SIDEWAYS")


def test_labels_must_match_history() -> None:
    with pytest.raises(ValueError, match="labels"):
        check_compatibility(V1, [V1], "BACKWARD", labels=["a", "b"])


# --- the platform's own schema ----------------------------------------------------------------------


def _raw_event() -> dict[str, Any]:
    return json.loads((REPO_ROOT / "schemas/avro/raw_event.avsc").read_text())


def test_raw_event_is_compatible_with_itself_in_every_mode() -> None:
    schema = _raw_event()
    for mode in Compatibility:
        assert check_compatibility(schema, [schema], mode) == []


def test_raw_event_new_optional_field_is_full_compatible() -> None:
    old, new = _raw_event(), _raw_event()
    new["fields"].append({"name": "campaign", "type": ["null", "string"], "default": None})
    assert check_compatibility(new, [old], "FULL_TRANSITIVE") == []


def test_raw_event_type_change_is_refused() -> None:
    old, new = _raw_event(), _raw_event()
    quantity = next(field for field in new["fields"] if field["name"] == "quantity")
    quantity["type"] = ["null", "string"]
    problems = check_compatibility(new, [old], "BACKWARD")
    assert [p.path for p in problems] == ["RawEvent.quantity"]


# --- parsing and validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        (record("R", f("a", "int", default="x")), "invalid default"),
        (record("R", f("a", ["null", "int"], default=3)), "first union branch"),
        (record("R", f("a", ["int", "null"], default=None)), "first union branch"),
        (record("R", f("a", "int", default=2**31)), "invalid default"),
        (record("R", f("a", {"type": "fixed", "name": "F", "size": 2}, default="abc")), "invalid default"),
        (record("R", f("a", {"type": "enum", "name": "E", "symbols": ["A"]}, default="B")), "invalid default"),
        (record("R", f("a", record("I", f("x", "int")), default={})), "field 'x' is missing"),
        (record("R", f("a", "int"), f("a", "long")), "duplicate field"),
        (record("R", f("a", "Nope")), "unknown type"),
        (record("1R", f("a", "int")), "invalid Avro name"),
        ({"type": "enum", "name": "E", "symbols": ["A", "A"]}, "duplicate symbols"),
        ({"type": "enum", "name": "E", "symbols": ["A"], "default": "B"}, "default"),
        ({"type": "fixed", "name": "F"}, "size"),
        (["null", "null"], "duplicate"),
        (["null", ["int"]], "unions may not immediately contain unions"),
        ([], "empty union"),
        ({"type": "array"}, "items"),
        ({"type": "map"}, "values"),
        (record("R", f("a", record("R", f("b", "int")))), "defined twice"),
        (42, "must be a string, an object or an array"),
    ],
)
def test_invalid_schemas_are_rejected(schema: Any, message: str) -> None:
    with pytest.raises(AvroSchemaError, match=message):
        parse(schema)


@pytest.mark.parametrize(
    "schema",
    [
        record("R", f("a", ["null", "int"], default=None)),
        record("R", f("a", ["int", "null"], default=1)),
        record("R", f("a", "long", default=2**40)),
        record("R", f("a", "double", default=1)),
        record("R", f("a", "bytes", default="\u00ff")),
        record("R", f("a", {"type": "array", "items": "int"}, default=[1, 2])),
        record("R", f("a", {"type": "map", "values": "string"}, default={"k": "v"})),
        record("R", f("a", record("I", f("x", "int"), f("y", "int", default=0)), default={"x": 1})),
        record("R", f("next", ["null", "R"], default=None)),
        record("R", f("a", {"type": "string", "logicalType": "uuid"})),
        record("R", f("e", {"type": "enum", "name": "E", "symbols": ["A"]}), f("e2", "E")),
        {"type": "record", "name": "ns.R", "fields": [f("a", {"type": "enum", "name": "E", "symbols": ["X"]})]},
    ],
)
def test_valid_schemas_parse(schema: Any) -> None:
    parse(schema)
    fastavro.parse_schema(schema)  # and a real implementation agrees


def test_named_type_references_resolve_through_namespaces() -> None:
    schema = {
        "type": "record",
        "name": "R",
        "namespace": "a.b",
        "fields": [
            f("x", {"type": "fixed", "name": "H", "size": 2}),
            f("y", "H"),
            f("z", "a.b.H"),
            f("w", {"type": "record", "name": "c.Other", "fields": [f("h", "a.b.H")]}),
        ],
    }
    parsed = parse(schema)
    assert parsed.fullname == "a.b.R"
    assert [fld.type.fullname for fld in parsed.fields] == ["a.b.H", "a.b.H", "a.b.H", "c.Other"]


def test_parse_is_idempotent_on_parsed_schemas() -> None:
    parsed = parse(V1)
    assert parse(parsed) is parsed
    assert can_read(parsed, V1) == []
