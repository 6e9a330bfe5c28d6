"""The Iceberg catalog chosen by the environment, and the archive tables in it.

Locally: pyiceberg's SQL catalog (SQLite under the state dir) with data on SeaweedFS's S3. On Kubernetes: a
REST catalog (any: Polaris, Lakekeeper, S3 Tables, SeaweedFS's own) and any S3. The same code runs on both.

`ensure_table` creates a table (partitioned by day of event time and by event type, Parquet + zstd, few large
files) or brings an existing one to the current Avro contract (`schemas.plan_evolution`: new optional columns
without rewriting data; a breaking change raises `BreakingSchemaChange`).

Two table properties carry the archiver's guarantees and are enforced on every start:
`commit.retry.num-retries=0`, because pyiceberg would otherwise retry a conflicting append on top of the other
writer's snapshot, and only the archiver's own retry (which re-reads the stored offsets first) knows whether the
rows are already in the table; `write.metadata.delete-after-commit.enabled`, so frequent commits do not pile
up metadata files.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pyiceberg.catalog import Catalog, load_catalog
from pyiceberg.exceptions import (
    CommitFailedException,
    NamespaceAlreadyExistsError,
    NoSuchTableError,
    TableAlreadyExistsError,
)
from pyiceberg.table import Table
from sqlalchemy import create_engine, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from services.kit.avro import SchemaRepository

from .schemas import BreakingSchemaChange, Evolution, TableSpec, fields_with_default, plan_evolution
from .settings import CatalogSettings

log = logging.getLogger(__name__)

COMMIT_RETRIES = "commit.retry.num-retries"


def table_properties(target_file_size_bytes: int = 512 * 1024 * 1024) -> dict[str, str]:
    return {
        "format-version": "2",
        "write.format.default": "parquet",
        "write.parquet.compression-codec": "zstd",
        "write.target-file-size-bytes": str(target_file_size_bytes),
        COMMIT_RETRIES: "0",
        "write.metadata.delete-after-commit.enabled": "true",
        "write.metadata.previous-versions-max": "20",
        "history.expire.max-snapshot-age-ms": str(7 * 24 * 3600 * 1000),
        "history.expire.min-snapshots-to-keep": "10",
    }


# Properties an existing table must have (the others are defaults an operator may tune).
ENFORCED_PROPERTIES = (COMMIT_RETRIES, "write.metadata.delete-after-commit.enabled")


def s3_properties(settings: CatalogSettings) -> dict[str, str]:
    props = {"s3.region": settings.aws_region}
    if settings.s3_endpoint_url:
        props["s3.endpoint"] = settings.s3_endpoint_url
        props["s3.path-style-access"] = "true"
    if settings.aws_access_key_id:
        props["s3.access-key-id"] = settings.aws_access_key_id
    if settings.aws_secret_access_key:
        props["s3.secret-access-key"] = settings.aws_secret_access_key
    return props


def catalog_properties(settings: CatalogSettings) -> dict[str, Any]:
    props: dict[str, Any] = {
        "warehouse": settings.warehouse,
        "py-io-impl": "pyiceberg.io.pyarrow.PyArrowFileIO",
        **s3_properties(settings),
    }
    if settings.iceberg_catalog == "sql":
        props |= {"type": "sql", "uri": settings.sql_uri, "init_catalog_tables": "true"}
    else:
        props |= {"type": "rest", "uri": settings.iceberg_rest_uri}
        if settings.iceberg_rest_token:
            props["token"] = settings.iceberg_rest_token
        elif settings.iceberg_rest_sigv4:
            props |= {"rest.sigv4-enabled": "true", "rest.signing-region": settings.aws_region}
        else:
            credential = settings.iceberg_rest_credential
            if credential is None and settings.aws_access_key_id and settings.aws_secret_access_key:
                credential = f"{settings.aws_access_key_id}:{settings.aws_secret_access_key}"
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
        aws_secret_access_key=settings.aws_secret_access_key,
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


def ensure_namespace(catalog: Catalog, namespace: str) -> None:
    with contextlib.suppress(NamespaceAlreadyExistsError):
        catalog.create_namespace(namespace)


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


def ensure_table(
    catalog: Catalog,
    settings: CatalogSettings,
    spec: TableSpec,
    repository: SchemaRepository,
    target_file_size_bytes: int = 512 * 1024 * 1024,
) -> tuple[Table, Evolution]:
    """The table for `spec`, created or evolved to the current contract; raises `BreakingSchemaChange`."""
    ensure_namespace(catalog, settings.iceberg_namespace)
    contract = spec.schema(repository)
    name = identifier(settings, spec.name)
    try:
        table = catalog.load_table(name)
    except NoSuchTableError:
        try:
            table = catalog.create_table(
                name,
                schema=contract,
                partition_spec=spec.partition_spec(contract),
                properties=table_properties(target_file_size_bytes) | {"comment": spec.description},
            )
            log.info("created table %s", name)
            return table, Evolution()
        except TableAlreadyExistsError:  # another archiver won the race
            table = catalog.load_table(name)
    definition = repository[spec.subject].definition if spec.subject else None
    for attempt in range(3):  # replicas starting together: the loser of a schema commit plans again
        try:
            plan = plan_evolution(table.schema(), contract, fields_with_default(definition))
            if plan.problems:
                raise BreakingSchemaChange(name, plan.problems)
            if plan.changes:
                apply_evolution(table, plan)
                log.info("evolved table %s: %s", name, "; ".join(plan.describe()))
            missing = {
                key: value
                for key, value in table_properties(target_file_size_bytes).items()
                if key in ENFORCED_PROPERTIES and table.properties.get(key) != value
            }
            if missing:
                with table.transaction() as tx:
                    tx.set_properties(missing)
                log.info("set table properties of %s: %s", name, missing)
            return table, plan
        except CommitFailedException:
            if attempt == 2:
                raise
            table = catalog.load_table(name)
    raise AssertionError("unreachable")


def apply_evolution(table: Table, plan: Evolution) -> None:
    """Metadata-only schema change: no data file is read or rewritten."""
    with table.update_schema() as update:
        for field in plan.add:
            update.add_column(field.name, field.field_type, doc=field.doc, required=False)
        for name, kind in plan.widen:
            update.update_column(name, field_type=kind)
        for name in plan.make_optional:
            update.make_column_optional(name)
