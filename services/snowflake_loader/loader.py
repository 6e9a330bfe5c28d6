"""One load of one lake table: plan the batch, write Parquet, PUT, COPY into RAW, MERGE into STAGING and MARTS.

The steps of a batch and what a crash after each leaves (the next run repeats the batch from the top):

1. plan      the last committed load (CONTROL.LOADS) gives the snapshot and offsets to start from; the batch is
             the rows of the current snapshot past them, named `<table>-<snapshot id>`. Nothing written yet.
2. write+PUT Parquet files under the batch's own stage folder (OVERWRITE): a crash leaves files that the
             next attempt overwrites (same batch) or that are never read (another batch's folder).
3. COPY      one transaction: delete RAW rows of batches left PENDING by a crashed attempt, COPY (FORCE, so a
             file name seen before loads again; PURGE), record the batch as PENDING. All or nothing.
4. MERGE     one transaction: STAGING, DIM_USERS, the marts, the status history, then the LOADS row and PENDING
             cleared. All or nothing: before its COMMIT nothing of it is visible, after it the batch is done.

So after a crash anywhere, RAW holds at most one copy of any batch and STAGING/MARTS are either untouched by
the batch or completely updated by it; the rerun re-plans from LOADS and ends with the same tables a run
without the crash makes. `SNOWFLAKE_LOADER_FAIL_AFTER` (tests) ends the process right after step 2, 3 or 4
(before its COMMIT), as a crash there would.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from prometheus_client import Counter, Gauge, Histogram
from pyiceberg.catalog import Catalog
from pyiceberg.exceptions import NoSuchTableError

from services.kit.exits import ExitCode
from services.kit.reconnect import one_line
from services.stores.iceberg import load_table
from services.stores.snowflake import Warehouse

from . import lake, sql
from .migrations import apply_migrations
from .settings import LoaderSettings

log = logging.getLogger(__name__)

ROWS = Counter("lp_snowflake_loader_rows_loaded_total", "Lake rows copied into RAW and merged.", ["table"])
BATCHES = Counter("lp_snowflake_loader_batches_total", "Batches committed.", ["table"])
FAILURES = Counter("lp_snowflake_loader_failures_total", "Loads that failed (retried next interval).", ["table"])
STEP_SECONDS = Histogram(
    "lp_snowflake_loader_step_seconds",
    "Duration of each step of a batch.",
    ["table", "step"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900),
)
LAST_SUCCESS = Gauge(
    "lp_snowflake_loader_last_success_timestamp_seconds", "When a load of the table last succeeded.", ["table"]
)
LOADED_SNAPSHOT_AGE = Gauge(
    "lp_snowflake_loader_loaded_snapshot_timestamp_seconds",
    "Commit time of the last loaded Iceberg snapshot (freshness of the warehouse).",
    ["table"],
)


def schemas_of(settings: LoaderSettings) -> sql.Schemas:
    return sql.Schemas(settings.raw, settings.staging, settings.marts, settings.control)


def migrate(warehouse: Warehouse, settings: LoaderSettings) -> list[int]:
    """Create the database (if asked), apply the DDL, create the stage, select the control schema."""
    if settings.snowflake_create_database:
        warehouse.execute(f"CREATE DATABASE IF NOT EXISTS {settings.database}")
        warehouse.execute(f"USE DATABASE {settings.database}")
    schemas = schemas_of(settings)
    applied = apply_migrations(warehouse.execute, warehouse.query, schemas.as_dict())
    # Every time, not only in a migration: a stage is not data, and fakesnow forgets stages on restart.
    warehouse.execute(sql.create_stage(schemas))
    # Some statements (fakesnow's MERGE, unqualified names) need a current schema.
    warehouse.execute(f"USE SCHEMA {schemas.control}")
    return applied


@dataclass
class TableLoad:
    """What one load of one table did (the `run-once` summary)."""

    table: str
    status: str = "up-to-date"  # up-to-date | loaded | missing | failed
    batch_id: str | None = None
    snapshot_id: int | None = None
    rows: int = 0
    files: int = 0
    full_read: bool = False
    seconds: float = 0.0
    steps: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class InjectedCrash(SystemExit):
    """SNOWFLAKE_LOADER_FAIL_AFTER was reached (raised only when exiting the process is not wanted)."""


class Loader:
    def __init__(
        self,
        settings: LoaderSettings,
        warehouse: Warehouse,
        catalog: Catalog,
        *,
        crash: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.warehouse = warehouse
        self.catalog = catalog
        self.schemas = schemas_of(settings)
        self.crash = crash or _exit_process
        self._failing: set[str] = set()  # tables whose last load failed

    # --- control ----------------------------------------------------------------------------------------------
    def last_load(self, table: str) -> tuple[int | None, lake.Offsets | None, dict[str, str]]:
        """The last loaded snapshot, its offsets and the topic ids they count in."""
        rows = self.warehouse.query(sql.last_load(self.schemas), {"table": table})
        if not rows:
            return None, None, {}
        snapshot_id, offsets, _ = rows[0]
        decoded = lake.decode_offsets(offsets)
        return int(snapshot_id), (decoded or None), lake.decode_topic_ids(offsets)

    def _fault(self, step: str) -> None:
        if self.settings.snowflake_loader_fail_after == step:
            log.error("SNOWFLAKE_LOADER_FAIL_AFTER=%s: crashing on purpose after the %s step", step, step)
            self.crash(step)

    # --- one table ----------------------------------------------------------------------------------------------
    def load_table(self, table: str) -> TableLoad:
        result = TableLoad(table)
        started = time.perf_counter()
        try:
            iceberg = load_table(self.catalog, self.settings, table)
        except NoSuchTableError:
            result.status = "missing"
            return result
        last_snapshot, last_offsets, last_topic_ids = self.last_load(table)
        batch = lake.plan(iceberg, table, last_snapshot, last_offsets, last_topic_ids)
        if batch is None:
            result.seconds = round(time.perf_counter() - started, 3)
            self._freshness(table, iceberg, last_snapshot)
            return result
        result.batch_id, result.snapshot_id, result.full_read = batch.batch_id, batch.snapshot_id, batch.since is None
        if result.full_read and last_snapshot is not None:
            log.warning("%s: snapshot %s has no lp.offsets: reading the whole table", table, batch.snapshot_id)
        work_dir = self.settings.snowflake_loader_work_dir
        if work_dir is not None:
            work_dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f"lp-sf-{table}-", dir=work_dir))
        try:
            with self._timed(result, "write"):
                files, rows = self._write(iceberg, batch, work)
            with self._timed(result, "put"):
                for path in files:
                    self.warehouse.execute(sql.put(str(path), self.schemas, table, batch.batch_id))
            self._fault("put")
            with self._timed(result, "copy"):
                copied = self._copy(table, batch.batch_id, bool(files))
            if copied != rows:
                raise RuntimeError(f"{table}: wrote {rows} rows to Parquet but RAW holds {copied} of {batch.batch_id}")
            self._fault("copy")
            with self._timed(result, "merge"):
                self._merge(table, batch, rows)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        result.status, result.rows, result.files = "loaded", rows, len(files)
        result.seconds = round(time.perf_counter() - started, 3)
        ROWS.labels(table).inc(rows)
        BATCHES.labels(table).inc()
        self._freshness(table, iceberg, batch.snapshot_id)
        log.info(
            "%s: loaded batch %s (%d rows, %d files) in %.1fs",
            table, batch.batch_id, rows, len(files), result.seconds,
            extra={"table": table, "batch_id": batch.batch_id, "rows": rows, "steps": result.steps},
        )  # fmt: skip
        return result

    def _write(self, iceberg: Any, batch: lake.Plan, work: Path) -> tuple[list[Path], int]:
        """The batch as Parquet files of at most SNOWFLAKE_LOADER_FILE_ROWS rows (streamed: memory holds one
        Arrow batch of the scan, not the whole batch)."""
        loaded_at = datetime.now(UTC)
        limit = self.settings.snowflake_loader_file_rows
        files: list[Path] = []
        rows = in_file = 0
        writer: pq.ParquetWriter | None = None
        try:
            for record_batch in lake.read_batches(iceberg, batch):
                start = 0
                while start < record_batch.num_rows:
                    if writer is not None and in_file >= limit:
                        writer.close()
                        writer = None
                    if writer is None:
                        files.append(work / f"part-{len(files):05d}.parquet")
                        in_file = 0
                    piece = record_batch.slice(start, limit - in_file)
                    source = f"{batch.table}/{batch.batch_id}/{files[-1].name}"
                    shaped = lake.raw_rows(piece, batch.table, batch.batch_id, loaded_at, source)
                    if writer is None:
                        writer = pq.ParquetWriter(files[-1], shaped.schema, compression="zstd")
                    writer.write_table(shaped)
                    start += piece.num_rows
                    in_file += piece.num_rows
                    rows += piece.num_rows
        finally:
            if writer is not None:
                writer.close()
        return files, rows

    def _copy(self, table: str, batch_id: str, has_files: bool) -> int:
        params = {"table": table, "batch": batch_id}
        with self.warehouse.transaction():
            self.warehouse.execute(sql.delete_pending_raw(self.schemas, table), params)
            self.warehouse.execute(sql.delete_raw_batch(self.schemas, table), params)
            self.warehouse.execute(sql.clear_pending(self.schemas), params)
            if has_files:
                self.warehouse.execute(sql.copy_into(self.schemas, table, batch_id))
            self.warehouse.execute(sql.add_pending(self.schemas), params)
        return int(self.warehouse.scalar(sql.raw_batch_rows(self.schemas, table), params))

    def _merge(self, table: str, batch: lake.Plan, rows: int) -> None:
        params = {
            "table": table,
            "batch": batch.batch_id,
            "snapshot": batch.snapshot_id,
            "offsets": lake.encode_offsets(batch.offsets, batch.topic_ids),
            "from_offsets": None if batch.since is None else lake.encode_offsets(batch.since),
            "rows": rows,
        }
        with self.warehouse.transaction():
            for _, statement in sql.phase_two(self.schemas, table):
                self.warehouse.execute(statement, params)
            self.warehouse.execute(sql.record_load(self.schemas), params)
            self.warehouse.execute(sql.clear_pending(self.schemas), params)
            self._fault("merge")

    def _timed(self, result: TableLoad, step: str) -> _Timer:
        return _Timer(result, step)

    def _freshness(self, table: str, iceberg: Any, snapshot_id: int | None) -> None:
        LAST_SUCCESS.labels(table).set(time.time())
        snapshot = iceberg.snapshot_by_id(snapshot_id) if snapshot_id is not None else None
        if snapshot is not None:
            LOADED_SNAPSHOT_AGE.labels(table).set(snapshot.timestamp_ms / 1000)

    # --- every table ----------------------------------------------------------------------------------------------
    def run_once(
        self, stop: Callable[[], bool] = lambda: False, progress: Callable[[], None] = lambda: None
    ) -> list[TableLoad]:
        """Load what is new in each configured table; a failing table does not stop the others. `progress` is
        called after each table (the service's liveness beat)."""
        results = []
        for table in self.settings.table_names:
            if stop():
                break
            try:
                results.append(self.load_table(table))
            except Exception as error:
                FAILURES.labels(table).inc()
                # The traceback once per streak of failures; while the warehouse is away, one line per attempt.
                if table in self._failing:
                    log.error("%s: load failed again: %s", table, one_line(error))
                else:
                    log.exception("%s: load failed", table)
                self._failing.add(table)
                results.append(TableLoad(table, status="failed", error=one_line(error)))
            else:
                self._failing.discard(table)
            progress()
        return results


class _Timer:
    def __init__(self, result: TableLoad, step: str) -> None:
        self.result, self.step = result, step

    def __enter__(self) -> None:
        self.started = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        seconds = time.perf_counter() - self.started
        self.result.steps[self.step] = round(seconds, 3)
        STEP_SECONDS.labels(self.result.table, self.step).observe(seconds)


def _exit_process(step: str) -> None:
    logging.shutdown()
    os._exit(ExitCode.INJECTED_CRASH)
