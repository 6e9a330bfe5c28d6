"""Processes opening a fresh SQL catalog together: pyiceberg creates its own tables by check-then-create, and
the loser of that race failed with "table iceberg_tables already exists" (two archivers started at once).

The race is made certain, not likely: every opener's "does iceberg_tables exist?" check answers "no" and then
waits until all openers have asked (or, when they cannot all get there, a short timeout) before creating it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pyiceberg.catalog import Catalog, load_catalog
from sqlalchemy.dialects.sqlite.base import SQLiteDialect

from services.stores.iceberg import load_sql_catalog_retrying, open_sql_catalog

OPENERS = 4


@pytest.fixture
def checks_meet(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Barrier]:
    """Hold each opener between "iceberg_tables does not exist" and creating it, until all openers are there."""
    barrier = threading.Barrier(OPENERS, timeout=1.0)
    original = SQLiteDialect.has_table

    def has_table(self: SQLiteDialect, connection: Any, table_name: str, *args: Any, **kwargs: Any) -> bool:
        exists = original(self, connection, table_name, *args, **kwargs)
        if table_name == "iceberg_tables" and not exists:
            # Broken: the others are not coming (they wait for the lock, or found the table).
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait()
        return exists

    monkeypatch.setattr(SQLiteDialect, "has_table", has_table)
    yield barrier


def open_together(open_one: Callable[[], Catalog]) -> tuple[list[Catalog], list[BaseException]]:
    catalogs: list[Catalog] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            catalogs.append(open_one())
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(OPENERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return catalogs, errors


def properties(uri: str, tmp_path: Path) -> dict[str, Any]:
    return {"type": "sql", "uri": uri, "init_catalog_tables": "true", "warehouse": f"file://{tmp_path}/warehouse"}


def usable(catalog: Catalog, namespace: str) -> bool:
    catalog.create_namespace_if_not_exists(namespace)
    return (namespace,) in catalog.list_namespaces()


def test_the_race_is_real_with_pyiceberg_alone(checks_meet: threading.Barrier, tmp_path: Path) -> None:
    props = properties(f"sqlite:///{tmp_path}/catalog.db", tmp_path)
    _, errors = open_together(lambda: load_catalog("lp", **props))
    assert errors and all("already exists" in str(error) for error in errors), errors


def test_openers_of_a_fresh_sqlite_catalog_all_succeed(checks_meet: threading.Barrier, tmp_path: Path) -> None:
    props = properties(f"sqlite:///{tmp_path}/state/iceberg/catalog.db", tmp_path)
    catalogs, errors = open_together(lambda: open_sql_catalog("lp", props))
    assert errors == [] and len(catalogs) == OPENERS
    assert all(usable(catalog, f"ns{index}") for index, catalog in enumerate(catalogs))
    assert (tmp_path / "state/iceberg/catalog.db.lock").exists()


def test_openers_of_another_database_retry_after_a_concurrent_creator(
    checks_meet: threading.Barrier, tmp_path: Path
) -> None:
    """Without a file to lock (Postgres, MySQL), the losers' "already exists" errors are caught and they open
    again: the same race as above, through that path."""
    props = properties(f"sqlite:///{tmp_path}/catalog.db", tmp_path)
    catalogs, errors = open_together(lambda: load_sql_catalog_retrying("lp", props))
    assert errors == [] and len(catalogs) == OPENERS
    assert all(usable(catalog, f"ns{index}") for index, catalog in enumerate(catalogs))
