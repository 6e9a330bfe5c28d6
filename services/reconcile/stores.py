"""Read (day, event_type) -> rows, distinct events and revenue from each store, through the stores layer.

- ClickHouse: the named query `daily` via `run_query` (a running sink's /query port, else the chDB folder,
  or the server with CLICKHOUSE_CLIENT=native). The query returns every day; the window is applied here.
- Iceberg: the archiver's tables in the catalog; a scan of four columns, pruned to the window by day(event_time)
  partitions, grouped in DuckDB.
- Snowflake: STAGING.EVENTS_CLEANED with the real connector; grouped in the warehouse.
Every store counts each event_id once and sums its amount once, and counts its rows too (one per event when
exact): ClickHouse its base table without FINAL (or its activity view when that counted more), Iceberg the
table's rows, Snowflake the most of the compared table's and RAW.USER_EVENTS's rows.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any

from services.kit.config import settings_from

from .compare import Figures, Key, Window, cells_from_rows
from .settings import ReconcileSettings


class StoreUnavailable(RuntimeError):
    """A store could not be read (unreachable, not initialised, refused the query)."""

    def __init__(self, store: str, message: str) -> None:
        super().__init__(f"{store}: {message}")
        self.store = store


def read_clickhouse(env: Mapping[str, str], window: Window) -> dict[Key, Figures]:
    from services.stores.clickhouse import ClickHouseSettings, QueryFailed, run_query

    settings = settings_from(ClickHouseSettings, env)
    try:
        result = run_query(settings, "daily")
    except QueryFailed as error:
        raise StoreUnavailable("clickhouse", str(error)) from None
    except Exception as error:  # the native client's network and server errors
        raise StoreUnavailable("clickhouse", f"{type(error).__name__}: {error}") from None
    return {key: f for key, f in cells_from_rows(result.rows).items() if window.contains(key[0])}


def _iceberg_filter(window: Window) -> Any:
    from pyiceberg.expressions import AlwaysTrue, And, GreaterThanOrEqual, LessThan

    # On event_time, not event_date: the table is partitioned by day(event_time), so whole files are skipped.
    condition: Any = AlwaysTrue()
    if window.since is not None:
        start = datetime.combine(window.since, time(), tzinfo=UTC)
        condition = And(condition, GreaterThanOrEqual("event_time", start.isoformat()))
    if window.until is not None:
        end = datetime.combine(window.until + timedelta(days=1), time(), tzinfo=UTC)
        condition = And(condition, LessThan("event_time", end.isoformat()))
    return condition


def read_iceberg(env: Mapping[str, str], window: Window, table_name: str = "user_events") -> dict[Key, Figures]:
    import duckdb
    from pyiceberg.exceptions import NoSuchTableError

    from services.stores.iceberg import CatalogSettings, load_table, open_catalog

    settings = settings_from(CatalogSettings, env)
    try:
        table = load_table(open_catalog(settings), settings, table_name)
        reader = table.scan(
            row_filter=_iceberg_filter(window), selected_fields=("event_id", "event_type", "event_date", "amount")
        ).to_arrow_batch_reader()
        with duckdb.connect() as con:
            # Deduplicating a long window may spill; /tmp is the one writable place in the pod.
            con.execute(f"SET temp_directory = '{Path(tempfile.gettempdir()) / 'lp-reconcile-duckdb'}'")
            con.register("events", reader)
            rows = con.execute(
                "SELECT event_date, event_type, sum(copies), count(*), sum(amount) FROM ("
                " SELECT event_id, any_value(event_date) AS event_date, any_value(event_type) AS event_type,"
                " any_value(amount) AS amount, count(*) AS copies FROM events GROUP BY event_id"
                ") GROUP BY event_date, event_type"
            ).fetchall()
    except NoSuchTableError as error:
        raise StoreUnavailable("iceberg", str(error)) from None
    except Exception as error:  # catalog, S3 and file errors
        raise StoreUnavailable("iceberg", f"{type(error).__name__}: {error}") from None
    return {key: f for key, f in cells_from_rows(rows).items() if window.contains(key[0])}


def snowflake_sql(table: str, window: Window, raw_table: str | None = None) -> tuple[str, dict[str, Any]]:
    """The grouped query and its parameters (pyformat, the connector's default): per cell, the rows (of `table`,
    or of `raw_table` when it holds more), the distinct events and their revenue summed once."""
    where, params = [], {}
    if window.since is not None:
        where.append("EVENT_DATE >= %(since)s")
        params["since"] = window.since
    if window.until is not None:
        where.append("EVENT_DATE <= %(until)s")
        params["until"] = window.until
    condition = f" WHERE {' AND '.join(where)}" if where else ""
    # Each event once: its first row. The copies are counted beside it.
    events = (
        "SELECT EVENT_DATE, EVENT_TYPE, COUNT(*) AS ROWS_, SUM(CASE WHEN N = 1 THEN 1 ELSE 0 END) AS EVENTS_, "
        "SUM(CASE WHEN N = 1 THEN AMOUNT END) AS REVENUE_ FROM ("
        "SELECT EVENT_DATE, EVENT_TYPE, AMOUNT, ROW_NUMBER() OVER (PARTITION BY EVENT_ID ORDER BY EVENT_DATE) AS N "
        f"FROM {table}{condition}) GROUP BY EVENT_DATE, EVENT_TYPE"
    )
    if raw_table is None:
        return f"SELECT EVENT_DATE, EVENT_TYPE, ROWS_, EVENTS_, REVENUE_ FROM ({events})", params
    raw = (
        f"SELECT EVENT_DATE, EVENT_TYPE, COUNT(*) AS RAW_ROWS FROM {raw_table}{condition} "
        "GROUP BY EVENT_DATE, EVENT_TYPE"
    )
    sql = (
        "SELECT E.EVENT_DATE, E.EVENT_TYPE, GREATEST(E.ROWS_, COALESCE(R.RAW_ROWS, 0)), E.EVENTS_, E.REVENUE_ "
        f"FROM ({events}) E LEFT JOIN ({raw}) R ON E.EVENT_DATE = R.EVENT_DATE AND E.EVENT_TYPE = R.EVENT_TYPE"
    )
    return sql, params


def read_snowflake(
    env: Mapping[str, str],
    window: Window,
    table: str = "STAGING.EVENTS_CLEANED",
    raw_table: str | None = "RAW.USER_EVENTS",
) -> dict[Key, Figures]:
    from services.stores.snowflake import CredentialError, SnowflakeSettings, open_warehouse

    settings = settings_from(SnowflakeSettings, env)  # the loader's variables, the same credential handling
    sql, params = snowflake_sql(table, window, raw_table)
    try:
        with open_warehouse(settings) as warehouse:
            rows = warehouse.query(sql, params)
    except CredentialError as error:
        raise StoreUnavailable("snowflake", str(error)) from None
    except Exception as error:  # connector errors name the cause; never the credentials
        raise StoreUnavailable(
            "snowflake", f"{type(error).__name__}: {error} (database {settings.database}, table {table})"
        ) from None
    return {key: f for key, f in cells_from_rows(rows).items() if window.contains(key[0])}


def read_store(store: str, env: Mapping[str, str], window: Window, settings: ReconcileSettings) -> dict[Key, Figures]:
    if store == "clickhouse":
        return read_clickhouse(env, window)
    if store == "iceberg":
        return read_iceberg(env, window, settings.reconcile_iceberg_table)
    if store == "snowflake":
        return read_snowflake(
            env, window, settings.reconcile_snowflake_table, settings.reconcile_snowflake_raw_table or None
        )
    raise ValueError(f"unknown store {store!r}")
