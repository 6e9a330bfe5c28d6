"""The run summary's archive figures and checks."""

from __future__ import annotations

from services.archiver.runsummary import INPUTS, local_env, summarise, summary_lines, table_stats


def stats(events: int, transactions: int, dead: int, duplicates: int = 0, snapshots: int = 1) -> dict:
    return {
        "user_events": {"rows": events, "files": 3, "snapshots": snapshots, "duplicates": duplicates},
        "transactions": {"rows": transactions, "files": 1, "snapshots": snapshots},
        "dead_letters": {"rows": dead, "files": 1, "snapshots": snapshots},
    }


def test_checks_compare_the_run_with_the_topics() -> None:
    topics = {"events.processed": 90, "transactions.processed": 7, "events.raw.dlq": 4, "cdc.postgres.users.dlq": 1}
    figures, checks = summarise(stats(10, 3, 0), stats(100, 10, 5, snapshots=4), topics)
    assert figures["user_events"] == {"rows": 90, "rows_in_table": 100, "files": 3, "snapshots": 3}
    assert all(checks.values())
    _, checks = summarise(stats(10, 3, 0), stats(101, 10, 5, duplicates=1), topics)
    assert not checks["archiver: user_events got every record of events.processed"]
    assert not checks["archiver: no event_id twice in user_events"]
    assert summary_lines(figures)[0].startswith("  archive user_events      +90 rows (100 in the table)")


def test_local_env_and_stats_of_a_fresh_catalog(tmp_path) -> None:
    env = local_env(tmp_path) | {"ICEBERG_WAREHOUSE": f"file://{tmp_path}/w"}
    assert env["ICEBERG_SQL_URI"] == f"sqlite:///{tmp_path}/iceberg/catalog.db"
    found = table_stats(env)
    assert {name: s["rows"] for name, s in found.items()} == {"user_events": 0, "transactions": 0, "dead_letters": 0}
    assert "events.processed" in INPUTS and "events.raw.dlq" in INPUTS
