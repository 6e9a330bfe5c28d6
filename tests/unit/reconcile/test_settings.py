"""Settings and arguments: validated, bad ones name their variable and exit 2; days and store lists parse."""

from __future__ import annotations

import subprocess
import sys
from datetime import date
from pathlib import Path

import pytest

from services.kit.config import ConfigError, settings_from
from services.reconcile.compare import Window
from services.reconcile.runner import run
from services.reconcile.settings import ReconcileSettings, parse_day, parse_stores
from services.reconcile.stores import _iceberg_filter, snowflake_sql

REPO_ROOT = Path(__file__).resolve().parents[3]
TODAY = date(2026, 11, 22)


def test_days_parse_in_every_documented_form():
    assert parse_day("2026-11-02", TODAY) == date(2026, 11, 2)
    assert parse_day("today", TODAY) == TODAY
    assert parse_day("Yesterday", TODAY) == date(2026, 11, 21)
    assert parse_day("-7d", TODAY) == date(2026, 11, 15)
    with pytest.raises(ValueError, match="not a day"):
        parse_day("2026-11-02T10:00", TODAY)  # whole days only: the stores are compared per day


def test_stores_need_two_known_ones():
    assert parse_stores("ClickHouse, snowflake") == ("clickhouse", "snowflake")
    assert parse_stores("iceberg,iceberg,snowflake") == ("iceberg", "snowflake")
    with pytest.raises(ValueError, match="at least two"):
        parse_stores("iceberg")
    with pytest.raises(ValueError, match="unknown store"):
        parse_stores("iceberg,postgres")


def test_defaults_are_the_seed_targets():
    settings = settings_from(ReconcileSettings, {})
    assert settings.stores == ("clickhouse", "iceberg", "snowflake")
    assert settings.reconcile_min_consistency == 0.999
    assert settings.reconcile_snowflake_table == "STAGING.EVENTS_CLEANED"


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"RECONCILE_MIN_CONSISTENCY": "1.5"}, "RECONCILE_MIN_CONSISTENCY"),
        ({"RECONCILE_MIN_CONSISTENCY": "0"}, "RECONCILE_MIN_CONSISTENCY"),
        ({"RECONCILE_REVENUE_TOLERANCE": "-1"}, "RECONCILE_REVENUE_TOLERANCE"),
        ({"RECONCILE_STORES": "clickhouse"}, "RECONCILE_STORES"),
        ({"RECONCILE_SINCE": "last week"}, "RECONCILE_SINCE"),
        ({"RECONCILE_SNOWFLAKE_TABLE": "x; DROP TABLE y"}, "RECONCILE_SNOWFLAKE_TABLE"),
    ],
)
def test_a_bad_variable_is_named(env: dict[str, str], variable: str):
    with pytest.raises(ConfigError) as raised:
        settings_from(ReconcileSettings, env)
    assert raised.value.code == 2 and variable in str(raised.value)


def test_bad_arguments_raise_config_errors_before_any_store_is_read():
    with pytest.raises(ConfigError, match="--stores"):
        run({}, stores="iceberg")
    with pytest.raises(ConfigError, match="not a day"):
        run({}, since="soon")
    with pytest.raises(ConfigError, match="empty"):
        run({}, since="2026-11-03", until="2026-11-02")


def test_the_snowflake_query_groups_distinct_events_inside_the_window():
    sql, params = snowflake_sql("STAGING.EVENTS_CLEANED", Window(date(2026, 11, 2), date(2026, 11, 3)), "RAW.E")
    assert "FROM STAGING.EVENTS_CLEANED WHERE EVENT_DATE >= %(since)s AND EVENT_DATE <= %(until)s" in sql
    assert "FROM RAW.E WHERE EVENT_DATE >= %(since)s AND EVENT_DATE <= %(until)s" in sql
    assert params == {"since": date(2026, 11, 2), "until": date(2026, 11, 3)}
    open_sql, open_params = snowflake_sql("T", Window())
    assert "WHERE" not in open_sql and open_params == {}


def test_the_snowflake_query_counts_rows_of_both_tables_and_each_event_once():
    import duckdb

    day = date(2026, 11, 2)
    with duckdb.connect() as con:
        for table in ("staged", "raw"):
            con.execute(f"CREATE TABLE {table} (EVENT_ID VARCHAR, EVENT_DATE DATE, EVENT_TYPE VARCHAR, AMOUNT DOUBLE)")
        con.execute("INSERT INTO staged VALUES ('a', ?, 'purchase', 2.5), ('b', ?, 'purchase', 1.0)", [day, day])
        # RAW holds a second copy of a: the staged table merged it away, the rows still count it.
        con.execute("INSERT INTO raw SELECT * FROM staged UNION ALL SELECT * FROM staged WHERE EVENT_ID = 'a'")
        assert con.execute(snowflake_sql("staged", Window(), "raw")[0]).fetchall() == [(day, "purchase", 3, 2, 3.5)]
        assert con.execute(snowflake_sql("staged", Window())[0]).fetchall() == [(day, "purchase", 2, 2, 3.5)]
        con.execute("INSERT INTO staged SELECT * FROM staged WHERE EVENT_ID = 'b'")  # a copy in the table itself
        assert con.execute(snowflake_sql("staged", Window(), "raw")[0]).fetchall() == [(day, "purchase", 3, 2, 3.5)]


def test_the_iceberg_filter_is_on_event_time_so_day_partitions_prune():
    text = str(_iceberg_filter(Window(date(2026, 11, 2), date(2026, 11, 3))))
    assert "event_time" in text and "2026-11-02T00:00:00+00:00" in text and "2026-11-04T00:00:00+00:00" in text
    assert str(_iceberg_filter(Window())) == "AlwaysTrue()"


def test_the_command_exits_2_naming_the_variable():
    done = subprocess.run(
        [sys.executable, "-m", "services.reconcile"],
        env={"PATH": "/usr/bin:/bin", "RECONCILE_MIN_CONSISTENCY": "lots"},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "RECONCILE_MIN_CONSISTENCY" in done.stderr and "Traceback" not in done.stderr
