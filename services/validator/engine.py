"""The rule engine: one record and its kind in, a `Verdict` out.

Synchronous and free of I/O. Its only state is explicit: the `RuleBook` (read once per record), the
`ReferenceStore` (read), the `DedupeStore` (written when a record is accepted) and the per-rule counters.

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

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from services.validator.dedupe import DedupeStore
from services.validator.references import ReferenceStore
from services.validator.rulebook import CompiledRule, Failure, RuleBook, RuleSet, RuleType, Severity

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


# (when test, check, [checked, failed], is warn, is DUPLICATE_ALLOW_ONE, the rule)
_Step = tuple[Callable[[Mapping[str, Any], datetime], bool] | None, Any, list[int], bool, bool, CompiledRule]


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
        self._plan_for: RuleSet | None = None
        self._plans: dict[str, tuple[_Step, ...]] = {}
        self._clean_accept = Verdict(Outcome.ACCEPT)
        self._checks = _Checks(references.contains, self.dedupe.seen)

    # -- evaluation -------------------------------------------------------------------------------------------------
    def _plan(self, ruleset: RuleSet, kind: str) -> tuple[_Step, ...]:
        if ruleset is not self._plan_for:  # a reload happened: rebuild the plans
            self._plan_for, self._plans = ruleset, {}
            self._clean_accept = Verdict(Outcome.ACCEPT, rules_version=ruleset.version)  # shared: it is frozen
        plan = self._plans.get(kind)
        if plan is None:
            plan = self._plans[kind] = tuple(
                (
                    None if rule.when is None else rule.when.test,
                    rule.check,
                    self._counts.setdefault(rule.id, [0, 0]),
                    rule.severity is Severity.WARN,
                    rule.type is RuleType.DUPLICATE_ALLOW_ONE,
                    rule,
                )
                for rule in ruleset.for_kind(kind)
            )
        return plan

    def evaluate(
        self, record: Mapping[str, Any], kind: str, *, attempt: int = 0, now: datetime | None = None
    ) -> Verdict:
        """Judge `record` of `kind` ("event", "transaction"). `attempt`: retries already made (0 = first try)."""
        ruleset = self.rulebook.current
        if now is None:
            now = self.clock()
        checks = self._checks
        errors: list[Failure] = []
        warnings: tuple[Failure, ...] = ()
        retryable: tuple[Failure, ...] = ()
        dedupe_passed: list[CompiledRule] = []
        for when, check, cell, warn, dedupe, rule in self._plan(ruleset, kind):
            if when is not None and not when(record, now):
                continue
            cell[0] += 1
            failures = check(record, now, checks)
            if failures is None:
                if dedupe:
                    dedupe_passed.append(rule)
                continue
            cell[1] += 1
            if warn:
                warnings += failures
            elif failures[0].retryable:
                retryable += failures
            else:
                errors.extend(failures)
                if not self.collect_all:
                    break

        if errors:
            verdict = Verdict(Outcome.REJECT, (*errors, *retryable), warnings, attempt, ruleset.version)
        elif retryable:
            verdict = Verdict(Outcome.RETRY, retryable, warnings, attempt + 1, ruleset.version)
        else:
            for rule in dedupe_passed:
                self._remember(rule, record, now)
            if warnings or attempt:
                verdict = Verdict(Outcome.ACCEPT, (), warnings, attempt, ruleset.version)
            else:
                verdict = self._clean_accept
        self.outcomes[verdict.outcome] += 1
        return verdict

    def canonical(self, record: Mapping[str, Any], kind: str) -> Mapping[str, Any]:
        """`record` with its ids (the fields `format: uuid` rules name) in canonical form; judge and pass on
        this, not the record as received (see `RuleSet.canonical`)."""
        return self.rulebook.current.canonical(record, kind)

    def check_ids(self, record: Mapping[str, Any], kind: str, *, now: datetime | None = None) -> Verdict:
        """Only the `format: uuid` rules: for records no other rule judges (a CDC delete is a fact at the source,
        but its ids still go to every store)."""
        ruleset = self.rulebook.current
        now = now if now is not None else self.clock()
        errors: list[Failure] = []
        for rule in ruleset.id_rules(kind):
            if rule.severity is Severity.WARN or (rule.when is not None and not rule.when.test(record, now)):
                continue
            cell = self._counts.setdefault(rule.id, [0, 0])
            cell[0] += 1
            failures = rule.check(record, now, self._checks)
            if failures is not None:
                cell[1] += 1
                errors.extend(failures)
                break
        verdict = Verdict(Outcome.REJECT if errors else Outcome.ACCEPT, tuple(errors), (), 0, ruleset.version)
        self.outcomes[verdict.outcome] += 1
        return verdict

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
        if not isinstance(event_time, datetime):
            event_time = now
        self.dedupe.remember(rule.id, key, event_time, rule.spec.window, now=now)

    # -- metrics ----------------------------------------------------------------------------------------------------
    def rule_counters(self) -> dict[str, RuleCounter]:
        """rule id -> checked / failed so far (export as lp_validator_rule_{checked,failed}_total{rule})."""
        return {rule_id: RuleCounter(checked, failed) for rule_id, (checked, failed) in self._counts.items()}

    def outcome_counters(self) -> dict[str, int]:
        return {str(outcome): count for outcome, count in self.outcomes.items()}
