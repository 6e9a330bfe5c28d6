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

import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_FILE = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class MigrationError(RuntimeError):
    pass


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()[:16]

    def statements(self, database: str, cluster: str | None) -> list[str]:
        """The file's statements, rendered for `database` (and `cluster`), comments removed."""
        text = render(self.sql, database, cluster)
        lines = [line for line in text.splitlines() if not line.lstrip().startswith("--")]
        return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


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
    migrations = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILE.match(path.name)
        if match is None:
            raise MigrationError(f"{path.name}: migration files are named NNN_lowercase_name.sql")
        migrations.append(Migration(int(match.group(1)), match.group(2), path.read_text()))
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migrations share a version in {directory}")
    if versions != list(range(1, len(versions) + 1)):
        raise MigrationError(f"migration versions must run 1, 2, 3, ... without gaps (found {versions})")
    return migrations


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
    for migration in migrations:
        known = applied.get(migration.version)
        if known is not None:
            if known != migration.checksum:
                raise MigrationError(
                    f"migration {migration.version:03d}_{migration.name} changed after it was applied "
                    f"(checksum {known} -> {migration.checksum}): add a new migration instead"
                )
            continue
        for statement in migration.statements(database, cluster):
            execute(statement)
        execute(
            f"INSERT INTO {database}.schema_migrations (version, name, checksum) "
            f"VALUES ({migration.version}, '{migration.name}', '{migration.checksum}')"
        )
        log.info("applied migration %03d_%s", migration.version, migration.name)
        done.append(migration.version)
    return done
