"""Rule files: the default set, clear load errors, atomic reload, and adding a rule with YAML only."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

from services.validator.dedupe import DedupeStore
from services.validator.engine import Outcome, RuleEngine
from services.validator.references import ReferenceStore
from services.validator.rulebook import (
    DEFAULT_RULES_DIR,
    RuleBook,
    RuleLoadError,
    RuleType,
    Severity,
    describe_rules,
    load_ruleset,
)

NOW = datetime(2026, 1, 5, 12, tzinfo=UTC)
MINIMAL = """
    applies_to: event
    rules:
      - id: event_required_ids
        type: MANDATORY
        fields: [event_id]
"""


def test_default_rules_load_and_cover_the_bad_event_kinds() -> None:
    ruleset = load_ruleset(DEFAULT_RULES_DIR, reference_tables=("users", "products"))
    by_id = {rule.id: rule for rule in ruleset.rules}
    expected = {
        "event_required_ids": RuleType.MANDATORY,
        "event_type_known": RuleType.VALUE,
        "amount_not_negative": RuleType.VALUE,
        "price_not_negative": RuleType.VALUE,
        "quantity_positive": RuleType.VALUE,
        "user_exists": RuleType.LOOKUP,
        "product_exists": RuleType.LOOKUP,
        "event_id_unique": RuleType.DUPLICATE_ALLOW_ONE,
        "event_time_not_in_future": RuleType.BUSINESS_RULE,
        "transaction_total_consistent": RuleType.BUSINESS_RULE,
        "ip_address_ipv4": RuleType.VALUE,
        "country_iso2": RuleType.VALUE,
    }
    for rule_id, rule_type in expected.items():
        assert by_id[rule_id].type is rule_type, rule_id
    assert by_id["ip_address_ipv4"].severity is Severity.WARN
    assert by_id["country_iso2"].severity is Severity.WARN
    assert set(by_id["event_required_ids"].spec.fields) == {"event_id", "user_id", "event_type", "event_time"}
    assert len(ruleset.version) == 16
    assert {d["file"] for d in describe_rules(ruleset)} == {"events.yaml", "transactions.yaml"}


def test_rules_run_in_phases_by_type() -> None:
    ruleset = load_ruleset(DEFAULT_RULES_DIR)
    order = [rule.type for rule in ruleset.for_kind("event")]
    phases = [RuleType.MANDATORY, RuleType.VALUE, RuleType.BUSINESS_RULE, RuleType.DUPLICATE_ALLOW_ONE]
    assert order == sorted(order, key=[*phases, RuleType.LOOKUP].index)
    assert {rule.id for rule in ruleset.for_kind("transaction")} >= {"transaction_total_consistent"}
    assert ruleset.for_kind("unknown") == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "rules:\n  - id: r1\n    type: VALUE\n    applies_to: event\n    field: amount\n    min: lots\n",
            "events.yaml: rule 'r1': field min: Input should be a valid number",
        ),
        (
            "rules:\n  - id: r1\n    type: VALUE\n    applies_to: event\n    field: amount\n",
            "events.yaml: rule 'r1': field ?: Value error, a VALUE rule needs at least one of regex, min, max, enum",
        ),
        (
            "rules:\n  - id: r1\n    type: NOPE\n    applies_to: event\n",
            "events.yaml: rule 'r1': field type: must be one of MANDATORY, VALUE, LOOKUP",
        ),
        (
            "rules:\n  - id: r1\n    type: MANDATORY\n    applies_to: event\n    fields: [a]\n    typo: 1\n",
            "events.yaml: rule 'r1': field typo: Extra inputs are not permitted",
        ),
        (
            "rules:\n  - id: Bad-Id\n    type: MANDATORY\n    applies_to: event\n    fields: [a]\n",
            "events.yaml: rule 'Bad-Id': field id: String should match pattern",
        ),
        (
            "rules:\n  - type: MANDATORY\n    applies_to: event\n    fields: [a]\n",
            "events.yaml: rule #1: field id: Field required",
        ),
        (
            "rules:\n  - id: r1\n    type: MANDATORY\n    applies_to: events\n    fields: [a]\n",
            "events.yaml: rule 'r1': field applies_to: unknown record kind(s) ['events']",
        ),
        (
            "rules:\n  - id: r1\n    type: VALUE\n    applies_to: event\n    field: a\n    regex: '(['\n",
            "events.yaml: rule 'r1': field ?: Value error, regex '([' does not compile",
        ),
        (
            "rules:\n  - id: r1\n    type: BUSINESS_RULE\n    applies_to: event\n    expression: a.b > 1\n",
            "events.yaml: rule 'r1': field expression: attribute access is not allowed (column 1)",
        ),
        (
            "rules:\n  - id: r1\n    type: BUSINESS_RULE\n    applies_to: event\n    expression: __import__('os')\n",
            "events.yaml: rule 'r1': field expression: calling '__import__'",
        ),
        (
            "rules:\n  - id: r1\n    type: MANDATORY\n    applies_to: event\n    fields: [a]\n    when: a.b\n",
            "events.yaml: rule 'r1': field when: attribute access is not allowed",
        ),
        (
            "rules:\n  - id: r1\n    type: LOOKUP\n    applies_to: event\n    field: a\n    reference: shops\n",
            "events.yaml: rule 'r1': field reference: unknown reference table 'shops'",
        ),
        (
            "rules:\n  - id: r1\n    type: DUPLICATE_ALLOW_ONE\n    applies_to: event\n    key: a\n    window: soon\n",
            "events.yaml: rule 'r1': field window: Value error, not a duration: 'soon'",
        ),
        ("rules: [\n", "events.yaml: invalid YAML"),
        ("rulez: []\n", "events.yaml: field rulez: Extra inputs are not permitted"),
    ],
)
def test_load_errors_name_file_rule_and_field(rules_dir: Callable[..., Path], text: str, message: str) -> None:
    directory = rules_dir(events=text)
    with pytest.raises(RuleLoadError) as caught:
        load_ruleset(directory, reference_tables=("users", "products"))
    assert any(message in problem for problem in caught.value.problems), caught.value.problems


def test_all_problems_of_all_files_are_listed_at_once(rules_dir: Callable[..., Path]) -> None:
    directory = rules_dir(
        a="rules:\n  - id: dup\n    type: MANDATORY\n    applies_to: event\n    fields: [x]\n",
        b=(
            "rules:\n  - id: dup\n    type: MANDATORY\n    applies_to: event\n    fields: [x]\n"
            "  - id: r2\n    type: VALUE\n    applies_to: event\n    field: x\n    min: 5\n    max: 1\n"
        ),
    )
    with pytest.raises(RuleLoadError) as caught:
        load_ruleset(directory)
    text = str(caught.value)
    assert "b.yaml: rule 'dup': field id: duplicate rule id, also defined in a.yaml" in text
    assert "b.yaml: rule 'r2'" in text and "min 5.0 is greater than max 1.0" in text


def test_missing_or_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(RuleLoadError, match="does not exist"):
        load_ruleset(tmp_path / "nope")
    with pytest.raises(RuleLoadError, match="no rule files"):
        load_ruleset(tmp_path)


def test_type_names_are_case_insensitive_and_disabled_rules_skipped(rules_dir: Callable[..., Path]) -> None:
    directory = rules_dir(
        events="""
        applies_to: [event]
        rules:
          - {id: a, type: mandatory, fields: event_id}
          - {id: b, type: Value, field: amount, min: 0, enabled: false}
        """
    )
    assert load_ruleset(directory).ids == ("a",)


def test_adding_a_rule_is_one_yaml_entry(
    rules_dir: Callable[..., Path], references: ReferenceStore, known: SimpleNamespace
) -> None:
    raw_event = known.event
    directory = rules_dir(events=MINIMAL)
    book = RuleBook(directory, reference_tables=references.table_names)
    engine = RuleEngine(book, references, DedupeStore(), lambda: NOW)
    big_order = raw_event(amount=25_000.0)
    assert engine.evaluate(big_order, "event").ok

    # A new file with a new rule: no code, no restart.
    (directory / "limits.yaml").write_text(
        """
rules:
  - id: purchase_amount_limit
    type: BUSINESS_RULE
    applies_to: event
    when: {event_type: [purchase]}
    expression: amount <= 10000
    code: AMOUNT_OVER_LIMIT
    description: Orders above 10k need manual review.
"""
    )
    result = book.reload()
    assert result.ok and result.changed
    verdict = engine.evaluate(big_order, "event")
    assert verdict.outcome is Outcome.REJECT
    failure = verdict.errors[0]
    assert (failure.rule_id, failure.code, failure.field) == ("purchase_amount_limit", "AMOUNT_OVER_LIMIT", "amount")
    assert engine.evaluate(raw_event(amount=99.0), "event").ok
    assert engine.evaluate(raw_event(event_type="search", amount=25_000.0), "event").ok  # `when` does not hold


def test_reload_swaps_only_valid_rule_sets(rules_dir: Callable[..., Path]) -> None:
    directory = rules_dir(events=MINIMAL)
    book = RuleBook(directory)
    first = book.current
    assert not book.changed_on_disk()

    assert book.reload() == book.reload()  # nothing changed: same version, not changed
    assert book.reload().changed is False and book.current is first

    (directory / "events.yaml").write_text(MINIMAL.replace("[event_id]", "[event_id, user_id]").replace("\n    ", "\n"))
    os.utime(directory / "events.yaml", ns=(1, 1))  # a different stamp even on coarse file systems
    assert book.changed_on_disk()
    result = book.reload_if_changed()
    assert result is not None and result.ok and result.changed
    second = book.current
    assert second is not first and second.version != first.version
    assert book.reload_if_changed() is None

    (directory / "broken.yaml").write_text("rules:\n  - id: x\n    type: VALUE\n    applies_to: event\n")
    result = book.reload()
    assert not result.ok and not result.changed
    assert "broken.yaml: rule 'x'" in (result.error or "")
    assert book.current is second  # the old set stays in force
    assert book.last_error == result.error
    assert book.reload_if_changed() is None  # the failed attempt is remembered: no reload storm

    (directory / "broken.yaml").unlink()
    result = book.reload()
    assert result.ok and book.last_error is None
    assert book.current.version == second.version


def test_a_service_does_not_start_with_invalid_rules(rules_dir: Callable[..., Path]) -> None:
    directory = rules_dir(events="rules:\n  - id: x\n    type: VALUE\n    applies_to: event\n")
    with pytest.raises(RuleLoadError):
        RuleBook(directory)


def test_the_blank_text_class_is_pythons_whitespace() -> None:
    """MANDATORY's blank-text pattern lists exactly the characters str.isspace() calls whitespace."""
    import sys

    from services.validator.columns import PY_SPACE_CODES

    assert set(PY_SPACE_CODES) == {code for code in range(sys.maxunicode + 1) if chr(code).isspace()}


def test_decimal_against_float_is_compared_exactly() -> None:
    """Python compares Decimal('0.10') with the float 0.1 exactly (the float is a little more than 0.1); the
    column form must not round the decimal to a float first, so it leaves such comparisons to the interpreter."""
    from datetime import UTC, datetime
    from decimal import Decimal

    import pyarrow as pa

    from services.validator.columns import ColumnBatch, VectorExpression
    from services.validator.expressions import compile_expression

    expression = compile_expression("amount < 0.1")
    table = pa.table({"amount": pa.array([Decimal("0.10"), Decimal("0.11"), Decimal("0.09")])})
    holds = VectorExpression(expression).holds(ColumnBatch(table, datetime.now(UTC)))
    assert holds.tolist() == [Decimal("0.10") < 0.1, False, True] == [True, False, True]
