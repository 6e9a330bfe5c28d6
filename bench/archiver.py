"""Archiver rows/s (Kafka -> Iceberg, one process) against a bare pyiceberg append of the same Arrow batches.

Both figures write the same rows (processed events as the validator writes them, Avro, 12 partitions) into a
table with the same schema, the same partitions (day of event time x event type, Parquet + zstd) and the same
commit size, on the same S3 (SeaweedFS) and SQL catalog, in the same run:

- ceiling: `Table.append` of ready-made Arrow tables, one per commit: no Kafka, no decoding, no offsets.
  (`Table.append` needs `pyiceberg-core` for a day() transform, so its table partitions by identity on
  event_date, which the contract defines as the UTC day of event_time: the same files.)
- archiver: `python -m services.archiver` consuming the topic from the beginning, measured from its first
  batch (`lp_archiver_first_batch_timestamp_seconds`) until `lp_archiver_rows_committed_total` reaches the
  topic's size: consume, columnar Avro decode, Arrow build, data files, commits with offsets.
"""

from __future__ import annotations

import os
import re
import signal
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import pyarrow as pa

from bench.harness import BenchContext, Result, produce_all
from services.kit.kafka import create_topics
from services.kit.memory import use_system_arrow_pool
from services.testing.net import free_port
from services.testing.processes import start_module

PARTITIONS = 12
DISTINCT = 20_000  # distinct payloads, cycled: decoding costs the same, seeding is much faster
COMMIT_ROWS = 500_000  # the archiver's default ARCHIVER_COMMIT_ROWS, used by both
ROUNDS = 3


def _seed(bootstrap: str, topic: str, events: int) -> list[bytes]:
    from services.testing.samples import encoded_events

    distinct = [(key, payload) for key, payload, _ in encoded_events(DISTINCT)]
    produce_all(bootstrap, topic, (distinct[i % DISTINCT] for i in range(events)))
    return [payload for _, payload in distinct]


def _settings(env: dict[str, str]) -> Any:
    from services.stores.iceberg import CatalogSettings

    return CatalogSettings(**{k.lower(): v for k, v in env.items() if k.lower() in CatalogSettings.model_fields})


def _catalog_env(env: dict[str, str], work_dir: Path, namespace: str) -> dict[str, str]:
    return {
        **env,
        "ICEBERG_CATALOG": "sql",
        "ICEBERG_SQL_URI": f"sqlite:///{work_dir}/catalog.db",
        "ICEBERG_NAMESPACE": namespace,
    }


def _ceiling(env: dict[str, str], payloads: list[bytes], events: int, namespace: str) -> float:
    """Rows/s of bare `Table.append` of the same rows, COMMIT_ROWS per append."""
    from pyiceberg.partitioning import PartitionField, PartitionSpec
    from pyiceberg.transforms import IdentityTransform

    from services.archiver.catalog import ensure_namespace, table_properties
    from services.archiver.rows import AvroRowBuilder, RecordColumns
    from services.archiver.schemas import arrow_schema, iceberg_schema
    from services.kit.avro import SchemaRepository
    from services.stores.iceberg import open_catalog

    repository = SchemaRepository.load()
    settings = _settings(env)
    catalog = open_catalog(settings)
    ensure_namespace(catalog, namespace)
    schema = iceberg_schema(repository["processed_event"].definition)
    spec = PartitionSpec(
        PartitionField(schema.find_field("event_date").field_id, 1000, IdentityTransform(), "event_date"),
        PartitionField(schema.find_field("event_type").field_id, 1001, IdentityTransform(), "event_type"),
    )
    table = catalog.create_table(
        f"{namespace}.bare_append", schema=schema, partition_spec=spec, properties=table_properties()
    )
    columns = RecordColumns()
    for i, payload in enumerate(payloads):
        columns.append("bench", i % PARTITIONS, i, int(time.time() * 1000), b"key", payload, None)
    distinct, rejected = AvroRowBuilder(repository, "processed_event", arrow_schema(table.schema())).build(columns)
    assert not rejected
    batches = []
    for start in range(0, events, COMMIT_ROWS):
        size = min(COMMIT_ROWS, events - start)
        repeats = [distinct] * (size // len(payloads)) + [distinct.slice(0, size % len(payloads))]
        batches.append(pa.concat_tables(repeats).combine_chunks())
    started = time.perf_counter()
    for batch in batches:
        table.append(batch)
    elapsed = time.perf_counter() - started
    return events / elapsed


def _metrics(port: int, topic: str) -> dict[str, float]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            body = response.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for name, pattern in (
        ("consumed", rf'lp_sink_records_consumed_total\{{sink="archiver",topic="{re.escape(topic)}"\}} ([0-9.e+]+)'),
        ("first", r"lp_archiver_first_batch_timestamp_seconds ([0-9.e+]+)"),
    ):
        match = re.search(pattern, body)
        if match:
            out[name] = float(match.group(1))
    return out


def _archiver(env: dict[str, str], topic: str, events: int, work_dir: Path, namespace: str) -> float:
    """Rows/s from the first batch handed to the archiver to the snapshot holding the last row.

    Once every record is buffered the process gets SIGTERM, which commits what is left at once (instead of
    when the buffer's age reaches the commit interval); the end is that snapshot's commit time."""
    port = free_port()
    catalog_env = _catalog_env(env, work_dir, namespace)
    run_env = {
        **os.environ,
        **catalog_env,
        "LOG_LEVEL": "WARNING",
        "HTTP_PORT": str(port),
        "CONSUMER_GROUP": f"bench-archiver-{time.time_ns()}",
        "ARCHIVER_TABLES": "user_events",
        "ARCHIVER_EVENTS_TOPICS": topic,
        "ARCHIVER_COMMIT_ROWS": str(COMMIT_ROWS),
        "ARCHIVER_COMMIT_INTERVAL_S": "60",
    }
    log_path = work_dir / f"archiver-{namespace}.log"
    process = start_module("services.archiver", "run", env=run_env, log_path=log_path)
    try:
        deadline = time.monotonic() + 900
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"archiver exited with {process.returncode}: {log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError("the archiver did not consume the benchmark topic in 900 s")
            figures = _metrics(port, topic)
            if figures.get("consumed", 0) >= events and "first" in figures:
                break
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        if process.wait(timeout=120) != 0:
            raise RuntimeError(f"archiver exited with {process.returncode}: {log_path.read_text()[-3000:]}")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    from services.stores.iceberg import load_table, open_catalog

    settings = _settings(catalog_env)
    table = load_table(open_catalog(settings), settings, "user_events")
    snapshot = table.current_snapshot()
    rows = int(snapshot.summary.additional_properties["total-records"]) if snapshot and snapshot.summary else 0
    if rows != events:
        raise RuntimeError(f"the archive holds {rows} rows, the topic {events}")
    return events / (snapshot.timestamp_ms / 1000 - figures["first"])


def run(ctx: BenchContext) -> list[Result]:
    events = max(200_000, int(1_000_000 * ctx.scale))  # a few commits: consuming and committing overlap
    bootstrap = ctx.env["KAFKA_BOOTSTRAP_SERVERS"]
    stamp = time.time_ns()
    topic = f"bench.archiver.{stamp}"
    create_topics({"bootstrap.servers": bootstrap}, {topic: PARTITIONS, f"{topic}.archiver.dlq": 1})
    payloads = _seed(bootstrap, topic, events)
    work_dir = Path(tempfile.mkdtemp(prefix="archiver-", dir=ctx.work_dir))
    use_system_arrow_pool()  # the ceiling allocates as the archiver does
    # Alternate the two and keep the best of each: on a small shared machine one run measures the neighbours too.
    ceilings, archivers = [], []
    for round_ in range(ROUNDS):
        namespace = f"bench_{stamp}_{round_}"
        ceilings.append(_ceiling(_catalog_env(ctx.env, work_dir, namespace), payloads, events, namespace))
        archivers.append(_archiver(ctx.env, topic, events, work_dir, namespace))
    ceiling, archiver = max(ceilings), max(archivers)
    spread = ", ".join(f"{a:,.0f}/{c:,.0f}" for a, c in zip(archivers, ceilings, strict=True))
    return [
        Result(
            "archiver rows/s (Kafka -> Iceberg)",
            round(archiver),
            "rows/s",
            round(ceiling),
            "bare pyiceberg Table.append of the same Arrow rows, same commit size",
            note=f"{events} processed events, 12 partitions, commits of {COMMIT_ROWS}, 1 process, best of {ROUNDS} "
            f"(runs: {spread}); goal 100,000",
        )
    ]


if __name__ == "__main__":  # this benchmark alone, on a stack of its own: python -m bench.archiver
    from services.stack import LocalStack, StackSettings

    with (
        tempfile.TemporaryDirectory(prefix="lp-bench-") as work,
        LocalStack(StackSettings.with_free_ports(state_dir=Path(work) / "stack"), only=["broker", "s3"]) as stack,
    ):
        for result in run(BenchContext(stack.env(), float(os.environ.get("BENCH_SCALE", "1")), Path(work))):
            print(f"{result.name}: {result.value:,.0f} {result.unit} (ceiling {result.ceiling:,.0f}, {result.ratio})")
