"""The rule engine: each rule type (pass, fail, `when`, missing field), outcomes, counters, dedupe semantics."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal
from types import SimpleNamespace

import pytest

from services.validator.engine import Outcome, RuleCounter, RuleEngine
from services.validator.rulebook import RuleType, Severity

# --- MANDATORY -------------------------------------------------------------------------------------------------
MANDATORY = """
    applies_to: event
    rules:
      - id: ids
        type: MANDATORY
        fields: [event_id, user_id, properties]
      - id: purchase_fields
        type: MANDATORY
        when: {event_type: [purchase]}
        fields: [transaction_id]
"""


def test_mandatory(engine_for: Callable[..., RuleEngine], known: SimpleNamespace) -> None:
    engine = engine_for(events=MANDATORY)
    assert engine.evaluate(known.event(), "event").ok
    verdict = engine.evaluate(known.event(event_id=None, user_id="  ", properties={}), "event")
    assert verdict.outcome is Outcome.REJECT
    assert [(f.rule_id, f.rule_type, f.field, f.code) for f in verdict.errors] == [
        ("ids", RuleType.MANDATORY, "event_id", "MISSING_FIELD"),
        ("ids", RuleType.MANDATORY, "user_id", "MISSING_FIELD"),
        ("ids", RuleType.MANDATORY, "properties", "MISSING_FIELD"),
    ]
    assert verdict.errors[0].message == "event_id is missing or empty"
    record = known.event(transaction_id=None)
    del record["event_id"]  # absent counts as missing too
    assert engine.evaluate(record, "event").errors[0].field == "event_id"


def test_mandatory_when(engine_for: Callable[..., RuleEngine], known: SimpleNamespace) -> None:
    engine = engine_for(events=MANDATORY)
    assert engine.evaluate(known.event(event_type="page_view", transaction_id=None), "event").ok
    failed = engine.evaluate(known.event(event_type="purchase", transaction_id=None), "event")
    assert failed.errors[0].rule_id == "purchase_fields"
    # a `when` whose field is missing does not hold: the rule is skipped, not failed
    assert engine.evaluate(known.event(event_type=None, transaction_id=None), "event").ok


# --- VALUE -----------------------------------------------------------------------------------------------------
VALUE = r"""
    applies_to: event
    rules:
      - id: type_known
        type: VALUE
        field: event_type
        enum: [purchase, page_view]
      - id: amount_range
        type: VALUE
        field: amount
        min: 0
        max: 1000
        max_exclusive: true
      - id: quantity_positive
        type: VALUE
        field: quantity
        min: 0
        min_exclusive: true
      - id: money
        type: VALUE
        fields: [price, amount]
        min: 0
      - id: country_iso2
        type: VALUE
        severity: warn
        field: country
        regex: '[A-Z]{2}'
      - id: big_purchase_device
        type: VALUE
        severity: warn
        when: "event_type == 'purchase' and amount > 500"
        field: device_type
        enum: [desktop]
"""


@pytest.mark.parametrize(
    ("overrides", "rule_id", "code"),
    [
        ({"event_type": "refund"}, "type_known", "VALUE_NOT_ALLOWED"),
        ({"amount": -0.01}, "amount_range", "OUT_OF_RANGE"),
        ({"amount": 1000.0}, "amount_range", "OUT_OF_RANGE"),  # max exclusive
        ({"amount": float("nan")}, "amount_range", "OUT_OF_RANGE"),
        ({"amount": "12"}, "amount_range", "WRONG_TYPE"),
        ({"amount": True}, "amount_range", "WRONG_TYPE"),
        ({"quantity": 0}, "quantity_positive", "OUT_OF_RANGE"),  # min exclusive
        ({"price": -1.0}, "money", "OUT_OF_RANGE"),
    ],
)
def test_value_errors(
    engine_for: Callable[..., RuleEngine], known: SimpleNamespace, overrides: dict, rule_id: str, code: str
) -> None:
    verdict = engine_for(events=VALUE).evaluate(known.event(**overrides), "event")
    assert verdict.outcome is Outcome.REJECT
    assert (verdict.errors[0].rule_id, verdict.errors[0].code) == (rule_id, code)


def test_value_passes_bounds_and_nulls(engine_for: Callable[..., RuleEngine], known: SimpleNamespace) -> None:
    engine = engine_for(events=VALUE)
    assert engine.evaluate(known.event(amount=0.0, quantity=1, price=Decimal("0")), "event").ok  # min inclusive
    assert engine.evaluate(known.event(amount=999.99), "event").ok
    # null values pass VALUE rules: presence is MANDATORY's job
    nulls = known.event(event_type=None, amount=None, quantity=None, price=None, country=None)
    assert engine.evaluate(nulls, "event").ok


def test_value_messages(engine_for: Callable[..., RuleEngine], known: SimpleNamespace) -> None:
    engine = engine_for(events=VALUE)
    message = engine.evaluate(known.event(amount=-5.0), "event").errors[0].message
    assert message == "amount=-5.0 is outside [0, 1000)"
    message = engine.evaluate(known.event(event_type="refund"), "event").errors[0].message
    assert message == "event_type='refund' is not one of ['page_view', 'purchase']"


def test_value_warn_flags_and_when(engine_for: Callable[..., RuleEngine], known: SimpleNamespace) -> None:
    engine = engine_for(events=VALUE)
    verdict = engine.evaluate(known.event(country="gb"), "event")
    assert verdict.ok and verdict.flags == ["country_iso2"]
    assert verdict.warnings[0].severity is Severity.WARN
    assert "does not match" in verdict.warnings[0].message
    assert engine.evaluate(known.event(country=12), "event").warnings[0].code == "WRONG_TYPE"
    # the `when` holds only for big purchases
    assert engine.evaluate(known.event(amount=400.0, device_type="mobile"), "event").flags == []
    assert engine.evaluate(known.event(amount=700.0, device_type="desktop"), "event").flags == []
    big = engine.evaluate(known.event(amount=999.0, device_type="mobile", country="gb"), "event")
    assert big.flags == ["country_iso2", "big_purchase_device"]
    assert engine.evaluate(known.event(amount=999.0, device_type="mobile", event_type="page_view"), "event").ok


def test_multi_field_value_reports_each_field(engine_for: Callable[..., RuleEngine], known: SimpleNamespace) -> None:
    engine = engine_for(events=VALUE, collect_all=True)
    verdict = engine.evaluate(known.event(price=-1.0, amount=-2.0), "event")
    money = [f for f in verdict.errors if f.rule_id == "money"]
    assert [f.field for f in money] == ["price", "amount"]


# --- LOOKUP ----------------------------------------------------------------------------------------------------
LOOKUP = """
    applies_to: event
    rules:
      - id: user_exists
        type: LOOKUP
        field: user_id
        reference: users
      - id: product_exists
        type: LOOKUP
        field: product_id
        reference: products
        when: "event_type != 'search'"
      - id: product_known_warn
        type: LOOKUP
        severity: warn
        field: product_id
        reference: products
      - id: amount_positive
        type: VALUE
        field: amount
        min: 0
"""


def test_lookup_pass_and_retry(engine_for: Callable[..., RuleEngine], known: SimpleNamespace) -> None:
    engine = engine_for(events=LOOKUP)
    assert engine.evaluate(known.event(), "event").ok
    verdict = engine.evaluate(known.event(user_id="ghost"), "event")
    assert verdict.outcome is Outcome.RETRY
    assert verdict.attempt == 1
    failure = verdict.errors[0]
    assert (failure.rule_id, failure.rule_type, failure.field, failure.code, failure.retryable) == (
        "user_exists",
        RuleType.LOOKUP,
        "user_id",
        "REFERENCE_NOT_FOUND",
        True,
    )
    assert failure.message == "user_id='ghost' not found in users"
    assert engine.evaluate(known.event(user_id="ghost"), "event", attempt=3).attempt == 4


def test_lookup_when_missing_and_warn(engine_for: Callable[..., RuleEngine], known: SimpleNamespace) -> None:
    engine = engine_for(events=LOOKUP)
    # a missing key is MANDATORY's business: LOOKUP passes
    assert engine.evaluate(known.event(user_id=None), "event").ok
    # `when` skips the error rule; the warn rule still flags, and a warn miss is never retried
    verdict = engine.evaluate(known.event(event_type="search", product_id="nope"), "event")
    assert verdict.ok and verdict.flags == ["product_known_warn"]


def test_an_error_beats_a_retry(engine_for: Callable[..., RuleEngine], known: SimpleNamespace) -> None:
    # a record that will be rejected anyway is not parked for retries (LOOKUPs run last)
    verdict = engine_for(events=LOOKUP).evaluate(known.event(user_id="ghost", amount=-1.0), "event")
    assert verdict.outcome is Outcome.REJECT
    assert verdict.errors[0].rule_id == "amount_positive"


def test_lookup_retry_off(engine_for: Callable[..., RuleEngine], known: SimpleNamespace) -> None:
    rules = "rules:\n  - {id: u, type: LOOKUP, applies_to: event, field: user_id, reference: users, retry: false}\n"
    verdict = engine_for(events=rules).evaluate(known.event(user_id="ghost"), "event")
    assert verdict.outcome is Outcome.REJECT and not verdict.errors[0].retryable


# --- DUPLICATE_ALLOW_ONE ---------------------------------------------------------------------------------------
DUPLICATE = """
    applies_to: event
    rules:
      - id: amount_positive
        type: VALUE
        field: amount
        min: 0
      - id: unique
        type: DUPLICATE_ALLOW_ONE
        key: event_id
        window: 10m
      - id: user_exists
        type: LOOKUP
        field: user_id
        reference: users
"""


def test_duplicate_keeps_the_first(engine_for: Callable[..., RuleEngine], known: SimpleNamespace) -> None:
    engine = engine_for(events=DUPLICATE)
    assert engine.evaluate(known.event(), "event").ok
    verdict = engine.evaluate(known.event(), "event")
    assert verdict.outcome is Outcome.REJECT
    failure = verdict.errors[0]
    assert (failure.rule_id, failure.rule_type, failure.code, failure.field) == (
        "unique",
        RuleType.DUPLICATE_ALLOW_ONE,
        "DUPLICATE",
        "event_id",
    )
    assert engine.evaluate(known.event(event_id="another"), "event").ok
    assert engine.evaluate(known.event(event_id=None), "event").ok  # no key: nothing to compare


def test_duplicate_window_by_event_time(engine_for: Callable[..., RuleEngine], known: SimpleNamespace) -> None:
    engine = engine_for(events=DUPLICATE)
    assert engine.evaluate(known.event(), "event").ok
    later = known.now + timedelta(minutes=11)
    # a copy whose event time is past the first one's window is not a duplicate any more
    assert engine.evaluate(known.event(event_time=later), "event", now=later).ok


def test_rejected_or_retried_records_are_not_remembered(
    engine_for: Callable[..., RuleEngine], known: SimpleNamespace
) -> None:
    engine = engine_for(events=DUPLICATE)
    # rejected for another reason: its key must not block the corrected copy
    assert engine.evaluate(known.event(amount=-1.0), "event").outcome is Outcome.REJECT
    assert engine.evaluate(known.event(), "event").ok
    # a record parked for retry comes back with the same event_id: it is not its own duplicate
    retried = known.event(event_id="late", user_id="not-yet")
    assert engine.evaluate(retried, "event").outcome is Outcome.RETRY
    engine.references.put("users", {**known.user_row, "user_id": "not-yet"})
    assert engine.evaluate(retried, "event", attempt=1).ok
    assert engine.evaluate(retried, "event").outcome is Outcome.REJECT  # now it is remembered


def test_duplicate_with_composite_key(engine_for: Callable[..., RuleEngine], known: SimpleNamespace) -> None:
    rules = "rules:\n  - {id: d, type: DUPLICATE_ALLOW_ONE, applies_to: event, key: [session_id, page_url]}\n"
    engine = engine_for(events=rules)
    assert engine.evaluate(known.event(), "event").ok
    assert engine.evaluate(known.event(event_id="x"), "event").errors[0].field == "session_id,page_url"
    assert engine.evaluate(known.event(page_url="/other"), "event").ok


# --- BUSINESS_RULE ---------------------------------------------------------------------------------------------
BUSINESS = """
    applies_to: [event, transaction]
    rules:
      - id: not_in_future
        type: BUSINESS_RULE
        applies_to: event
        expression: event_time <= now + minutes(5)
        code: FUTURE_TIMESTAMP
      - id: total_consistent
        type: BUSINESS_RULE
        applies_to: transaction
        expression: abs(total - (quantity * unit_price - discount + tax)) <= 0.01
        field: total
        message: total does not add up
      - id: purchase_price
        type: BUSINESS_RULE
        severity: warn
        applies_to: event
        when: {event_type: [purchase]}
        expression: amount >= price
      - id: ratio
        type: BUSINESS_RULE
        applies_to: transaction
        expression: total / quantity >= 0
"""
TRANSACTION = {
    "transaction_id": "t1",
    "quantity": 2,
    "unit_price": Decimal("129.99"),
    "discount": Decimal("13.00"),
    "tax": Decimal("49.40"),
    "total": Decimal("296.38"),
}


def test_business_rule_pass_fail(engine_for: Callable[..., RuleEngine], known: SimpleNamespace) -> None:
    engine = engine_for(events=BUSINESS)
    assert engine.evaluate(known.event(event_time=known.now + timedelta(minutes=4)), "event").ok
    verdict = engine.evaluate(known.event(event_time=known.now + timedelta(days=3)), "event")
    failure = verdict.errors[0]
    assert (failure.rule_id, failure.code, failure.field) == ("not_in_future", "FUTURE_TIMESTAMP", "event_time")
    assert failure.message.startswith("violates `event_time <= now + minutes(5)` (event_time=datetime.datetime(2026")

    assert engine.evaluate(TRANSACTION, "transaction").ok
    bad = engine.evaluate({**TRANSACTION, "total": Decimal("300.00")}, "transaction")
    assert bad.errors[0].rule_id == "total_consistent"
    assert bad.errors[0].field == "total"
    assert bad.errors[0].code == "BUSINESS_RULE_VIOLATED"
    assert bad.errors[0].message.startswith("total does not add up (discount=Decimal('13.00'), quantity=2")


def test_business_rule_missing_field_and_runtime_error(
    engine_for: Callable[..., RuleEngine], known: SimpleNamespace
) -> None:
    engine = engine_for(events=BUSINESS)
    missing = engine.evaluate({**TRANSACTION, "tax": None}, "transaction").errors[0]
    assert (missing.rule_id, missing.code, missing.field) == ("total_consistent", "MISSING_FIELD", "tax")
    assert (
        missing.message == "tax is missing (needed by `abs(total - (quantity * unit_price - discount + tax)) <= 0.01`)"
    )
    zero = engine.evaluate({**TRANSACTION, "quantity": 0, "total": Decimal("36.40")}, "transaction").errors[0]
    assert (zero.rule_id, zero.code) == ("ratio", "EXPRESSION_ERROR")
    assert zero.message == "`total / quantity >= 0` could not be evaluated: DivisionByZero"


def test_business_rule_when_and_warn(engine_for: Callable[..., RuleEngine], known: SimpleNamespace) -> None:
    engine = engine_for(events=BUSINESS)
    assert engine.evaluate(known.event(amount=10.0, price=20.0), "event").flags == ["purchase_price"]
    assert engine.evaluate(known.event(event_type="search", amount=10.0, price=20.0), "event").flags == []


# --- engine-wide behaviour -------------------------------------------------------------------------------------
def test_first_error_or_all(engine_for: Callable[..., RuleEngine], known: SimpleNamespace) -> None:
    record = known.event(event_type="refund", amount=-1.0, quantity=0)
    first = engine_for(events=VALUE).evaluate(record, "event")
    assert [f.rule_id for f in first.errors] == ["type_known"]
    every = engine_for(events=VALUE, collect_all=True).evaluate(record, "event")
    assert [f.rule_id for f in every.errors] == ["type_known", "amount_range", "quantity_positive", "money"]
    assert every.first_error is every.errors[0]


def test_kinds_select_rules(engine_for: Callable[..., RuleEngine], known: SimpleNamespace) -> None:
    engine = engine_for(events=BUSINESS)
    future = known.now + timedelta(days=3)
    assert engine.evaluate({**TRANSACTION, "event_time": future}, "transaction").ok  # not_in_future: events only
    assert not engine.evaluate({**TRANSACTION, "event_time": future}, "event").ok


def test_counters(engine_for: Callable[..., RuleEngine], known: SimpleNamespace) -> None:
    engine = engine_for(events=MANDATORY)
    engine.evaluate(known.event(), "event")
    engine.evaluate(known.event(event_id=None), "event")
    engine.evaluate(known.event(event_type="search", transaction_id=None), "event")
    assert engine.rule_counters() == {
        "ids": RuleCounter(checked=3, failed=1),
        "purchase_fields": RuleCounter(checked=1, failed=0),  # stopped after the first error, skipped by `when`
    }
    assert engine.outcome_counters() == {"accept": 2, "reject": 1, "retry": 0}


def test_counters_survive_a_reload(engine_for: Callable[..., RuleEngine], known: SimpleNamespace) -> None:
    engine = engine_for(events=MANDATORY)
    engine.evaluate(known.event(), "event")
    version = engine.rulebook.current.version
    (engine.rulebook.directory / "extra.yaml").write_text(
        "rules:\n  - {id: extra, type: VALUE, applies_to: event, field: amount, min: 0}\n"
    )
    assert engine.rulebook.reload().changed
    verdict = engine.evaluate(known.event(), "event")
    assert verdict.rules_version != version
    counters = engine.rule_counters()
    assert counters["ids"].checked == 2 and counters["extra"].checked == 1


def test_default_rules_accept_a_good_purchase(engine: RuleEngine, known: SimpleNamespace) -> None:
    verdict = engine.evaluate(known.event(), "event")
    assert verdict.ok and verdict.flags == [] and verdict.errors == ()
    assert verdict.rules_version == engine.rulebook.current.version
