"""What `make run` needs of the Snowflake loader: its environment, and the summary's figures and checks.

The demo starts the loader like any service (or runs `python -m services.snowflake_loader run-once` after the
archiver stopped), then calls `warehouse_stats(env)` and `summarise(...)`: rows per table, and checks that the
warehouse agrees with the lake.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
from pyiceberg.exceptions import NoSuchTableError

from services.kit.config import settings_from
from services.stores.iceberg import load_table, open_catalog
from services.stores.snowflake import open_warehouse

from .settings import LoaderSettings

TABLES = (
    "RAW.USER_EVENTS", "RAW.TRANSACTIONS", "STAGING.EVENTS_CLEANED", "STAGING.TRANSACTION_CHANGES",
    "MARTS.DIM_USERS", "MARTS.USER_SESSIONS", "MARTS.DAILY_METRICS", "MARTS.FACT_TRANSACTIONS",
    "MARTS.FACT_TRANSACTION_STATUS_HISTORY", "CONTROL.LOADS", "CONTROL.PENDING",
)  # fmt: skip


def local_env(state_dir: Path) -> dict[str, str]:
    """The loader's variables for a local run (next to the stack's own `LocalStack.env()`, which has the
    SNOWFLAKE_* connection variables of fakesnow)."""
    return {
        "ICEBERG_CATALOG": "sql",
        "ICEBERG_SQL_URI": f"sqlite:///{state_dir}/iceberg/catalog.db",  # the archiver's catalog
        "SNOWFLAKE_CREATE_DATABASE": "true",
        "SNOWFLAKE_LOADER_INTERVAL_S": "5",  # production: 60
        "SNOWFLAKE_LOADER_WORK_DIR": str(state_dir / "snowflake-loader"),
        "SNOWFLAKE_NETWORK_TIMEOUT_S": "60",
    }


def _schema_name(settings: LoaderSettings, table: str) -> str:
    schema, name = table.split(".")
    actual = {"RAW": settings.raw, "STAGING": settings.staging, "MARTS": settings.marts, "CONTROL": settings.control}
    return f"{actual[schema]}.{name}"


def warehouse_stats(env: Mapping[str, str]) -> dict[str, Any]:
    """Rows per warehouse table, the lake's figures to compare with, and the SCD2 and duplicate checks' inputs."""
    settings = settings_from(LoaderSettings, env)
    with open_warehouse(settings) as warehouse:
        rows = {t: int(warehouse.scalar(f"SELECT COUNT(*) FROM {_schema_name(settings, t)}")) for t in TABLES}
        marts, staging = settings.marts, settings.staging
        users_without_one_current = int(
            warehouse.scalar(
                f"SELECT COUNT(*) FROM (SELECT USER_ID FROM {marts}.DIM_USERS GROUP BY USER_ID "
                "HAVING COUNT_IF(IS_CURRENT) <> 1)"
            )
        )
        distinct_events = int(warehouse.scalar(f"SELECT COUNT(DISTINCT EVENT_ID) FROM {staging}.EVENTS_CLEANED"))
        distinct_transactions = int(
            warehouse.scalar(f"SELECT COUNT(DISTINCT TRANSACTION_ID) FROM {staging}.TRANSACTION_CHANGES")
        )
    catalog = open_catalog(settings)
    lake: dict[str, int | None] = {}
    for name, column in (("user_events", "event_id"), ("transactions", "transaction_id")):
        try:
            values = load_table(catalog, settings, name).scan(selected_fields=(column,)).to_arrow().column(column)
            lake[f"{name}_distinct"] = pc.count_distinct(values, mode="all").as_py()
        except NoSuchTableError:
            lake[f"{name}_distinct"] = None
    return {
        "rows": rows,
        "lake": lake,
        "users_without_one_current_version": users_without_one_current,
        "distinct_event_ids": distinct_events,
        "distinct_transaction_ids": distinct_transactions,
    }


def summarise(stats: Mapping[str, Any]) -> tuple[dict[str, int], dict[str, bool]]:
    """The figures (rows per table) and the checks of one `warehouse_stats` taken after the last load."""
    rows = dict(stats["rows"])
    lake = stats["lake"]
    checks = {
        "snowflake: EVENTS_CLEANED has one row per event_id of Iceberg user_events": (
            rows["STAGING.EVENTS_CLEANED"] == stats["distinct_event_ids"] == (lake["user_events_distinct"] or 0)
        ),
        "snowflake: FACT_TRANSACTIONS has one row per transaction of Iceberg transactions": (
            rows["MARTS.FACT_TRANSACTIONS"] == (lake["transactions_distinct"] or 0)
        ),
        "snowflake: DIM_USERS has exactly one current row per user": stats["users_without_one_current_version"] == 0,
        "snowflake: no batch left half-loaded (CONTROL.PENDING empty)": rows["CONTROL.PENDING"] == 0,
    }
    return rows, checks


def summary_lines(rows: Mapping[str, int]) -> list[str]:
    return [f"  snowflake {name:<38} {count} rows" for name, count in rows.items()]
