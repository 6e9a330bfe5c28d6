"""SQL building, the SCD2 hash and the migrations (pure: the statements themselves run in the integration tests)."""

from __future__ import annotations

import re

import pytest

from services.snowflake_loader import sql
from services.snowflake_loader.migrations import Migration, MigrationError, apply_migrations, load_migrations

CUSTOM = sql.Schemas("L0", "L1", "L2", "CTL")


def test_attributes_hash_is_md5_of_the_tracked_columns_with_a_null_mark() -> None:
    import hashlib

    assert sql.attributes_hash("gold", "DE") == hashlib.md5(b"gold|DE").hexdigest()
    assert sql.attributes_hash(None, "DE") == hashlib.md5(b"~|DE").hexdigest()
    # every tracked column counts, and a null differs from an empty string
    assert sql.attributes_hash("gold", "DE") != sql.attributes_hash("gold", "FR")
    assert sql.attributes_hash("gold", "DE") != sql.attributes_hash("silver", "DE")
    assert sql.attributes_hash(None, "DE") != sql.attributes_hash("", "DE")
    with pytest.raises(ValueError):
        sql.attributes_hash("gold")


def test_the_sql_hash_expression_matches_the_python_twin() -> None:
    expression = sql.attributes_hash_sql()
    assert expression == "MD5(CONCAT_WS('|', COALESCE(USER_TIER, '~'), COALESCE(USER_COUNTRY, '~')))"
    assert sql.TRACKED_USER_COLUMNS == ("USER_TIER", "USER_COUNTRY")
    assert sql.user_key("u1", "e1") == __import__("hashlib").md5(b"u1|e1").hexdigest()


def test_statements_use_the_configured_schemas_and_bind_the_batch() -> None:
    for table in ("user_events", "transactions"):
        for _, statement in sql.phase_two(CUSTOM, table):
            assert not re.search(r"\b(RAW|STAGING|MARTS|CONTROL)\.", statement), statement
            assert "%(batch)s" in statement  # every step reads only the batch's rows (or its keys)
    assert sql.copy_into(CUSTOM, "user_events", "user_events-7") == (
        "COPY INTO L0.USER_EVENTS FROM @CTL.LOADER_STAGE/user_events/user_events-7/ FILE_FORMAT = (TYPE = PARQUET) "
        "MATCH_BY_COLUMN_NAME = CASE_INSENSITIVE FORCE = TRUE PURGE = TRUE"
    )
    assert sql.put("/tmp/x/p.parquet", CUSTOM, "transactions", "b") == (
        "PUT 'file:///tmp/x/p.parquet' @CTL.LOADER_STAGE/transactions/b/ OVERWRITE = TRUE AUTO_COMPRESS = FALSE"
    )
    with pytest.raises(ValueError):
        sql.put("/tmp/it's.parquet", CUSTOM, "transactions", "b")


def test_phase_two_order_and_the_first_archived_row_wins() -> None:
    steps = [name for name, _ in sql.phase_two(sql.Schemas(), "user_events")]
    assert steps == ["events_cleaned"] * 2 + ["dim_users"] * 2 + ["user_sessions"] * 2 + ["daily_metrics"] * 2
    delete, insert = sql.merge_events_cleaned(sql.Schemas())
    assert "s.ARCHIVE_POSITION < t.ARCHIVE_POSITION" in delete
    assert "ROW_NUMBER() OVER (PARTITION BY EVENT_ID ORDER BY ARCHIVE_POSITION)" in insert
    assert "WHERE NOT EXISTS" in insert
    assert [name for name, _ in sql.phase_two(sql.Schemas(), "transactions")] == [
        "transaction_changes", "transaction_changes", "fact_transactions", "fact_transactions",
        "status_history", "status_history",
    ]  # fmt: skip
    with pytest.raises(ValueError):
        sql.phase_two(sql.Schemas(), "dead_letters")


def test_a_batch_that_rereads_lands_in_the_scratch_twin_and_adds_only_unseen_rows() -> None:
    assert sql.copy_into(CUSTOM, "transactions", "b", incoming=True).startswith(
        "COPY INTO CTL.INCOMING_TRANSACTIONS FROM @CTL.LOADER_STAGE/transactions/b/ "
    )
    assert sql.create_incoming(CUSTOM, "user_events") == (
        "CREATE OR REPLACE TRANSIENT TABLE CTL.INCOMING_USER_EVENTS LIKE L0.USER_EVENTS"
    )
    assert sql.insert_unseen(CUSTOM, "user_events") == (
        "INSERT INTO L0.USER_EVENTS SELECT * FROM CTL.INCOMING_USER_EVENTS i WHERE NOT EXISTS "
        "(SELECT 1 FROM L0.USER_EVENTS r WHERE r.ARCHIVE_POSITION = i.ARCHIVE_POSITION AND r.EVENT_ID = i.EVENT_ID)"
    )
    assert "r.CHANGE_KEY = i.CHANGE_KEY" in sql.insert_unseen(CUSTOM, "transactions")


@pytest.mark.parametrize(("table", "raw"), sorted(sql.RAW_TABLES.items()))
def test_every_raw_table_has_an_identity_of_its_columns(table: str, raw: str) -> None:
    identity = sql.RAW_IDENTITY[table]
    assert identity[0] == "ARCHIVE_POSITION" and len(identity) > 1  # where it was archived, and what it is
    assert set(identity) <= set(_ddl_columns(raw))


def _ddl_columns(table: str) -> list[str]:
    text = "\n".join(m.sql for m in load_migrations())
    body = re.search(rf"\.{table} \((.*?)\n\);", text, re.S)
    assert body, table
    lines = [line.strip() for line in body.group(1).splitlines()]
    return [line.split()[0] for line in lines if line and not line.startswith("--")]


@pytest.mark.parametrize(
    ("table", "columns"),
    [
        ("EVENTS_CLEANED", sql.EVENT_COLUMNS),
        ("TRANSACTION_CHANGES", sql.CHANGE_COLUMNS),
        ("DIM_USERS", sql.DIM_COLUMNS),
        ("USER_SESSIONS", sql.SESSION_COLUMNS),
        ("DAILY_METRICS", sql.DAILY_COLUMNS),
        ("FACT_TRANSACTIONS", sql.FACT_COLUMNS),
        ("FACT_TRANSACTION_STATUS_HISTORY", sql.HISTORY_COLUMNS),
    ],
)
def test_the_column_lists_are_the_ddls(table: str, columns: tuple[str, ...]) -> None:
    assert tuple(_ddl_columns(table)) == columns


def test_migrations_render_and_apply_once() -> None:
    migrations = load_migrations()
    assert [m.version for m in migrations] == [1, 2, 3, 4]
    statements = [s for m in migrations for s in m.statements(CUSTOM.as_dict())]
    assert all("{" not in s and "--" not in s for s in statements)
    assert all(re.match(r"CREATE (SCHEMA|TABLE) IF NOT EXISTS ", s) for s in statements)
    assert any(s.startswith("CREATE TABLE IF NOT EXISTS L1.EVENTS_CLEANED") for s in statements)

    executed: list[str] = []
    stored: list[tuple[int, str]] = []

    def execute(statement: str, params: dict | None = None) -> None:
        executed.append(statement)
        if params is not None:
            stored.append((params["version"], params["checksum"]))

    assert apply_migrations(execute, lambda _: list(stored), CUSTOM.as_dict(), migrations) == [1, 2, 3, 4]
    count = len(executed)
    assert apply_migrations(execute, lambda _: list(stored), CUSTOM.as_dict(), migrations) == []
    assert len(executed) == count + 2  # only the control schema and table, IF NOT EXISTS

    changed = [Migration(1, migrations[0].name, migrations[0].sql + "\n-- edited"), *migrations[1:]]
    with pytest.raises(MigrationError, match="changed after it was applied"):
        apply_migrations(execute, lambda _: list(stored), CUSTOM.as_dict(), changed)
    with pytest.raises(MigrationError, match="plain identifier"):
        migrations[0].statements({**CUSTOM.as_dict(), "raw": "x; drop"})
