"""Ordered, versioned DDL files, applied once each: what every store's migrations share.

A store keeps `migrations/NNN_lowercase_name.sql` files of `;`-terminated statements and its own dialect
(placeholders, where the applied versions are recorded); this module finds the files, checks that versions run
1, 2, 3, ... and tells which are pending, refusing an applied file whose checksum changed (add a new migration
instead: a store already holds what the old text made).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

_FILE = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")


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

    @property
    def label(self) -> str:
        return f"{self.version:03d}_{self.name}"


M = TypeVar("M", bound=Migration)


def split_statements(text: str, trailing_comments: bool = False) -> list[str]:
    """The `;`-terminated statements of `text` without `--` comment lines (and, if asked, comments at line ends:
    only for dialects whose DDL never holds `--` inside a string)."""
    if trailing_comments:
        lines = [re.sub(r"--.*$", "", line).rstrip() for line in text.splitlines()]
    else:
        lines = [line for line in text.splitlines() if not line.lstrip().startswith("--")]
    return [s.strip() for s in "\n".join(line for line in lines if line).split(";") if s.strip()]


def load_migrations(directory: Path, kind: type[M]) -> list[M]:
    migrations = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILE.match(path.name)
        if match is None:
            raise MigrationError(f"{path.name}: migration files are named NNN_lowercase_name.sql")
        migrations.append(kind(int(match.group(1)), match.group(2), path.read_text()))
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise MigrationError(
            f"migration versions in {directory} must run 1, 2, 3, ... without gaps or repeats (found {versions})"
        )
    return migrations


def pending(migrations: Sequence[M], applied: Mapping[int, str]) -> list[M]:
    """The migrations not applied yet, in order; `applied` maps version -> checksum recorded when applied."""
    out = []
    for migration in migrations:
        known = applied.get(migration.version)
        if known is None:
            out.append(migration)
        elif known != migration.checksum:
            raise MigrationError(
                f"migration {migration.label} changed after it was applied "
                f"(checksum {known} -> {migration.checksum}): add a new migration instead"
            )
    return out
