"""Rules over columns: what the compiled rulebook evaluates on a whole batch at once, with Arrow compute.

A batch is an Arrow table of one record kind (raw events decoded column-wise from Avro, CDC rows, or the rows of
a batch file) plus the time it is judged at. Each rule compiles to a function from the batch to a boolean mask
of the rows it fails; the engine (`engine.RuleEngine.evaluate_batch`) combines the masks into verdicts.

The semantics are the interpreter's (`expressions.py`) and the per-value checks' (`rulebook.py`), which stay the
definition of the language and word the failures; the vector forms must give the same answers. Where Arrow
cannot give them exactly -- an operation on types whose Python meaning Arrow does not share (text ordering
against numbers, integer overflow, decimal division, a regex with Unicode classes) -- `Unsupported` is raised,
at compile time or for one batch, and that expression or check runs through the interpreter for the batch's
rows instead. `describe_vectorisation` says which rules of a rule set are vectorised, which are not and why.
"""

from __future__ import annotations

import ast
import re
import sre_constants
import sre_parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from services.validator.expressions import FUNCTIONS, Expression, _mixed_numbers
from services.validator.ids import ANY_CASE_UUID, CANONICAL_UUID


class Unsupported(Exception):
    """The vector form cannot compute this exactly as the interpreter does; use the interpreter."""


# --- the batch --------------------------------------------------------------------------------------------------
@dataclass
class ColumnBatch:
    """The records of one kind being judged together, as columns, and the time they are judged at."""

    table: pa.Table
    now: datetime
    canonical_ids: frozenset[str] = frozenset()  # fields known to hold only canonical UUIDs (or nulls)
    _columns: dict[str, pa.Array] = field(default_factory=dict, repr=False)
    _valid: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    _rows: list[dict[str, Any]] | None = field(default=None, repr=False)

    @property
    def size(self) -> int:
        return self.table.num_rows

    def column(self, name: str) -> pa.Array:
        """The column `name` as one array; a field the batch does not have is all null (`record.get` is None)."""
        array = self._columns.get(name)
        if array is None:
            if name in self.table.column_names:
                chunked = self.table.column(name)
                array = chunked.combine_chunks() if chunked.num_chunks != 1 else chunked.chunk(0)
            else:
                array = pa.nulls(self.size)
            self._columns[name] = array
        return array

    def valid(self, name: str) -> np.ndarray:
        """Rows where `name` is not null."""
        mask = self._valid.get(name)
        if mask is None:
            array = self.column(name)
            mask = np.ones(self.size, bool) if array.null_count == 0 else as_mask(array.is_valid())
            self._valid[name] = mask
        return mask

    def rows(self) -> list[dict[str, Any]]:
        """The records as dicts (built once, on demand): for the interpreter and for wording failures."""
        if self._rows is None:
            self._rows = records_of(self.table)
        return self._rows


def records_of(table: pa.Table) -> list[dict[str, Any]]:
    """The rows as the dicts a decoder gives (Arrow hands maps over as lists of pairs: made dicts again)."""
    records = table.to_pylist()
    maps = [f.name for f in table.schema if pa.types.is_map(f.type)]
    for record in records if maps else ():
        for name in maps:
            value = record[name]
            if value is not None:
                record[name] = dict(value)
    return records


def as_mask(array: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A boolean Arrow array as numpy, nulls as False."""
    if array.null_count:
        array = pc.fill_null(array, False)
    return np.asarray(array.to_numpy(zero_copy_only=False), bool)


# --- value checks ---------------------------------------------------------------------------------------------------
# Python's str.isspace() characters, as an RE2 class: MANDATORY's "blank text is missing" must mean what it does
# for the interpreter, by construction rather than by two Unicode tables agreeing (utf8_is_space happens to agree
# on pyarrow 26).
PY_SPACE_CODES = (
    0x9, 0xA, 0xB, 0xC, 0xD, 0x1C, 0x1D, 0x1E, 0x1F, 0x20, 0x85, 0xA0, 0x1680, 0x2000, 0x2001, 0x2002, 0x2003,
    0x2004, 0x2005, 0x2006, 0x2007, 0x2008, 0x2009, 0x200A, 0x2028, 0x2029, 0x202F, 0x205F, 0x3000,
)  # fmt: skip  # every code point whose str.isspace() is true (Python 3.11; a unit test checks them all)
_PY_SPACE = "".join(f"\\x{{{code:x}}}" for code in PY_SPACE_CODES)
BLANK_TEXT = f"^[{_PY_SPACE}]*$"


def blank_or_null(array: pa.Array) -> np.ndarray:
    """MANDATORY's notion of missing: null, empty or blank text, an empty map or list."""
    missing = ~as_mask(array.is_valid()) if array.null_count else np.zeros(len(array), bool)
    kind = array.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        missing |= as_mask(pc.match_substring_regex(array, BLANK_TEXT))
    elif pa.types.is_map(kind) or pa.types.is_list(kind) or pa.types.is_large_list(kind):
        offsets = np.asarray(array.offsets.to_numpy(zero_copy_only=False), np.int64)
        missing |= np.diff(offsets) == 0
    elif pa.types.is_null(kind):
        missing[:] = True
    return missing


def re2_fullmatch(pattern: str) -> str:
    """`pattern` as an RE2 pattern whose match on a whole value is Python's `re.fullmatch`; raises `Unsupported`
    for constructs whose meaning differs between the two engines (Unicode classes such as \\d and \\w,
    anchors, flags, backreferences, lookarounds). For the rest -- literals, classes of explicit characters,
    groups, alternation and repetition -- whether a whole value matches is the same question in both."""
    try:
        parsed = sre_parse.parse(pattern)
    except re.error as error:
        raise Unsupported(f"regex does not compile: {error}") from None
    if parsed.state.flags & ~(re.UNICODE | re.U):
        raise Unsupported("regex flags")
    _check_regex_nodes(parsed)
    return f"^(?:{pattern})$"


_SAFE_REGEX_OPS = {
    sre_constants.LITERAL,
    sre_constants.NOT_LITERAL,
    sre_constants.ANY,
    sre_constants.IN,
    sre_constants.BRANCH,
    sre_constants.SUBPATTERN,
    sre_constants.MAX_REPEAT,
    sre_constants.MIN_REPEAT,
    sre_constants.RANGE,
    sre_constants.NEGATE,
}


def _check_regex_nodes(nodes: Any) -> None:
    for op, argument in nodes:
        if op not in _SAFE_REGEX_OPS:
            raise Unsupported(f"regex construct {op}")
        if op is sre_constants.IN:
            _check_regex_nodes(argument)
        elif op is sre_constants.BRANCH:
            for branch in argument[1]:
                _check_regex_nodes(branch)
        elif op is sre_constants.SUBPATTERN:
            _group, add_flags, del_flags, sub = argument
            if add_flags or del_flags:
                raise Unsupported("inline regex flags")
            _check_regex_nodes(sub)
        elif op in (sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT):
            _check_regex_nodes(argument[2])


def per_value(array: pa.Array, passes: Callable[[Any], bool]) -> np.ndarray:
    """Rows whose non-null value fails `passes`, asking once per distinct value (exact for any check of a value
    alone, and cheap where values repeat: event types, devices, countries)."""
    valid = as_mask(array.is_valid()) if array.null_count else None
    try:
        encoded = pc.dictionary_encode(array)
    except pa.ArrowNotImplementedError:  # maps and lists: row by row
        values = array.to_pylist()
        failing = np.fromiter((v is not None and not passes(v) for v in values), bool, len(values))
        return failing
    dictionary = encoded.dictionary.to_pylist()
    verdicts = np.fromiter((not passes(v) for v in dictionary), bool, len(dictionary))
    indices = encoded.indices
    if indices.null_count:
        indices = pc.fill_null(indices, 0)
    failing = (
        verdicts[np.asarray(indices.to_numpy(zero_copy_only=False), np.int64)]
        if len(dictionary)
        else np.zeros(len(array), bool)
    )
    if valid is not None:
        failing &= valid
    return failing


def canonical_columns(table: pa.Table, fields: Sequence[str]) -> tuple[pa.Table, np.ndarray, frozenset[str]]:
    """`table` with the ids in `fields` in canonical form (`ids.canonical_uuid`, column-wise), the rows where one
    was rewritten, and the fields whose every value is now a canonical UUID (their `format: uuid` check has
    nothing left to find). Only UUIDs spelled in upper or mixed case change; anything else is left for its rule."""
    rewritten = np.zeros(table.num_rows, bool)
    canonical: set[str] = set()
    for name in fields:
        if name not in table.column_names:
            continue
        column = table.column(name)
        if not pa.types.is_string(column.type):
            continue
        valid = as_mask(column.is_valid()) if column.null_count else None
        is_canonical = as_mask(pc.match_substring_regex(column, CANONICAL_UUID))
        other = ~is_canonical if valid is None else valid & ~is_canonical
        if not other.any():
            canonical.add(name)
            continue
        needs = other & as_mask(pc.match_substring_regex(column, ANY_CASE_UUID))
        if needs.any():
            rewritten |= needs
            lowered = pc.if_else(pa.array(needs), pc.utf8_lower(column), column)
            table = table.set_column(table.column_names.index(name), name, lowered)
            if not (other & ~needs).any():
                canonical.add(name)
    return table, rewritten, frozenset(canonical)


# --- expressions ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Const:
    value: Any


Vector = pa.Array | _Const
Evaluated = tuple[Vector, np.ndarray | None]  # (values, rows where evaluating raised: MissingField or an error)
Node = Callable[[ColumnBatch], Evaluated]

_ARITHMETIC = {ast.Add: "add_checked", ast.Sub: "subtract_checked", ast.Mult: "multiply_checked"}
_COMPARE_KERNELS = {
    ast.Eq: "equal",
    ast.NotEq: "not_equal",
    ast.Lt: "less",
    ast.LtE: "less_equal",
    ast.Gt: "greater",
    ast.GtE: "greater_equal",
}
_PY_BINARY = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b,
}
_EXACT_FLOAT_INT = 2**53


def _or(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    if a is None:
        return b
    if b is None:
        return a
    return a | b


# in this order: bool is an int, and a datetime is a date
_CONSTANT_KINDS = (
    (bool, "bool"),
    (int, "int"),
    (float, "float"),
    (Decimal, "decimal"),
    (str, "text"),
    (datetime, "time"),
    (timedelta, "duration"),
)


def _kind(vector: Vector) -> str:
    """'int', 'float', 'decimal', 'text', 'time', 'duration', 'bool', 'sized', 'null' or 'other'."""
    if isinstance(vector, _Const):
        value = vector.value
        if value is None:
            return "null"
        return next((kind for cls, kind in _CONSTANT_KINDS if isinstance(value, cls)), "other")
    kind = vector.type
    if pa.types.is_boolean(kind):
        return "bool"
    if pa.types.is_integer(kind):
        return "int"
    if pa.types.is_floating(kind):
        return "float"
    if pa.types.is_decimal(kind):
        return "decimal"
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "text"
    if pa.types.is_timestamp(kind) and kind.tz is not None:
        return "time"
    if pa.types.is_duration(kind):
        return "duration"
    if pa.types.is_map(kind) or pa.types.is_list(kind):
        return "sized"
    if pa.types.is_null(kind):
        return "null"
    return "other"


def _as_arrow(vector: Vector) -> pa.Array | pa.Scalar:
    if isinstance(vector, _Const):
        value = vector.value
        if isinstance(value, datetime):
            return pa.scalar(value, pa.timestamp("us", tz="UTC"))
        if isinstance(value, timedelta):
            return pa.scalar(value, pa.duration("us"))
        return pa.scalar(value)
    return vector


def _exact_float(vector: Vector) -> pa.Array | pa.Scalar:
    """Numbers as float64 exactly as Python's float() would round them, or `Unsupported`."""
    if isinstance(vector, _Const):
        return pa.scalar(float(vector.value))
    kind = _kind(vector)
    if kind == "float":
        return vector.cast(pa.float64())
    if kind == "int":
        if len(vector) and (pc.max(pc.abs(vector.cast(pa.int64()))).as_py() or 0) >= _EXACT_FLOAT_INT:
            raise Unsupported("integers beyond 2**53 in float arithmetic")
        return vector.cast(pa.float64())
    if kind == "decimal":  # unscaled / 10**scale: one correctly rounded division, as float(Decimal) is
        scale = vector.type.scale
        if scale > 22:
            raise Unsupported("decimal scale beyond 22 in float arithmetic")
        unscaled = pc.cast(pc.multiply(vector, pa.scalar(Decimal(10) ** scale)), pa.decimal128(38, 0))
        as_int = unscaled.cast(pa.int64())
        if len(as_int) and (pc.max(pc.abs(as_int)).as_py() or 0) >= _EXACT_FLOAT_INT:
            raise Unsupported("decimal digits beyond 2**53 in float arithmetic")
        return pc.divide(as_int.cast(pa.float64()), float(10**scale))
    raise Unsupported(f"float() of {kind}")


def truthy(vector: Vector, size: int) -> np.ndarray:
    """Python truth of each value (a failing row's value does not matter: callers mask it)."""
    if isinstance(vector, _Const):
        return np.full(size, bool(vector.value))
    kind = _kind(vector)
    if kind == "bool":
        return as_mask(vector)
    if kind in ("int", "float", "decimal"):
        return as_mask(pc.not_equal(vector, _zero(vector)))
    if kind == "text":
        return as_mask(pc.greater(pc.utf8_length(vector), 0))
    if kind == "sized":
        offsets = np.asarray(vector.offsets.to_numpy(zero_copy_only=False), np.int64)
        return np.diff(offsets) > 0
    if kind == "time":
        return np.ones(size, bool)
    raise Unsupported(f"truth of {kind}")


class VectorExpression:
    """An `Expression` compiled to Arrow compute over a `ColumnBatch`, or to the interpreter where it cannot be."""

    def __init__(self, expression: Expression) -> None:
        self.expression = expression
        self.unsupported: str | None = None
        self._root: Node | None = None
        try:
            self._root = self._compile(ast.parse(expression.source, mode="eval").body)
        except Unsupported as reason:
            self.unsupported = str(reason)

    # -- what rules ask --------------------------------------------------------------------------------------------
    def holds(self, batch: ColumnBatch) -> np.ndarray:
        """`when` truth per row: False where a field is missing or the value cannot be computed."""
        if self._root is not None:
            try:
                values, failed = self._root(batch)
                result = truthy(values, batch.size)
                return result if failed is None else result & ~failed
            except (Unsupported, pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError):
                pass
        test, now = self.expression.test, batch.now
        return np.fromiter((test(row, now) for row in batch.rows()), bool, batch.size)

    def fails(self, batch: ColumnBatch) -> np.ndarray:
        """BUSINESS_RULE failure per row: false, or a field missing, or the value cannot be computed."""
        if self._root is not None:
            try:
                values, failed = self._root(batch)
                result = ~truthy(values, batch.size)
                return result if failed is None else result | failed
            except (Unsupported, pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError):
                pass
        evaluate, now = self.expression, batch.now

        def fails_one(row: Mapping[str, Any]) -> bool:
            try:
                return not evaluate(row, now)
            except Exception:  # MissingField, EvaluationError: the rule fails (and says why)
                return True

        return np.fromiter((fails_one(row) for row in batch.rows()), bool, batch.size)

    # -- compiling -------------------------------------------------------------------------------------------------
    def _compile(self, node: ast.AST) -> Node:
        handler = getattr(self, f"_{type(node).__name__}", None)
        if handler is None:
            raise Unsupported(f"{type(node).__name__}")
        return handler(node)

    def _Constant(self, node: ast.Constant) -> Node:
        constant = _Const(node.value)
        return lambda batch: (constant, None)

    def _Name(self, node: ast.Name) -> Node:
        name = node.id
        if name == "now":
            return lambda batch: (_Const(batch.now), None)

        def column(batch: ColumnBatch) -> Evaluated:
            valid = batch.valid(name)
            return batch.column(name), None if valid.all() else ~valid

        return column

    def _sequence(self, node: ast.List | ast.Tuple | ast.Set) -> Node:
        if not all(isinstance(item, ast.Constant) for item in node.elts):
            raise Unsupported("a list of non-literals")
        values = [item.value for item in node.elts]  # type: ignore[attr-defined]
        try:
            constant = _Const(frozenset(values))
        except TypeError:
            constant = _Const(tuple(values))
        return lambda batch: (constant, None)

    _List = _Tuple = _Set = _sequence

    def _BinOp(self, node: ast.BinOp) -> Node:
        op_type = type(node.op)
        python_op = _PY_BINARY.get(op_type)
        if python_op is None:
            raise Unsupported(f"operator {op_type.__name__}")
        left, right = self._compile(node.left), self._compile(node.right)

        def binary(batch: ColumnBatch) -> Evaluated:
            (a, a_failed), (b, b_failed) = left(batch), right(batch)
            failed = _or(a_failed, b_failed)
            if isinstance(a, _Const) and isinstance(b, _Const):
                try:
                    try:
                        return _Const(python_op(a.value, b.value)), failed
                    except TypeError:
                        return _Const(python_op(*_mixed_numbers(a.value, b.value))), failed
                except Exception:  # an error for every row: the interpreter words it
                    return _Const(None), np.ones(batch.size, bool)
            return _arithmetic(op_type, a, b, failed, batch.size)

        return binary

    def _UnaryOp(self, node: ast.UnaryOp) -> Node:
        operand = self._compile(node.operand)
        if isinstance(node.op, ast.Not):

            def negation(batch: ColumnBatch) -> Evaluated:
                values, failed = operand(batch)
                return pa.array(~truthy(values, batch.size)), failed

            return negation
        if isinstance(node.op, ast.USub | ast.UAdd):
            minus = isinstance(node.op, ast.USub)

            def sign(batch: ColumnBatch) -> Evaluated:
                values, failed = operand(batch)
                if isinstance(values, _Const):
                    return _Const(-values.value if minus else +values.value), failed
                if _kind(values) not in ("int", "float", "decimal"):
                    raise Unsupported("sign of a non-number")
                return (pc.negate_checked(values) if minus else values), failed

            return sign
        raise Unsupported(f"operator {type(node.op).__name__}")

    def _BoolOp(self, node: ast.BoolOp) -> Node:
        parts = [self._compile(value) for value in node.values]
        conjunction = isinstance(node.op, ast.And)

        def boolean(batch: ColumnBatch) -> Evaluated:
            # all()/any() evaluate left to right and stop at the first false/true value: a later part's failure
            # only counts on the rows that reach it
            result = np.full(batch.size, conjunction)
            failed = np.zeros(batch.size, bool)
            undecided = np.ones(batch.size, bool)
            for part in parts:
                values, part_failed = part(batch)
                truth = truthy(values, batch.size)
                if part_failed is not None:
                    failed |= undecided & part_failed
                    undecided &= ~part_failed
                decided = undecided & (~truth if conjunction else truth)
                result[decided] = not conjunction
                undecided &= ~decided
            return pa.array(result), failed

        return boolean

    def _Compare(self, node: ast.Compare) -> Node:
        first = self._compile(node.left)
        rest = [self._compile(c) for c in node.comparators]
        ops = [type(op) for op in node.ops]
        for op in ops:
            if op not in _COMPARE_KERNELS and op not in (ast.In, ast.NotIn):
                raise Unsupported(f"comparison {op.__name__}")

        def compare(batch: ColumnBatch) -> Evaluated:
            left, failed = first(batch)
            result = np.ones(batch.size, bool)
            reached = np.ones(batch.size, bool)  # a chain stops at its first false link
            for op, operand in zip(ops, rest, strict=True):
                right, right_failed = operand(batch)
                if right_failed is not None:
                    failed = _or(failed, reached & right_failed)
                truth = _compare(op, left, right, batch.size)
                result &= truth | ~reached
                reached &= truth
                left = right
            return pa.array(result), failed

        return compare

    def _IfExp(self, node: ast.IfExp) -> Node:
        test, body, orelse = self._compile(node.test), self._compile(node.body), self._compile(node.orelse)

        def choice(batch: ColumnBatch) -> Evaluated:
            condition, test_failed = test(batch)
            truth = truthy(condition, batch.size)
            (yes, yes_failed), (no, no_failed) = body(batch), orelse(batch)
            if _kind(yes) != _kind(no):
                raise Unsupported("branches of different types")
            values = pc.if_else(pa.array(truth), _as_arrow(yes), _as_arrow(no))
            # a row that failed the test never evaluates a branch; one that did not evaluates only its branch
            return values, _or(test_failed, _or(_and_mask(truth, yes_failed), _and_mask(~truth, no_failed)))

        return choice

    def _Call(self, node: ast.Call) -> Node:
        name = node.func.id  # type: ignore[attr-defined]
        function = FUNCTIONS[name][0]
        args = [self._compile(arg) for arg in node.args]

        def call(batch: ColumnBatch) -> Evaluated:
            evaluated = [arg(batch) for arg in args]
            failed = None
            for _, arg_failed in evaluated:
                failed = _or(failed, arg_failed)
            values = [v for v, _ in evaluated]
            if all(isinstance(v, _Const) for v in values):
                try:
                    return _Const(function(*(v.value for v in values))), failed  # type: ignore[union-attr]
                except Exception:
                    return _Const(None), np.ones(batch.size, bool)
            return _call(name, values, batch.size), failed

        return call


def _and_mask(rows: np.ndarray, failed: np.ndarray | None) -> np.ndarray | None:
    return None if failed is None else rows & failed


def _arithmetic(op_type: type, a: Vector, b: Vector, failed: np.ndarray | None, size: int) -> Evaluated:
    kinds = {_kind(a), _kind(b)}
    if kinds <= {"int", "float", "decimal"}:
        if "decimal" in kinds and "float" in kinds:  # Python computes these in float
            a, b = _exact_float_vector(a), _exact_float_vector(b)
            kinds = {"float"}
        if op_type is ast.Div:
            if "decimal" in kinds:
                raise Unsupported("decimal division")
            divisor_zero = _is_zero(b, size)
            values = pc.divide(_exact_float(a), _exact_float(b))
            return values, _or(failed, divisor_zero)
        kernel = _ARITHMETIC.get(op_type)
        if kernel is None:
            raise Unsupported("floor division and modulo")
        if kinds == {"int"}:  # Python ints do not overflow; int64 kernels that would must not answer
            a, b = _widened(a), _widened(b)
        return pc.call_function(kernel, [_as_arrow(a), _as_arrow(b)]), failed
    if kinds == {"time", "duration"} and op_type in (ast.Add, ast.Sub) and _kind(a) == "time":
        return pc.call_function(_ARITHMETIC[op_type], [_as_arrow(a), _as_arrow(b)]), failed
    if kinds == {"text"} and op_type is ast.Add:
        return pc.binary_join_element_wise(_as_arrow(a), _as_arrow(b), ""), failed
    raise Unsupported(f"{op_type.__name__} of {sorted(kinds)}")


def _exact_float_vector(vector: Vector) -> Vector:
    if isinstance(vector, _Const):
        return _Const(float(vector.value))
    converted = _exact_float(vector)
    assert isinstance(converted, pa.Array)
    return converted


def _widened(vector: Vector) -> Vector:
    return vector if isinstance(vector, _Const) else vector.cast(pa.int64())


def _zero(array: pa.Array) -> pa.Scalar:
    return pa.scalar(Decimal(0) if pa.types.is_decimal(array.type) else 0, array.type)


def _is_zero(vector: Vector, size: int) -> np.ndarray | None:
    if isinstance(vector, _Const):
        return np.ones(size, bool) if vector.value == 0 else None
    return as_mask(pc.equal(vector, _zero(vector)))


def _compare(op: type, left: Vector, right: Vector, size: int) -> np.ndarray:
    if op in (ast.In, ast.NotIn):
        if not isinstance(right, _Const) or not isinstance(right.value, frozenset | tuple):
            raise Unsupported("`in` against anything but a list of literals")
        if isinstance(left, _Const):
            inside = left.value in right.value
            return np.full(size, inside if op is ast.In else not inside)
        kind = _kind(left)
        wanted = {"text": str, "int": int, "float": float}.get(kind)
        if wanted is None or any(type(v) is not wanted for v in right.value):
            raise Unsupported(f"`in` of {kind} against mixed literals")
        members = pa.array(sorted(right.value), left.type if kind != "int" else pa.int64())
        found = as_mask(pc.is_in(left if kind != "int" else left.cast(pa.int64()), value_set=members))
        return found if op is ast.In else ~found
    kinds = {_kind(left), _kind(right)}
    if isinstance(left, _Const) and isinstance(right, _Const):
        raise Unsupported("a comparison of literals")  # not worth a vector form
    if "decimal" in kinds and "float" in kinds:  # Python compares these exactly; a float rounding could not
        raise Unsupported("comparing decimals with floats")
    if kinds == {"int", "float"}:
        left, right = _exact_float_vector(left), _exact_float_vector(right)
    elif len(kinds) > 1 and not kinds <= {"int", "decimal"}:
        if op in (ast.Eq, ast.NotEq) and "null" not in kinds:
            raise Unsupported(f"equality of {sorted(kinds)}")
        raise Unsupported(f"ordering of {sorted(kinds)}")
    return as_mask(pc.call_function(_COMPARE_KERNELS[op], [_as_arrow(left), _as_arrow(right)]))


def _call(name: str, values: Sequence[Vector], size: int) -> pa.Array:
    if name == "abs" and _kind(values[0]) in ("int", "float", "decimal"):
        return pc.abs_checked(_as_arrow(_widened(values[0]) if _kind(values[0]) == "int" else values[0]))
    if name == "len" and _kind(values[0]) == "text":
        return pc.utf8_length(values[0])
    if name == "float" and _kind(values[0]) in ("int", "float", "decimal"):
        return _exact_float(values[0])
    if name in ("min", "max"):
        kinds = {_kind(v) for v in values}
        if len(kinds) == 1 and kinds <= {"int", "float"}:
            kernel = pc.min_element_wise if name == "min" else pc.max_element_wise
            return kernel(*(_as_arrow(v) for v in values))
    raise Unsupported(f"{name}() of {[_kind(v) for v in values]}")


__all__ = [
    "BLANK_TEXT",
    "ColumnBatch",
    "Unsupported",
    "VectorExpression",
    "as_mask",
    "blank_or_null",
    "canonical_columns",
    "per_value",
    "re2_fullmatch",
    "records_of",
    "truthy",
]
