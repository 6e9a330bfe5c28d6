"""remove-orphans on the real local stack: SeaweedFS S3 and the SQL catalog.

A table is written by the archiver's committer; an archiver process then dies between writing its files and the
catalog commit (a real crash, in its own process), which leaves Parquet files, manifests, a manifest list and a
metadata file that nothing references. The command line lists them in a dry run, deletes exactly them, keeps a
file newer than the cut-off (a commit in flight), and every snapshot still reads. S3 is checked with boto3, not
with the code under test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import boto3
import pytest

from services.archiver.catalog import ensure_table
from services.archiver.maintenance import compact, read
from services.archiver.rows import AvroRowBuilder, RecordColumns
from services.archiver.schemas import arrow_schema, default_tables
from services.archiver.writer import write_data_files
from services.kit.avro import SchemaRepository
from services.stack import LocalStack
from services.stores.iceberg import CatalogSettings, open_catalog
from services.testing.archiver_samples import commit_samples
from services.testing.processes import run_module
from services.testing.samples import encoded_events

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
TOPIC = "events.processed"
PER_COMMIT = 200
PAYLOADS = [payload for _, payload, _ in encoded_events(1000)]

# Run in its own process: commit one batch through the archiver's committer and die (SIGKILL-like, no cleanup)
# right after the new metadata file is written, before the catalog row points at it.
CRASHING_COMMIT = textwrap.dedent(
    """
    import os, sys
    from pyiceberg.catalog.sql import SqlCatalog
    from services.stores.iceberg import load_table, open_catalog
    from services.archiver.committer import TableCommitter
    from services.archiver.rows import AvroRowBuilder, RecordColumns
    from services.testing.samples import encoded_events
    from services.archiver.schemas import arrow_schema
    from services.stores.iceberg import CatalogSettings
    from services.kit.avro import SchemaRepository

    settings = CatalogSettings.from_env(os.environ)
    table = load_table(open_catalog(settings), settings, "user_events")
    committer = TableCommitter(table, committer_id="doomed")
    start = committer.claim([("events.processed", 0)])[("events.processed", 0)]
    payloads = [payload for _, payload, _ in encoded_events(1000)]
    columns = RecordColumns()
    for offset in range(start, start + 200):
        columns.append("events.processed", 0, offset, None, None, payloads[offset % len(payloads)], None)
    rows, _ = AvroRowBuilder(SchemaRepository.load(), "processed_event", arrow_schema(table.schema())).build(columns)
    committer.add(rows, columns.consumed())
    real = SqlCatalog._write_metadata

    def write_then_die(*args, **kwargs):
        real(*args, **kwargs)
        sys.stdout.flush()
        os._exit(137)

    SqlCatalog._write_metadata = staticmethod(write_then_die)
    committer.commit()
    sys.exit("the commit was supposed to die before the catalog swap")
    """
)


class Archive:
    def __init__(self, stack: LocalStack, **catalog: str) -> None:
        self.name = f"orph{uuid.uuid4().hex[:10]}"
        self.env = {
            **stack.env(),
            "ICEBERG_CATALOG": "sql",
            "ICEBERG_SQL_URI": f"sqlite:///{stack.state_dir}/{self.name}-catalog.db",
            "ICEBERG_NAMESPACE": self.name,
            **catalog,
        }
        self.settings = CatalogSettings.from_env(self.env)
        self.repository = SchemaRepository.load()
        self.table, _ = ensure_table(open_catalog(self.settings), self.settings, default_tables()[0], self.repository)
        self.s3 = boto3.client(
            "s3",
            endpoint_url=stack.s3_endpoint,
            aws_access_key_id=stack.aws_access_key_id,
            aws_secret_access_key=stack.aws_secret_access_key,
            region_name=stack.aws_region,
        )
        bucket, _, prefix = self.table.metadata.location.removeprefix("s3://").partition("/")
        self.bucket, self.prefix = bucket, prefix.rstrip("/") + "/"

    def objects(self) -> set[str]:
        """s3://bucket/key of every file under the table's location (not the empty "folder/" markers pyarrow's
        S3 filesystem leaves when it deletes a file)."""
        keys: set[str] = set()
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
            keys.update(
                f"s3://{self.bucket}/{o['Key']}" for o in page.get("Contents", []) if not o["Key"].endswith("/")
            )
        return keys

    def rows(self, count: int, start: int) -> tuple[object, dict]:
        columns = RecordColumns()
        for offset in range(start, start + count):
            columns.append(TOPIC, 0, offset, None, None, PAYLOADS[offset % len(PAYLOADS)], None)
        builder = AvroRowBuilder(self.repository, "processed_event", arrow_schema(self.table.schema()))
        rows, _ = builder.build(columns)
        return rows, columns.consumed()

    def commit(self, commits: int) -> None:
        commit_samples(self.table, self.repository, PAYLOADS, commits, PER_COMMIT, topic=TOPIC)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_module("services.archiver", *args, env=self.env)

    def offsets(self, **kwargs: object) -> list[int]:
        return sorted(read(self.table, columns=("_kafka_offset",), **kwargs).column("_kafka_offset").to_pylist())


def test_remove_orphans_deletes_exactly_the_files_of_a_crashed_commit(stack: LocalStack) -> None:
    archive = Archive(stack)
    archive.commit(3)
    compact(archive.table, small_file_bytes=10**9)  # a rewrite: the old files stay reachable from old snapshots
    archive.table.refresh()
    snapshots = sorted(archive.table.snapshots(), key=lambda s: s.timestamp_ms)
    live = archive.objects()

    crash = subprocess.run(
        [sys.executable, "-c", CRASHING_COMMIT],
        env={**os.environ, **archive.env},
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=300,
    )
    assert crash.returncode == 137, crash.stderr
    orphans = archive.objects() - live
    assert any(k.endswith(".parquet") and "/data/" in k for k in orphans), orphans
    assert any(k.endswith(".metadata.json") for k in orphans) and any(k.endswith(".avro") for k in orphans)

    time.sleep(1.5)  # S3 keeps modification times in whole seconds
    cutoff = datetime.now(UTC).isoformat()
    time.sleep(1.5)
    in_flight = write_data_files(archive.table, archive.rows(50, 10_000)[0])  # written, not committed yet
    young = {f.file_path for f in in_flight}
    assert young <= archive.objects()

    refused = archive.cli("remove-orphans", "--table", "user_events", "--older-than", cutoff, "--dry-run")
    assert refused.returncode == 2 and "--allow-recent" in refused.stderr
    assert archive.cli("remove-orphans", "user_events", "--older-than", "3d").returncode == 0  # too young: kept
    assert archive.objects() == live | orphans | young

    dry = archive.cli(
        "remove-orphans", "--table", "user_events", "--older-than", cutoff, "--allow-recent", "--dry-run"
    )  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    listed = json.loads(dry.stdout)
    assert set(listed["orphans"]) == orphans and listed["deleted"] == 0
    assert listed["files_too_young"] == len(young) and listed["files_referenced"] == len(live)
    assert archive.objects() == live | orphans | young  # a dry run deletes nothing

    done = archive.cli("remove-orphans", "--table", "user_events", "--older-than", cutoff, "--allow-recent")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["deleted"] == len(orphans)
    assert archive.objects() == live | young  # exactly the orphans went; the young file stays

    archive.table.refresh()
    assert archive.offsets() == list(range(3 * PER_COMMIT))
    for n, snapshot in enumerate(snapshots[:3], start=1):  # time travel down to the oldest snapshot
        assert archive.offsets(snapshot_id=snapshot.snapshot_id) == list(range(n * PER_COMMIT))
    archive.commit(1)  # the archiver goes on from the stored offsets: the crashed batch is written again
    assert archive.offsets() == list(range(4 * PER_COMMIT))


def test_remove_orphans_through_seaweedfs_rest_catalog(stack: LocalStack) -> None:
    """The Kubernetes set-up: a REST catalog whose tables live in an s3tables bucket. The listing must match the
    locations that catalog writes into the metadata, or the command refuses to delete anything."""
    archive = Archive(stack, ICEBERG_CATALOG="rest", ICEBERG_WAREHOUSE=f"s3://lp-orph-{uuid.uuid4().hex[:8]}")
    archive.commit(2)
    live = archive.objects()
    assert any(k.endswith(".metadata.json") for k in live), live  # the table's files are where it says
    orphans = {f.file_path for f in write_data_files(archive.table, archive.rows(100, 5_000)[0])}  # never committed
    time.sleep(1.5)
    cutoff = datetime.now(UTC).isoformat()

    dry = archive.cli("remove-orphans", "user_events", "--older-than", cutoff, "--allow-recent", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    listed = json.loads(dry.stdout)
    assert set(listed["orphans"]) == orphans and listed["files_referenced"] == len(live)
    done = archive.cli("remove-orphans", "user_events", "--older-than", cutoff, "--allow-recent")
    assert done.returncode == 0, done.stderr
    assert archive.objects() == live
    archive.table.refresh()
    assert archive.offsets() == list(range(2 * PER_COMMIT))
