"""Shared fixtures of the validator tests: a known user and product, valid records, engines and rule dirs."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from services.validator.dedupe import DedupeStore
from services.validator.engine import RuleEngine
from services.validator.references import ReferenceStore
from services.validator.rulebook import DEFAULT_RULES_DIR, RuleBook

NOW = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)  # a Monday
USER_ID = "11111111-1111-4111-8111-111111111111"
PRODUCT_ID = "22222222-2222-4222-8222-222222222222"
USER_ROW = {
    "user_id": USER_ID,
    "email": "  Ada.Lovelace@Example.COM ",
    "first_name": "Ada",
    "last_name": "Lovelace",
    "tier": "gold",
    "country": "GB",
    "city": "London",
    "registration_date": date(2024, 3, 1),
    "created_at": datetime(2024, 3, 1, tzinfo=UTC),
    "updated_at": datetime(2025, 6, 1, tzinfo=UTC),
}
PRODUCT_ROW = {
    "product_id": PRODUCT_ID,
    "name": "Voltix Pro Headphones 7",
    "category": "electronics",
    "subcategory": "headphones",
    "brand": "Voltix",
    "price": Decimal("129.99"),
    "cost": Decimal("70.00"),
    "created_at": datetime(2024, 1, 1, tzinfo=UTC),
    "updated_at": datetime(2025, 1, 1, tzinfo=UTC),
}


def raw_event(**overrides: Any) -> dict[str, Any]:
    """A valid raw_event record (a purchase by the known user of the known product)."""
    record = {
        "event_id": "33333333-3333-4333-8333-333333333333",
        "event_type": "purchase",
        "event_time": NOW,
        "user_id": USER_ID,
        "session_id": "44444444-4444-4444-8444-444444444444",
        "product_id": PRODUCT_ID,
        "transaction_id": "55555555-5555-4555-8555-555555555555",
        "quantity": 2,
        "price": 129.99,
        "amount": 280.78,
        "search_query": None,
        "page_url": "/checkout/confirmation",
        "referrer": None,
        "device_type": "mobile",
        "ip_address": "81.2.69.160",
        "country": "GB",
        "source": "generator",
        "properties": {"payment_method": "paypal"},
    }
    record.update(overrides)
    return record


@pytest.fixture()
def known() -> SimpleNamespace:
    """The shared constants and the valid-event factory (conftest is not importable under importlib mode)."""
    return SimpleNamespace(
        now=NOW,
        user_id=USER_ID,
        product_id=PRODUCT_ID,
        user_row=dict(USER_ROW),
        product_row=dict(PRODUCT_ROW),
        event=raw_event,
    )


@pytest.fixture()
def references() -> ReferenceStore:
    store = ReferenceStore()
    store.put("users", USER_ROW, lsn=10)
    store.put("products", PRODUCT_ROW, lsn=10)
    return store


@pytest.fixture()
def rulebook() -> RuleBook:
    return RuleBook(DEFAULT_RULES_DIR, reference_tables=("users", "products"))


@pytest.fixture()
def engine(rulebook: RuleBook, references: ReferenceStore) -> RuleEngine:
    return RuleEngine(rulebook, references, DedupeStore(), lambda: NOW)


@pytest.fixture()
def rules_dir(tmp_path: Path) -> Callable[..., Path]:
    """Write rule files into a fresh directory: rules_dir(events="yaml text", other="...") -> the directory."""
    directory = tmp_path / "rules"
    directory.mkdir()

    def write(**files: str) -> Path:
        for name, text in files.items():
            (directory / f"{name}.yaml").write_text(textwrap.dedent(text))
        return directory

    return write


@pytest.fixture()
def engine_for(references: ReferenceStore, rules_dir: Callable[..., Path]) -> Callable[..., RuleEngine]:
    """An engine over the given rule file texts, e.g. engine_for(events=...)."""

    def build(*, collect_all: bool = False, **files: str) -> RuleEngine:
        book = RuleBook(rules_dir(**files), reference_tables=references.table_names)
        return RuleEngine(book, references, DedupeStore(), lambda: NOW, collect_all=collect_all)

    return build
