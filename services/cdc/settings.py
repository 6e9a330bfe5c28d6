"""Settings of the CDC service (environment variables, validated once at start)."""

from __future__ import annotations

import getpass
import os
from pathlib import Path

from psycopg.conninfo import conninfo_to_dict
from pydantic import Field, field_validator

from services.cdc.connector import default_properties_path, normalize_tables
from services.kit.config import Dsn, ServiceSettings
from services.kit.paths import repo_root

_SLOT_NAME_PATTERN = r"^[a-z0-9_]{1,63}$"  # PostgreSQL's rule for replication slot names


class CdcSettings(ServiceSettings):
    service_name: str = "cdc"
    postgres_dsn: Dsn = Field(..., description="PostgreSQL (OLTP) connection string to capture from.")
    cdc_tables: str = Field(
        "public.users,public.products,public.transactions",
        description="Tables to capture, comma-separated; `users` means `public.users`.",
    )
    cdc_slot_name: str = Field("lp_cdc", pattern=_SLOT_NAME_PATTERN, description="Logical replication slot.")
    cdc_publication_name: str = Field("lp_cdc", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
    cdc_topic_prefix: str = Field(
        "cdc", pattern=r"^[a-zA-Z0-9._-]+$", description="Topics are <prefix>.postgres.<table> and <prefix>.heartbeat."
    )
    cdc_offsets_file: Path | None = Field(
        None, description="Debezium's file offset store (default: .local/cdc/<slot>.offsets.dat in the repository)."
    )
    cdc_heartbeat_interval_ms: int = Field(10_000, ge=100, description="Heartbeat (and WAL release) interval.")
    cdc_connector_properties: Path = Field(
        default_factory=default_properties_path, description="The shared Debezium connector property set."
    )
    cdc_flush_timeout_s: float = Field(60.0, gt=0, description="Most a batch may wait for Kafka acknowledgements.")
    cdc_jvm_heap_mb: int = Field(256, ge=64, description="-Xmx of the embedded JVM.")
    cdc_jvm_options: str = Field("", description="Extra JVM options, space-separated.")
    cdc_stall_after_s: float = Field(
        120.0,
        gt=0,
        description="/healthz fails when a batch hangs, or no record (not even a heartbeat) comes, this long.",
    )
    report_file: Path | None = Field(None, description="Write a JSON report (events per table and op) on exit.")

    @field_validator("cdc_tables")
    @classmethod
    def _tables(cls, value: str) -> str:
        tables = normalize_tables(value.split(","))
        if not tables:
            raise ValueError("at least one table is required")
        return ",".join(tables)

    @property
    def tables(self) -> list[str]:
        return self.cdc_tables.split(",")

    @property
    def offsets_file(self) -> Path:
        return self.cdc_offsets_file or repo_root() / ".local" / "cdc" / f"{self.cdc_slot_name}.offsets.dat"

    def connector_variables(self) -> dict[str, str]:
        """The values for the property set's placeholders: the environment, then what these settings define.

        The PG* variables come from POSTGRES_DSN, falling back to libpq's own environment variables and defaults,
        so the DSN means the same to psycopg (preflight) and to pgjdbc (Debezium).
        """
        dsn = conninfo_to_dict(self.postgres_dsn.get_secret_value())
        user = str(dsn.get("user") or os.environ.get("PGUSER") or getpass.getuser())
        host = str(dsn.get("host") or os.environ.get("PGHOST") or "localhost")
        if host.startswith("/"):
            raise ValueError("POSTGRES_DSN names a unix socket; Debezium (pgjdbc) needs a TCP host")
        derived = {
            "PGHOST": host.split(",")[0],
            "PGPORT": str(dsn.get("port") or os.environ.get("PGPORT") or "5432").split(",")[0],
            "PGUSER": user,
            "PGPASSWORD": str(dsn.get("password") or os.environ.get("PGPASSWORD") or ""),
            "PGDATABASE": str(dsn.get("dbname") or os.environ.get("PGDATABASE") or user),
            "PGSSLMODE": str(dsn.get("sslmode") or os.environ.get("PGSSLMODE") or ""),
            "CDC_TABLES": self.cdc_tables,
            "CDC_SLOT_NAME": self.cdc_slot_name,
            "CDC_PUBLICATION_NAME": self.cdc_publication_name,
            "CDC_TOPIC_PREFIX": self.cdc_topic_prefix,
            "CDC_HEARTBEAT_INTERVAL_MS": str(self.cdc_heartbeat_interval_ms),
        }
        return {**os.environ, **derived}
