"""Validation rules as data: YAML files, checked by pydantic at load, compiled into an immutable `RuleSet`.

A rule file holds `rules:` (a list) and optionally a file-wide default `applies_to:`. Adding a rule is one YAML
entry; see docs/validation.md for the language. Loading collects *every* problem of every file into one
`RuleLoadError` whose lines name the file, the rule id and the field, so a broken rule file is fixed in one go.

`RuleBook` owns the current `RuleSet` and swaps it atomically on `reload()` only when the new files are
valid; otherwise the old set stays in force and the reason is reported. Readers take `rulebook.current` once
per record, so a record is always judged by one consistent rule set.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from services.validator.columns import (
    ColumnBatch,
    Unsupported,
    VectorExpression,
    as_mask,
    blank_or_null,
    per_value,
    re2_fullmatch,
)
from services.validator.expressions import (
    EvaluationError,
    Expression,
    ExpressionError,
    MissingField,
    compile_expression,
    parse_duration,
)
from services.validator.ids import ANY_CASE_UUID, canonical_uuid, uuid_problem

# The rule files shipped with the code; a deployment can point VALIDATOR_RULES_DIR elsewhere (e.g. a mounted
# ConfigMap, which is what makes hot reload useful in Kubernetes).
DEFAULT_RULES_DIR = Path(os.environ.get("VALIDATOR_RULES_DIR") or Path(__file__).resolve().parent / "rules")
RECORD_KINDS = ("event", "transaction")
RULE_FILE_GLOBS = ("*.yaml", "*.yml")


class RuleType(StrEnum):
    MANDATORY = "MANDATORY"
    VALUE = "VALUE"
    LOOKUP = "LOOKUP"
    DUPLICATE_ALLOW_ONE = "DUPLICATE_ALLOW_ONE"
    BUSINESS_RULE = "BUSINESS_RULE"


class Severity(StrEnum):
    ERROR = "error"  # the record goes to the dead-letter topic
    WARN = "warn"  # the record is kept and carries the rule id in quality_flags


# Evaluation order by type: cheap presence checks first; lookups last, so a record that fails anything else is
# rejected at once instead of being parked for retries it could never pass.
PHASES = {
    RuleType.MANDATORY: 0,
    RuleType.VALUE: 1,
    RuleType.BUSINESS_RULE: 2,
    RuleType.DUPLICATE_ALLOW_ONE: 3,
    RuleType.LOOKUP: 4,
}

# Failure codes (a rule's `code:` replaces the violation code of its type).
MISSING_FIELD = "MISSING_FIELD"
NOT_ALLOWED = "VALUE_NOT_ALLOWED"
OUT_OF_RANGE = "OUT_OF_RANGE"
PATTERN_MISMATCH = "PATTERN_MISMATCH"
WRONG_TYPE = "WRONG_TYPE"
REFERENCE_NOT_FOUND = "REFERENCE_NOT_FOUND"
DUPLICATE = "DUPLICATE"
BUSINESS_RULE_VIOLATED = "BUSINESS_RULE_VIOLATED"
EXPRESSION_ERROR = "EXPRESSION_ERROR"


@dataclass(frozen=True, slots=True)
class Failure:
    rule_id: str
    rule_type: RuleType
    field: str | None
    code: str
    message: str
    severity: Severity = Severity.ERROR
    retryable: bool = False  # a LOOKUP miss the late-reference policy may retry


# --- the YAML models -------------------------------------------------------------------------------------------
RuleId = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
FieldName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,63}$")]
Code = Annotated[str, StringConstraints(pattern=r"^[A-Z][A-Z0-9_]{0,63}$")]
Scalar = str | int | float | bool


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: RuleId
    severity: Severity = Severity.ERROR
    applies_to: list[str] = Field(min_length=1)
    description: str = ""
    when: str | dict[FieldName, list[Scalar]] | None = Field(
        None, description="An expression, or {field: [values]} meaning field in values (all must hold)."
    )
    code: Code | None = None
    enabled: bool = True

    _as_list_applies_to = field_validator("applies_to", mode="before")(_as_list)


class MandatoryRule(_Rule):
    type: Literal[RuleType.MANDATORY]
    fields: list[FieldName] = Field(min_length=1)

    _as_list_fields = field_validator("fields", mode="before")(_as_list)


class ValueRule(_Rule):
    """Null values pass (presence is MANDATORY's job); a present value must satisfy every check given."""

    type: Literal[RuleType.VALUE]
    fields: list[FieldName] = Field(min_length=1, description="`field: x` is accepted as a shorthand")
    regex: str | None = Field(None, description="must match the whole value")
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    max_exclusive: bool = False
    enum: list[Scalar] | None = Field(None, min_length=1)
    format: Literal["uuid"] | None = Field(
        None, description="uuid: a UUID in 8-4-4-4-12 hex; the record carries it on in lower case (ids.py)"
    )

    @model_validator(mode="before")
    @classmethod
    def _field_shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict) and "field" in data:
            if "fields" in data:
                raise ValueError("give `field` or `fields`, not both")
            data = {**data, "fields": _as_list(data["field"])}
            del data["field"]
        return data

    @model_validator(mode="after")
    def _some_check(self) -> ValueRule:
        if self.regex is None and self.min is None and self.max is None and self.enum is None and self.format is None:
            raise ValueError("a VALUE rule needs at least one of regex, min, max, enum, format")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is greater than max {self.max}")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as error:
                raise ValueError(f"regex {self.regex!r} does not compile: {error}") from None
        return self


class LookupRule(_Rule):
    type: Literal[RuleType.LOOKUP]
    field: FieldName
    reference: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]*$")]
    retry: bool = Field(True, description="a miss may be late reference data: retry before dead-lettering")


class DuplicateRule(_Rule):
    type: Literal[RuleType.DUPLICATE_ALLOW_ONE]
    key: list[FieldName] = Field(min_length=1)
    window: timedelta = Field(timedelta(minutes=15), description="e.g. 30s, 15m, 1h")
    time_field: FieldName = "event_time"

    _as_list_key = field_validator("key", mode="before")(_as_list)

    @field_validator("window", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> timedelta:
        window = parse_duration(value)
        if window <= timedelta(0):
            raise ValueError("window must be positive")
        return window


class BusinessRule(_Rule):
    type: Literal[RuleType.BUSINESS_RULE]
    expression: str = Field(min_length=1)
    field: FieldName | None = Field(None, description="field reported on failure (default: the only one read)")
    message: str | None = Field(None, description="human text on failure (default: the expression)")


RuleModel = Annotated[
    MandatoryRule | ValueRule | LookupRule | DuplicateRule | BusinessRule,
    Field(discriminator="type"),
]
_RULE_ADAPTER: TypeAdapter[Any] = TypeAdapter(RuleModel)


class RuleFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    applies_to: list[str] | None = Field(None, description="default applies_to of the file's rules")
    rules: list[dict[str, Any]]

    _as_list_applies_to = field_validator("applies_to", mode="before")(_as_list)


# --- compiled rules --------------------------------------------------------------------------------------------
class Checks(Protocol):
    """What the engine offers rules at evaluation (kept minimal so rules stay pure functions of their inputs)."""

    def contains(self, table: str, key: Any) -> bool: ...

    def seen(self, namespace: str, key: Any, event_time: datetime) -> bool: ...


# explain(record, now, checks) -> None when it passes, else the failures (several for MANDATORY / VALUE fields).
# The interpreter's semantics for one record: the engine asks it only for the rows `failing` found, to word them.
CheckFunction = Callable[[Mapping[str, Any], datetime, Checks], tuple[Failure, ...] | None]
# failing(batch, checks) -> the rows of the batch the rule fails (before its `when`): the verdict, column-wise
ColumnCheck = Callable[[ColumnBatch, Checks], np.ndarray]


@dataclass(frozen=True, slots=True)
class CompiledRule:
    id: str
    type: RuleType
    severity: Severity
    kinds: frozenset[str]
    when: Expression | None
    explain: CheckFunction
    failing: ColumnCheck | None  # None for DUPLICATE_ALLOW_ONE, which the engine runs in record order
    when_holds: Callable[[ColumnBatch], np.ndarray] | None  # the `when` over a batch
    source: str  # the file it came from
    description: str
    spec: Any  # the validated pydantic model, for introspection and docs
    interpreted: str | None = None  # why part of this rule runs through the interpreter, if it does

    def dedupe_key(self, record: Mapping[str, Any]) -> Any:
        """The DUPLICATE_ALLOW_ONE key of `record` (None when a key field is missing)."""
        fields = self.spec.key
        if len(fields) == 1:
            return record.get(fields[0])
        values = tuple(record.get(f) for f in fields)
        return None if None in values else values


_SIZED = frozenset({str, list, dict, tuple, set})
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)  # types for which "empty" means missing


def _shown(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _compile_mandatory(rule: MandatoryRule, severity: Severity) -> CheckFunction:
    fields = tuple(rule.fields)
    rule_type, code = RuleType.MANDATORY, rule.code or MISSING_FIELD

    def check(record: Mapping[str, Any], now: datetime, checks: Checks) -> tuple[Failure, ...] | None:
        missing = None
        for name in fields:
            value = record.get(name)
            if value is None or (
                value.__class__ in _SIZED and (not value or (value.__class__ is str and value.isspace()))
            ):
                missing = (missing or ()) + (name,)
        if missing is None:
            return None
        return tuple(
            Failure(rule.id, rule_type, name, code, f"{name} is missing or empty", severity) for name in missing
        )

    return check


def _columns_mandatory(rule: MandatoryRule) -> ColumnCheck:
    fields = tuple(rule.fields)

    def failing(batch: ColumnBatch, checks: Checks) -> np.ndarray:
        missing = np.zeros(batch.size, bool)
        for name in fields:
            missing |= blank_or_null(batch.column(name))
        return missing

    return failing


def _compile_value(rule: ValueRule, severity: Severity) -> tuple[CheckFunction, ColumnCheck]:
    fields = tuple(rule.fields)
    rule_type = RuleType.VALUE
    pattern = re.compile(rule.regex) if rule.regex is not None else None
    allowed = frozenset(rule.enum) if rule.enum is not None else None
    uuid_format = rule.format == "uuid"
    low, high = rule.min, rule.max
    low_exclusive, high_exclusive = rule.min_exclusive, rule.max_exclusive
    bounds = (
        ("(" if low_exclusive else "[")
        + ("-inf" if low is None else f"{low:g}")
        + ", "
        + ("inf" if high is None else f"{high:g}")
        + (")" if high_exclusive else "]")
    )

    def fail(name: str, code: str, message: str) -> Failure:
        return Failure(rule.id, rule_type, name, rule.code or code, message, severity)

    def check_one(name: str, value: Any) -> Failure | None:
        if allowed is not None and (not value.__hash__ or value not in allowed):
            return fail(name, NOT_ALLOWED, f"{name}={_shown(value)} is not one of {sorted(map(str, allowed))}")
        if low is not None or high is not None:
            if value.__class__ is bool or not isinstance(value, int | float | Decimal):
                return fail(name, WRONG_TYPE, f"{name}={_shown(value)} is not a number")
            if (  # written as not-inside, so that NaN fails
                (low is not None and not (value > low if low_exclusive else value >= low))
                or (high is not None and not (value < high if high_exclusive else value <= high))
            ):  # fmt: skip
                return fail(name, OUT_OF_RANGE, f"{name}={value} is outside {bounds}")
        if pattern is not None:
            if not isinstance(value, str):
                return fail(name, WRONG_TYPE, f"{name}={_shown(value)} is not text")
            if pattern.fullmatch(value) is None:
                return fail(name, PATTERN_MISMATCH, f"{name}={_shown(value)} does not match {pattern.pattern!r}")
        if uuid_format and (problem := uuid_problem(value)) is not None:
            code, reason = problem
            return fail(name, code, f"{name}={_shown(value)} {reason}")
        return None

    def check(record: Mapping[str, Any], now: datetime, checks: Checks) -> tuple[Failure, ...] | None:
        failures = tuple(
            failure
            for name in fields
            if (value := record.get(name)) is not None and (failure := check_one(name, value)) is not None
        )
        return failures or None

    def value_fails(name: str, array: pa.Array, known_canonical: frozenset[str]) -> np.ndarray:
        """Rows whose value fails one of the checks, in Arrow where it means what Python means."""
        kind = array.type
        text = pa.types.is_string(kind)
        numeric = pa.types.is_integer(kind) or pa.types.is_floating(kind)
        passes = np.ones(len(array), bool)
        if allowed is not None:
            if not text:
                raise Unsupported("an enum over a non-text column")
            members = pa.array(sorted(v for v in allowed if isinstance(v, str)), pa.string())
            passes &= as_mask(pc.is_in(array, value_set=members))
        if low is not None or high is not None:
            if not numeric:
                raise Unsupported("a range over a non-number column")
            if pa.types.is_integer(kind):  # Python compares ints with float bounds exactly: integral bounds only
                if any(b is not None and not float(b).is_integer() for b in (low, high)):
                    raise Unsupported("a fractional bound on an integer column")
                array = array.cast(pa.int64())
                bound = lambda b: pa.scalar(int(b), pa.int64())  # noqa: E731
            else:
                bound = lambda b: pa.scalar(float(b), pa.float64())  # noqa: E731
            if low is not None:
                passes &= as_mask((pc.greater if low_exclusive else pc.greater_equal)(array, bound(low)))
            if high is not None:
                passes &= as_mask((pc.less if high_exclusive else pc.less_equal)(array, bound(high)))
        if pattern is not None:
            if not text:
                raise Unsupported("a regex over a non-text column")
            if re2_pattern is None:
                raise Unsupported(re2_refused)
            passes &= as_mask(pc.match_substring_regex(array, re2_pattern))
        if uuid_format and name not in known_canonical:
            if not text:
                raise Unsupported("a uuid format over a non-text column")
            passes &= as_mask(pc.match_substring_regex(array, ANY_CASE_UUID))
        return ~passes

    re2_pattern, re2_refused = None, ""
    if pattern is not None:  # checked once, here: whether RE2 means what `re` does for this pattern
        try:
            re2_pattern = re2_fullmatch(pattern.pattern)
        except Unsupported as reason:
            re2_refused = str(reason)
    uuid_only = uuid_format and allowed is None and pattern is None and low is None and high is None

    def failing(batch: ColumnBatch, checks: Checks) -> np.ndarray:
        fails = np.zeros(batch.size, bool)
        for name in fields:
            valid = batch.valid(name)
            if not valid.any():
                continue
            array = batch.column(name)
            known_canonical = batch.canonical_ids
            if name in known_canonical and uuid_only:
                continue  # `canonical_columns` found every value a canonical UUID: nothing can fail
            try:
                fails |= valid & value_fails(name, array, known_canonical)
            except Unsupported:  # exact per distinct value, through the rule's own check
                fails |= per_value(array, lambda value, name=name: check_one(name, value) is None)
        return fails

    return check, failing


def _compile_lookup(rule: LookupRule, severity: Severity) -> CheckFunction:
    name, table = rule.field, rule.reference
    retryable = rule.retry and severity is Severity.ERROR
    code = rule.code or REFERENCE_NOT_FOUND

    def check(record: Mapping[str, Any], now: datetime, checks: Checks) -> tuple[Failure, ...] | None:
        value = record.get(name)
        if value is None or checks.contains(table, value):
            return None
        message = f"{name}={_shown(value)} not found in {table}"
        return (Failure(rule.id, RuleType.LOOKUP, name, code, message, severity, retryable),)

    return check


def _columns_lookup(rule: LookupRule) -> ColumnCheck:
    name, table = rule.field, rule.reference

    def failing(batch: ColumnBatch, checks: Checks) -> np.ndarray:
        contains = checks.contains
        keys = batch.column(name).to_pylist()
        return np.fromiter((key is not None and not contains(table, key) for key in keys), bool, len(keys))

    return failing


def _compile_duplicate(rule: DuplicateRule, severity: Severity) -> CheckFunction:
    time_field, code, rule_id = rule.time_field, rule.code or DUPLICATE, rule.id
    key_name = ",".join(rule.key)
    window = rule.window

    def check(record: Mapping[str, Any], now: datetime, checks: Checks) -> tuple[Failure, ...] | None:
        key = compiled_key(record)
        if key is None:
            return None
        event_time = record.get(time_field)
        if not isinstance(event_time, datetime):
            event_time = now
        if not checks.seen(rule_id, key, (event_time - _EPOCH) // _MICROSECOND):
            return None
        message = f"{key_name}={_shown(key)} already accepted within {window}"
        return (Failure(rule_id, RuleType.DUPLICATE_ALLOW_ONE, key_name, code, message, severity),)

    fields = tuple(rule.key)
    if len(fields) == 1:
        (only,) = fields

        def compiled_key(record: Mapping[str, Any]) -> Any:
            return record.get(only)
    else:

        def compiled_key(record: Mapping[str, Any]) -> Any:
            values = tuple(record.get(f) for f in fields)
            return None if None in values else values

    return check


def duplicate_failure(rule: CompiledRule, key: Any) -> Failure:
    """The failure of a DUPLICATE_ALLOW_ONE rule for a record whose `key` was already accepted."""
    spec = rule.spec
    message = f"{','.join(spec.key)}={_shown(key)} already accepted within {spec.window}"
    key_name = ",".join(spec.key)
    return Failure(rule.id, RuleType.DUPLICATE_ALLOW_ONE, key_name, spec.code or DUPLICATE, message, rule.severity)


def _compile_business(rule: BusinessRule, severity: Severity, expression: Expression) -> CheckFunction:
    reported = rule.field or (next(iter(expression.fields)) if len(expression.fields) == 1 else None)
    code = rule.code or BUSINESS_RULE_VIOLATED
    shown_fields = sorted(expression.fields)

    def check(record: Mapping[str, Any], now: datetime, checks: Checks) -> tuple[Failure, ...] | None:
        try:
            if expression(record, now):
                return None
        except MissingField as missing:
            message = f"{missing.field} is missing (needed by `{expression.source}`)"
            return (Failure(rule.id, RuleType.BUSINESS_RULE, missing.field, MISSING_FIELD, message, severity),)
        except EvaluationError as error:
            message = f"`{expression.source}` could not be evaluated: {error}"
            return (Failure(rule.id, RuleType.BUSINESS_RULE, reported, EXPRESSION_ERROR, message, severity),)
        values = ", ".join(f"{name}={_shown(record.get(name), 40)}" for name in shown_fields)
        text = rule.message or f"violates `{expression.source}`"
        message = f"{text} ({values})" if values else text
        return (Failure(rule.id, RuleType.BUSINESS_RULE, reported, code, message, severity),)

    return check


def _compile_when(when: str | dict[str, list[Any]] | None) -> Expression | None:
    if when is None:
        return None
    if isinstance(when, str):
        return compile_expression(when)
    # {field: [values]} -> `field in [...] and ...`, through the same compiler (one code path, same semantics)
    parts = [f"{name} in {list(values)!r}" for name, values in when.items()]
    return compile_expression(" and ".join(parts) or "True")


# --- loading ---------------------------------------------------------------------------------------------------
class RuleLoadError(ValueError):
    """One or more rule files are invalid; `problems` lists each as `file: rule 'id': field: message`."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid validation rules:\n  " + "\n  ".join(problems))


@dataclass(frozen=True)
class RuleSet:
    """An immutable, compiled set of rules; `for_kind` gives the evaluation order for one record kind."""

    rules: tuple[CompiledRule, ...]
    version: str  # sha256 over the files' names and contents (short): stamped on outputs for lineage
    files: tuple[str, ...]
    _by_kind: Mapping[str, tuple[CompiledRule, ...]] = field(repr=False)
    _id_rules_by_kind: Mapping[str, tuple[CompiledRule, ...]] = field(repr=False, default_factory=dict)
    _uuid_by_kind: Mapping[str, tuple[str, ...]] = field(repr=False, default_factory=dict)

    def for_kind(self, kind: str) -> tuple[CompiledRule, ...]:
        return self._by_kind.get(kind, ())

    def id_rules(self, kind: str) -> tuple[CompiledRule, ...]:
        """The VALUE rules of `kind` with `format: uuid`, in evaluation order."""
        return self._id_rules_by_kind.get(kind, ())

    def uuid_fields(self, kind: str) -> tuple[str, ...]:
        """Fields a VALUE rule of `kind` declares `format: uuid`: ids, carried on in canonical form."""
        return self._uuid_by_kind.get(kind, ())

    def canonical(self, record: Mapping[str, Any], kind: str) -> Mapping[str, Any]:
        """`record` with its `uuid_fields` in canonical (lower-case) form: a copy if one changes, else itself.

        Applied before the rules judge a record, so that DUPLICATE_ALLOW_ONE compares canonical ids (a
        case-changed copy of an accepted event is its duplicate), LOOKUPs find the row, and every output and
        store gets one spelling. A value that is not a UUID is left as it is, for its rule to refuse."""
        changed: dict[str, Any] | None = None
        for name in self.uuid_fields(kind):
            value = record.get(name)
            canonical = canonical_uuid(value)
            if canonical is not value:
                changed = changed if changed is not None else dict(record)
                changed[name] = canonical
        return record if changed is None else changed

    def rule(self, rule_id: str) -> CompiledRule:
        for rule in self.rules:
            if rule.id == rule_id:
                return rule
        raise KeyError(rule_id)

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(rule.id for rule in self.rules)


def _describe_validation_error(where: str, error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors():
        loc = [str(p) for p in item["loc"]]
        if loc and loc[0] in RuleType.__members__:  # the discriminator tag pydantic puts first
            loc = loc[1:]
        if item["type"] in ("union_tag_invalid", "union_tag_not_found"):
            loc = ["type"]
            message = f"must be one of {', '.join(RuleType)}"
        else:
            message = item["msg"]
        problems.append(f"{where}: field {'.'.join(loc) or '?'}: {message}")
    return problems


def _rule_files(directory: Path) -> list[Path]:
    return sorted({p for pattern in RULE_FILE_GLOBS for p in directory.glob(pattern) if p.is_file()})


def load_ruleset(
    directory: Path,
    *,
    kinds: Collection[str] = RECORD_KINDS,
    reference_tables: Collection[str] | None = None,
) -> RuleSet:
    """Read, validate and compile every `*.yaml` in `directory`; raises `RuleLoadError` listing all problems."""
    directory = Path(directory)
    if not directory.is_dir():
        raise RuleLoadError([f"{directory}: rules directory does not exist"])
    files = _rule_files(directory)
    if not files:
        raise RuleLoadError([f"{directory}: no rule files (*.yaml)"])
    problems: list[str] = []
    compiled: list[CompiledRule] = []
    seen_ids: dict[str, str] = {}
    digest = hashlib.sha256()
    for path in files:
        text = path.read_bytes()
        digest.update(path.name.encode() + b"\0" + text + b"\0")
        compiled += _load_file(path, text, kinds, reference_tables, seen_ids, problems)
    if problems:
        raise RuleLoadError(problems)
    by_kind = {
        kind: tuple(sorted((r for r in compiled if kind in r.kinds), key=lambda r: PHASES[r.type]))  # stable
        for kind in kinds
    }
    id_rules = {
        kind: tuple(r for r in rules if r.type is RuleType.VALUE and r.spec.format == "uuid")
        for kind, rules in by_kind.items()
    }
    uuid_fields = {
        kind: tuple(dict.fromkeys(name for rule in rules for name in rule.spec.fields))
        for kind, rules in id_rules.items()
    }
    version = digest.hexdigest()[:16]
    return RuleSet(tuple(compiled), version, tuple(p.name for p in files), by_kind, id_rules, uuid_fields)


def _load_file(
    path: Path,
    text: bytes,
    kinds: Collection[str],
    reference_tables: Collection[str] | None,
    seen_ids: dict[str, str],
    problems: list[str],
) -> list[CompiledRule]:
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        problems.append(f"{path.name}: invalid YAML: {error}".replace("\n", " "))
        return []
    if document is None:
        return []  # an empty file holds no rules (e.g. all commented out)
    try:
        rule_file = RuleFile.model_validate(document)
    except ValidationError as error:
        problems += _describe_validation_error(path.name, error)
        return []
    compiled = []
    for index, raw in enumerate(rule_file.rules, start=1):
        rule_id = raw.get("id") if isinstance(raw, dict) else None
        where = f"{path.name}: rule {rule_id!r}" if rule_id else f"{path.name}: rule #{index}"
        if not isinstance(raw, dict):
            problems.append(f"{where}: must be a mapping")
            continue
        raw = dict(raw)
        if isinstance(raw.get("type"), str):
            raw["type"] = raw["type"].upper()
        if "applies_to" not in raw and rule_file.applies_to is not None:
            raw["applies_to"] = rule_file.applies_to
        try:
            model = _RULE_ADAPTER.validate_python(raw)
        except ValidationError as error:
            problems += _describe_validation_error(where, error)
            continue
        before = len(problems)
        unknown_kinds = sorted(set(model.applies_to) - set(kinds))
        if unknown_kinds:
            problems.append(f"{where}: field applies_to: unknown record kind(s) {unknown_kinds}; known: {list(kinds)}")
        if model.id in seen_ids:
            problems.append(f"{where}: field id: duplicate rule id, also defined in {seen_ids[model.id]}")
        seen_ids.setdefault(model.id, path.name)
        if isinstance(model, LookupRule) and reference_tables is not None and model.reference not in reference_tables:
            problems.append(
                f"{where}: field reference: unknown reference table {model.reference!r}; "
                f"known: {sorted(reference_tables)}"
            )
        try:
            when = _compile_when(model.when)
        except ExpressionError as error:
            problems.append(f"{where}: field when: {error}")
            when = None
        expression = None
        if isinstance(model, BusinessRule):
            try:
                expression = compile_expression(model.expression)
            except ExpressionError as error:
                problems.append(f"{where}: field expression: {error}")
        if len(problems) > before or not model.enabled:
            continue
        compiled.append(_compile(model, when, expression, path.name))
    return compiled


def _compile(model: Any, when: Expression | None, expression: Expression | None, source: str) -> CompiledRule:
    severity = Severity(model.severity)
    failing: ColumnCheck | None
    interpreted: list[str] = []
    if isinstance(model, MandatoryRule):
        check, failing = _compile_mandatory(model, severity), _columns_mandatory(model)
    elif isinstance(model, ValueRule):
        check, failing = _compile_value(model, severity)
    elif isinstance(model, LookupRule):
        check, failing = _compile_lookup(model, severity), _columns_lookup(model)
    elif isinstance(model, DuplicateRule):
        check, failing = _compile_duplicate(model, severity), None
    else:
        assert expression is not None
        check = _compile_business(model, severity, expression)
        vector = VectorExpression(expression)
        if vector.unsupported:
            interpreted.append(f"expression: {vector.unsupported}")
        failing = lambda batch, checks: vector.fails(batch)  # noqa: E731
    when_holds = None
    if when is not None:
        vector_when = VectorExpression(when)
        if vector_when.unsupported:
            interpreted.append(f"when: {vector_when.unsupported}")
        when_holds = vector_when.holds
    return CompiledRule(
        id=model.id,
        type=RuleType(model.type),
        severity=severity,
        kinds=frozenset(model.applies_to),
        when=when,
        explain=check,
        failing=failing,
        when_holds=when_holds,
        source=source,
        description=model.description,
        spec=model,
        interpreted="; ".join(interpreted) or None,
    )


# --- the reloadable book ---------------------------------------------------------------------------------------
def directory_stamp(directory: Path) -> tuple[tuple[str, int, int], ...]:
    """(name, mtime_ns, size) of every rule file: cheap to poll, changes whenever a file is edited or added."""
    stamp = []
    for path in _rule_files(Path(directory)):
        try:
            info = path.stat()
        except FileNotFoundError:  # removed between listing and stat
            continue
        stamp.append((path.name, info.st_mtime_ns, info.st_size))
    return tuple(stamp)


@dataclass(frozen=True, slots=True)
class ReloadResult:
    changed: bool  # a different rule set is now in force
    ok: bool  # False: the files on disk are invalid and the previous set stays in force
    version: str  # the version in force after the call
    error: str | None = None


class RuleBook:
    """The rule set in force. Load fails loudly at start; reloads fail safe (the old set stays)."""

    def __init__(
        self,
        directory: Path = DEFAULT_RULES_DIR,
        *,
        kinds: Collection[str] = RECORD_KINDS,
        reference_tables: Collection[str] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.kinds = tuple(kinds)
        self.reference_tables = None if reference_tables is None else tuple(reference_tables)
        self._lock = threading.Lock()
        self._stamp = directory_stamp(self.directory) if self.directory.is_dir() else ()
        self._current = self._load()  # raises RuleLoadError: a service must not start without valid rules
        self.last_error: str | None = None

    def _load(self) -> RuleSet:
        return load_ruleset(self.directory, kinds=self.kinds, reference_tables=self.reference_tables)

    @property
    def current(self) -> RuleSet:
        return self._current

    def changed_on_disk(self) -> bool:
        """Whether any rule file was added, removed or modified since the last (attempted) load."""
        return directory_stamp(self.directory) != self._stamp

    def reload(self) -> ReloadResult:
        """Load the files again; swap in the new set only if it is valid and differs from the current one."""
        with self._lock:
            self._stamp = directory_stamp(self.directory)
            try:
                candidate = self._load()
            except RuleLoadError as error:
                self.last_error = str(error)
                return ReloadResult(False, False, self._current.version, str(error))
            self.last_error = None
            if candidate.version == self._current.version:
                return ReloadResult(False, True, candidate.version)
            self._current = candidate  # one reference assignment: readers see the old or the new set, whole
            return ReloadResult(True, True, candidate.version)

    def reload_if_changed(self) -> ReloadResult | None:
        """`reload()` when the files' stamps changed (call it from a timer); None when nothing changed."""
        return self.reload() if self.changed_on_disk() else None


def describe_rules(ruleset: RuleSet) -> Iterable[dict[str, Any]]:
    """Plain data about each rule (for a /rules endpoint or logs)."""
    for rule in ruleset.rules:
        yield {
            "id": rule.id,
            "type": str(rule.type),
            "severity": str(rule.severity),
            "applies_to": sorted(rule.kinds),
            "file": rule.source,
            "description": rule.description,
            "vectorised": rule.interpreted is None,
            **({"interpreted": rule.interpreted} if rule.interpreted else {}),
        }
