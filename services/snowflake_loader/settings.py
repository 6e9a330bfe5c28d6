"""The Snowflake loader's configuration, from the environment (docs/snowflake-loader.md has the table).

Where the lake and the warehouse are (and the credentials) are the stores' settings (`CatalogSettings`,
`SnowflakeSettings`); this adds the loader's schemas and loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from services.kit.config import OptionalBrokerList, ServiceSettings
from services.stores.iceberg import CatalogSettings
from services.stores.snowflake import IDENTIFIER, SnowflakeSettings

FAIL_POINTS = ("put", "copy", "merge")
TABLES = ("user_events", "transactions")


def _csv(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


class LoaderSettings(SnowflakeSettings, CatalogSettings, ServiceSettings):
    """The service and its commands (`run-once`, `migrate`): the lake, the warehouse, the schemas and the loop."""

    service_name: str = "snowflake-loader"
    kafka_bootstrap_servers: OptionalBrokerList = Field("", description="Unused: the loader reads the lake, not Kafka.")
    snowflake_create_database: bool = Field(
        False, description="`migrate` runs CREATE DATABASE IF NOT EXISTS (local; needs the privilege)."
    )
    snowflake_raw_schema: str = Field("RAW", pattern=IDENTIFIER)
    snowflake_staging_schema: str = Field("STAGING", pattern=IDENTIFIER)
    snowflake_marts_schema: str = Field("MARTS", pattern=IDENTIFIER)
    snowflake_control_schema: str = Field("CONTROL", pattern=IDENTIFIER, description="LOADS, PENDING, migrations.")
    snowflake_loader_interval_s: float = Field(60.0, gt=0, description="Look for new snapshots this often.")
    snowflake_loader_tables: str = Field(",".join(TABLES), description="Lake tables to load (comma list).")
    snowflake_loader_file_rows: int = Field(
        500_000, ge=1, description="Rows per staged Parquet file (a batch may have several files)."
    )
    snowflake_loader_work_dir: Path | None = Field(
        None, description="Where batches are written as Parquet before PUT (default: a temporary folder)."
    )
    snowflake_loader_fail_after: Literal["put", "copy", "merge"] | None = Field(
        None,
        description="Tests only: exit the process (status 86) right after this step of the first batch, "
        "as a crash would (merge: after the MERGE statements, before COMMIT).",
    )

    @property
    def raw(self) -> str:
        return self.snowflake_raw_schema.upper()

    @property
    def staging(self) -> str:
        return self.snowflake_staging_schema.upper()

    @property
    def marts(self) -> str:
        return self.snowflake_marts_schema.upper()

    @property
    def control(self) -> str:
        return self.snowflake_control_schema.upper()

    @property
    def table_names(self) -> tuple[str, ...]:
        return _csv(self.snowflake_loader_tables)

    @model_validator(mode="after")
    def _four_schemas(self) -> LoaderSettings:
        if len({self.raw, self.staging, self.marts, self.control}) != 4:
            raise ValueError("SNOWFLAKE_{RAW,STAGING,MARTS,CONTROL}_SCHEMA must be four different schemas")
        return self

    @field_validator("snowflake_loader_tables", mode="after")
    @classmethod
    def _known_tables(cls, value: str) -> str:
        names = _csv(value)
        unknown = set(names) - set(TABLES)
        if unknown or not names:
            raise ValueError(f"unknown table(s) {sorted(unknown)} or none given (user_events, transactions)")
        return value
