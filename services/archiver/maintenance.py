"""Keeping the archive compact and its history bounded; reading it as of any snapshot.

- `compact`: per partition, the small data files are read and written again as few large ones, and one
  snapshot replaces exactly those files (never "everything in the partition": the archiver may be appending
  to the same partition meanwhile). The snapshot carries the stored Kafka offsets forward, so the committer's
  resume point is unchanged; rows are counted before and after and the commit is refused if they differ.
- `expire`: snapshots older than a cut-off are removed from the metadata (the newest few are always kept),
  then the data files, manifests and manifest lists only they referenced are deleted: this is what frees
  the space compaction made obsolete. Time travel reaches back as far as the snapshots that remain.
- `remove_orphans`: files under the table's data/ and metadata/ folders that no snapshot, manifest list,
  manifest or metadata file references (a crashed or fenced commit, an interrupted compaction or expiry) and
  that are older than a cut-off (a commit in flight writes its files before the catalog commit) are deleted.
- `history`, `stats`: what happened to a table, and rows/files/snapshots per table (the run summary).
- `read`: a scan as of a snapshot id or a point in time, with an optional filter.
"""

from __future__ import annotations

import logging
import random
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.catalog import Catalog
from pyiceberg.exceptions import CommitFailedException
from pyiceberg.expressions import AlwaysTrue, BooleanExpression
from pyiceberg.io.pyarrow import ArrowScan
from pyiceberg.manifest import DataFile
from pyiceberg.table import FileScanTask, Table
from pyiceberg.table.snapshots import Snapshot

from services.stores.iceberg import CatalogSettings, load_table
from services.stores.iceberg_offsets import (
    COMMITTER_PROPERTY,
    OFFSETS_PROPERTY,
    ROWS_PROPERTY,
    encode_offsets,
    snapshot_offsets,
)

from .writer import commit_files, delete_files, write_data_files

log = logging.getLogger(__name__)

OPERATION_PROPERTY = "lp.operation"


# --- compaction ----------------------------------------------------------------------------------------------
@dataclass
class CompactionReport:
    table: str
    snapshot_id: int | None = None
    partitions: int = 0
    files_before: int = 0
    files_after: int = 0
    files_rewritten: int = 0
    files_written: int = 0
    rows_rewritten: int = 0
    bytes_rewritten: int = 0
    attempts: int = 0
    dry_run: bool = False
    skipped: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _partition_groups(tasks: Iterable[FileScanTask]) -> dict[tuple[int, str], list[FileScanTask]]:
    groups: dict[tuple[int, str], list[FileScanTask]] = defaultdict(list)
    for task in tasks:
        groups[(task.file.spec_id, repr(task.file.partition))].append(task)
    return groups


def compact(
    table: Table,
    *,
    small_file_bytes: int | None = None,
    min_files: int = 2,
    dry_run: bool = False,
    max_attempts: int = 8,
) -> CompactionReport:
    """Rewrite the small files of every partition that has at least `min_files` of them (see module docstring).

    `small_file_bytes`: files below this are rewritten (default: 3/4 of write.target-file-size-bytes).
    """
    table.refresh()
    name = ".".join(table.name())
    report = CompactionReport(name, dry_run=dry_run)
    snapshot = table.current_snapshot()
    if snapshot is None:
        report.skipped = "empty table"
        return report
    target = int(table.properties.get("write.target-file-size-bytes", 512 * 1024 * 1024))
    small = small_file_bytes if small_file_bytes is not None else target * 3 // 4
    tasks = list(table.scan(snapshot_id=snapshot.snapshot_id).plan_files())
    report.files_before = len(tasks)
    if any(task.delete_files for task in tasks):
        report.skipped = "the table has delete files (not written by the archiver): compact it with Spark"
        return report
    chosen: list[list[FileScanTask]] = []
    for group in _partition_groups(tasks).values():
        smalls = [task for task in group if task.file.file_size_in_bytes < small]
        if len(smalls) >= min_files:
            chosen.append(smalls)
    report.partitions = len(chosen)
    report.files_rewritten = sum(len(group) for group in chosen)
    report.rows_rewritten = sum(task.file.record_count for group in chosen for task in group)
    report.bytes_rewritten = sum(task.file.file_size_in_bytes for group in chosen for task in group)
    if dry_run or not chosen:
        report.files_after = report.files_before
        return report
    removed: list[DataFile] = []
    added: list[DataFile] = []
    schema = table.schema()
    try:
        for group in chosen:
            # One partition at a time: memory holds one partition's small files, not the table.
            rows = ArrowScan(table.metadata, table.io, schema, AlwaysTrue()).to_table(group)
            if rows.num_rows != sum(task.file.record_count for task in group):
                raise RuntimeError(f"{name}: read {rows.num_rows} rows from files that hold a different count")
            added.extend(write_data_files(table, rows))
            removed.extend(task.file for task in group)
        if sum(f.record_count for f in added) != sum(f.record_count for f in removed):
            raise RuntimeError(f"{name}: compaction would change the row count; nothing committed")
        report.files_written = len(added)
        for attempt in range(1, max_attempts + 1):
            report.attempts = attempt
            table.refresh()
            live = {task.file.file_path for task in table.scan().plan_files()}
            gone = [f.file_path for f in removed if f.file_path not in live]
            if gone:  # another compaction or a delete got there first
                raise RuntimeError(f"{name}: {len(gone)} of the files to replace are gone; compact again")
            offsets = snapshot_offsets(table)
            properties = {OPERATION_PROPERTY: "compact"}
            if offsets:
                properties[OFFSETS_PROPERTY] = encode_offsets(offsets)
            try:
                commit_files(table, added, properties, removed=removed)
                break
            except CommitFailedException as error:  # the archiver committed meanwhile: replace on top of it
                log.info("%s: compaction commit conflict (attempt %d): %s", name, attempt, error)
                time.sleep(random.uniform(0.05, 0.2 * attempt))
        else:
            raise RuntimeError(f"{name}: compaction still conflicting after {max_attempts} attempts")
    except BaseException:
        delete_files(table, added)
        raise
    table.refresh()
    current = table.current_snapshot()
    report.snapshot_id = current.snapshot_id if current else None
    report.files_after = len(list(table.scan().plan_files()))
    return report


# --- expiry ------------------------------------------------------------------------------------------------
@dataclass
class ExpiryReport:
    table: str
    snapshots_before: int = 0
    snapshots_expired: int = 0
    data_files_deleted: int = 0
    manifests_deleted: int = 0
    manifest_lists_deleted: int = 0
    oldest_kept: str | None = None
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _live_files(table: Table, snapshots: Iterable[Snapshot], cache: dict[str, list[str]]) -> tuple[set[str], set[str]]:
    """(data files live in any of `snapshots`, manifests they list)."""
    data: set[str] = set()
    manifests: set[str] = set()
    for snapshot in snapshots:
        for manifest in snapshot.manifests(table.io):
            manifests.add(manifest.manifest_path)
            if manifest.manifest_path not in cache:
                cache[manifest.manifest_path] = [
                    entry.data_file.file_path for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=True)
                ]
            data.update(cache[manifest.manifest_path])
    return data, manifests


def expire(table: Table, older_than: datetime, retain_last: int = 10, dry_run: bool = False) -> ExpiryReport:
    """Expire snapshots older than `older_than`, keeping the newest `retain_last` and every branch/tag head."""
    table.refresh()
    name = ".".join(table.name())
    snapshots = sorted(table.snapshots(), key=lambda s: s.timestamp_ms)
    report = ExpiryReport(name, snapshots_before=len(snapshots), dry_run=dry_run)
    protected = {ref.snapshot_id for ref in table.metadata.refs.values()}
    keep_newest = {s.snapshot_id for s in snapshots[-max(1, retain_last) :]}
    cutoff_ms = int(older_than.timestamp() * 1000)
    expired = [
        s
        for s in snapshots
        if s.timestamp_ms < cutoff_ms and s.snapshot_id not in protected and s.snapshot_id not in keep_newest
    ]
    kept = [s for s in snapshots if s not in expired]
    report.snapshots_expired = len(expired)
    report.oldest_kept = _iso(kept[0].timestamp_ms) if kept else None
    if not expired or dry_run:
        return report
    cache: dict[str, list[str]] = {}
    kept_data, kept_manifests = _live_files(table, kept, cache)
    old_data, old_manifests = _live_files(table, expired, cache)
    table.maintenance.expire_snapshots().by_ids([s.snapshot_id for s in expired]).commit()
    # Only after the commit: a file is deleted once no snapshot that remains can reach it.
    for path in old_data - kept_data:
        _delete(table, path)
        report.data_files_deleted += 1
    for path in old_manifests - kept_manifests:
        _delete(table, path)
        report.manifests_deleted += 1
    kept_lists = {s.manifest_list for s in kept}
    for snapshot in expired:
        if snapshot.manifest_list not in kept_lists:
            _delete(table, snapshot.manifest_list)
            report.manifest_lists_deleted += 1
    return report


def _delete(table: Table, path: str) -> None:
    try:
        table.io.delete(path)
    except Exception as error:  # an orphan costs storage, not correctness
        log.warning("could not delete %s: %s", path, error)


# --- orphan files ------------------------------------------------------------------------------------------
ORPHAN_MIN_AGE = timedelta(hours=1)  # below this, a commit in flight could still be writing its files
ORPHAN_DEFAULT_AGE = timedelta(days=3)


class OrphanCheckError(RuntimeError):
    """The listing and the table's references do not line up: nothing is deleted."""


@dataclass
class OrphanReport:
    table: str
    cutoff: str
    files_listed: int = 0
    files_referenced: int = 0
    files_too_young: int = 0
    orphans: list[str] = field(default_factory=list)
    orphan_bytes: int = 0
    deleted: int = 0
    failed: list[str] = field(default_factory=list)
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Listed:
    uri: str  # as given to the FileIO for deletion
    size: int
    modified: datetime


def _match_key(location: str) -> str:
    """A file's location without scheme (s3/s3a/s3n, file) and with single slashes: listings and metadata may
    spell the same object differently; a false match only keeps a file, never deletes one."""
    uri = urlparse(location)
    path = f"{uri.netloc}/{uri.path}" if uri.scheme and uri.scheme != "file" else uri.path
    return "/" + "/".join(part for part in path.split("/") if part)


def _referenced(table: Table) -> set[str]:
    """Every file the table's metadata can reach: the current and previous metadata files, statistics files,
    and for every snapshot (all branches and tags) its manifest list, manifests and the live data and delete
    files they list. A DELETED manifest entry is not a reference: a snapshot that still reads that file lists it
    as ADDED or EXISTING."""
    metadata = table.metadata
    found = {table.metadata_location, *(entry.metadata_file for entry in metadata.metadata_log)}
    found.update(stat.statistics_path for stat in metadata.statistics)
    found.update(stat.statistics_path for stat in metadata.partition_statistics)
    cache: dict[str, list[str]] = {}
    for snapshot in metadata.snapshots:
        found.add(snapshot.manifest_list)
        for manifest in snapshot.manifests(table.io):
            found.add(manifest.manifest_path)
            if manifest.manifest_path not in cache:
                cache[manifest.manifest_path] = [
                    entry.data_file.file_path for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=True)
                ]
            found.update(cache[manifest.manifest_path])
    return {_match_key(path) for path in found if path}


def table_file_roots(table: Table) -> list[str]:
    """Where the table's files go: its data and metadata folders (or the write.*.path overrides)."""
    location = table.metadata.location.rstrip("/")
    props = table.properties
    return [
        props.get("write.data.path", f"{location}/data").rstrip("/"),
        props.get("write.metadata.path", f"{location}/metadata").rstrip("/"),
    ]


def _list_files(table: Table, root: str) -> list[_Listed]:
    """Every file under `root`, with its size and last-modified time, through the table's pyarrow filesystem
    (the FileIO's own S3 settings: endpoint, credentials, path style)."""
    from pyarrow.fs import FileSelector, FileType
    from pyiceberg.io.pyarrow import PyArrowFileIO

    io = table.io if isinstance(table.io, PyArrowFileIO) else PyArrowFileIO(dict(table.io.properties))
    scheme, netloc, path = PyArrowFileIO.parse_location(root)
    fs = io.fs_by_scheme(scheme, netloc)
    out = []
    for info in fs.get_file_info(FileSelector(path, recursive=True, allow_not_found=True)):
        if info.type != FileType.File:
            continue
        modified = info.mtime if info.mtime is not None else datetime.now(UTC)  # unknown age: treat as young
        if modified.tzinfo is None:
            modified = modified.replace(tzinfo=UTC)
        uri = f"{scheme}://{info.path}" if scheme != "file" else f"file://{info.path}"
        out.append(_Listed(uri, int(info.size or 0), modified))
    return out


def remove_orphans(
    table: Table,
    older_than: datetime,
    dry_run: bool = False,
    *,
    allow_recent: bool = False,
    now: datetime | None = None,
) -> OrphanReport:
    """Delete the files under the table's data/ and metadata/ folders that nothing in its metadata references
    and that were last modified before `older_than`.

    Orphans come from a committer that wrote its Parquet files and died before the catalog commit, a fenced
    commit whose cleanup failed, and a compaction or expiry interrupted half-way. The cut-off is the safety
    margin for work in flight: a commit writes its data files, manifests and metadata file *before* the catalog
    swap makes them referenced, and a commit that failed keeps its files for the next attempt. A cut-off less
    than `ORPHAN_MIN_AGE` (1 hour) before now is refused unless `allow_recent` (only when no writer runs).

    The folders are listed first and the table is refreshed after, so a commit that lands during the listing is
    seen as referencing its files. Raises `OrphanCheckError`, deleting nothing, when the current metadata file
    or manifest list is not in the listing (a location spelt differently would make every file look orphaned).
    """
    now = now or datetime.now(UTC)
    if older_than.tzinfo is None:
        older_than = older_than.replace(tzinfo=UTC)
    if older_than > now - ORPHAN_MIN_AGE and not allow_recent:
        raise ValueError(
            f"cut-off {older_than.isoformat()} is less than {ORPHAN_MIN_AGE} ago: files of a commit in flight "
            "would look orphaned; use an older cut-off (default 3d), or allow it only while no writer runs"
        )
    name = ".".join(table.name())
    report = OrphanReport(name, cutoff=older_than.isoformat(), dry_run=dry_run)
    listed = [item for root in table_file_roots(table) for item in _list_files(table, root)]
    table.refresh()
    referenced = _referenced(table)
    report.files_listed = len(listed)
    keys = {_match_key(item.uri) for item in listed}
    current = table.current_snapshot()
    expected = [table.metadata_location, *([current.manifest_list] if current else [])]
    missing = [path for path in expected if _match_key(path) not in keys]
    if missing:
        raise OrphanCheckError(
            f"{name}: {', '.join(missing)} not found when listing {', '.join(table_file_roots(table))}: the listing "
            "and the table metadata disagree on where files are; nothing deleted"
        )
    orphans: list[_Listed] = []
    for item in listed:
        if _match_key(item.uri) in referenced:
            report.files_referenced += 1
        elif item.modified >= older_than:
            report.files_too_young += 1
        else:
            orphans.append(item)
    report.orphans = sorted(item.uri for item in orphans)
    report.orphan_bytes = sum(item.size for item in orphans)
    if dry_run:
        return report
    for item in orphans:
        try:
            table.io.delete(item.uri)
            report.deleted += 1
        except Exception as error:  # the next run tries again
            log.warning("could not delete orphan %s: %s", item.uri, error)
            report.failed.append(item.uri)
    return report


# --- history, stats, time travel ----------------------------------------------------------------------------
def _iso(timestamp_ms: int) -> str:
    return datetime.fromtimestamp(timestamp_ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def history(table: Table, limit: int | None = None) -> list[dict[str, Any]]:
    """The table's snapshots, newest first: what each one did and who made it."""
    table.refresh()
    current = table.current_snapshot()
    current_id = current.snapshot_id if current else None
    out = []
    for snapshot in sorted(table.snapshots(), key=lambda s: s.timestamp_ms, reverse=True)[:limit]:
        summary = snapshot.summary
        props = summary.additional_properties if summary else {}
        out.append(
            {
                "snapshot_id": snapshot.snapshot_id,
                "parent_id": snapshot.parent_snapshot_id,
                "committed_at": _iso(snapshot.timestamp_ms),
                "operation": str(summary.operation.value) if summary else None,
                "by": props.get(OPERATION_PROPERTY) or ("archiver" if COMMITTER_PROPERTY in props else None),
                "committer": props.get(COMMITTER_PROPERTY),
                "added_rows": int(props.get("added-records", 0)),
                "deleted_rows": int(props.get("deleted-records", 0)),
                "added_files": int(props.get("added-data-files", 0)),
                "deleted_files": int(props.get("deleted-data-files", 0)),
                "total_rows": int(props.get("total-records", 0)),
                "total_files": int(props.get("total-data-files", 0)),
                "archiver_rows": int(props[ROWS_PROPERTY]) if ROWS_PROPERTY in props else None,
                "current": snapshot.snapshot_id == current_id,
            }
        )
    return out


def stats(table: Table) -> dict[str, Any]:
    """Rows, data files, bytes and snapshots of the table now."""
    table.refresh()
    snapshot = table.current_snapshot()
    props = snapshot.summary.additional_properties if snapshot and snapshot.summary else {}
    return {
        "rows": int(props.get("total-records", 0)),
        "files": int(props.get("total-data-files", 0)),
        "bytes": int(props.get("total-files-size", 0)),
        "snapshots": len(table.snapshots()),
        "current_snapshot_id": snapshot.snapshot_id if snapshot else None,
        "last_commit_at": _iso(snapshot.timestamp_ms) if snapshot else None,
        "kafka_offsets": {f"{t}:{p}": o for (t, p), o in sorted(snapshot_offsets(table).items())},
    }


def archive_stats(
    catalog: Catalog,
    settings: CatalogSettings,
    tables: Iterable[str] = ("user_events", "transactions", "dead_letters"),
    distinct: Mapping[str, str] | None = None,
) -> dict[str, dict[str, Any]]:
    """`stats` of each table (zeros and "missing" for one not created yet). `distinct` = {table: column}: also
    count the rows whose value of that column is not unique (`duplicates`; reads the column of the table)."""
    from pyiceberg.exceptions import NoSuchTableError

    out: dict[str, dict[str, Any]] = {}
    for name in tables:
        try:
            table = load_table(catalog, settings, name)
        except NoSuchTableError:
            out[name] = {"rows": 0, "files": 0, "bytes": 0, "snapshots": 0, "missing": True}
            continue
        out[name] = stats(table)
        column = (distinct or {}).get(name)
        if column is not None:
            values = table.scan(selected_fields=(column,)).to_arrow().column(column)
            out[name]["duplicates"] = len(values) - pc.count_distinct(values, mode="all").as_py()
    return out


class NoSuchSnapshot(LookupError):
    pass


class BadFilter(ValueError):
    pass


def check_filter(table: Table, row_filter: str | BooleanExpression) -> BooleanExpression:
    """The filter, parsed and bound to the table's columns (an unknown column or a syntax error: `BadFilter`)."""
    from pyiceberg.expressions import parser
    from pyiceberg.expressions.visitors import bind

    try:
        expression = parser.parse(row_filter) if isinstance(row_filter, str) else row_filter
        bind(table.schema(), expression, case_sensitive=True)
    except Exception as error:  # pyparsing's ParseException, pyiceberg's ValueError for unknown columns, ...
        column = getattr(error, "col", None)  # pyparsing's own message lists its whole grammar
        why = f"syntax error at column {column}" if column is not None else str(error)
        raise BadFilter(
            f"bad filter {row_filter!r}: {why} (e.g. \"event_type = 'purchase' AND country IN ('DE', 'FR')\")"
        ) from None
    return expression


def resolve_snapshot(table: Table, snapshot_id: int | None = None, as_of: datetime | None = None) -> int | None:
    """The snapshot to read: by id, the one current at `as_of`, or the current one (None: empty table)."""
    if snapshot_id is not None:
        if table.snapshot_by_id(snapshot_id) is None:
            raise NoSuchSnapshot(f"table {'.'.join(table.name())} has no snapshot {snapshot_id} (expired?)")
        return snapshot_id
    if as_of is not None:
        snapshot = table.snapshot_as_of_timestamp(int(as_of.timestamp() * 1000))
        if snapshot is None:
            raise NoSuchSnapshot(f"table {'.'.join(table.name())} has no snapshot at or before {as_of.isoformat()}")
        return snapshot.snapshot_id
    current = table.current_snapshot()
    return current.snapshot_id if current else None


def read(
    table: Table,
    *,
    snapshot_id: int | None = None,
    as_of: datetime | None = None,
    row_filter: str | BooleanExpression = "True",
    columns: tuple[str, ...] = ("*",),
    limit: int | None = None,
) -> pa.Table:
    """Time travel: the table's rows as of a snapshot id or a point in time (default: now)."""
    table.refresh()
    check_filter(table, row_filter)
    sid = resolve_snapshot(table, snapshot_id, as_of)
    if sid is None:
        return table.scan(selected_fields=columns).to_arrow().slice(0, 0)
    return table.scan(row_filter=row_filter, selected_fields=columns, snapshot_id=sid, limit=limit).to_arrow()
