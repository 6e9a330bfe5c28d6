"""The archiver's configuration, from the environment (docs/archiver.md has the table)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from services.kit.config import ServiceSettings
from services.kit.paths import repo_root
from services.kit.sink import SinkSettings

from .schemas import DEFAULT_DEAD_LETTER_TOPICS


def _csv(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def default_sql_uri() -> str:
    """SQLite next to the local stack's other state (LP_STATE_DIR, else .local in the checkout)."""
    state = os.environ.get("LP_STATE_DIR") or str(repo_root() / ".local")
    return f"sqlite:///{state}/iceberg/catalog.db"


class CatalogSettings(ServiceSettings):
    """Where the tables live: catalog, warehouse and S3. Shared by the service and every CLI command."""

    kafka_bootstrap_servers: str = Field("", description="Only the service and `replay` need Kafka.")
    iceberg_catalog: Literal["sql", "rest"] = Field(
        "sql", description="sql: SQLAlchemy catalog (SQLite locally); rest: an Iceberg REST catalog."
    )
    iceberg_catalog_name: str = Field("lp", description="Catalog name (the SQL catalog keys its rows by it).")
    iceberg_sql_uri: str | None = Field(
        None, description="SQLAlchemy URI of the SQL catalog; default sqlite:///$LP_STATE_DIR/iceberg/catalog.db."
    )
    iceberg_rest_uri: str | None = Field(None, description="Base URI of the REST catalog (ICEBERG_CATALOG=rest).")
    iceberg_rest_credential: str | None = Field(
        None,
        description="OAuth2 client credential id:secret for the REST catalog; default "
        "AWS_ACCESS_KEY_ID:AWS_SECRET_ACCESS_KEY (what SeaweedFS expects).",
    )
    iceberg_rest_token: str | None = Field(None, description="Bearer token for the REST catalog instead.")
    iceberg_rest_sigv4: bool = Field(False, description="Sign REST catalog requests with SigV4 (AWS S3 Tables, Glue).")
    iceberg_warehouse: str | None = Field(
        None,
        description="sql: where table data goes (default s3://$S3_BUCKET/warehouse); rest: the warehouse the "
        "catalog serves (SeaweedFS: s3://<table bucket>, default s3://lp-tables).",
    )
    iceberg_create_table_bucket: bool = Field(
        True, description="rest: create the s3tables table bucket named by the warehouse if missing (SeaweedFS)."
    )
    iceberg_namespace: str = Field("lp", min_length=1, description="Namespace of the archive tables.")
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint; unset for AWS S3.")
    s3_bucket: str = Field("lakehouse", min_length=1)
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None
    aws_region: str = "us-east-1"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> CatalogSettings:
        """From an environment other than the process's own (e.g. `LocalStack.env()` plus overrides)."""
        return cls(**{k.lower(): v for k, v in env.items() if k.lower() in cls.model_fields})

    @field_validator("iceberg_rest_uri", mode="after")
    @classmethod
    def _rest_needs_uri(cls, value: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("iceberg_catalog") == "rest" and not value:
            raise ValueError("must be set when ICEBERG_CATALOG=rest")
        return value

    @property
    def sql_uri(self) -> str:
        return self.iceberg_sql_uri or default_sql_uri()

    @property
    def warehouse(self) -> str:
        if self.iceberg_warehouse:
            return self.iceberg_warehouse
        return f"s3://{self.s3_bucket}/warehouse" if self.iceberg_catalog == "sql" else "s3://lp-tables"


class ArchiverSettings(CatalogSettings, SinkSettings):
    """The service (`python -m services.archiver run`): the catalog, the kit's sink settings, and its own."""

    service_name: str = "archiver"
    kafka_bootstrap_servers: str = Field(..., min_length=1, description="host:port[,host:port...]")
    consumer_group: str = Field("lp-archiver", min_length=1, description="Kafka consumer group of the archiver.")
    batch_max_rows: int = Field(
        50_000, ge=1, le=1_000_000, description="Records of one partition decoded together (then buffered)."
    )
    batch_max_age_s: float = Field(2.0, gt=0, description="Hand a partition's records over after this long.")
    archiver_events_topics: str = Field("events.processed", description="Topics archived into user_events.")
    archiver_transactions_topics: str = Field("transactions.processed", description="Topics into transactions.")
    archiver_dead_letter_topics: str = Field(
        ",".join(DEFAULT_DEAD_LETTER_TOPICS), description="Dead-letter topics archived into dead_letters."
    )
    archiver_tables: str = Field(
        "user_events,transactions,dead_letters", description="Tables this process archives (comma list)."
    )
    archiver_commit_rows: int = Field(
        500_000, ge=1, description="Commit a table when this many rows are buffered (few, large files)."
    )
    archiver_commit_bytes: int = Field(
        256 * 1024 * 1024, ge=1, description="... or when the buffered Kafka payloads reach this many bytes."
    )
    archiver_commit_interval_s: float = Field(
        60.0, gt=0, description="... or when the oldest buffered row is this old (bounds the archive's lag)."
    )
    archiver_commit_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="Scheduling niceness of the commit threads (0: as the consumer). They yield the CPU to the "
        "consume-and-decode loop, the archiver's bottleneck, and use what it leaves.",
    )
    archiver_target_file_size_bytes: int = Field(
        512 * 1024 * 1024, ge=1024, description="Iceberg write.target-file-size-bytes of new tables."
    )

    def topics_of(self, table: str) -> tuple[str, ...]:
        from .schemas import DEAD_LETTERS, TRANSACTIONS, USER_EVENTS

        return _csv(
            {
                USER_EVENTS: self.archiver_events_topics,
                TRANSACTIONS: self.archiver_transactions_topics,
                DEAD_LETTERS: self.archiver_dead_letter_topics,
            }[table]
        )

    @property
    def table_names(self) -> tuple[str, ...]:
        return _csv(self.archiver_tables)

    @field_validator("archiver_tables", mode="after")
    @classmethod
    def _known_tables(cls, value: str) -> str:
        from .schemas import DEAD_LETTERS, TRANSACTIONS, USER_EVENTS

        names = _csv(value)
        unknown = set(names) - {USER_EVENTS, TRANSACTIONS, DEAD_LETTERS}
        if unknown or not names:
            raise ValueError(
                f"unknown table(s) {sorted(unknown)} or none given (user_events, transactions, dead_letters)"
            )
        return value
