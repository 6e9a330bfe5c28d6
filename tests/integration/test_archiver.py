"""The Iceberg archiver against the real local stack: Tansu, SeaweedFS S3, SQL catalog and SeaweedFS's REST catalog.

Each test uses its own topics, namespace (or table bucket) and consumer group: the session stack is shared.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Message, Producer

from services.archiver.catalog import ensure_table
from services.archiver.committer import Fenced, TableCommitter
from services.archiver.rows import AvroRowBuilder, RecordColumns
from services.archiver.schemas import arrow_schema, default_tables
from services.kit.avro import AvroDeserializer, AvroSerializer, Decoded, Schema, SchemaRepository
from services.kit.kafka import PRODUCER_DEFAULTS, create_topics, scan_topic
from services.stack import LocalStack
from services.stores.iceberg import CatalogSettings, load_table, open_catalog
from services.stores.iceberg_offsets import snapshot_offsets
from services.testing.net import free_port, metric_totals
from services.testing.processes import log_tails, run_module, start_module, stop, wait_for
from services.testing.samples import START, dead_letter, encoded_events, processed_transactions

pytestmark = pytest.mark.integration

EVENTS = 24_000
STEP = timedelta(milliseconds=200)  # 24k events over 80 minutes of event time


@dataclass
class Setup:
    """Topics, namespace and environment of one test's archiver."""

    stack: LocalStack
    name: str
    env: dict[str, str]
    events: str
    transactions: str
    dead_letters: str
    logs: list[Path] = field(default_factory=list)

    @property
    def kafka(self) -> dict[str, Any]:
        return {"bootstrap.servers": self.stack.bootstrap_servers}

    def settings(self) -> CatalogSettings:
        fields = CatalogSettings.model_fields
        return CatalogSettings(**{k.lower(): v for k, v in self.env.items() if k.lower() in fields})

    def table(self, name: str = "user_events"):
        settings = self.settings()
        return load_table(open_catalog(settings), settings, name)

    def start(self, label: str, **extra: str) -> tuple[subprocess.Popen[bytes], int]:
        port = free_port()
        log = self.stack.log_dir / f"archiver-{self.name}-{label}.log"
        self.logs.append(log)
        env = {**self.env, "HTTP_PORT": str(port), **extra}
        return start_module("services.archiver", "run", env=env, log_path=log), port

    def tails(self) -> str:
        return log_tails(self.logs)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_module("services.archiver", *args, env=self.env)


def make_setup(stack: LocalStack, **catalog: str) -> Setup:
    name = f"it{uuid.uuid4().hex[:10]}"
    events, transactions, dead = f"{name}.events", f"{name}.transactions", f"{name}.dlq"
    create_topics(
        {"bootstrap.servers": stack.bootstrap_servers},
        {events: 6, transactions: 2, dead: 1, f"{events}.archiver.dlq": 1, f"{transactions}.archiver.dlq": 1},
    )
    env = {
        **stack.env(),
        "ICEBERG_CATALOG": "sql",
        "ICEBERG_SQL_URI": f"sqlite:///{stack.state_dir}/{name}-catalog.db",
        "ICEBERG_NAMESPACE": name,
        "ARCHIVER_EVENTS_TOPICS": events,
        "ARCHIVER_TRANSACTIONS_TOPICS": transactions,
        "ARCHIVER_DEAD_LETTER_TOPICS": dead,
        "CONSUMER_GROUP": f"{name}-archiver",
        "LOG_FORMAT": "text",
        "ARCHIVER_COMMIT_ROWS": "2000",
        "ARCHIVER_COMMIT_INTERVAL_S": "1",
        "BATCH_MAX_ROWS": "1000",
        "BATCH_MAX_AGE_S": "0.2",
        **catalog,
    }
    return Setup(stack, name, env, events, transactions, dead)


def produce_load(setup: Setup, count: int, rate: float, invalid_every: int = 97) -> tuple[dict[str, Any], list[int]]:
    """Events at about `rate`/s (every `invalid_every`-th one broken); returns valid records by id and the
    positions of the broken ones."""
    producer = Producer({**PRODUCER_DEFAULTS, "bootstrap.servers": setup.stack.bootstrap_servers})
    valid: dict[str, Any] = {}
    broken: list[int] = []
    started = time.monotonic()
    for i, (key, payload, record) in enumerate(encoded_events(count, seed=int(setup.name[2:], 16) % 10_000, step=STEP)):
        if i % invalid_every == invalid_every - 1:
            payload = payload[:-5] if i % 2 else b"garbage"
            broken.append(i)
        else:
            valid[record["event_id"]] = record
        producer.produce(setup.events, payload, key=key)
        if i % 500 == 0:
            producer.poll(0)
            ahead = i / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
    assert producer.flush(60) == 0
    return valid, broken


def archived_ids(setup: Setup) -> list[str]:
    table = setup.table()
    return table.scan(selected_fields=("event_id",)).to_arrow().column("event_id").to_pylist()


# --- crash and restart ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def crashed_run(stack: LocalStack) -> Iterator[tuple[Setup, dict[str, Any], list[int], int]]:
    """A load into the events topic; the archiver is killed with SIGKILL half-way and started again."""
    setup = make_setup(stack)
    result: dict[str, Any] = {}
    loader = threading.Thread(
        target=lambda: result.update(zip(("valid", "broken"), produce_load(setup, EVENTS, 2000), strict=True))
    )
    first, _ = setup.start("first")
    loader.start()
    try:
        wait_for(
            lambda: len(archived_ids(setup)) >= 3000 if _table_exists(setup) else False,
            120,
            "first commits",
            setup.logs,
        )
        first.kill()  # SIGKILL: no flush, no commit, no goodbye to the group
        first.wait()
        at_kill = len(archived_ids(setup))
        second, _ = setup.start("second")
        loader.join(timeout=120)
        valid = result["valid"]
        wait_for(lambda: len(archived_ids(setup)) >= len(valid), 180, "every valid event archived", setup.logs)
        time.sleep(3)  # anything still buffered would be committed within ARCHIVER_COMMIT_INTERVAL_S
        assert stop(second) == 0, setup.tails()
        yield setup, valid, result["broken"], at_kill
    finally:
        for process in (first,):
            if process.poll() is None:
                process.kill()


def _table_exists(setup: Setup) -> bool:
    try:
        setup.table()
        return True
    except Exception:
        return False


def test_kill_9_during_a_load_then_restart_keeps_every_valid_event_exactly_once(crashed_run) -> None:
    setup, valid, broken, at_kill = crashed_run
    assert 0 < at_kill < len(valid), "the kill must happen during the load"
    ids = archived_ids(setup)
    assert len(ids) == len(valid)
    assert len(set(ids)) == len(ids), "an event_id is archived twice"
    assert set(ids) == set(valid)
    # The stored offsets are the end of every partition: nothing left behind, nothing skipped.
    ends = scan_topic(setup.kafka, setup.events)
    table = setup.table()
    assert snapshot_offsets(table) == {(setup.events, p): end for p, end in ends.items()}
    # Every broken record reached the archiver's dead-letter topic (at least once: a crash may repeat one).
    dead: set[tuple[int, int]] = set()
    scan_topic(setup.kafka, f"{setup.events}.archiver.dlq", on_message=lambda m: dead.add(_origin(m)))
    assert len(dead) == len(broken)
    assert len(table.snapshots()) >= 3


def _origin(message: Message) -> tuple[int, int]:
    headers = dict(message.headers() or ())
    return int(headers["lp-dlq-original-partition"]), int(headers["lp-dlq-original-offset"])


def test_replay_of_a_range_into_a_topic_yields_exactly_that_range(crashed_run) -> None:
    setup, valid, _, _ = crashed_run
    since, until = START + timedelta(minutes=20), START + timedelta(minutes=35)
    target = f"{setup.name}.replayed"
    create_topics(setup.kafka, {target: 3})
    done = setup.cli(
        "replay", "user_events", "--since", since.isoformat(), "--until", until.isoformat(), "--into", target
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    expected = {i for i, r in valid.items() if since <= r["event_time"] < until}
    decode = AvroDeserializer(SchemaRepository.load(), "processed_event")
    replayed: list[dict[str, Any]] = []

    def collect(message: Message) -> None:
        result = decode(message.value())
        assert isinstance(result, Decoded)
        headers = dict(message.headers() or ())
        assert headers["lp-replay-id"].decode() == report["replay_id"]
        replayed.append(result.record)

    scan_topic(setup.kafka, target, on_message=collect)
    assert report["rows"] == len(replayed) == len(expected) > 0
    assert {r["event_id"] for r in replayed} == expected
    assert all(r == valid[r["event_id"]] for r in replayed)  # the same records, field for field

    purchases = f"{setup.name}.purchases"
    create_topics(setup.kafka, {purchases: 1})
    done = setup.cli(
        "replay", "user_events", "--since", since.isoformat(), "--until", until.isoformat(),
        "--into", purchases, "--where", "event_type = 'purchase'",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    count = 0

    def count_purchase(message: Message) -> None:
        nonlocal count
        result = decode(message.value())
        assert isinstance(result, Decoded) and result.record["event_type"] == "purchase"
        count += 1

    scan_topic(setup.kafka, purchases, on_message=count_purchase)
    assert count == sum(1 for i in expected if valid[i]["event_type"] == "purchase") > 0


def test_compaction_keeps_the_rows_and_reduces_the_file_count(crashed_run) -> None:
    setup, valid, _, _ = crashed_run
    before = json.loads(setup.cli("stats").stdout)["user_events"]
    snapshot_before = before["current_snapshot_id"]
    done = setup.cli("compact", "user_events", "--small-file-mb", "64")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    after = json.loads(setup.cli("stats").stdout)["user_events"]
    assert after["rows"] == before["rows"] == len(valid)
    assert after["files"] < before["files"] and report["files_rewritten"] > after["files"]
    assert after["kafka_offsets"] == before["kafka_offsets"]
    ids = archived_ids(setup)
    assert len(ids) == len(set(ids)) == len(valid)
    # Time travel to before the compaction reads the same rows from the old files.
    done = setup.cli("read", "user_events", "--snapshot-id", str(snapshot_before), "--count")
    assert json.loads(done.stdout)["rows"] == len(valid)
    history = [json.loads(line) for line in setup.cli("history", "user_events").stdout.splitlines()]
    assert history[0]["by"] == "compact" and history[0]["current"]
    done = setup.cli("expire", "user_events", "--older-than", "0s", "--retain-last", "1")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["data_files_deleted"] >= report["files_rewritten"]
    final = json.loads(setup.cli("stats").stdout)["user_events"]
    assert final["snapshots"] == 1 and final["rows"] == len(valid)


# --- two committers -------------------------------------------------------------------------------------------
def test_two_archivers_on_the_same_table_are_fenced_and_never_duplicate(stack: LocalStack) -> None:
    """Two processes in different consumer groups both take every partition of the topic: each commit checks
    the stored offsets, the loser of each race is fenced, re-seeks and goes on. The table ends exact."""
    setup = make_setup(stack)
    count = 8_000
    a, port_a = setup.start("a", CONSUMER_GROUP=f"{setup.name}-a")
    b, port_b = setup.start("b", CONSUMER_GROUP=f"{setup.name}-b")
    try:
        valid, _ = produce_load(setup, count, 4000, invalid_every=10**9)
        wait_for(lambda: _table_exists(setup) and len(archived_ids(setup)) >= count, 180, "all events", setup.logs)
        time.sleep(3)
        fenced = metric_totals(port_a).get("lp_archiver_fenced_total", 0) + metric_totals(port_b).get(
            "lp_archiver_fenced_total", 0
        )
        # Event-to-visible is observed at each committed snapshot (its oldest and newest record), and the last
        # snapshot's time is exported (docs/observability.md). One of the two may have lost every race.
        totals = [metric_totals(port) for port in (port_a, port_b)]
        assert sum(t.get("lp_sink_event_to_visible_seconds_count", 0) for t in totals) >= 2
        assert max(t.get("lp_archiver_last_snapshot_timestamp_seconds", 0) for t in totals) > time.time() - 600
        assert stop(a) == 0, setup.tails()
        assert stop(b) == 0, setup.tails()
    finally:
        for process in (a, b):
            if process.poll() is None:
                process.kill()
    ids = archived_ids(setup)
    assert len(ids) == len(set(ids)) == count and set(ids) == set(valid)
    assert fenced >= 1, "both wrote the same partitions: at least one commit must have been fenced"


# --- the REST catalog ---------------------------------------------------------------------------------------------
def test_through_seaweedfs_rest_catalog(stack: LocalStack) -> None:
    """Tables in an s3tables table bucket behind SeaweedFS's Iceberg REST catalog: the service archives, the
    catalog enforces optimistic concurrency (a stale committer is fenced), the schema evolves in place."""
    bucket = f"lp-it-{uuid.uuid4().hex[:8]}"
    setup = make_setup(stack, ICEBERG_CATALOG="rest", ICEBERG_WAREHOUSE=f"s3://{bucket}")
    valid, _ = produce_load(setup, 3000, 10_000, invalid_every=10**9)
    key, value, headers = dead_letter(b"raw", offset=3)
    producer = Producer({"bootstrap.servers": stack.bootstrap_servers})
    producer.produce(setup.dead_letters, value, key=key, headers=headers)
    serialize = AvroSerializer(SchemaRepository.load()["processed_transaction"])
    changes = list(processed_transactions(200))
    for change in changes:
        producer.produce(setup.transactions, serialize(change), key=change["transaction_id"].encode())
    producer.flush(10)
    process, _ = setup.start("rest")
    try:
        wait_for(
            lambda: _table_exists(setup) and len(archived_ids(setup)) >= len(valid), 120, "archive via REST", setup.logs
        )
        wait_for(lambda: setup.table("dead_letters").scan().to_arrow().num_rows == 1, 30, "dead letter", setup.logs)
        wait_for(lambda: setup.table("transactions").scan().to_arrow().num_rows == 200, 30, "changes", setup.logs)
        assert stop(process) == 0, setup.tails()
    finally:
        if process.poll() is None:
            process.kill()
    ids = archived_ids(setup)
    assert len(ids) == len(set(ids)) == len(valid)
    stats = json.loads(setup.cli("stats").stdout)
    assert stats["user_events"]["rows"] == len(valid) and stats["dead_letters"]["rows"] == 1
    archived_changes = setup.table("transactions").scan().to_arrow().sort_by("_kafka_offset").to_pylist()
    by_lsn = {c["source_lsn"]: c for c in changes}
    assert sorted(by_lsn) == sorted(r["source_lsn"] for r in archived_changes)
    assert all({k: r[k] for k in by_lsn[r["source_lsn"]]} == by_lsn[r["source_lsn"]] for r in archived_changes)

    # Two committers of one partition through the REST catalog: the second is fenced.
    settings = setup.settings()
    catalog = open_catalog(settings)
    repository = SchemaRepository.load()
    spec = default_tables()[0]
    table = load_table(catalog, settings, "user_events")
    a = TableCommitter(catalog.load_table(table.name()), committer_id="a")
    b = TableCommitter(catalog.load_table(table.name()), committer_id="b")
    tp = ("manual", 0)
    a.claim([tp])
    b.claim([tp])
    builder = AvroRowBuilder(repository, "processed_event", arrow_schema(table.schema()))
    columns = RecordColumns()
    for offset, (_, payload, _) in enumerate(encoded_events(10, seed=99)):
        columns.append("manual", 0, offset, None, None, payload, None)
    rows, _ = builder.build(columns)
    a.add(rows, columns.consumed())
    b.add(rows, columns.consumed())
    a.commit()
    with pytest.raises(Fenced):
        b.commit()
    assert len(archived_ids(setup)) == len(valid) + 10

    # A new optional field in the contract becomes a column; no data file is rewritten.
    files_before = {t.file.file_path for t in load_table(catalog, settings, "user_events").scan().plan_files()}
    evolved = dict(repository["processed_event"].definition)
    evolved["fields"] = [*evolved["fields"], {"name": "campaign", "type": ["null", "string"], "default": None}]
    newer = SchemaRepository([Schema.from_definition("processed_event", evolved)])
    table, plan = ensure_table(catalog, settings, spec, newer)
    assert [f.name for f in plan.add] == ["campaign"]
    assert {t.file.file_path for t in table.scan().plan_files()} == files_before
    assert set(table.scan(selected_fields=("campaign",)).to_arrow().column("campaign").to_pylist()) == {None}
