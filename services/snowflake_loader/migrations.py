"""Ordered, versioned Snowflake DDL, applied idempotently (`python -m services.snowflake_loader migrate`, and at
every start of the service).

`migrations/NNN_name.sql` files hold `;`-terminated statements with the placeholders `{raw}`, `{staging}`,
`{marts}` and `{control}` (the schema names from the settings). Every statement is `IF NOT EXISTS`, so a
migration interrupted half-way simply runs again. Applied versions are recorded in
`{control}.SCHEMA_MIGRATIONS` with the file's checksum: an applied file that changed is refused (add a new
migration instead).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from services.kit import migrations as kit
from services.kit.migrations import MigrationError, split_statements

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_PLACEHOLDERS = ("raw", "staging", "marts", "control")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*$")

__all__ = ["Migration", "MigrationError", "apply_migrations", "load_migrations", "render"]


class Migration(kit.Migration):
    def statements(self, schemas: Mapping[str, str]) -> list[str]:
        """The file's statements with the schema names filled in, comments removed."""
        return split_statements(render(self.sql, schemas), trailing_comments=True)


def render(sql: str, schemas: Mapping[str, str]) -> str:
    for key in _PLACEHOLDERS:
        name = schemas[key]
        if not _IDENTIFIER.match(name):
            raise MigrationError(f"schema name {name!r} is not a plain identifier")
        sql = sql.replace("{" + key + "}", name)
    return sql


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    return kit.load_migrations(directory, Migration)


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
    for migration in kit.pending(migrations, applied):
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
