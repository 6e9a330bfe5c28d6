"""The run summary's checks fail when the warehouse disagrees with the lake."""

from __future__ import annotations

from pathlib import Path

from services.snowflake_loader.runsummary import TABLES, local_env, summarise


def stats(**overrides: object) -> dict[str, object]:
    rows = dict.fromkeys(TABLES, 0) | {"STAGING.EVENTS_CLEANED": 10, "MARTS.FACT_TRANSACTIONS": 3}
    base: dict[str, object] = {
        "rows": rows,
        "lake": {"user_events_distinct": 10, "transactions_distinct": 3},
        "users_without_one_current_version": 0,
        "distinct_event_ids": 10,
        "distinct_transaction_ids": 3,
    }
    return base | overrides


def test_all_checks_pass_when_the_warehouse_matches_the_lake() -> None:
    rows, checks = summarise(stats())
    assert rows["STAGING.EVENTS_CLEANED"] == 10 and all(checks.values())


def test_each_disagreement_fails_its_check() -> None:
    assert not all(summarise(stats(lake={"user_events_distinct": 11, "transactions_distinct": 3}))[1].values())
    assert not all(summarise(stats(distinct_event_ids=9))[1].values())
    assert not all(summarise(stats(users_without_one_current_version=1))[1].values())
    pending = dict.fromkeys(TABLES, 0) | {
        "STAGING.EVENTS_CLEANED": 10,
        "MARTS.FACT_TRANSACTIONS": 3,
        "CONTROL.PENDING": 1,
    }
    assert not all(summarise(stats(rows=pending))[1].values())


def test_local_env_uses_the_archivers_catalog(tmp_path: Path) -> None:
    env = local_env(tmp_path)
    assert env["ICEBERG_SQL_URI"] == f"sqlite:///{tmp_path}/iceberg/catalog.db"
    assert env["SNOWFLAKE_CREATE_DATABASE"] == "true"
