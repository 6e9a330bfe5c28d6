"""Configuration of the reconciliation (docs/reconciliation.md has the table), and how to read a day window.

Each store's settings class (`services.stores`) is read from the same environment the store's writer uses, so the
command needs no variable of its own to find a store: ClickHouse `ClickHouseSettings` (CLICKHOUSE_*), Iceberg
`CatalogSettings` (ICEBERG_*, S3_*, AWS_*), Snowflake `SnowflakeSettings` (SNOWFLAKE_*).
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TypeVar

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.kit.config import HttpUrl

STORES = ("clickhouse", "iceberg", "snowflake")
_IDENTIFIER = r"^[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*){0,2}$"

S = TypeVar("S", bound=BaseSettings)


def parse_stores(value: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(part.strip().lower() for part in value.split(",") if part.strip()))
    unknown = [name for name in names if name not in STORES]
    if unknown:
        raise ValueError(f"unknown store(s) {unknown}; choose from {', '.join(STORES)}")
    if len(names) < 2:
        raise ValueError(f"name at least two stores to compare (got {', '.join(names) or 'none'})")
    return names


_RELATIVE = re.compile(r"^-(\d+)d$")


def parse_day(text: str, today: date | None = None) -> date:
    """A UTC day: YYYY-MM-DD, `today`, `yesterday` or `-Nd` (N days before today)."""
    today = today or datetime.now(UTC).date()
    value = text.strip().lower()
    if value == "today":
        return today
    if value == "yesterday":
        return today - timedelta(days=1)
    relative = _RELATIVE.match(value)
    if relative:
        return today - timedelta(days=int(relative.group(1)))
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{text!r} is not a day (YYYY-MM-DD, today, yesterday or -Nd)") from None


class ReconcileSettings(BaseSettings):
    """The comparison itself: which stores, the tolerance, the window and where the metrics go."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    reconcile_stores: str = Field(",".join(STORES), description="Stores to compare (at least two), comma list.")
    reconcile_min_consistency: float = Field(
        0.999, gt=0, le=1, description="Exit 1 below this consistency (0.999 = 99.9 %)."
    )
    reconcile_revenue_tolerance: float = Field(
        1e-6, ge=0, lt=1, description="Relative difference under which a cell's revenues count as equal."
    )
    reconcile_since: str | None = Field(None, description="First UTC day of event time compared (default: all).")
    reconcile_until: str | None = Field(None, description="Last UTC day of event time compared, inclusive.")
    reconcile_metrics_file: Path | None = Field(None, description="Write the metrics here (Prometheus text format).")
    reconcile_pushgateway_url: HttpUrl | None = Field(None, description="Also push the metrics to this Pushgateway.")
    reconcile_pushgateway_job: str = Field("lp-reconcile", min_length=1, description="Pushgateway job name.")
    reconcile_iceberg_table: str = Field("user_events", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    reconcile_snowflake_table: str = Field(
        "STAGING.EVENTS_CLEANED", pattern=_IDENTIFIER, description="[SCHEMA.]TABLE in SNOWFLAKE_DATABASE."
    )
    reconcile_snowflake_raw_table: str = Field(
        "RAW.USER_EVENTS",
        pattern=rf"^$|{_IDENTIFIER}",
        description="Its rows count too (the loader's landing table, where a duplicate lands first); empty: off.",
    )

    @field_validator("reconcile_stores")
    @classmethod
    def _stores(cls, value: str) -> str:
        parse_stores(value)
        return value

    @field_validator("reconcile_since", "reconcile_until")
    @classmethod
    def _day(cls, value: str | None) -> str | None:
        if value:
            parse_day(value)
        return value or None

    @property
    def stores(self) -> tuple[str, ...]:
        return parse_stores(self.reconcile_stores)
