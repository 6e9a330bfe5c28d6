"""The engine benchmark compares like with like: on a real batch with faults, every engine available here gives
the masks the project's rules give, and those are the rules' own per-record verdicts (the interpreter)."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from bench.validator_engines import (
    ENGINES,
    Masks,
    NoChecks,
    check_same,
    column_rules,
    engines,
    judging_time,
    real_batch,
)
from services.validator.columns import records_of
from services.validator.rulebook import CompiledRule, RuleBook

NOW = judging_time()


@pytest.fixture(scope="module")
def rules() -> list[CompiledRule]:
    return column_rules(RuleBook().current.for_kind("event"))


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return real_batch(2000, NOW)


@pytest.fixture(scope="module")
def results(rules: list[CompiledRule], table: pa.Table) -> dict[str, Masks]:
    made = engines(rules)
    assert "arrow" in made and "arrow-direct" in made  # pyarrow is a dependency of the platform
    return {name: engine(table, NOW) for name, engine in made.items()}


def test_every_engine_available_gives_the_same_masks(results: dict[str, Masks], table: pa.Table) -> None:
    check_same(results, table)
    missing = set(ENGINES) - set(results)
    assert not missing or missing <= {"duckdb", "polars"}, missing  # only the optional engines may be absent


def test_every_mask_both_passes_and_fails_rows(results: dict[str, Masks]) -> None:
    """The faults make each rule fail somewhere and pass elsewhere, so agreeing on the masks says something."""
    for name, mask in results["arrow"].items():
        assert mask.any() and not mask.all(), name


def test_the_masks_are_the_rules_own_verdicts(rules: list[CompiledRule], results: dict[str, Masks], table) -> None:
    records = records_of(table)
    checks = NoChecks()
    masks = results["arrow"]
    for rule in rules:
        expected = [rule.explain(record, NOW, checks) is not None for record in records]
        assert masks[rule.id].tolist() == expected, rule.id
        if rule.when is not None:
            assert masks[f"{rule.id}:when"].tolist() == [rule.when.test(record, NOW) for record in records], rule.id


def test_the_batch_holds_the_cases_where_engine_defaults_differ(results: dict[str, Masks], table: pa.Table) -> None:
    """NaN (DuckDB and Polars order it above every number) and the separators str.isspace() calls blank (not
    Unicode White_Space) are in the batch, and every engine fails those rows as Python does."""
    prices = table.column("price").to_pylist()
    nan_rows = [row for row, value in enumerate(prices) if value is not None and math.isnan(value)]
    user_ids = table.column("user_id").to_pylist()
    separator_rows = [row for row, value in enumerate(user_ids) if value == "\x1f"]
    assert nan_rows and separator_rows
    for name, masks in results.items():
        assert masks["price_not_negative"][nan_rows].all(), name
        assert masks["event_required_ids"][separator_rows].all(), name
        assert masks["event_required_ids"].dtype == np.bool_, name
