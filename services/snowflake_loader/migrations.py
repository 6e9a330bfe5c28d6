"""Ordered, versioned Snowflake DDL, applied idempotently (`python -m services.snowflake_loader migrate`, and at
every start of the service).

`migrations/NNN_name.sql` files hold `;`-terminated statements with the placeholders `{raw}`, `{staging}`,
`{marts}` and `{control}` (the schema names from the settings). Every statement is `IF NOT EXISTS`, so a
migration interrupted half-way simply runs again. Applied versions are recorded in
`{control}.SCHEMA_MIGRATIONS` with the file's checksum: an applied file that changed is refused (add a new
migration instead).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_FILE = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")
_PLACEHOLDERS = ("raw", "staging", "marts", "control")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*$")


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

    def statements(self, schemas: Mapping[str, str]) -> list[str]:
        """The file's statements with the schema names filled in, comments removed."""
        text = render(self.sql, schemas)
        lines = [re.sub(r"--.*$", "", line).rstrip() for line in text.splitlines()]
        return [s.strip() for s in "\n".join(line for line in lines if line).split(";") if s.strip()]


def render(sql: str, schemas: Mapping[str, str]) -> str:
    for key in _PLACEHOLDERS:
        name = schemas[key]
        if not _IDENTIFIER.match(name):
            raise MigrationError(f"schema name {name!r} is not a plain identifier")
        sql = sql.replace("{" + key + "}", name)
    return sql


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    migrations = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILE.match(path.name)
        if match is None:
            raise MigrationError(f"{path.name}: migration files are named NNN_lowercase_name.sql")
        migrations.append(Migration(int(match.group(1)), match.group(2), path.read_text()))
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise MigrationError(f"migration versions must run 1, 2, 3, ... without gaps or repeats (found {versions})")
    return migrations


def apply_migrations(
    execute: Callable[..., Any],
    query: Callable[[str], list[tuple[Any, ...]]],
    schemas: Mapping[str, str],
    migrations: list[Migration] | None = None,
) -> list[int]:
    """Apply the pending migrations in order; returns the versions applied now.

    `execute(sql, params=None)` runs a statement, `query(sql)` returns rows."""
    migrations = load_migrations() if migrations is None else migrations
    control = schemas["control"]
    execute(render("CREATE SCHEMA IF NOT EXISTS {control}", schemas))
    execute(
        f"CREATE TABLE IF NOT EXISTS {control}.SCHEMA_MIGRATIONS (VERSION NUMBER(10, 0) NOT NULL, "
        "NAME VARCHAR NOT NULL, CHECKSUM VARCHAR NOT NULL, APPLIED_AT TIMESTAMP_NTZ NOT NULL)"
    )
    applied = {int(v): str(c) for v, c in query(f"SELECT VERSION, CHECKSUM FROM {control}.SCHEMA_MIGRATIONS")}
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
        for statement in migration.statements(schemas):
            execute(statement)
        execute(
            f"INSERT INTO {control}.SCHEMA_MIGRATIONS (VERSION, NAME, CHECKSUM, APPLIED_AT) "
            "SELECT %(version)s, %(name)s, %(checksum)s, SYSDATE()",
            {"version": migration.version, "name": migration.name, "checksum": migration.checksum},
        )
        log.info("applied migration %03d_%s", migration.version, migration.name)
        done.append(migration.version)
    return done
