"""The store-independent part of migrations: files, versions, pending ones, changed files, statements."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.kit.migrations import Migration, MigrationError, load_migrations, pending, split_statements


def test_files_load_in_version_order_and_versions_must_run_without_gaps(tmp_path: Path) -> None:
    (tmp_path / "002_second.sql").write_text("SELECT 2;")
    (tmp_path / "001_first.sql").write_text("SELECT 1;")
    assert [m.label for m in load_migrations(tmp_path, Migration)] == ["001_first", "002_second"]
    (tmp_path / "004_gap.sql").write_text("SELECT 4;")
    with pytest.raises(MigrationError, match="without gaps"):
        load_migrations(tmp_path, Migration)
    (tmp_path / "004_gap.sql").unlink()
    (tmp_path / "3_badly_named.sql").write_text("")
    with pytest.raises(MigrationError, match="NNN_lowercase_name"):
        load_migrations(tmp_path, Migration)


def test_pending_skips_applied_ones_and_refuses_an_edited_one() -> None:
    first, second = Migration(1, "a", "CREATE x;"), Migration(2, "b", "CREATE y;")
    assert pending([first, second], {}) == [first, second]
    assert pending([first, second], {1: first.checksum}) == [second]
    with pytest.raises(MigrationError, match="001_a changed after it was applied"):
        pending([Migration(1, "a", "CREATE x2;"), second], {1: first.checksum})


def test_statements_without_comments() -> None:
    text = "-- a header\nCREATE TABLE t (\n  a INT, -- why\n  b INT\n);\n\nINSERT INTO t VALUES ('--kept');\n"
    assert split_statements(text) == [
        "CREATE TABLE t (\n  a INT, -- why\n  b INT\n)",
        "INSERT INTO t VALUES ('--kept')",
    ]
    assert split_statements(text, trailing_comments=True)[0] == "CREATE TABLE t (\n  a INT,\n  b INT\n)"
