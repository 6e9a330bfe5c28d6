"""The archive tables in the Iceberg catalog (`services.stores.iceberg` opens it): creating and evolving them.

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
import logging

from pyiceberg.catalog import Catalog
from pyiceberg.exceptions import (
    CommitFailedException,
    NamespaceAlreadyExistsError,
    NoSuchTableError,
    TableAlreadyExistsError,
)
from pyiceberg.table import Table

from services.kit.avro import SchemaRepository
from services.stores.iceberg import CatalogSettings, identifier

from .schemas import BreakingSchemaChange, Evolution, TableSpec, fields_with_default, plan_evolution

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


def ensure_namespace(catalog: Catalog, namespace: str) -> None:
    with contextlib.suppress(NamespaceAlreadyExistsError):
        catalog.create_namespace(namespace)


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
