"""Ordered, versioned DDL migrations, applied at start; idempotent and safe to run from several sinks at once.

`migrations/NNN_name.sql` files hold `;`-terminated statements with three placeholders, so one DDL serves both
targets: `{db}` (the database), `{on_cluster}` and `{replicated}`. With `CLICKHOUSE_CLUSTER` unset they render
to nothing (one local engine, chDB or a single server); with it set, every statement runs `ON CLUSTER '<name>'`
and MergeTree engines become their Replicated* twins with the server's default replica path
(`/clickhouse/tables/{uuid}/{shard}`, `{replica}`), which ON CLUSTER keeps equal on every replica.

Applied versions are recorded in `{db}.schema_migrations` with the file's checksum: a migration is applied once,
an applied file that changed is refused (add a new migration instead), and since every statement is
`IF NOT EXISTS`, two sinks racing through the same migration both succeed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

from services.kit import migrations as kit
from services.kit.migrations import MigrationError, split_statements

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

__all__ = ["Migration", "MigrationError", "apply_migrations", "load_migrations", "render"]


class Migration(kit.Migration):
    def statements(self, database: str, cluster: str | None) -> list[str]:
        """The file's statements, rendered for `database` (and `cluster`), comments removed."""
        return split_statements(render(self.sql, database, cluster))


def render(sql: str, database: str, cluster: str | None) -> str:
    if not _IDENTIFIER.match(database):
        raise MigrationError(f"CLICKHOUSE_DATABASE {database!r} is not a plain identifier")
    if cluster is not None and not re.match(r"^[A-Za-z0-9_.-]+$", cluster):
        raise MigrationError(f"CLICKHOUSE_CLUSTER {cluster!r} is not a plain cluster name")
    return (
        sql.replace("{db}", database)
        .replace("{on_cluster}", f"ON CLUSTER '{cluster}'" if cluster else "")
        .replace("{replicated}", "Replicated" if cluster else "")
    )


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    return kit.load_migrations(directory, Migration)


def apply_migrations(
    execute: Callable[[str], object],
    query: Callable[[str], list[tuple]],
    database: str,
    cluster: str | None = None,
    migrations: list[Migration] | None = None,
) -> list[int]:
    """Apply the pending migrations in order; returns the versions applied now."""
    migrations = load_migrations() if migrations is None else migrations
    execute(render("CREATE DATABASE IF NOT EXISTS {db} {on_cluster}", database, cluster))
    execute(
        render(
            "CREATE TABLE IF NOT EXISTS {db}.schema_migrations {on_cluster} (version UInt32, name String, "
            "checksum String, applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) "
            "ENGINE = {replicated}ReplacingMergeTree ORDER BY version",
            database,
            cluster,
        )
    )
    applied = {
        int(v): str(c)
        for v, c in query(
            f"SELECT version, argMax(checksum, applied_at) FROM {database}.schema_migrations GROUP BY version"
        )
    }
    done = []
    for migration in kit.pending(migrations, applied):
        for statement in migration.statements(database, cluster):
            execute(statement)
        execute(
            f"INSERT INTO {database}.schema_migrations (version, name, checksum) "
            f"VALUES ({migration.version}, '{migration.name}', '{migration.checksum}')"
        )
        log.info("applied migration %03d_%s", migration.version, migration.name)
        done.append(migration.version)
    return done
