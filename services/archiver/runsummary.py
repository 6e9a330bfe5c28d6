"""What `make run` needs of the archiver: its environment, its inputs, and the summary's figures and checks.

The demo starts the archiver like any service, waits until its group has consumed `INPUTS`, stops it (SIGTERM
commits what is buffered) and compares the tables' stats before and after the run with the topics' counts.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from services.contracts.topics import EVENTS_PROCESSED, TRANSACTIONS_PROCESSED
from services.stores.iceberg import CatalogSettings, open_catalog

from .maintenance import archive_stats
from .schemas import DEFAULT_DEAD_LETTER_TOPICS, TRANSACTIONS, USER_EVENTS

GROUP = "lp-archiver"
INPUTS = (EVENTS_PROCESSED, TRANSACTIONS_PROCESSED, *DEFAULT_DEAD_LETTER_TOPICS)
TABLES = (USER_EVENTS, TRANSACTIONS, "dead_letters")


def local_env(state_dir: Path) -> dict[str, str]:
    """The archiver's variables for a local run (next to the stack's own `LocalStack.env()`)."""
    return {
        "ICEBERG_CATALOG": "sql",
        "ICEBERG_SQL_URI": f"sqlite:///{state_dir}/iceberg/catalog.db",
        "CONSUMER_GROUP": GROUP,
        # Production commits every 60 s or 500k rows (few, large files); a demo run's tables fill as it goes.
        "ARCHIVER_COMMIT_INTERVAL_S": "5",
    }


def table_stats(env: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Rows, files, snapshots per table (and `duplicates` of user_events.event_id) in the environment `env`."""
    settings = CatalogSettings.from_env(env)
    return archive_stats(open_catalog(settings), settings, TABLES, distinct={USER_EVENTS: "event_id"})


def summarise(
    before: Mapping[str, Mapping[str, Any]], after: Mapping[str, Mapping[str, Any]], topics: Mapping[str, int]
) -> tuple[dict[str, dict[str, int]], dict[str, bool]]:
    """The run's archive figures per table and the checks, from table stats before/after and the run's topic
    counts (records each topic received during the run)."""
    figures = {
        name: {
            "rows": after[name]["rows"] - before.get(name, {}).get("rows", 0),
            "rows_in_table": after[name]["rows"],
            "files": after[name]["files"],
            "snapshots": after[name]["snapshots"] - before.get(name, {}).get("snapshots", 0),
        }
        for name in TABLES
    }
    dead_letters = sum(count for topic, count in topics.items() if topic in DEFAULT_DEAD_LETTER_TOPICS)
    checks = {
        "archiver: user_events got every record of events.processed": figures[USER_EVENTS]["rows"]
        == topics.get(EVENTS_PROCESSED, 0),
        "archiver: no event_id twice in user_events": after[USER_EVENTS].get("duplicates", 0) == 0,
        "archiver: transactions got every record of transactions.processed": figures[TRANSACTIONS]["rows"]
        == topics.get(TRANSACTIONS_PROCESSED, 0),
        "archiver: dead_letters got every dead letter of the run": figures["dead_letters"]["rows"] == dead_letters,
    }
    return figures, checks


def summary_lines(figures: Mapping[str, Mapping[str, int]]) -> list[str]:
    return [
        f"  archive {name:<16} +{f['rows']} rows ({f['rows_in_table']} in the table), {f['files']} files, "
        f"+{f['snapshots']} snapshots"
        for name, f in figures.items()
    ]
