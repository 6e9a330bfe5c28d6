"""The Iceberg catalog chosen by the environment: its settings, opening it, loading a table.

Locally: pyiceberg's SQL catalog (SQLite under the state dir) with data on SeaweedFS's S3. On Kubernetes: a
REST catalog (any: Polaris, Lakekeeper, S3 Tables, SeaweedFS's own) and any S3. The same code runs on both.
The archiver writes the tables (and creates them); the Snowflake loader and the reconciliation read them.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from pyiceberg.catalog import Catalog, load_catalog
from pyiceberg.exceptions import NoSuchTableError
from pyiceberg.table import Table
from sqlalchemy import create_engine, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from services.kit.config import HttpUrl
from services.kit.dependencies import url_address, url_shown, wait_for_tcp
from services.kit.paths import repo_root
from services.kit.reconnect import one_line

log = logging.getLogger(__name__)


def default_sql_uri() -> str:
    """SQLite next to the local stack's other state (LP_STATE_DIR, else .local in the checkout)."""
    state = os.environ.get("LP_STATE_DIR") or str(repo_root() / ".local")
    return f"sqlite:///{state}/iceberg/catalog.db"


class CatalogSettings(BaseSettings):
    """Where the tables live: catalog, warehouse and S3 (the archiver, its commands, the loader, reconcile)."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    iceberg_catalog: Literal["sql", "rest"] = Field(
        "sql", description="sql: SQLAlchemy catalog (SQLite locally); rest: an Iceberg REST catalog."
    )
    iceberg_catalog_name: str = Field("lp", description="Catalog name (the SQL catalog keys its rows by it).")
    iceberg_sql_uri: SecretStr | None = Field(
        None,
        description="SQLAlchemy URI of the SQL catalog (may hold a password); default "
        "sqlite:///$LP_STATE_DIR/iceberg/catalog.db.",
    )
    iceberg_rest_uri: HttpUrl | None = Field(None, description="Base URI of the REST catalog (ICEBERG_CATALOG=rest).")
    iceberg_rest_credential: SecretStr | None = Field(
        None,
        description="OAuth2 client credential id:secret for the REST catalog; default "
        "AWS_ACCESS_KEY_ID:AWS_SECRET_ACCESS_KEY (what SeaweedFS expects).",
    )
    iceberg_rest_token: SecretStr | None = Field(None, description="Bearer token for the REST catalog instead.")
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
    s3_endpoint_url: HttpUrl | None = Field(None, description="S3 endpoint; unset for AWS S3.")
    s3_bucket: str = Field("lakehouse", min_length=1)
    aws_access_key_id: str | None = None
    aws_secret_access_key: SecretStr | None = None
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
        """ICEBERG_SQL_URI in clear (it may hold a password: never log it)."""
        return self.iceberg_sql_uri.get_secret_value() if self.iceberg_sql_uri else default_sql_uri()

    @property
    def warehouse(self) -> str:
        if self.iceberg_warehouse:
            return self.iceberg_warehouse
        return f"s3://{self.s3_bucket}/warehouse" if self.iceberg_catalog == "sql" else "s3://lp-tables"


def wait_for_storage(settings: CatalogSettings, timeout_s: float) -> None:
    """Wait (at most `timeout_s`) until the S3 endpoint and the REST catalog accept connections; else one
    DependencyUnavailable naming S3_ENDPOINT_URL or ICEBERG_REST_URI. AWS's own S3 (no endpoint) is not probed."""
    for variable, url in (
        ("S3_ENDPOINT_URL", settings.s3_endpoint_url),
        ("ICEBERG_REST_URI", settings.iceberg_rest_uri if settings.iceberg_catalog == "rest" else None),
    ):
        if url:
            wait_for_tcp(variable, url_shown(url), [url_address(url)], timeout_s)


def s3_properties(settings: CatalogSettings) -> dict[str, str]:
    props = {"s3.region": settings.aws_region}
    if settings.s3_endpoint_url:
        props["s3.endpoint"] = settings.s3_endpoint_url
        props["s3.path-style-access"] = "true"
    if settings.aws_access_key_id:
        props["s3.access-key-id"] = settings.aws_access_key_id
    if settings.aws_secret_access_key:
        props["s3.secret-access-key"] = settings.aws_secret_access_key.get_secret_value()
    return props


def catalog_properties(settings: CatalogSettings) -> dict[str, Any]:
    """pyiceberg's catalog properties (they hold the secrets in clear: never log them)."""
    props: dict[str, Any] = {
        "warehouse": settings.warehouse,
        "py-io-impl": "pyiceberg.io.pyarrow.PyArrowFileIO",
        **s3_properties(settings),
    }
    if settings.iceberg_catalog == "sql":
        # pool_pre_ping: a pooled connection that a restarted database dropped is replaced before use, instead
        # of failing the next commit or load (the REST catalog refreshes an expired token itself).
        props |= {"type": "sql", "uri": settings.sql_uri, "init_catalog_tables": "true", "pool_pre_ping": "true"}
    else:
        props |= {"type": "rest", "uri": settings.iceberg_rest_uri}
        if settings.iceberg_rest_token:
            props["token"] = settings.iceberg_rest_token.get_secret_value()
        elif settings.iceberg_rest_sigv4:
            props |= {"rest.sigv4-enabled": "true", "rest.signing-region": settings.aws_region}
        else:
            credential = (
                settings.iceberg_rest_credential.get_secret_value() if settings.iceberg_rest_credential else None
            )
            if credential is None and settings.aws_access_key_id and settings.aws_secret_access_key:
                credential = f"{settings.aws_access_key_id}:{settings.aws_secret_access_key.get_secret_value()}"
            if credential:
                props["credential"] = credential
    return props


def ensure_table_bucket(settings: CatalogSettings) -> None:
    """SeaweedFS (like AWS S3 Tables) serves a REST warehouse per s3tables table bucket: create it once."""
    import boto3
    from botocore.exceptions import ClientError

    name = settings.warehouse.removeprefix("s3://").split("/", 1)[0]
    client = boto3.client(
        "s3tables",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.aws_region,
        aws_access_key_id=settings.aws_access_key_id,
        aws_secret_access_key=(
            settings.aws_secret_access_key.get_secret_value() if settings.aws_secret_access_key else None
        ),
    )
    existing = {bucket["name"] for bucket in client.list_table_buckets().get("tableBuckets", [])}
    if name in existing:
        return
    try:
        client.create_table_bucket(name=name)
        log.info("created table bucket %s", name)
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") not in ("ConflictException", "BucketAlreadyExists"):
            raise


def open_catalog(settings: CatalogSettings) -> Catalog:
    properties = catalog_properties(settings)
    if settings.iceberg_catalog == "sql":
        return open_sql_catalog(settings.iceberg_catalog_name, properties)
    if settings.iceberg_create_table_bucket:
        ensure_table_bucket(settings)
    return load_catalog(settings.iceberg_catalog_name, **properties)


# pyiceberg's SqlCatalog keeps its own tables, and creates them on first open by check-then-create (SQLAlchemy
# `create_all`): processes opening a fresh catalog together race, and the loser fails with "table iceberg_tables
# already exists" (two archivers started at once did).
SQL_CATALOG_TABLES = ("iceberg_tables", "iceberg_namespace_properties")


def open_sql_catalog(name: str, properties: dict[str, Any]) -> Catalog:
    """The SQL catalog, opened safely beside other processes opening it for the first time.

    A SQLite file: an exclusive lock beside it serialises the opening (the first creates the tables, the others
    find them). Another database: see `load_sql_catalog_retrying`."""
    database = sqlite_file(properties["uri"])
    if database is None:
        return load_sql_catalog_retrying(name, properties)
    database.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(database.with_name(database.name + ".lock")):
        return load_catalog(name, **properties)


def load_sql_catalog_retrying(name: str, properties: dict[str, Any], attempts: int = 3) -> Catalog:
    """An error while opening, once the catalog's tables exist, was a concurrent creator's ("already exists",
    a unique violation): open again, which creates only what is still missing."""
    for attempt in range(1, attempts + 1):
        try:
            return load_catalog(name, **properties)
        except DBAPIError as error:
            if attempt == attempts or not sql_catalog_tables_exist(properties["uri"]):
                raise
            log.info("opening the SQL catalog raced another process (%s): opening again", type(error).__name__)
    raise AssertionError("unreachable")


def sqlite_file(uri: str) -> Path | None:
    """The database file of a SQLite URI; None for another database or SQLite in memory."""
    url = make_url(uri)
    if (
        url.get_backend_name() != "sqlite"
        or url.database in (None, "", ":memory:")
        or url.query.get("mode") == "memory"
    ):
        return None
    return Path(url.database.removeprefix("file:"))


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Held by one process (and one thread) at a time; released on exit, or by the OS if the process dies."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def sql_catalog_tables_exist(uri: str) -> bool:
    """Any of the SQL catalog's own tables exists (some process created them, or is creating them)."""
    engine = create_engine(uri)
    try:
        names = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    return any(table in names for table in SQL_CATALOG_TABLES)


def catalog_problem(catalog: Catalog) -> str | None:
    """A readiness check: None when the catalog answers (lists its namespaces), else why not."""
    try:
        catalog.list_namespaces()
    except Exception as error:
        return one_line(error)
    return None


def identifier(settings: CatalogSettings, table: str) -> str:
    return f"{settings.iceberg_namespace}.{table}"


def load_table(catalog: Catalog, settings: CatalogSettings, table: str) -> Table:
    try:
        return catalog.load_table(identifier(settings, table))
    except NoSuchTableError:
        raise NoSuchTableError(
            f"table {identifier(settings, table)} does not exist yet: start the archiver once "
            "(python -m services.archiver run) or run `python -m services.archiver init`"
        ) from None
