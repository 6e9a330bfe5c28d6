"""Snowflake loader rows/s (Iceberg snapshot -> RAW -> STAGING + marts) against bare `write_pandas` of the same
rows, in the same run, against the same fakesnow server.

- ceiling: `snowflake.connector.pandas_tools.write_pandas` of the RAW-shaped rows (the DataFrame ready-made)
  into RAW.USER_EVENTS of a fresh database: the connector's own Parquet + PUT + COPY path, nothing else.
- loader: `Loader.load_table("user_events")` into another fresh database, from the Iceberg table (SeaweedFS S3,
  SQL catalog) written by the archiver's committer: scan, shape, Parquet, PUT, COPY (phase 1 transaction),
  then STAGING, DIM_USERS, USER_SESSIONS and DAILY_METRICS (phase 2 transaction).
The ratio says what the warehouse modelling costs on top of landing the rows.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from bench.harness import BenchContext, Result

DISTINCT = 20_000  # distinct sample events, repeated with fresh event ids: generating is the slow part


def _lake(env: dict[str, str], work_dir: Path, rows: int) -> tuple[Any, Any, dict[str, str]]:
    from services.archiver.catalog import ensure_table
    from services.archiver.committer import TableCommitter
    from services.archiver.rows import AvroRowBuilder, RecordColumns
    from services.archiver.schemas import arrow_schema, default_tables
    from services.kit.avro import AvroSerializer, SchemaRepository
    from services.stores.iceberg import CatalogSettings, open_catalog
    from services.testing.samples import processed_events

    namespace = f"bench_sf_{uuid.uuid4().hex[:8]}"
    catalog_env = {
        **env,
        "ICEBERG_CATALOG": "sql",
        "ICEBERG_SQL_URI": f"sqlite:///{work_dir}/sf-catalog.db",
        "ICEBERG_NAMESPACE": namespace,
    }
    settings = CatalogSettings.from_env(catalog_env)
    catalog = open_catalog(settings)
    repository = SchemaRepository.load()
    table, _ = ensure_table(catalog, settings, default_tables()[0], repository)
    serialize = AvroSerializer(repository["processed_event"])
    base = [record for _, record in processed_events(min(rows, DISTINCT))]
    committer = TableCommitter(table, committer_id="bench")
    committer.claim([("bench", 0)])
    builder = AvroRowBuilder(repository, "processed_event", arrow_schema(table.schema()))
    columns = RecordColumns()
    for i in range(rows):
        record = {**base[i % len(base)], "event_id": str(uuid.UUID(int=i + 1))}
        columns.append("bench", 0, i, None, None, serialize(record), None)
    built, rejected = builder.build(columns)
    assert not rejected
    committer.add(built, columns.consumed())
    committer.commit()
    return catalog, table, catalog_env


def _settings(env: dict[str, str], database: str, work_dir: Path) -> Any:
    from services.snowflake_loader.settings import LoaderSettings

    values = {
        **env,
        "SNOWFLAKE_DATABASE": database,
        "SNOWFLAKE_CREATE_DATABASE": "true",
        "SNOWFLAKE_LOADER_TABLES": "user_events",
        "SNOWFLAKE_LOADER_WORK_DIR": str(work_dir),
        "SNOWFLAKE_NETWORK_TIMEOUT_S": "300",
    }
    return LoaderSettings(**{k.lower(): v for k, v in values.items() if k.lower() in LoaderSettings.model_fields})


def _ceiling(env: dict[str, str], table: Any, work_dir: Path) -> float:
    """Rows/s of bare write_pandas of the RAW-shaped rows into RAW.USER_EVENTS (table made by the migrations)."""
    from snowflake.connector.pandas_tools import write_pandas

    from services.snowflake_loader.lake import raw_rows
    from services.snowflake_loader.loader import migrate
    from services.stores.snowflake import Warehouse, connect

    settings = _settings(env, f"BENCH_WP_{uuid.uuid4().hex[:8].upper()}", work_dir)
    shaped = [
        raw_rows(batch, "user_events", "bench", datetime.now(UTC), "bench.parquet")
        for batch in table.scan().to_arrow_batch_reader()
        if batch.num_rows
    ]
    frame = pa.concat_tables(shaped).to_pandas()
    warehouse = Warehouse(connect(settings))
    try:
        migrate(warehouse, settings)
        warehouse.execute(f"USE SCHEMA {settings.raw}")  # write_pandas makes its temporary stage here
        started = time.perf_counter()
        ok, _, rows, _ = write_pandas(warehouse.conn, frame, "USER_EVENTS", use_logical_type=True)
        elapsed = time.perf_counter() - started
    finally:
        warehouse.close()
    if not ok or rows != len(frame):
        raise RuntimeError(f"write_pandas wrote {rows} of {len(frame)} rows")
    return rows / elapsed


def _loader(env: dict[str, str], catalog: Any, rows: int, work_dir: Path) -> tuple[float, dict[str, float]]:
    from services.snowflake_loader.loader import Loader, migrate
    from services.stores.snowflake import Warehouse, connect

    settings = _settings(env, f"BENCH_LD_{uuid.uuid4().hex[:8].upper()}", work_dir)
    warehouse = Warehouse(connect(settings))
    try:
        migrate(warehouse, settings)
        result = Loader(settings, warehouse, catalog).load_table("user_events")
    finally:
        warehouse.close()
    if result.status != "loaded" or result.rows != rows:
        raise RuntimeError(f"the loader loaded {result.rows} of {rows} rows ({result.status}: {result.error})")
    return rows / result.seconds, result.steps


def run(ctx: BenchContext) -> list[Result]:
    warnings.filterwarnings("ignore", message=".*incompatible version of 'pyarrow'.*")
    rows = max(20_000, int(200_000 * ctx.scale))
    work_dir = Path(tempfile.mkdtemp(prefix="snowflake-loader-", dir=ctx.work_dir))
    catalog, table, catalog_env = _lake(ctx.env, work_dir, rows)
    ceiling = _ceiling(catalog_env, table, work_dir)
    loader, steps = _loader(catalog_env, catalog, rows, work_dir)
    split = ", ".join(f"{step} {seconds:.1f}s" for step, seconds in steps.items())
    return [
        Result(
            "snowflake loader rows/s (Iceberg -> RAW -> marts)",
            round(loader),
            "rows/s",
            round(ceiling),
            "bare write_pandas of the same RAW rows (PUT + COPY), same fakesnow server",
            note=f"{rows} user events in one snapshot, one batch ({split}); fakesnow (DuckDB), not Snowflake",
        )
    ]


if __name__ == "__main__":  # this benchmark alone, on a stack of its own: python -m bench.snowflake_loader
    from services.stack import LocalStack, StackSettings

    with (
        tempfile.TemporaryDirectory(prefix="lp-bench-") as work,
        LocalStack(StackSettings.with_free_ports(state_dir=Path(work) / "stack"), only=["s3", "snowflake"]) as stack,
    ):
        for result in run(BenchContext(stack.env(), float(os.environ.get("BENCH_SCALE", "1")), Path(work))):
            print(f"{result.name}: {result.value:,.0f} {result.unit} (ceiling {result.ceiling:,.0f}, {result.ratio})")
