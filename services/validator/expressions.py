"""A small, safe expression language for BUSINESS_RULE rules and `when` conditions.

Rule files are configuration, so their expressions must not be able to do anything but compute a value from
the record. An expression is parsed with `ast` (Python syntax, `mode="eval"`), every node is checked against a
whitelist, and the tree is compiled once into nested closures. Nothing is ever passed to `eval`/`exec`, so a
construct we did not whitelist (attribute access, subscripts, lambdas, comprehensions, `**`, calls of anything
but the functions below) cannot run at all: it is refused at load with the column it starts at.

Names are record fields, except `now` (the engine's clock). A field that is absent or None raises
`MissingField` at evaluation: the rule then fails with a message naming the field (or, for a `when`
condition, the condition is false). Times are `datetime`s; durations come from `seconds(n)`, `minutes(n)`,
`hours(n)`, `days(n)` or `duration('5m')`, so `event_time <= now + minutes(5)` reads as it should.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal, DecimalException, InvalidOperation
from typing import Any

from services.kit.durations import parse_duration

MAX_SOURCE_LENGTH = 2000
MAX_NODES = 300  # bounds evaluation cost: no loops exist, so cost is linear in the tree size

Evaluator = Callable[[Mapping[str, Any], datetime], Any]


class ExpressionError(ValueError):
    """The expression text is refused (syntax, or a construct outside the whitelist)."""


class MissingField(Exception):
    """A field the expression reads is absent or None in the record."""

    def __init__(self, field: str) -> None:
        super().__init__(field)
        self.field = field


class EvaluationError(Exception):
    """The expression could not be computed for this record (type mismatch, division by zero, ...)."""


def _lower(value: str) -> str:
    return value.lower()


def _upper(value: str) -> str:
    return value.upper()


def _strip(value: str) -> str:
    return value.strip()


def _round(value: Any, digits: int = 0) -> Any:
    return round(value, digits)


# name -> (function, min args, max args)
FUNCTIONS: dict[str, tuple[Callable[..., Any], int, int]] = {
    "abs": (abs, 1, 1),
    "round": (_round, 1, 2),
    "len": (len, 1, 1),
    "lower": (_lower, 1, 1),
    "upper": (_upper, 1, 1),
    "strip": (_strip, 1, 1),
    "min": (min, 2, 8),
    "max": (max, 2, 8),
    "float": (float, 1, 1),
    "int": (int, 1, 1),
    "seconds": (lambda n: timedelta(seconds=n), 1, 1),
    "minutes": (lambda n: timedelta(minutes=n), 1, 1),
    "hours": (lambda n: timedelta(hours=n), 1, 1),
    "days": (lambda n: timedelta(days=n), 1, 1),
    "duration": (parse_duration, 1, 1),
}
RESERVED_NAMES = frozenset({"now", *FUNCTIONS})

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_COMPARE: dict[type[ast.cmpop], Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}
_REFUSED_HINTS: dict[type[ast.AST], str] = {
    ast.Attribute: "attribute access",
    ast.Subscript: "subscripts",
    ast.Lambda: "lambda",
    ast.ListComp: "comprehensions",
    ast.SetComp: "comprehensions",
    ast.DictComp: "comprehensions",
    ast.GeneratorExp: "generator expressions",
    ast.NamedExpr: "assignment expressions",
    ast.JoinedStr: "f-strings",
    ast.Starred: "star arguments",
    ast.Dict: "dict literals",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.YieldFrom: "yield",
}


def _mixed_numbers(a: Any, b: Any) -> tuple[Any, Any]:
    """Decimal (CDC money columns) and float (event measures, literals) do not mix in Python; compute in float."""
    if isinstance(a, Decimal) and isinstance(b, float):
        return float(a), b
    if isinstance(a, float) and isinstance(b, Decimal):
        return a, float(b)
    raise TypeError(f"unsupported operand types {type(a).__name__} and {type(b).__name__}")


@dataclass(frozen=True, slots=True)
class Expression:
    """A compiled expression; call it with the record and the current time."""

    source: str
    fields: frozenset[str]  # record fields it reads
    _evaluate: Evaluator
    test: Callable[[Mapping[str, Any], datetime], bool]  # truth as a `when` condition (one call, hot path)

    def __call__(self, record: Mapping[str, Any], now: datetime) -> Any:
        """The value, or raises `MissingField` / `EvaluationError`."""
        try:
            return self._evaluate(record, now)
        except MissingField:
            raise
        except DecimalException as error:  # its str() is a list of signal classes: the name says it all
            raise EvaluationError(type(error).__name__) from None
        except (ArithmeticError, TypeError, ValueError, OverflowError) as error:
            raise EvaluationError(f"{type(error).__name__}: {error}") from None

    def holds(self, record: Mapping[str, Any], now: datetime) -> bool:
        """Truth of a `when` condition: false when a field it reads is missing or it cannot be computed."""
        return self.test(record, now)


def _condition(evaluate: Evaluator) -> Callable[[Mapping[str, Any], datetime], bool]:
    def test(record: Mapping[str, Any], now: datetime) -> bool:
        try:
            return bool(evaluate(record, now))
        except (MissingField, ArithmeticError, TypeError, ValueError, InvalidOperation, OverflowError):
            return False

    return test


def compile_expression(source: str) -> Expression:
    """Parse, check against the whitelist and compile `source`; raises `ExpressionError` naming the problem."""
    if not isinstance(source, str) or not source.strip():
        raise ExpressionError("expression is empty")
    if len(source) > MAX_SOURCE_LENGTH:
        raise ExpressionError(f"expression longer than {MAX_SOURCE_LENGTH} characters")
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except SyntaxError as error:
        raise ExpressionError(f"syntax error at column {error.offset}: {error.msg}") from None
    compiler = _Compiler()
    evaluate = compiler.compile(tree.body)
    if compiler.nodes > MAX_NODES:
        raise ExpressionError(f"expression too large ({compiler.nodes} nodes > {MAX_NODES})")
    return Expression(source.strip(), frozenset(compiler.fields), evaluate, _condition(evaluate))


_NOT_CONSTANT = object()


class _Compiler:
    def __init__(self) -> None:
        self.fields: set[str] = set()
        self.nodes = 0
        # evaluator -> its value, for sub-expressions known at compile time (literals, calls on literals):
        # folding them keeps `now + minutes(5)` to one addition per record
        self.constants: dict[Evaluator, Any] = {}

    def constant(self, value: Any) -> Evaluator:
        def evaluate(record: Mapping[str, Any], now: datetime) -> Any:
            return value

        self.constants[evaluate] = value
        return evaluate

    def value_of(self, evaluator: Evaluator) -> Any:
        return self.constants.get(evaluator, _NOT_CONSTANT)

    def refuse(self, node: ast.AST, what: str) -> ExpressionError:
        column = getattr(node, "col_offset", -1) + 1
        return ExpressionError(f"{what} is not allowed (column {column})")

    def compile(self, node: ast.AST) -> Evaluator:
        self.nodes += 1
        handler = getattr(self, f"_{type(node).__name__}", None)
        if handler is None:
            hint = _REFUSED_HINTS.get(type(node), f"{type(node).__name__} syntax")
            raise self.refuse(node, hint)
        return handler(node)

    # -- leaves -------------------------------------------------------------------------------------------------
    def _Constant(self, node: ast.Constant) -> Evaluator:
        value = node.value
        if value is not None and not isinstance(value, bool | int | float | str):
            raise self.refuse(node, f"a {type(value).__name__} literal")
        return self.constant(value)

    def _Name(self, node: ast.Name) -> Evaluator:
        name = node.id
        if name.startswith("_"):
            raise self.refuse(node, f"the name {name!r} (leading underscore)")
        if name == "now":
            return lambda record, now: now
        if name in FUNCTIONS:
            raise self.refuse(node, f"using the function {name!r} as a value")
        self.fields.add(name)

        def field(record: Mapping[str, Any], now: datetime) -> Any:
            value = record.get(name)
            if value is None:
                raise MissingField(name)
            return value

        return field

    def _sequence(self, node: ast.List | ast.Tuple | ast.Set) -> Evaluator:
        items = [self.compile(item) for item in node.elts]
        values = [self.value_of(item) for item in items]
        if all(value is not _NOT_CONSTANT for value in values):
            try:
                return self.constant(frozenset(values))  # O(1) `in` for the common `x in ['a', 'b']`
            except TypeError:
                return self.constant(tuple(values))
        return lambda record, now: tuple(item(record, now) for item in items)

    _List = _Tuple = _Set = _sequence

    # -- operators ----------------------------------------------------------------------------------------------
    def _BinOp(self, node: ast.BinOp) -> Evaluator:
        op_type = type(node.op)
        if op_type is ast.Pow:
            raise self.refuse(node, "the power operator ** (unbounded cost)")
        op = _BINARY.get(op_type)
        if op is None:
            raise self.refuse(node, f"the operator {op_type.__name__}")
        left, right = self.compile(node.left), self.compile(node.right)
        repeats = op_type is ast.Mult  # 'x' * 10**9 would allocate a gigabyte: multiply numbers only

        def binary(record: Mapping[str, Any], now: datetime) -> Any:
            a, b = left(record, now), right(record, now)
            if repeats and (isinstance(a, str | tuple | frozenset) or isinstance(b, str | tuple | frozenset)):
                raise TypeError("multiplication is defined for numbers only")
            try:
                return op(a, b)
            except TypeError:
                return op(*_mixed_numbers(a, b))

        return binary

    def _UnaryOp(self, node: ast.UnaryOp) -> Evaluator:
        operand = self.compile(node.operand)
        if isinstance(node.op, ast.Not):
            return lambda record, now: not operand(record, now)
        if isinstance(node.op, ast.USub):
            return lambda record, now: -operand(record, now)
        if isinstance(node.op, ast.UAdd):
            return lambda record, now: +operand(record, now)
        raise self.refuse(node, f"the operator {type(node.op).__name__}")

    def _BoolOp(self, node: ast.BoolOp) -> Evaluator:
        values = tuple(self.compile(v) for v in node.values)
        if isinstance(node.op, ast.And):

            def all_of(record: Mapping[str, Any], now: datetime) -> bool:
                return all(value(record, now) for value in values)

            return all_of

        def any_of(record: Mapping[str, Any], now: datetime) -> bool:
            return any(value(record, now) for value in values)

        return any_of

    def _Compare(self, node: ast.Compare) -> Evaluator:
        ops = []
        for op in node.ops:
            function = _COMPARE.get(type(op))
            if function is None:
                raise self.refuse(node, f"the comparison {type(op).__name__} (use == / != with values)")
            ops.append(function)
        first = self.compile(node.left)
        rest = [self.compile(c) for c in node.comparators]
        if len(ops) == 1:
            (op,), (right,) = ops, rest
            constant = self.value_of(right)
            if constant is _NOT_CONSTANT:
                return lambda record, now: op(first(record, now), right(record, now))
            if isinstance(node.left, ast.Name) and node.left.id in self.fields:
                return self._field_against_constant(node.left.id, op, constant)
            if isinstance(node.ops[0], ast.In):
                return lambda record, now: first(record, now) in constant
            if isinstance(node.ops[0], ast.NotIn):
                return lambda record, now: first(record, now) not in constant
            return lambda record, now: op(first(record, now), constant)
        pairs = tuple(zip(ops, rest, strict=True))

        def chained(record: Mapping[str, Any], now: datetime) -> bool:
            left = first(record, now)
            for op, operand in pairs:
                right = operand(record, now)
                if not op(left, right):
                    return False
                left = right
            return True

        return chained

    @staticmethod
    def _field_against_constant(name: str, op: Callable[[Any, Any], Any], constant: Any) -> Evaluator:
        # `event_type in [...]`, `amount >= 0`: the most common shapes, in one call instead of three
        def compare(record: Mapping[str, Any], now: datetime) -> Any:
            value = record.get(name)
            if value is None:
                raise MissingField(name)
            return op(value, constant)

        return compare

    def _IfExp(self, node: ast.IfExp) -> Evaluator:
        test, body, orelse = self.compile(node.test), self.compile(node.body), self.compile(node.orelse)
        return lambda record, now: body(record, now) if test(record, now) else orelse(record, now)

    def _Call(self, node: ast.Call) -> Evaluator:
        if not isinstance(node.func, ast.Name):
            raise self.refuse(node, "calling anything but a whitelisted function")
        name = node.func.id
        if name not in FUNCTIONS:
            raise self.refuse(node, f"calling {name!r} (allowed functions: {', '.join(sorted(FUNCTIONS))})")
        if node.keywords:
            raise self.refuse(node, f"keyword arguments to {name}()")
        function, low, high = FUNCTIONS[name]
        if not low <= len(node.args) <= high:
            expected = str(low) if low == high else f"{low} to {high}"
            raise self.refuse(node, f"{name}() with {len(node.args)} arguments (takes {expected})")
        args = tuple(self.compile(arg) for arg in node.args)
        values = [self.value_of(arg) for arg in args]
        if all(value is not _NOT_CONSTANT for value in values):
            # Every function is pure: compute it once now. A bad literal (duration('5x')) is a load error.
            try:
                return self.constant(function(*values))
            except (TypeError, ValueError, ArithmeticError) as error:
                raise self.refuse(node, f"{name}{tuple(values)!r}: {error}") from None
        if len(args) == 1:
            (arg,) = args
            return lambda record, now: function(arg(record, now))
        return lambda record, now: function(*(arg(record, now) for arg in args))
