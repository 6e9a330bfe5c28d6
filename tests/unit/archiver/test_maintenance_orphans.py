"""remove-orphans deletes exactly the files nothing references (a crashed commit, an interrupted expiry), only
when they are older than the cut-off, and never a file any snapshot or metadata file can reach."""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pyiceberg.catalog.sql import SqlCatalog

import services.archiver.maintenance as maintenance
from services.archiver.__main__ import main
from services.archiver.catalog import ensure_table
from services.archiver.committer import TableCommitter
from services.archiver.maintenance import (
    OrphanCheckError,
    _match_key,
    compact,
    expire,
    read,
    remove_orphans,
)
from services.archiver.schemas import default_tables
from services.testing.archiver_samples import commit_samples
from services.testing.samples import encoded_events

TOPIC = "events.processed"
PAYLOADS = [payload for _, payload, _ in encoded_events(300)]


class Crash(BaseException):
    """The process dies: nothing after this point runs, no cleanup (BaseException passes every `except`)."""


@pytest.fixture
def table(catalog, catalog_settings, repository):
    table, _ = ensure_table(catalog, catalog_settings, default_tables()[0], repository)
    return table


@pytest.fixture
def warehouse(catalog_settings) -> Path:
    return Path(catalog_settings.warehouse.removeprefix("file://"))


def fill(table, repository, commits: int, committer: TableCommitter | None = None, per_commit: int = 50):
    return commit_samples(table, repository, PAYLOADS, commits, per_commit, committer, TOPIC)


def files(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*") if p.is_file()}


def backdate(root: Path, age: timedelta) -> None:
    when = time.time() - age.total_seconds()
    for path in files(root):
        os.utime(path, (when, when))


def crashed_commit(table, repository, monkeypatch, committer: TableCommitter) -> None:
    """The archiver writes its Parquet files, manifests, manifest list and new metadata file, then dies before
    the catalog row is swapped: everything it wrote is unreferenced."""
    real = SqlCatalog._write_metadata

    def write_then_die(*args, **kwargs):
        real(*args, **kwargs)
        raise Crash

    monkeypatch.setattr(SqlCatalog, "_write_metadata", staticmethod(write_then_die))
    with pytest.raises(Crash):
        fill(table, repository, commits=1, committer=committer)
    monkeypatch.setattr(SqlCatalog, "_write_metadata", staticmethod(real))


def offsets(table, **kwargs) -> list[int]:
    return sorted(read(table, columns=("_kafka_offset",), **kwargs).column("_kafka_offset").to_pylist())


def test_a_crashed_commit_leaves_orphans_that_are_removed_and_every_snapshot_still_reads(
    table, repository, warehouse, monkeypatch
) -> None:
    committer = fill(table, repository, commits=3)
    live = files(warehouse)
    crashed_commit(table, repository, monkeypatch, committer)
    orphans = files(warehouse) - live
    kinds = {Path(p).parent.name + ":" + Path(p).suffix for p in orphans}
    assert {"metadata:.json", "metadata:.avro"} <= kinds and any(p.endswith(".parquet") for p in orphans), kinds
    backdate(warehouse, timedelta(days=4))

    dry = remove_orphans(table, datetime.now(UTC) - timedelta(days=3), dry_run=True)
    assert {_match_key(p) for p in dry.orphans} == {_match_key(p) for p in orphans}
    assert dry.deleted == 0 and files(warehouse) == live | orphans
    assert dry.files_referenced == len(live)  # every file written before the crash is reachable

    report = remove_orphans(table, datetime.now(UTC) - timedelta(days=3))
    assert report.deleted == len(orphans) and not report.failed
    assert files(warehouse) == live  # exactly the orphans went
    table.refresh()
    for n, snapshot in enumerate(sorted(table.snapshots(), key=lambda s: s.timestamp_ms), start=1):
        assert offsets(table, snapshot_id=snapshot.snapshot_id) == list(range(50 * n))  # time travel intact
    assert remove_orphans(table, datetime.now(UTC) - timedelta(days=3)).orphans == []

    fill(table, repository, commits=1, committer=TableCommitter(table))  # the archiver goes on: re-reads offsets
    assert offsets(table) == list(range(200))


def test_files_newer_than_the_cut_off_are_kept(table, repository, warehouse, monkeypatch) -> None:
    committer = fill(table, repository, commits=2)
    live = files(warehouse)
    backdate(warehouse, timedelta(days=4))
    crashed_commit(table, repository, monkeypatch, committer)  # its files are young: perhaps a commit in flight
    young = files(warehouse) - live

    report = remove_orphans(table, datetime.now(UTC) - timedelta(days=3))
    assert report.orphans == [] and report.deleted == 0 and report.files_too_young == len(young) > 0
    assert files(warehouse) == live | young

    with pytest.raises(ValueError, match="commit in flight"):
        remove_orphans(table, datetime.now(UTC) - timedelta(minutes=10))
    # Once no writer runs (here: the crashed one is gone), a recent cut-off may be allowed explicitly.
    report = remove_orphans(table, datetime.now(UTC) + timedelta(seconds=1), allow_recent=True)
    assert report.deleted == len(young) and files(warehouse) == live


def test_an_interrupted_expiry_leaves_files_that_remove_orphans_frees(
    table, repository, warehouse, monkeypatch
) -> None:
    fill(table, repository, commits=4)
    compact(table, small_file_bytes=10**9)
    left: list[str] = []
    monkeypatch.setattr(maintenance, "_delete", lambda _table, path: left.append(path))  # dies after its commit
    expired = expire(table, datetime.now(UTC) + timedelta(seconds=1), retain_last=1)
    monkeypatch.undo()
    assert expired.snapshots_expired == 4 and left
    assert all(Path(p.removeprefix("file://")).exists() for p in left)
    backdate(warehouse, timedelta(days=4))

    report = remove_orphans(table, datetime.now(UTC) - timedelta(days=3))
    assert {_match_key(p) for p in report.orphans} >= {_match_key(p) for p in left}
    assert not any(Path(p.removeprefix("file://")).exists() for p in left)
    assert offsets(table) == list(range(200))


def test_a_listing_that_does_not_match_the_metadata_deletes_nothing(table, repository, warehouse, monkeypatch) -> None:
    fill(table, repository, commits=2)
    backdate(warehouse, timedelta(days=4))
    before = files(warehouse)
    real = maintenance._list_files

    def elsewhere(table, root):  # e.g. a location written s3://other/... in the metadata
        return [maintenance._Listed(f"file:///moved{item.uri.removeprefix('file://')}", item.size, item.modified)
                for item in real(table, root)]  # fmt: skip

    monkeypatch.setattr(maintenance, "_list_files", elsewhere)
    with pytest.raises(OrphanCheckError, match="nothing deleted"):
        remove_orphans(table, datetime.now(UTC) - timedelta(days=3))
    assert files(warehouse) == before


def test_locations_match_across_spellings() -> None:
    assert _match_key("s3a://bucket/wh//t/data/x.parquet") == _match_key("s3://bucket/wh/t/data/x.parquet")
    assert _match_key("file:///tmp/wh/x.avro") == _match_key("/tmp/wh/x.avro")
    assert _match_key("s3://bucket/a/x") != _match_key("s3://other/a/x")


# --- command line -------------------------------------------------------------------------------------------
@pytest.fixture
def env(catalog_settings, monkeypatch) -> None:
    monkeypatch.setenv("ICEBERG_CATALOG", "sql")
    monkeypatch.setenv("ICEBERG_SQL_URI", catalog_settings.sql_uri)
    monkeypatch.setenv("ICEBERG_WAREHOUSE", catalog_settings.warehouse)
    monkeypatch.setenv("ICEBERG_NAMESPACE", catalog_settings.iceberg_namespace)


def test_cli_lists_then_removes(env, table, repository, warehouse, monkeypatch, capsys) -> None:
    committer = fill(table, repository, commits=2)
    live = files(warehouse)
    crashed_commit(table, repository, monkeypatch, committer)
    orphans = files(warehouse) - live
    backdate(warehouse, timedelta(days=4))

    assert main(["remove-orphans", "--table", "user_events", "--dry-run"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert dry["dry_run"] and len(dry["orphans"]) == len(orphans) and files(warehouse) == live | orphans

    assert main(["remove-orphans", "user_events", "--older-than", "2d"]) == 0
    done = json.loads(capsys.readouterr().out)
    assert done["deleted"] == len(orphans) and files(warehouse) == live


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["remove-orphans", "user_events", "--older-than", "10m"], "less than 1:00:00 ago"),
        (["remove-orphans", "user_events", "--older-than", datetime.now(UTC).isoformat()], "--allow-recent"),
        (["remove-orphans"], "needs a table"),
        (["remove-orphans", "user_events", "--table", "transactions"], "two different tables"),
    ],
)
def test_cli_refuses_bad_arguments_before_touching_the_catalog(argv, message, capsys) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_refuses_an_unreadable_cut_off(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["remove-orphans", "user_events", "--older-than", "last tuesday"])
    assert exit_info.value.code == 2 and "not an age" in capsys.readouterr().err
