"""The rule engine: a batch of records of one kind in (an Arrow table), a `Verdict` per record out.

Synchronous and free of I/O. Its only state is explicit: the `RuleBook` (read once per batch), the
`ReferenceStore` (read), the `DedupeStore` (written when a record is accepted) and the per-rule counters.
Rules are evaluated column-wise over the whole batch (`columns.py`, `evaluate_batch`); a single record is a
batch of one.

Outcomes:

- ACCEPT: no error-severity rule failed; `flags` lists the warn rules that did (they go to quality_flags);
- REJECT: an error-severity rule failed (dead-letter, stage validate). By default evaluation stops at the
  first failing error rule (`collect_all=True` evaluates everything, e.g. for a batch report);
- RETRY: the only errors are LOOKUP misses that may be late reference data. `attempt` is the number of the
  retry to schedule; `retry.retry_decision` turns it into a not-before time or a dead letter.

Rules run in phases by type (MANDATORY, VALUE, BUSINESS_RULE, DUPLICATE_ALLOW_ONE, LOOKUP), in file order
within a phase. A DUPLICATE_ALLOW_ONE key is remembered only when the record is accepted: a rejected or
retried record never blocks a later good copy of itself (the retry of a record is that copy).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from services.validator.columns import ColumnBatch, records_of
from services.validator.dedupe import DedupeStore
from services.validator.references import ReferenceStore
from services.validator.rulebook import (
    CompiledRule,
    Failure,
    RuleBook,
    RuleSet,
    RuleType,
    Severity,
    duplicate_failure,
)

log = logging.getLogger(__name__)
_MICROSECOND = timedelta(microseconds=1)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


class Outcome(StrEnum):
    ACCEPT = "accept"
    REJECT = "reject"
    RETRY = "retry"


@dataclass(frozen=True, slots=True)
class Verdict:
    outcome: Outcome
    errors: tuple[Failure, ...] = ()
    warnings: tuple[Failure, ...] = ()
    attempt: int = 0  # RETRY: the number of the retry to schedule (1 = first); else the attempts made so far
    rules_version: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.ACCEPT

    @property
    def flags(self) -> list[str]:
        """Ids of the warn rules that failed, in evaluation order, each once (the record's quality_flags)."""
        if not self.warnings:
            return []
        return list(dict.fromkeys(w.rule_id for w in self.warnings))

    @property
    def first_error(self) -> Failure | None:
        return self.errors[0] if self.errors else None


@dataclass(frozen=True, slots=True)
class RuleCounter:
    checked: int
    failed: int


@dataclass(frozen=True, slots=True)
class _Checks:
    """The `rules.Checks` a rule may use, as plain bound methods: one call, no indirection, on the hot path."""

    contains: Callable[[str, Any], bool]
    seen: Callable[[str, Any, datetime], bool]


@dataclass(frozen=True, slots=True)
class _Step:
    """One rule in a kind's evaluation plan, with what the engine needs of it at hand."""

    rule: CompiledRule
    cell: list[int]  # [checked, failed]
    warn: bool
    retryable: bool  # a failure of it is a late-reference miss to retry, not an error
    dedupe: bool


def _table_of(records: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Records given as dicts (a single record, a tool's rows) as a table, columns typed from the values."""
    names = list(dict.fromkeys(name for record in records for name in record))
    return pa.table({name: pa.array([record.get(name) for record in records]) for name in names})


def _micros(moment: datetime) -> int:
    """Microseconds since the epoch: the duplicate memory's clock (exact for the millisecond event times)."""
    return (moment - _EPOCH) // _MICROSECOND


def _keys(batch: ColumnBatch, fields: Sequence[str]) -> list[Any]:
    """A DUPLICATE_ALLOW_ONE key per row (`CompiledRule.dedupe_key`): the value, or a tuple; None if one is null."""
    if len(fields) == 1:
        return batch.column(fields[0]).to_pylist()
    columns = [batch.column(name).to_pylist() for name in fields]
    return [None if None in values else values for values in zip(*columns, strict=True)]


def _times_us(batch: ColumnBatch, field: str, now_us: int) -> list[int]:
    """Each row's time for the duplicate window in microseconds; `now` where it has none (as `_remember`)."""
    column = batch.column(field)
    if not pa.types.is_timestamp(column.type) or column.type.tz is None:
        values = column.to_pylist()
        return [_micros(v) if isinstance(v, datetime) else now_us for v in values]
    micros = pc.cast(pc.cast(column, pa.timestamp("us", tz="UTC")), pa.int64())
    if micros.null_count:
        micros = pc.fill_null(micros, now_us)
    return micros.to_pylist()


class RuleEngine:
    def __init__(
        self,
        rulebook: RuleBook,
        references: ReferenceStore,
        dedupe_store: DedupeStore | None = None,
        clock: Clock = utc_now,
        *,
        collect_all: bool = False,
    ) -> None:
        self.rulebook = rulebook
        self.references = references
        self.dedupe = dedupe_store if dedupe_store is not None else DedupeStore()
        self.clock = clock
        self.collect_all = collect_all
        # rule id -> [checked, failed]; keyed by id so counts survive reloads (Prometheus counters are monotonic)
        self._counts: dict[str, list[int]] = {}
        self.outcomes: dict[str, int] = dict.fromkeys(Outcome, 0)
        self.disagreements = 0  # rows a rule's columns failed but its own check passed (a bug: logged once each)
        self._plan_for: RuleSet | None = None
        self._plans: dict[tuple[str, bool], tuple[_Step, ...]] = {}
        self._clean_accept = Verdict(Outcome.ACCEPT)
        self._checks = _Checks(references.contains, self.dedupe.seen)

    # -- evaluation -------------------------------------------------------------------------------------------------
    def _plan(self, ruleset: RuleSet, kind: str, ids_only: bool = False) -> tuple[_Step, ...]:
        if ruleset is not self._plan_for:  # a reload happened: rebuild the plans
            self._plan_for, self._plans = ruleset, {}
            self._clean_accept = Verdict(Outcome.ACCEPT, rules_version=ruleset.version)  # shared: it is frozen
        plan = self._plans.get((kind, ids_only))
        if plan is None:
            rules = ruleset.id_rules(kind) if ids_only else ruleset.for_kind(kind)
            plan = self._plans[(kind, ids_only)] = tuple(
                _Step(
                    rule,
                    self._counts.setdefault(rule.id, [0, 0]),
                    rule.severity is Severity.WARN,
                    rule.type is RuleType.LOOKUP and rule.spec.retry and rule.severity is Severity.ERROR,
                    rule.type is RuleType.DUPLICATE_ALLOW_ONE,
                )
                for rule in rules
                if not (ids_only and rule.severity is Severity.WARN)
            )
        return plan

    def evaluate(
        self, record: Mapping[str, Any], kind: str, *, attempt: int = 0, now: datetime | None = None
    ) -> Verdict:
        """Judge one record of `kind` ("event", "transaction"): a batch of one. `attempt`: retries already made."""
        return self.evaluate_records([record], kind, attempts=[attempt], now=now)[0]

    def check_ids(self, record: Mapping[str, Any], kind: str, *, now: datetime | None = None) -> Verdict:
        """Only the `format: uuid` rules, for one record (see `evaluate_batch(ids_only=True)`)."""
        return self.evaluate_records([record], kind, now=now, ids_only=True)[0]

    def evaluate_records(
        self,
        records: Sequence[Mapping[str, Any]],
        kind: str,
        *,
        attempts: Sequence[int] | None = None,
        now: datetime | None = None,
        ids_only: bool = False,
    ) -> list[Verdict]:
        """`evaluate_batch` over records given as dicts (CDC rows, a tool's records), columns typed from the
        values. Records whose values do not share a type per field (an Arrow column has one) are judged as
        batches of one, in order."""
        now = now if now is not None else self.clock()
        try:
            table = _table_of(records)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError):
            if len(records) == 1:
                raise
            return [
                self.evaluate_records(
                    [record], kind, attempts=None if attempts is None else [attempts[i]], now=now, ids_only=ids_only
                )[0]
                for i, record in enumerate(records)
            ]
        return self.evaluate_batch(table, kind, attempts=attempts, now=now, ids_only=ids_only)

    def evaluate_batch(
        self,
        table: pa.Table,
        kind: str,
        *,
        attempts: Sequence[int] | None = None,
        now: datetime | None = None,
        ids_only: bool = False,
        canonical_ids: frozenset[str] = frozenset(),
    ) -> list[Verdict]:
        """Judge every row of `table` (records of `kind`, in arrival order) at once; one `Verdict` per row.

        Each rule computes the rows it fails over the whole batch, in columns; a row that no rule fails is
        accepted without any per-row work. Only DUPLICATE_ALLOW_ONE runs row by row, in arrival order, since a
        record's verdict depends on the ones accepted before it. The rows some rule fails are then walked
        through the plan as the semantics say (phases, `when`, first error wins, warnings, retries), and each
        failure is worded by its rule's own check. `ids_only`: only the `format: uuid` rules (a CDC delete is a
        fact at the source, but its ids still go to every store). `canonical_ids`: fields the caller found to hold
        only canonical UUIDs (`columns.canonical_columns`), so their `format: uuid` checks are not repeated."""
        ruleset = self.rulebook.current
        now = now if now is not None else self.clock()
        plan = self._plan(ruleset, kind, ids_only)
        batch = ColumnBatch(table, now, canonical_ids)
        size = batch.size
        if size == 0:
            return []
        checks = self._checks
        never = len(plan)
        first_error = np.full(size, never, np.int32)  # plan index of each row's first error
        failing_any = np.zeros(size, bool)
        retry_any = np.zeros(size, bool)
        whens: list[np.ndarray | None] = []
        fails: list[np.ndarray | None] = []
        for index, step in enumerate(plan):
            rule = step.rule
            when = rule.when_holds(batch) if rule.when_holds is not None else None
            whens.append(when)
            if rule.failing is None:
                fails.append(None)
                continue
            failed = rule.failing(batch, checks)
            if when is not None:
                failed &= when
            fails.append(failed)
            if not failed.any():
                continue
            failing_any |= failed
            if step.retryable:
                retry_any |= failed
            elif not step.warn:
                np.minimum(first_error, np.where(failed, index, never), out=first_error)
        duplicates = self._run_duplicates(plan, batch, whens, first_error, retry_any) if not ids_only else {}

        verdicts: list[Verdict] = [self._clean_accept] * size
        attempt_of = attempts if attempts is not None else None
        special = failing_any
        if duplicates:
            special = failing_any.copy()
            special[list(duplicates)] = True
        clean_rows = ~special
        clean = int(clean_rows.sum())
        for index, step in enumerate(plan):  # every rule was reached, and passed, on the clean rows
            when = whens[index]
            step.cell[0] += clean if when is None else int((when & clean_rows).sum())
        if attempt_of is not None and clean:
            version = ruleset.version
            for row in np.nonzero(clean_rows & (np.asarray(attempt_of) > 0))[0].tolist():
                verdicts[row] = Verdict(Outcome.ACCEPT, (), (), attempt_of[row], version)
        self.outcomes[Outcome.ACCEPT] += clean

        rows = np.nonzero(special)[0].tolist()
        if rows:
            records = records_of(table.take(pa.array(rows, pa.int64())))
            for row, record in zip(rows, records, strict=True):
                attempt = attempt_of[row] if attempt_of is not None else 0
                verdict = self._walk(plan, row, record, whens, fails, duplicates, now, attempt, ruleset.version)
                verdicts[row] = verdict
                self.outcomes[verdict.outcome] += 1
        return verdicts

    def accepted(self, verdicts: Sequence[Verdict]) -> np.ndarray:
        """The mask of accepted rows of `evaluate_batch`'s verdicts. Rows no rule failed share one Verdict
        object, so they are found by identity in one C pass; only the others are looked at one by one."""
        clean = id(self._clean_accept)
        mask = np.fromiter(map(id, verdicts), np.uint64, len(verdicts)) == clean
        for row in np.nonzero(~mask)[0].tolist():
            mask[row] = verdicts[row].outcome is Outcome.ACCEPT
        return mask

    def is_clean(self, verdict: Verdict) -> bool:
        """Whether `verdict` is the shared one of rows no rule failed (no flags, no warnings)."""
        return verdict is self._clean_accept

    def _run_duplicates(
        self,
        plan: tuple[_Step, ...],
        batch: ColumnBatch,
        whens: list[np.ndarray | None],
        first_error: np.ndarray,
        retry_any: np.ndarray,
    ) -> dict[int, tuple[int, Any]]:
        """The DUPLICATE_ALLOW_ONE rules, row by row in arrival order: which rows repeat a key already accepted
        ({row: (plan index, key)}), remembering the keys of the rows that are accepted."""
        dedupe = [(index, step.rule) for index, step in enumerate(plan) if step.dedupe]
        if not dedupe:
            return {}
        now_us = _micros(batch.now)
        specs = []
        for index, rule in dedupe:
            keys = _keys(batch, rule.spec.key)
            times = _times_us(batch, rule.spec.time_field, now_us)
            window = int(rule.spec.window / _MICROSECOND)
            specs.append((index, rule.id, whens[index], keys, times, window))
        seen, remember = self.dedupe.seen, self.dedupe.remember
        collect_all, never = self.collect_all, len(plan)
        found: dict[int, tuple[int, Any]] = {}
        first = dedupe[0][0]
        reaching = range(batch.size) if collect_all else np.nonzero(first_error > first)[0].tolist()
        if len(specs) == 1 and specs[0][2] is None and not collect_all:  # the usual: one rule, no `when`
            index, rule_id, _, keys, times, window = specs[0]
            accepting = ((first_error == never) & ~retry_any).tolist()
            repeated = self.dedupe.admit(rule_id, reaching, keys, times, accepting, window, now=now_us)
            return {row: (index, key) for row, key in repeated.items()}
        for row in reaching:
            passed = None
            for index, rule_id, when, keys, times, window in specs:
                if not collect_all and first_error[row] <= index:
                    break
                if when is not None and not when[row]:
                    continue
                key = keys[row]
                if key is None:
                    continue
                if seen(rule_id, key, times[row]):
                    found[row] = (index, key)
                    break
                passed = [*(passed or ()), (rule_id, key, times[row], window)]
            else:
                if passed and first_error[row] == never and not retry_any[row]:
                    for rule_id, key, time_us, window in passed:
                        remember(rule_id, key, time_us, window, now=now_us)
        return found

    def _walk(
        self,
        plan: tuple[_Step, ...],
        row: int,
        record: Mapping[str, Any],
        whens: list[np.ndarray | None],
        fails: list[np.ndarray | None],
        duplicates: dict[int, tuple[int, Any]],
        now: datetime,
        attempt: int,
        version: str,
    ) -> Verdict:
        """One row some rule fails, through the plan as the semantics say, each failure worded by its rule."""
        checks = self._checks
        errors: list[Failure] = []
        warnings: tuple[Failure, ...] = ()
        retryable: tuple[Failure, ...] = ()
        duplicate = duplicates.get(row)
        for index, step in enumerate(plan):
            when = whens[index]
            if when is not None and not when[row]:
                continue
            step.cell[0] += 1
            rule = step.rule
            if step.dedupe:
                if duplicate is None or duplicate[0] != index:
                    continue
                failures: tuple[Failure, ...] | None = (duplicate_failure(rule, duplicate[1]),)
            else:
                failed = fails[index]
                if failed is None or not failed[row]:
                    continue
                failures = rule.explain(record, now, checks)
                if failures is None:
                    self.disagreements += 1
                    log.error("rule %s: the columns fail row %d but the rule's check passes it", rule.id, row)
                    continue
            step.cell[1] += 1
            if step.warn:
                warnings += failures
            elif failures[0].retryable:
                retryable += failures
            else:
                errors.extend(failures)
                if not self.collect_all:
                    break
        if errors:
            return Verdict(Outcome.REJECT, (*errors, *retryable), warnings, attempt, version)
        if retryable:
            return Verdict(Outcome.RETRY, retryable, warnings, attempt + 1, version)
        return Verdict(Outcome.ACCEPT, (), warnings, attempt, version)

    def canonical(self, record: Mapping[str, Any], kind: str) -> Mapping[str, Any]:
        """`record` with its ids (the fields `format: uuid` rules name) in canonical form; judge and pass on
        this, not the record as received (see `RuleSet.canonical`)."""
        return self.rulebook.current.canonical(record, kind)

    def dedupe_window(self, kind: str) -> timedelta | None:
        """The longest DUPLICATE_ALLOW_ONE window of `kind` (None when no such rule applies to it)."""
        windows = [
            rule.spec.window
            for rule in self.rulebook.current.for_kind(kind)
            if rule.type is RuleType.DUPLICATE_ALLOW_ONE
        ]
        return max(windows) if windows else None

    def remember_accepted(self, record: Mapping[str, Any], kind: str, *, now: datetime | None = None) -> bool:
        """Remember `record` as accepted earlier (e.g. read back from the processed topic after a restart), for
        every DUPLICATE_ALLOW_ONE rule of `kind` whose `when` holds: what `evaluate` remembers on ACCEPT, with the
        same semantics (the rule's window in event time, the first one wins). Whether any rule took it."""
        now = now if now is not None else self.clock()
        taken = False
        for rule in self.rulebook.current.for_kind(kind):
            if rule.type is not RuleType.DUPLICATE_ALLOW_ONE or (
                rule.when is not None and not rule.when.test(record, now)
            ):
                continue
            self._remember(rule, record, now)
            taken = True
        return taken

    def _remember(self, rule: CompiledRule, record: Mapping[str, Any], now: datetime) -> None:
        key = rule.dedupe_key(record)
        if key is None:
            return
        event_time = record.get(rule.spec.time_field)
        now_us = _micros(now)
        time_us = _micros(event_time) if isinstance(event_time, datetime) else now_us
        self.dedupe.remember(rule.id, key, time_us, int(rule.spec.window / _MICROSECOND), now=now_us)

    # -- metrics ----------------------------------------------------------------------------------------------------
    def rule_counters(self) -> dict[str, RuleCounter]:
        """rule id -> checked / failed so far (export as lp_validator_rule_{checked,failed}_total{rule})."""
        return {rule_id: RuleCounter(checked, failed) for rule_id, (checked, failed) in self._counts.items()}

    def outcome_counters(self) -> dict[str, int]:
        return {str(outcome): count for outcome, count in self.outcomes.items()}
