"""One load of one lake table: plan the batch, write Parquet, PUT, COPY into RAW, MERGE into STAGING and MARTS.

The steps of a batch and what a crash after each leaves (the next run repeats the batch from the top):

1. plan      the last committed load (CONTROL.LOADS) gives the snapshot and offsets to start from; the batch is
             the rows of the current snapshot past them, named `<table>-<snapshot id>`. Nothing written yet.
2. write+PUT Parquet files under the batch's own stage folder (OVERWRITE): a crash leaves files that the
             next attempt overwrites (same batch) or that are never read (another batch's folder).
3. COPY      one transaction: delete RAW rows of batches left PENDING by a crashed attempt, COPY (FORCE, so a
             file name seen before loads again; PURGE), record the batch as PENDING. All or nothing. A batch
             that re-reads partitions (`lake.Plan.rereads`) is copied into the scratch twin instead and only
             the rows RAW does not hold yet go on into RAW (`sql.insert_unseen`), in the same transaction.
4. MERGE     one transaction: STAGING, DIM_USERS, the marts, the status history, then the LOADS row and PENDING
             cleared. All or nothing: before its COMMIT nothing of it is visible, after it the batch is done.

So after a crash anywhere, RAW holds at most one copy of any batch (and of any archived row) and STAGING/MARTS
are either untouched by the batch or completely updated by it; the rerun re-plans from LOADS and ends with the
same tables a run without the crash makes. `SNOWFLAKE_LOADER_FAIL_AFTER` (tests) ends the process right after
step 2, 3 or 4 (before its COMMIT), as a crash there would.
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
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span
from prometheus_client import Counter, Gauge, Histogram
from pyiceberg.catalog import Catalog
from pyiceberg.exceptions import NoSuchTableError

from services.kit.exits import ExitCode
from services.kit.metrics import STAGE_RECORDS_OUT
from services.kit.reconnect import one_line
from services.stores.iceberg import load_table
from services.stores.snowflake import Warehouse

from . import lake, sql
from .migrations import apply_migrations
from .settings import LoaderSettings

log = logging.getLogger(__name__)
_TRACER = trace.get_tracer("services.snowflake_loader")

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
    # Every time, not only in a migration: a stage is not data, and fakesnow forgets stages on restart; the
    # scratch twins hold rows only inside a transaction, and re-created they always have RAW's columns.
    warehouse.execute(sql.create_stage(schemas))
    for table in sql.RAW_TABLES:
        warehouse.execute(sql.create_incoming(schemas, table))
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
    rows: int = 0  # rows added to RAW (and merged)
    rows_read: int = 0  # rows read from the lake: more than `rows` when a re-read found rows RAW holds already
    files: int = 0
    full_read: bool = False
    rereads: bool = False  # partitions read whole that earlier loads read from: only unseen rows were added
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
    def last_load(self, table: str) -> tuple[int | None, lake.Offsets | None, dict[str, str], lake.Offsets]:
        """The last loaded snapshot, its offsets, the topic ids they count in and where older incarnations'
        rows end (`lake.Plan.older_rows_until`)."""
        rows = self.warehouse.query(sql.last_load(self.schemas), {"table": table})
        if not rows:
            return None, None, {}, {}
        snapshot_id, offsets, _ = rows[0]
        decoded = lake.decode_offsets(offsets)
        return (
            int(snapshot_id),
            (decoded or None),
            lake.decode_topic_ids(offsets),
            lake.decode_older_rows_until(offsets),
        )

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
        last_snapshot, last_offsets, last_topic_ids, last_older = self.last_load(table)
        batch = lake.plan(iceberg, table, last_snapshot, last_offsets, last_topic_ids, last_older)
        if batch is None:
            result.seconds = round(time.perf_counter() - started, 3)
            self._freshness(table, iceberg, last_snapshot)
            return result
        result.batch_id, result.snapshot_id, result.full_read = batch.batch_id, batch.snapshot_id, batch.since is None
        result.rereads = batch.rereads
        if batch.rereads:
            log.info(
                "%s: snapshot %s: the batch may hold rows loaded before (no lp.offsets, offsets gone backwards, a "
                "re-created topic or its older rows past the offsets): only the rows RAW lacks are added",
                table, batch.snapshot_id,
            )  # fmt: skip
        work_dir = self.settings.snowflake_loader_work_dir
        if work_dir is not None:
            work_dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f"lp-sf-{table}-", dir=work_dir))
        span = load_span(table, batch)
        try:
            with self._timed(result, "write"):
                files, rows, read_ends = self._write(iceberg, batch, work)
            with self._timed(result, "put"):
                for path in files:
                    self.warehouse.execute(sql.put(str(path), self.schemas, table, batch.batch_id))
            self._fault("put")
            with self._timed(result, "copy"):
                added = self._copy(table, batch, rows, bool(files))
            self._fault("copy")
            with self._timed(result, "merge"):
                self._merge(table, batch, added, batch.older_rows_after(read_ends))
            span.set_attribute("lp.loader.rows", added)
        finally:
            span.end()
            shutil.rmtree(work, ignore_errors=True)
        result.status, result.rows, result.rows_read, result.files = "loaded", added, rows, len(files)
        result.seconds = round(time.perf_counter() - started, 3)
        ROWS.labels(table).inc(added)
        STAGE_RECORDS_OUT.labels("snowflake_loader").inc(added)
        BATCHES.labels(table).inc()
        self._freshness(table, iceberg, batch.snapshot_id)
        log.info(
            "%s: loaded batch %s (%d rows of %d read, %d files) in %.1fs",
            table, batch.batch_id, added, rows, len(files), result.seconds,
            extra={"table": table, "batch_id": batch.batch_id, "rows": added, "rows_read": rows, "steps": result.steps},
        )  # fmt: skip
        return result

    def _write(self, iceberg: Any, batch: lake.Plan, work: Path) -> tuple[list[Path], int, lake.Offsets]:
        """The batch as Parquet files of at most SNOWFLAKE_LOADER_FILE_ROWS rows (streamed: memory holds one
        Arrow batch of the scan, not the whole batch), its rows, and 1 + the highest offset read per partition."""
        loaded_at = datetime.now(UTC)
        limit = self.settings.snowflake_loader_file_rows
        files: list[Path] = []
        rows = in_file = 0
        read_ends: lake.Offsets = {}
        writer: pq.ParquetWriter | None = None
        try:
            for record_batch in lake.read_batches(iceberg, batch):
                for tp, end in lake.read_ends(record_batch).items():
                    read_ends[tp] = max(read_ends.get(tp, 0), end)
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
        return files, rows, read_ends

    def _copy(self, table: str, batch: lake.Plan, written: int, has_files: bool) -> int:
        """Phase 1; the rows the batch added to RAW: all it wrote, or for a re-read those RAW lacked."""
        params = {"table": table, "batch": batch.batch_id}
        with self.warehouse.transaction():
            self.warehouse.execute(sql.delete_pending_raw(self.schemas, table), params)
            self.warehouse.execute(sql.delete_raw_batch(self.schemas, table), params)
            self.warehouse.execute(sql.clear_pending(self.schemas), params)
            if has_files and batch.rereads:
                self.warehouse.execute(sql.clear_incoming(self.schemas, table))
                self.warehouse.execute(sql.copy_into(self.schemas, table, batch.batch_id, incoming=True))
                self._check(table, batch, written, self.warehouse.scalar(sql.incoming_rows(self.schemas, table)))
                self.warehouse.execute(sql.insert_unseen(self.schemas, table))
                self.warehouse.execute(sql.clear_incoming(self.schemas, table))
            elif has_files:
                self.warehouse.execute(sql.copy_into(self.schemas, table, batch.batch_id))
            self.warehouse.execute(sql.add_pending(self.schemas), params)
        added = int(self.warehouse.scalar(sql.raw_batch_rows(self.schemas, table), params))
        if not batch.rereads:
            self._check(table, batch, written, added)
        return added

    @staticmethod
    def _check(table: str, batch: lake.Plan, written: int, copied: Any) -> None:
        if int(copied) != written:
            raise RuntimeError(f"{table}: wrote {written} rows to Parquet but COPY landed {copied} of {batch.batch_id}")

    def _merge(self, table: str, batch: lake.Plan, rows: int, older_rows_until: lake.Offsets) -> None:
        params = {
            "table": table,
            "batch": batch.batch_id,
            "snapshot": batch.snapshot_id,
            "offsets": lake.encode_offsets(batch.offsets, batch.topic_ids, older_rows_until),
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


def load_span(table: str, batch: lake.Plan) -> Span:
    """The load of one batch as one span (a batch operation). The lake keeps no Kafka headers, so it cannot
    link to the records' traces; `lp.loader.offsets` names the offset ranges it loads (`topic:partition:from-to`,
    end exclusive), by which a trace's last per-record hop (the archiver's) is matched to its load."""
    since = batch.since or {}
    ranges = [
        f"{topic}:{partition}:{since.get((topic, partition), 0)}-{end}"
        for (topic, partition), end in sorted(batch.offsets.items())
    ]
    return _TRACER.start_span(
        f"load {table}",
        context=Context(),
        attributes={
            "lp.loader.table": table,
            "lp.loader.batch_id": batch.batch_id,
            "lp.loader.snapshot_id": batch.snapshot_id,
            "lp.loader.offsets": ranges,
        },
    )


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
