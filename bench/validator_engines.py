"""The validator's column-wise rule work with three engines: Arrow compute (the project's), DuckDB and Polars.

Issue 13 chose the engine by measurement; this is that measurement, rerun by `make bench`. Each engine takes the
same real batches -- raw events decoded column-wise into an Arrow table exactly as `EventProcessor.process_batch`
builds it (`ColumnarDecoder` on the generator's payloads, `bench.validator._events`), with faults mixed in so that
every rule fails somewhere -- and computes, for each column-wise rule of `services/validator/rules/events.yaml`,
the boolean numpy mask of the rows it fails (and of the rows its `when` holds on):

- arrow: the project's own compiled rules (`CompiledRule.failing` and `.when_holds` over a `ColumnBatch`);
- arrow-direct: the same masks in pyarrow.compute written by hand in one pass, i.e. the project's code without
  its per-rule Python (what the project's structure costs on top of the engine);
- duckdb: one SQL query over the Arrow table, one boolean column per mask, fetched as numpy;
- polars: one `select` of expressions over `pl.from_arrow` of the columns used, each column to numpy.

DuckDB and Polars compute the masks from the rule specs (`Atom`s below), written so that they mean what the
rules mean in Python, which is not what the engines do by default: both order NaN above every number (so
`price >= 0` holds for NaN, where Python's and Arrow's comparisons are false) and their trim/strip functions know
other whitespace than `str.isspace` (MANDATORY's "blank is missing"). `check_same` asserts that all engines give
identical masks on every batch measured. Lookups and the duplicate window are left out: they are hash lookups in
the process's own stores, not engine work. Every engine runs on one thread: the service runs one process per core.
"""

from __future__ import annotations

import ast
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bench.harness import BenchContext, Result
from services.kit.avro import AvroDeserializer, AvroSerializer, Decoded, SchemaRepository
from services.kit.avro_columnar import ColumnarDecoder
from services.validator.columns import BLANK_TEXT, ColumnBatch, as_mask, re2_fullmatch
from services.validator.ids import ANY_CASE_UUID
from services.validator.rulebook import BusinessRule, CompiledRule, MandatoryRule, RuleBook, RuleType, ValueRule

SIZES = (500, 2000, 10_000)  # 2000: the service's batch (the runtime hands the processor up to 2000 records)
SERVICE_BATCH = 2000
FAULT_EVERY = 9  # one row in nine carries a fault
ENGINES = ("arrow", "arrow-direct", "duckdb", "polars")
COLUMN_RULE_TYPES = (RuleType.MANDATORY, RuleType.VALUE, RuleType.BUSINESS_RULE)
Masks = dict[str, np.ndarray]  # rule id -> rows it fails (before its `when`); "<rule id>:when" -> rows it applies to


# --- the batches ------------------------------------------------------------------------------------------------
_UUID = "8d0c8f7e-3a51-4c1e-9f3b-2a7e6c1d4b90"


def _fault_table(now: datetime) -> list[Callable[[dict[str, Any]], None]]:
    """Faults a producer makes, each one a change to a decoded raw_event; several are the cases where engines'
    defaults differ from the rules' meaning (NaN, whitespace Python knows and Unicode does not, trailing newline)."""
    step = timedelta(minutes=5)

    def setter(**values: Any) -> Callable[[dict[str, Any]], None]:
        return lambda record: record.update(values)

    def purchase(**values: Any) -> Callable[[dict[str, Any]], None]:
        return setter(event_type="purchase", **values)

    return [
        setter(event_id=None),
        setter(user_id=""),
        setter(event_id="   "),
        setter(event_id="\u3000"),  # ideographic space: blank for Python, Arrow's table, RE2 and Rust alike
        setter(user_id="\x1f"),  # unit separator: str.isspace() is true, Unicode White_Space is not
        setter(event_type="\x1c\x1d "),
        setter(event_type="product_view", product_id="\xa0"),
        setter(event_type="add_to_cart", product_id=None),
        setter(session_id=_UUID.upper()),  # the same UUID: passes
        setter(session_id="not-a-uuid"),
        setter(transaction_id="{" + _UUID + "}"),
        setter(user_id=_UUID + "\n"),
        setter(product_id=_UUID.replace("-", "")),
        setter(event_type="purchase "),
        setter(event_type="PURCHASE"),
        purchase(transaction_id=None, amount=None),
        purchase(transaction_id=_UUID, quantity=1, price=10.0, amount=-0.01),
        purchase(transaction_id=_UUID, quantity=1, price=float("nan"), amount=10.0),
        purchase(transaction_id=_UUID, quantity=1, price=-0.0, amount=float("nan")),  # -0.0 >= 0 holds
        purchase(transaction_id=_UUID, quantity=1, price=float("inf"), amount=float("inf")),
        setter(quantity=0),
        setter(quantity=1001),
        setter(quantity=-5),
        setter(quantity=1000),
        setter(device_type="Desktop"),
        setter(device_type="phone"),
        setter(ip_address="256.1.1.1"),
        setter(ip_address="1.2.3.4\n"),
        setter(ip_address="01.2.3.4"),
        setter(ip_address=""),
        setter(ip_address="\u0661.\u0662.\u0663.\u0664"),  # Arabic-Indic digits: [0-9] is ASCII in every engine
        setter(country="us"),
        setter(country="USA"),
        setter(country="US\n"),
        setter(country="\xc4B"),
        setter(event_time=now + step),  # exactly the limit: passes
        setter(event_time=now + step + timedelta(milliseconds=1)),
        setter(event_time=now + timedelta(days=3)),
        setter(event_time=None),
    ]


def real_batch(size: int, now: datetime) -> pa.Table:
    """`size` generator events with faults mixed in, as payloads decoded column-wise into the table that
    `EventProcessor.process_batch` judges. `now` must be a whole millisecond (the limit's fault lands on it)."""
    from bench.validator import _events

    schemas = SchemaRepository.load()
    decode, encode = AvroDeserializer(schemas, "raw_event"), AvroSerializer(schemas["raw_event"])
    faults = _fault_table(now)
    _, records = _events(size)
    payloads = [payload for _, payload in records]
    for count, row in enumerate(range(FAULT_EVERY // 2, size, FAULT_EVERY)):
        decoded = decode(payloads[row])
        assert isinstance(decoded, Decoded)
        record = dict(decoded.record)
        faults[count % len(faults)](record)
        payloads[row] = encode(record)
    columns = ColumnarDecoder(schemas["raw_event"]).decode(payloads)
    assert len(columns.bad) == 0, "every payload decodes column-wise"
    return pa.table(columns.columns)


def judging_time() -> datetime:
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


# --- the rules, as atoms each engine writes in its own terms -------------------------------------------------------
@dataclass(frozen=True)
class Missing:
    """MANDATORY: null, empty or blank text (`str.isspace`), an empty map or list."""

    field: str


@dataclass(frozen=True)
class NotIn:
    """enum: a non-null value outside `values`."""

    field: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class OutOfRange:
    """min / max: a non-null number outside the bounds; NaN is outside every bound (as in Python)."""

    field: str
    low: float | None
    high: float | None
    low_exclusive: bool
    high_exclusive: bool


@dataclass(frozen=True)
class NoMatch:
    """regex / format: non-null text that `pattern` (RE2, anchored) does not match."""

    field: str
    pattern: str


@dataclass(frozen=True)
class InSet:
    """`when: field in [...]`: true only for a non-null value among `values`."""

    field: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class NotAtMost:
    """BUSINESS_RULE `field <= now + duration`: fails when false, or when the field is missing."""

    field: str
    offset: timedelta  # from the time the batch is judged at

    def limit(self, now: datetime) -> datetime:
        return now + self.offset


Atom = Missing | NotIn | OutOfRange | NoMatch | InSet | NotAtMost


@dataclass(frozen=True)
class MaskSpec:
    """A mask: the OR of its atoms (a row fails if any check fails), or for a `when` their AND."""

    name: str
    atoms: tuple[Atom, ...]
    conjunction: bool = False


def column_rules(rules: tuple[CompiledRule, ...]) -> list[CompiledRule]:
    return [rule for rule in rules if rule.type in COLUMN_RULE_TYPES]


def mask_specs(rules: list[CompiledRule]) -> list[MaskSpec]:
    """What each column-wise rule computes, from its spec (the same YAML the project compiles)."""
    specs = []
    for rule in rules:
        model = rule.spec
        if isinstance(model, MandatoryRule):
            specs.append(MaskSpec(rule.id, tuple(Missing(name) for name in model.fields)))
        elif isinstance(model, ValueRule):
            specs.append(MaskSpec(rule.id, tuple(atom for name in model.fields for atom in _value_atoms(model, name))))
        elif isinstance(model, BusinessRule):
            specs.append(MaskSpec(rule.id, (_business_atom(model.expression),)))
        if rule.when is not None:
            specs.append(MaskSpec(f"{rule.id}:when", _when_atoms(rule.when.source), conjunction=True))
    return specs


def _value_atoms(model: ValueRule, name: str) -> Iterator[Atom]:
    if model.enum is not None:
        if not all(isinstance(value, str) for value in model.enum):
            raise NotImplementedError(f"{model.id}: an enum of non-text values")
        yield NotIn(name, tuple(str(value) for value in model.enum))
    if model.min is not None or model.max is not None:
        yield OutOfRange(name, model.min, model.max, model.min_exclusive, model.max_exclusive)
    if model.regex is not None:
        yield NoMatch(name, re2_fullmatch(model.regex))
    if model.format == "uuid":
        yield NoMatch(name, ANY_CASE_UUID)


def _when_atoms(source: str) -> tuple[Atom, ...]:
    """`field in [literals]`, joined by `and` (what `when:` in either of its forms compiles to)."""
    tree = ast.parse(source, mode="eval").body
    parts = tree.values if isinstance(tree, ast.BoolOp) and isinstance(tree.op, ast.And) else [tree]
    atoms: list[Atom] = []
    for part in parts:
        if not (
            isinstance(part, ast.Compare)
            and isinstance(part.left, ast.Name)
            and [type(op) for op in part.ops] == [ast.In]
            and isinstance(part.comparators[0], ast.List | ast.Tuple | ast.Set)
        ):
            raise NotImplementedError(f"when {source!r}: only `field in [...]` is written for the other engines")
        values = [ast.literal_eval(item) for item in part.comparators[0].elts]
        if not all(isinstance(value, str) for value in values):
            raise NotImplementedError(f"when {source!r}: only text values")
        atoms.append(InSet(part.left.id, tuple(values)))
    return tuple(atoms)


_DURATION_UNITS = frozenset({"seconds", "minutes", "hours", "days"})  # the language's duration functions


def _business_atom(source: str) -> Atom:
    """`field <= now + unit(n)` (or `-`); other expressions are not written for the other engines."""
    tree = ast.parse(source, mode="eval").body
    match tree:
        case ast.Compare(
            left=ast.Name(id=field),
            ops=[ast.LtE()],
            comparators=[
                ast.BinOp(
                    left=ast.Name(id="now"),
                    op=ast.Add() | ast.Sub() as op,
                    right=ast.Call(func=ast.Name(id=unit), args=[ast.Constant(value=int() | float() as amount)]),
                )
            ],
        ) if unit in _DURATION_UNITS:
            step = timedelta(**{unit: amount})
            return NotAtMost(field, step if isinstance(op, ast.Add) else -step)
    raise NotImplementedError(f"expression {source!r} is not written for the other engines")


# --- the engines ----------------------------------------------------------------------------------------------------
class NoChecks:
    """The column-wise rules measured here consult neither the reference store nor the duplicate memory."""

    def contains(self, table: str, key: Any) -> bool:
        raise AssertionError("no lookup is measured")

    def seen(self, namespace: str, key: Any, event_time: datetime) -> bool:
        raise AssertionError("no duplicate check is measured")


Engine = Callable[[pa.Table, datetime], Masks]


def arrow_engine(rules: list[CompiledRule]) -> Engine:
    """The project's path: each compiled rule's column check and `when` over one `ColumnBatch`."""
    checks = NoChecks()

    def masks(table: pa.Table, now: datetime) -> Masks:
        batch = ColumnBatch(table, now)
        out: Masks = {}
        for rule in rules:
            assert rule.failing is not None
            out[rule.id] = rule.failing(batch, checks)
            if rule.when_holds is not None:
                out[f"{rule.id}:when"] = rule.when_holds(batch)
        return out

    return masks


def _kind(table: pa.Table, name: str) -> str:
    if name not in table.column_names:
        return "absent"
    kind = table.schema.field(name).type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "text"
    if pa.types.is_floating(kind):
        return "float"
    if pa.types.is_integer(kind):
        return "int"
    if pa.types.is_map(kind) or pa.types.is_list(kind):
        return "sized"
    return "other"


def arrow_direct_engine(rules: list[CompiledRule]) -> Engine:
    """The same masks with pyarrow.compute called directly, one kernel per atom, nulls filled once per mask."""

    specs = mask_specs(rules)

    def atom_mask(table: pa.Table, atom: Atom, now: datetime) -> pa.Array:
        kind = _kind(table, atom.field)
        if kind == "absent":
            return pa.array(np.full(table.num_rows, isinstance(atom, Missing | NotAtMost)))
        column = table.column(atom.field)
        match atom:
            case Missing():
                if kind == "text":
                    return pc.or_kleene(pc.is_null(column), pc.match_substring_regex(column, BLANK_TEXT))
                if kind == "sized":
                    return pc.or_kleene(pc.is_null(column), pc.equal(pc.list_value_length(column), 0))
                return pc.is_null(column)
            case NotIn():  # is_in says false for a null, which passes
                found = pc.is_in(column, value_set=pa.array(atom.values, pa.string()))
                return pc.and_(pc.is_valid(column), pc.invert(found))
            case OutOfRange():  # IEEE comparisons, as Python's: NaN is inside no bound
                return pc.invert(_arrow_inside(column, atom, kind))
            case NoMatch():
                return pc.invert(pc.match_substring_regex(column, atom.pattern))
            case InSet():
                return pc.is_in(column, value_set=pa.array(atom.values, pa.string()))
            case NotAtMost():
                limit = pa.scalar(atom.limit(now), pa.timestamp("us", tz="UTC"))
                return pc.or_kleene(pc.is_null(column), pc.greater(column, limit))
        raise TypeError(atom)

    def masks(table: pa.Table, now: datetime) -> Masks:
        out: Masks = {}
        for spec in specs:
            combined = None
            for atom in spec.atoms:
                mask = atom_mask(table, atom, now)
                combine = pc.and_kleene if spec.conjunction else pc.or_kleene
                combined = mask if combined is None else combine(combined, mask)
            out[spec.name] = as_mask(combined)  # null (a null value, or not in the set): false
        return out

    return masks


def _arrow_inside(column: pa.ChunkedArray, atom: OutOfRange, kind: str) -> pa.ChunkedArray:
    value = int if kind == "int" else float
    inside = None
    if atom.low is not None:
        kernel = pc.greater if atom.low_exclusive else pc.greater_equal
        inside = kernel(column, value(atom.low))
    if atom.high is not None:
        kernel = pc.less if atom.high_exclusive else pc.less_equal
        below = kernel(column, value(atom.high))
        inside = below if inside is None else pc.and_(inside, below)
    assert inside is not None
    return inside


def _sql_text(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _sql_number(value: float, kind: str) -> str:
    return str(int(value)) if kind == "int" else repr(float(value))


def duckdb_engine(rules: list[CompiledRule]) -> Engine:
    """One query, one boolean column per mask, over the Arrow table registered as a view; fetched as numpy.
    Patterns and sets are inlined as constants (compiled once per query); `coalesce` makes a null false."""
    import duckdb

    connection = duckdb.connect()
    connection.execute("SET threads = 1")
    specs = mask_specs(rules)
    limits = [atom for spec in specs for atom in spec.atoms if isinstance(atom, NotAtMost)]
    queries: dict[tuple[str, ...], tuple[str, list[str]]] = {}

    def atom_sql(table: pa.Table, atom: Atom) -> str:
        kind = _kind(table, atom.field)
        if kind == "absent":
            return "true" if isinstance(atom, Missing | NotAtMost) else "false"
        name = '"' + atom.field + '"'
        match atom:
            case Missing():
                if kind == "text":
                    return f"({name} IS NULL OR regexp_full_match({name}, {_sql_text(BLANK_TEXT)}))"
                if kind == "sized":
                    return f"({name} IS NULL OR cardinality({name}) = 0)"
                return f"({name} IS NULL)"
            case NotIn():
                return f"coalesce({name} NOT IN ({', '.join(map(_sql_text, atom.values))}), false)"
            case OutOfRange():
                bounds = []
                if atom.low is not None:
                    bounds.append(f"{name} {'>' if atom.low_exclusive else '>='} {_sql_number(atom.low, kind)}")
                if atom.high is not None:
                    bounds.append(f"{name} {'<' if atom.high_exclusive else '<='} {_sql_number(atom.high, kind)}")
                outside = f"NOT ({' AND '.join(bounds)})"
                if kind == "float":  # DuckDB orders NaN above every number: NaN >= 0 is true there
                    outside = f"isnan({name}) OR {outside}"
                return f"coalesce({outside}, false)"
            case NoMatch():
                return f"coalesce(NOT regexp_full_match({name}, {_sql_text(atom.pattern)}), false)"
            case InSet():
                return f"coalesce({name} IN ({', '.join(map(_sql_text, atom.values))}), false)"
            case NotAtMost():
                return f"NOT coalesce({name} <= $limit_{atom.field}, false)"
        raise TypeError(atom)

    def query(table: pa.Table) -> tuple[str, list[str]]:
        key = tuple(f"{f.name}:{f.type}" for f in table.schema)
        made = queries.get(key)
        if made is None:
            selects, names = [], []
            for spec in specs:
                parts = [atom_sql(table, atom) for atom in spec.atoms]
                selects.append(f"({(' AND ' if spec.conjunction else ' OR ').join(parts)}) AS m{len(names)}")
                names.append(spec.name)
            made = queries[key] = (f"SELECT {', '.join(selects)} FROM batch", names)
        return made

    def masks(table: pa.Table, now: datetime) -> Masks:
        sql, names = query(table)
        connection.register("batch", table)
        columns = connection.execute(sql, {f"limit_{atom.field}": atom.limit(now) for atom in limits}).fetchnumpy()
        return {name: np.asarray(columns[f"m{index}"], bool) for index, name in enumerate(names)}

    return masks


def polars_engine(rules: list[CompiledRule]) -> Engine:
    """One `select` of expressions over `pl.from_arrow` of the columns the rules read; each mask to numpy."""
    os.environ.setdefault("POLARS_MAX_THREADS", "1")  # read once, when polars is first imported
    import polars as pl

    specs = mask_specs(rules)
    used = sorted({atom.field for spec in specs for atom in spec.atoms})

    def atom_expr(table: pa.Table, atom: Atom, now: datetime) -> pl.Expr:
        kind = _kind(table, atom.field)
        if kind == "absent":
            return pl.lit(isinstance(atom, Missing | NotAtMost))
        column = pl.col(atom.field)
        match atom:
            case Missing():
                if kind == "text":
                    return column.is_null() | column.str.contains(BLANK_TEXT).fill_null(False)
                if kind == "sized":
                    return column.is_null() | (column.list.len() == 0).fill_null(False)
                return column.is_null()
            case NotIn():
                return (~column.is_in(list(atom.values))).fill_null(False)
            case OutOfRange():
                value = int if kind == "int" else float
                inside = pl.lit(True)
                if atom.low is not None:
                    low = value(atom.low)
                    inside = inside & (column > low if atom.low_exclusive else column >= low)
                if atom.high is not None:
                    high = value(atom.high)
                    inside = inside & (column < high if atom.high_exclusive else column <= high)
                outside = ~inside
                if kind == "float":  # Polars orders NaN above every number: NaN >= 0 is true there
                    outside = column.is_nan() | outside
                return outside.fill_null(False)
            case NoMatch():
                return (~column.str.contains(atom.pattern)).fill_null(False)
            case InSet():
                return column.is_in(list(atom.values)).fill_null(False)
            case NotAtMost():
                return (~(column <= pl.lit(atom.limit(now)))).fill_null(True)
        raise TypeError(atom)

    def masks(table: pa.Table, now: datetime) -> Masks:
        frame = pl.from_arrow(table.select([name for name in used if name in table.column_names]))
        assert isinstance(frame, pl.DataFrame)
        expressions = []
        for index, spec in enumerate(specs):
            parts = [atom_expr(table, atom, now) for atom in spec.atoms]
            combined = parts[0]
            for part in parts[1:]:
                combined = (combined & part) if spec.conjunction else (combined | part)
            expressions.append(combined.alias(f"m{index}"))
        result = frame.select(expressions)
        return {spec.name: result.get_column(f"m{index}").to_numpy() for index, spec in enumerate(specs)}

    return masks


def engines(rules: list[CompiledRule], only: tuple[str, ...] = ENGINES) -> dict[str, Engine]:
    """The engines asked for that can be imported here (DuckDB and Polars are development dependencies)."""
    makers = {
        "arrow": arrow_engine,
        "arrow-direct": arrow_direct_engine,
        "duckdb": duckdb_engine,
        "polars": polars_engine,
    }
    made = {}
    for name in only:
        try:
            made[name] = makers[name](rules)
        except ImportError:
            continue
    return made


def check_same(results: Mapping[str, Masks], table: pa.Table) -> None:
    """Every engine's masks equal Arrow compute's (the project's), rule by rule, row by row."""
    reference_name = next(iter(results))
    reference = results[reference_name]
    problems = []
    for name, masks in results.items():
        if masks.keys() != reference.keys():
            problems.append(f"{name}: masks {sorted(masks)} instead of {sorted(reference)}")
            continue
        for rule, mask in masks.items():
            expected = reference[rule]
            if mask.dtype != np.bool_ or mask.shape != expected.shape:
                problems.append(f"{name} {rule}: {mask.dtype} {mask.shape}, not bool {expected.shape}")
            elif not np.array_equal(mask, expected):
                rows = np.nonzero(mask != expected)[0][:3].tolist()
                shown = table.take(pa.array(rows, pa.int64())).drop_columns(["properties"]).to_pylist()
                problems.append(f"{name} {rule}: differs from {reference_name} on rows {rows}: {shown}")
    if problems:
        raise AssertionError("engines disagree:\n  " + "\n  ".join(problems))


# --- timing ---------------------------------------------------------------------------------------------------------
def _once(engine: Engine, table: pa.Table, now: datetime) -> float:
    started = time.perf_counter()
    engine(table, now)
    return time.perf_counter() - started


@dataclass
class EngineTimes:
    """Best seconds per batch by batch size, and the line through them: fixed cost per batch + cost per row."""

    seconds: dict[int, float]

    @property
    def per_row_us(self) -> float:
        """The slope of the line through the batch sizes measured (500 to 10 000 rows)."""
        slope, _ = np.polyfit(np.array(SIZES, float), [self.seconds[size] for size in SIZES], 1)
        return float(slope) * 1e6

    @property
    def fixed_us(self) -> float:
        """A batch of one row: what every batch pays whatever its size (kernel calls, planning, conversions)."""
        return self.seconds[1] * 1e6

    def at(self, size: int) -> float:
        """µs per row at batch `size`, fixed cost included (what the service pays)."""
        return self.seconds[size] * 1e6 / size


def measure(scale: float = 1.0, only: tuple[str, ...] = ENGINES) -> tuple[dict[str, EngineTimes], dict[str, int]]:
    """Time each engine on real batches of each size (best of several), after checking they agree on them."""
    rules = column_rules(RuleBook().current.for_kind("event"))
    now = judging_time()
    made = engines(rules, only)
    tables = {size: real_batch(size, now) for size in (1, *SIZES)}
    for table in tables.values():  # also warms every engine up (query planning, regex compilation)
        check_same({name: engine(table, now) for name, engine in made.items()}, table)
    failing = {name: int(mask.sum()) for name, mask in made["arrow"](tables[SERVICE_BATCH], now).items()}
    budget = 0.8 * max(scale, 0.1) * len(made)  # seconds of timing per batch size, all engines
    times: dict[str, EngineTimes] = {name: EngineTimes({}) for name in made}
    for size, table in tables.items():
        # rounds of every engine in turn, best of the rounds: a busy moment of the shared machine hits all alike
        best = {name: _once(engine, table, now) for name, engine in made.items()}
        rounds = int(min(200, max(3, budget / sum(best.values()))))
        for _ in range(rounds):
            for name, engine in made.items():
                best[name] = min(best[name], _once(engine, table, now))
        for name, seconds in best.items():
            times[name].seconds[size] = seconds
    return times, failing


def run(ctx: BenchContext) -> list[Result]:
    times, failing = measure(ctx.scale)
    arrow = times["arrow"]
    whens = sum(1 for name in failing if name.endswith(":when"))
    rule_count = len(failing) - whens
    results = []
    for name, engine_times in times.items():
        per_size = ", ".join(f"{size}: {engine_times.at(size):.2f}" for size in SIZES)
        results.append(
            Result(
                f"validator rule masks, {name} ns/row",
                round(engine_times.at(SERVICE_BATCH) * 1000),
                "ns/row",
                round(arrow.at(SERVICE_BATCH) * 1000),
                "Arrow compute as the project runs it (CompiledRule.failing), same batches",
                note=f"batches of {SERVICE_BATCH} decoded raw events, 1 in {FAULT_EVERY} faulty; {rule_count} "
                f"column-wise rules of events.yaml and {whens} `when`s, masks to numpy, 1 thread; "
                f"{engine_times.per_row_us:.2f} µs/row + {engine_times.fixed_us:.0f} µs fixed per batch; "
                f"µs/row by batch size {per_size}; masks identical across engines",
            )
        )
    return results


def report(times: Mapping[str, EngineTimes]) -> str:
    arrow = times["arrow"]
    lines = [
        f"{'engine':<13} {'fixed µs/batch':>14} {'µs/row':>7} "
        + " ".join(f"{'µs/row@' + str(s):>12}" for s in SIZES)
        + f" {'x arrow@' + str(SERVICE_BATCH):>12}"
    ]
    for name, t in times.items():
        lines.append(
            f"{name:<13} {t.fixed_us:>14.0f} {t.per_row_us:>7.2f} "
            + " ".join(f"{t.at(s):>12.2f}" for s in SIZES)
            + f" {t.seconds[SERVICE_BATCH] / arrow.seconds[SERVICE_BATCH]:>12.2f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":  # this benchmark alone, no stack needed: python -m bench.validator_engines
    measured, failed = measure(float(os.environ.get("BENCH_SCALE", "1")))
    print(f"rows failing each mask in a batch of {SERVICE_BATCH}: {failed}")
    print(report(measured))
