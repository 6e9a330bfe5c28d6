"""Compaction keeps every row and the stored offsets; expiry frees the replaced files; time travel and history."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import services.archiver.maintenance as maintenance
from services.archiver.catalog import ensure_table
from services.archiver.committer import TableCommitter
from services.archiver.maintenance import NoSuchSnapshot, compact, expire, history, read, stats
from services.archiver.schemas import default_tables
from services.stores.iceberg_offsets import snapshot_offsets
from services.testing.archiver_samples import commit_samples
from services.testing.samples import encoded_events

TOPIC = "events.processed"
PAYLOADS = [payload for _, payload, _ in encoded_events(600)]


@pytest.fixture
def table(catalog, catalog_settings, repository):
    table, _ = ensure_table(catalog, catalog_settings, default_tables()[0], repository)
    return table


def fill(table, repository, commits: int, committer: TableCommitter | None = None, per_commit: int = 100):
    return commit_samples(table, repository, PAYLOADS, commits, per_commit, committer, TOPIC)


def offsets(table, **kwargs) -> list[int]:
    return sorted(read(table, columns=("_kafka_offset",), **kwargs).column("_kafka_offset").to_pylist())


def test_compaction_keeps_rows_and_offsets_and_reduces_files(table, repository) -> None:
    committer = fill(table, repository, commits=6)
    before = stats(table)
    snapshot_before = before["current_snapshot_id"]
    assert before["rows"] == 600

    dry = compact(table, small_file_bytes=10**9, dry_run=True)
    assert dry.files_rewritten == before["files"] and stats(table)["files"] == before["files"]

    report = compact(table, small_file_bytes=10**9)
    after = stats(table)
    assert after["rows"] == 600 and report.rows_rewritten == 600
    assert after["files"] < before["files"] and report.files_after == after["files"]
    assert offsets(table) == list(range(600))
    assert after["kafka_offsets"] == before["kafka_offsets"] == {f"{TOPIC}:0": 600}
    assert offsets(table, snapshot_id=snapshot_before) == list(range(600))  # time travel across compaction
    assert history(table, limit=1)[0]["by"] == "compact"

    fill(table, repository, commits=1, committer=committer)  # the committer is not fenced by compaction
    assert offsets(table) == list(range(700))


def test_compaction_replaces_only_the_files_it_read(table, repository, monkeypatch) -> None:
    """The archiver commits between compaction's read and its commit (as another process: its own table
    object): the catalog refuses the compaction's commit, which tries again on top, keeping the new rows."""
    archiver_table = table.catalog.load_table(table.name())
    committer = fill(archiver_table, repository, commits=4)
    real_commit = maintenance.commit_files
    raced = []

    def archiver_commits_first(*args, **kwargs):
        if not raced:
            raced.append(1)
            fill(archiver_table, repository, commits=1, committer=committer)
        return real_commit(*args, **kwargs)

    monkeypatch.setattr(maintenance, "commit_files", archiver_commits_first)
    report = compact(table, small_file_bytes=10**9)
    assert raced and report.attempts == 2  # the first try lost to the archiver's commit
    assert offsets(table) == list(range(500))  # the rows appended meanwhile are still there
    table.refresh()
    assert snapshot_offsets(table) == {(TOPIC, 0): 500}


def test_expiry_removes_old_snapshots_and_the_files_only_they_used(table, repository) -> None:
    fill(table, repository, commits=5)
    compact(table, small_file_bytes=10**9)
    old_files = {t.file.file_path for t in table.scan(snapshot_id=table.snapshots()[0].snapshot_id).plan_files()}
    time.sleep(0.01)
    report = expire(table, datetime.now(UTC) + timedelta(seconds=1), retain_last=1)
    table.refresh()
    assert report.snapshots_expired == 5 and len(table.snapshots()) == 1
    assert report.data_files_deleted >= len(old_files)
    assert all(not Path(path.removeprefix("file://")).exists() for path in old_files)
    assert offsets(table) == list(range(500))  # the current snapshot's files are intact
    with pytest.raises(NoSuchSnapshot):
        read(table, as_of=datetime(2000, 1, 1, tzinfo=UTC))


def test_expiry_keeps_the_newest_snapshots(table, repository) -> None:
    fill(table, repository, commits=4)
    report = expire(table, datetime.now(UTC) + timedelta(seconds=1), retain_last=3, dry_run=True)
    assert report.snapshots_expired == 1 and len(table.snapshots()) == 4  # dry run: nothing changed
    expire(table, datetime.now(UTC) + timedelta(seconds=1), retain_last=3)
    table.refresh()
    assert len(table.snapshots()) == 3


def test_history_and_reads_as_of_a_time(table, repository) -> None:
    fill(table, repository, commits=2)
    entries = history(table)
    assert [e["added_rows"] for e in entries] == [100, 100]
    assert entries[0]["current"] and not entries[1]["current"]
    assert entries[0]["by"] == "archiver" and entries[0]["archiver_rows"] == 100
    first = table.snapshots()[0]
    as_of = datetime.fromtimestamp(first.timestamp_ms / 1000, UTC)
    assert offsets(table, as_of=as_of) == list(range(100))
    assert len(read(table, row_filter="event_type = 'purchase'", columns=("event_type",))) == sum(
        1 for t in read(table, columns=("event_type",)).column("event_type").to_pylist() if t == "purchase"
    )


def test_archive_stats_counts_rows_files_snapshots_and_duplicates(catalog, catalog_settings, table, repository) -> None:
    from services.archiver.maintenance import archive_stats
    from services.archiver.writer import commit_files, write_data_files

    fill(table, repository, commits=2)
    found = archive_stats(catalog, catalog_settings, distinct={"user_events": "event_id"})
    events = found["user_events"]
    assert (events["rows"], events["snapshots"], events["duplicates"]) == (200, 2, 0) and events["files"] > 0
    assert found["dead_letters"] == {"rows": 0, "files": 0, "bytes": 0, "snapshots": 0, "missing": True}
    again = read(table).slice(0, 7)  # the same rows committed a second time: what the archiver must never do
    commit_files(table, write_data_files(table, again), {})
    assert (
        archive_stats(catalog, catalog_settings, ["user_events"], {"user_events": "event_id"})["user_events"][
            "duplicates"
        ]
        == 7
    )


def test_a_bad_filter_is_refused_before_reading(table, repository) -> None:
    from services.archiver.maintenance import BadFilter

    fill(table, repository, commits=1)
    with pytest.raises(BadFilter, match="nosuch"):
        read(table, row_filter="nosuch = 1")
    with pytest.raises(BadFilter, match="syntax error"):
        read(table, row_filter="event_type = = 'x'")
