"""The CDC service as a process (`python -m services.cdc`) against real PostgreSQL and the Kafka-protocol broker.

Every test gets its own database (so snapshot counts are exact), slot, publication, offsets file and topic prefix.
"Caught up" is judged the way `make run` can judge it: after the writes, take `pg_current_wal_lsn()`; once the
slot's `confirmed_flush_lsn` passes it, Debezium has committed offsets past every change, and it commits only
what the service has flushed to Kafka. Heartbeats (every 300 ms here) move the slot even when nothing changes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fastavro
import psycopg
import pytest
from confluent_kafka import Message
from confluent_kafka.admin import AdminClient, NewTopic
from fastavro.validation import validate
from psycopg.conninfo import make_conninfo

from services.cdc.slots import drop_database_and_slots
from services.generator.oltp import OltpWriter
from services.kit.kafka import scan_topic
from services.stack import LocalStack, StackSettings
from services.stack.settings import pick_free_ports

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
TABLES = ("users", "products", "transactions")
KEY_COLUMN = {"users": "user_id", "products": "product_id", "transactions": "transaction_id"}
PARTITIONS = {"users": 4, "products": 2, "transactions": 4}
SNAPSHOT_MARKERS = {"true", "first", "first_in_data_collection", "last_in_data_collection", "last"}


# --- a database, topics and a CDC process per test -------------------------------------------------------------


@dataclass
class Target:
    dsn: str
    bootstrap: str
    prefix: str
    slot: str
    tmp: Path

    def topic(self, table: str) -> str:
        return f"{self.prefix}.postgres.{table}"

    @property
    def heartbeat_topic(self) -> str:
        return f"{self.prefix}.heartbeat"

    def env(self, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "POSTGRES_DSN": self.dsn,
            "CDC_TOPIC_PREFIX": self.prefix,
            "CDC_SLOT_NAME": self.slot,
            "CDC_PUBLICATION_NAME": self.slot,
            "CDC_OFFSETS_FILE": str(self.tmp / "offsets.dat"),
            "CDC_HEARTBEAT_INTERVAL_MS": "300",
            "LOG_FORMAT": "json",
            "SHUTDOWN_TIMEOUT_S": "30",
            **extra,
        }


def create_topics(bootstrap: str, prefix: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})  # keep a reference: the futures die with the client
    topics = [NewTopic(f"{prefix}.postgres.{t}", n, 1) for t, n in PARTITIONS.items()]
    topics.append(NewTopic(f"{prefix}.heartbeat", 1, 1))
    for future in admin.create_topics(topics).values():
        future.result(timeout=30)


def new_database(admin_dsn: str) -> str:
    name = f"cdc_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    dsn = make_conninfo(admin_dsn, dbname=name)
    with OltpWriter.connect(dsn) as writer:
        writer.apply_schema()
    return dsn


def drop_database(admin_dsn: str, dsn: str) -> None:
    drop_database_and_slots(admin_dsn, psycopg.conninfo.conninfo_to_dict(dsn)["dbname"])


@pytest.fixture
def target(stack: LocalStack, tmp_path: Path) -> Iterator[Target]:
    admin_dsn = make_conninfo(stack.postgres_dsn, dbname="postgres")
    dsn = new_database(admin_dsn)
    tag = uuid.uuid4().hex[:8]
    prefix = f"t{tag}.cdc"
    create_topics(stack.bootstrap_servers, prefix)
    yield Target(dsn, stack.bootstrap_servers, prefix, f"t_{tag}", tmp_path)
    drop_database(admin_dsn, dsn)


@dataclass
class CdcProcess:
    target: Target
    env: dict[str, str]
    http_port: int
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None

    @classmethod
    def start(cls, target: Target, name: str = "cdc", **extra: str) -> CdcProcess:
        (port,) = pick_free_ports(1)
        log_path = target.tmp / f"{name}.log"
        process = cls(target, target.env(HTTP_PORT=str(port), **extra), port, log_path)
        with log_path.open("ab") as log:
            process.popen = subprocess.Popen(
                [sys.executable, "-m", "services.cdc"], env=process.env, stdout=log, stderr=subprocess.STDOUT
            )
        return process

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        assert self.popen is not None
        return self.popen.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            pytest.fail(f"cdc exited with {self.popen.returncode if self.popen else '?'}:\n{self.log()[-5000:]}")

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=2) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def terminate(self, timeout: float = 60) -> int:
        assert self.popen is not None
        self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(timeout)

    def kill(self) -> None:
        assert self.popen is not None
        self.popen.kill()  # SIGKILL: no flush, no offset commit, no goodbye
        self.popen.wait(10)


def current_lsn(dsn: str) -> str:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return str(conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0])  # type: ignore[index]


def wait_caught_up(process: CdcProcess, timeout: float = 90) -> float:
    """Wait until CDC streams (a snapshot is over) and the slot confirmed everything written so far; returns
    the seconds it took. Streaming first: a slot created at start confirms the current position at once."""
    started = time.monotonic()
    while True:
        try:
            if "lp_cdc_streaming 1.0" in process.get("/metrics")[1]:
                break
        except OSError:  # not listening yet
            pass
        process.check_alive()
        if time.monotonic() - started > timeout:
            pytest.fail(f"cdc did not start streaming in {timeout:.0f}s:\n{process.log()[-5000:]}")
        time.sleep(0.2)
    wanted = current_lsn(process.target.dsn)
    with psycopg.connect(process.target.dsn, autocommit=True) as conn:
        while True:
            process.check_alive()
            row = conn.execute(
                "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots WHERE slot_name = %s",
                (wanted, process.target.slot),
            ).fetchone()
            if row is not None and row[0]:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                pytest.fail(f"cdc did not catch up with {wanted} in {timeout:.0f}s:\n{process.log()[-5000:]}")
            time.sleep(0.1)


# --- reading what arrived --------------------------------------------------------------------------------------


@dataclass
class Record:
    table: str
    partition: int
    offset: int
    key: bytes
    value: bytes | None
    headers: dict[str, bytes]
    envelope: dict[str, Any] | None = field(default=None)

    @property
    def op(self) -> str:
        return self.headers["lp-cdc-op"].decode()

    @property
    def lsn(self) -> int:
        return int(self.headers["lp-cdc-lsn"])

    @property
    def row_key(self) -> str:
        return json.loads(self.key)[KEY_COLUMN[self.table]]


def read_records(target: Target) -> list[Record]:
    records: list[Record] = []
    for table in TABLES:

        def collect(message: Message, table: str = table) -> None:
            value = message.value()
            records.append(
                Record(
                    table,
                    message.partition(),
                    message.offset(),
                    message.key(),
                    value,
                    {k: v for k, v in message.headers() or []},
                    json.loads(value) if value is not None else None,
                )
            )

        scan_topic({"bootstrap.servers": target.bootstrap}, target.topic(table), on_message=collect)
    return records


def by_key(records: list[Record]) -> dict[tuple[str, str], list[Record]]:
    """Each row's records in produce order (one partition per key, so offset order is produce order)."""
    grouped: dict[tuple[str, str], list[Record]] = defaultdict(list)
    for record in sorted(records, key=lambda r: (r.table, r.partition, r.offset)):
        grouped[(record.table, record.row_key)].append(record)
    return grouped


def murmur2(data: bytes) -> int:
    """Kafka's Java partitioner hash (Utils.murmur2): where Debezium Server would put a key."""
    m, length = 0x5BD1E995, len(data)
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    for i in range(0, length - length % 4, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> 24
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    tail = length & ~3
    extra = length % 4
    if extra == 3:
        h ^= data[tail + 2] << 16
    if extra >= 2:
        h ^= data[tail + 1] << 8
    if extra >= 1:
        h ^= data[tail]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h


def contracts() -> dict[str, Any]:
    return {
        table: fastavro.parse_schema(json.loads((REPO_ROOT / f"schemas/avro/cdc_{table}.avsc").read_text()))
        for table in TABLES
    }


# --- writing changes -------------------------------------------------------------------------------------------


def insert_users(conn: psycopg.Connection[Any], n: int, tier: str = "gold") -> list[str]:
    ids = [str(uuid.uuid4()) for _ in range(n)]
    with conn.transaction():
        for i, user_id in enumerate(ids):
            conn.execute(
                "INSERT INTO users VALUES (%s, %s, 'Ada', 'Lovelace', %s, 'GB', 'London', '2024-01-02', now(), now())",
                (user_id, f"u{i}-{user_id[:8]}@example.com", tier),
            )
    return ids


def insert_products(conn: psycopg.Connection[Any], n: int) -> list[str]:
    ids = [str(uuid.uuid4()) for _ in range(n)]
    with conn.transaction():
        for user_id in ids:
            conn.execute(
                "INSERT INTO products VALUES (%s, 'Widget', 'tools', 'hand tools', 'Acme', 12.50, 3.10, now(), now())",
                (user_id,),
            )
    return ids


def insert_transactions(conn: psycopg.Connection[Any], user_id: str, product_id: str, n: int) -> list[str]:
    ids = [str(uuid.uuid4()) for _ in range(n)]
    with conn.transaction():
        for tx_id in ids:
            conn.execute(
                "INSERT INTO transactions VALUES (%s, %s, %s, 2, 12.50, 0, 2.38, 27.38, 'card', '1 Main St', "
                "'created', now(), now())",
                (tx_id, user_id, product_id),
            )
    return ids


# --- tests -----------------------------------------------------------------------------------------------------


def test_snapshot_then_insert_update_delete_arrive_as_envelopes_in_order(target: Target) -> None:
    with psycopg.connect(target.dsn, autocommit=True) as conn:
        old_users = insert_users(conn, 5)
        old_products = insert_products(conn, 3)
        old_transactions = insert_transactions(conn, old_users[0], old_products[0], 4)

        traces = target.tmp / "spans.jsonl"
        report_file = target.tmp / "report.json"
        cdc = CdcProcess.start(target, OTEL_TRACES_FILE=str(traces), REPORT_FILE=str(report_file))
        wait_caught_up(cdc)
        assert cdc.get("/readyz")[0] == 200

        (new_user, gone_user) = insert_users(conn, 2)
        conn.execute("UPDATE users SET tier = 'silver' WHERE user_id = %s", (new_user,))
        conn.execute("UPDATE users SET tier = 'platinum', city = 'Paris' WHERE user_id = %s", (new_user,))
        conn.execute("UPDATE users SET city = 'Leeds' WHERE user_id = %s", (old_users[1],))
        conn.execute("DELETE FROM users WHERE user_id = %s", (gone_user,))
        conn.execute("UPDATE products SET price = 13.00 WHERE product_id = %s", (old_products[1],))
        (new_tx,) = insert_transactions(conn, new_user, old_products[2], 1)
        conn.execute("UPDATE transactions SET status = 'paid' WHERE transaction_id = %s", (new_tx,))
        conn.execute("DELETE FROM transactions WHERE transaction_id = %s", (old_transactions[3],))
        wait_caught_up(cdc)
        metrics = cdc.get("/metrics")[1]
        assert cdc.terminate() == 0, cdc.log()[-3000:]

    records = read_records(target)
    data = [r for r in records if r.value is not None]
    schema = contracts()

    # The snapshot: exactly the rows that existed, as op "r".
    snapshot = Counter(r.table for r in data if r.op == "r")
    assert snapshot == {"users": 5, "products": 3, "transactions": 4}
    assert {r.row_key for r in data if r.op == "r" and r.table == "users"} == set(old_users)
    assert all(r.envelope["source"]["snapshot"] in SNAPSHOT_MARKERS for r in data if r.op == "r")  # type: ignore[index]

    # Every record: headers agree with the envelope, the contract holds, keys are the primary key.
    for record in data:
        envelope = record.envelope
        assert envelope is not None
        assert record.op == envelope["op"]
        assert record.lsn == envelope["source"]["lsn"]
        assert re.fullmatch(rb"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}", record.headers["traceparent"])
        assert validate(envelope, schema[record.table], strict=True)
        assert json.loads(record.key) == {
            KEY_COLUMN[record.table]: (envelope["after"] or envelope["before"])[KEY_COLUMN[record.table]]
        }

    # Per key: one partition (the one Java's partitioner picks), changes in order, LSNs rising.
    for (table, _key), history in by_key(records).items():
        assert len({r.partition for r in history}) == 1
        assert history[0].partition == (murmur2(history[0].key) & 0x7FFFFFFF) % PARTITIONS[table]
        lsns = [r.lsn for r in history if r.op != "tombstone"]
        assert lsns == sorted(lsns)

    histories = by_key(records)
    mine = histories[("users", new_user)]
    assert [r.op for r in mine] == ["c", "u", "u"]
    assert [r.envelope["after"]["tier"] for r in mine] == ["gold", "silver", "platinum"]  # type: ignore[index]
    assert mine[2].envelope["before"]["tier"] == "silver"  # type: ignore[index]  # REPLICA IDENTITY FULL
    gone = histories[("users", gone_user)]
    assert [r.op for r in gone] == ["c", "d", "tombstone"]
    assert gone[1].envelope["before"]["email"].endswith("@example.com")  # type: ignore[index]  # whole old row
    assert gone[1].envelope["after"] is None  # type: ignore[index]
    assert gone[2].value is None and gone[2].key == gone[1].key and gone[2].lsn == gone[1].lsn
    assert [r.op for r in histories[("users", old_users[1])]] == ["r", "u"]
    price = histories[("products", old_products[1])]
    assert [r.op for r in price] == ["r", "u"]
    assert (price[1].envelope["before"]["price"], price[1].envelope["after"]["price"]) == ("12.50", "13.00")  # type: ignore[index]
    assert [r.op for r in histories[("transactions", new_tx)]] == ["c", "u"]
    assert [r.op for r in histories[("transactions", old_transactions[3])]] == ["r", "d", "tombstone"]

    # What the service says about itself matches what arrived.
    report = json.loads(report_file.read_text())
    assert report["events_by_table"] == {
        "users": {"r": 5, "c": 2, "u": 3, "d": 1, "tombstone": 1},
        "products": {"r": 3, "u": 1},
        "transactions": {"r": 4, "c": 1, "u": 1, "d": 1, "tombstone": 1},
    }
    assert report["events"] == len(data) == 22 and report["streaming"] is True
    assert 'lp_cdc_events_total{op="u",table="users"} 3.0' in metrics
    assert "lp_cdc_streaming 1.0" in metrics
    # Every change sampled (OTEL_SAMPLE_RATIO 1): each starts its own trace with a `send` span, which the
    # handler batch's span links to.
    spans = {s["span_id"]: s for s in (json.loads(line) for line in traces.read_text().splitlines())}
    linked = {link["span_id"] for s in spans.values() if s["name"] == "cdc.batch" for link in s["links"]}
    for record in data:
        _, trace_id, span_id, flags = record.headers["traceparent"].decode().split("-")
        send = spans[span_id]
        assert (send["trace_id"], send["parent_id"], send["kind"], flags) == (trace_id, None, "PRODUCER", "01")
        topic = target.topic(record.table)
        assert send["name"] == f"send {topic}" and send["attributes"]["messaging.destination.name"] == topic
        assert span_id in linked


def test_clean_restart_loses_nothing_repeats_nothing_and_does_not_snapshot_again(target: Target) -> None:
    with psycopg.connect(target.dsn, autocommit=True) as conn:
        seeded = insert_users(conn, 10)
        first = CdcProcess.start(target, "first", REPORT_FILE=str(target.tmp / "first.json"))
        wait_caught_up(first)
        added = insert_users(conn, 10)
        for user_id in added:
            conn.execute("UPDATE users SET city = 'Leeds' WHERE user_id = %s", (user_id,))
        for user_id in added[:5]:
            conn.execute("DELETE FROM users WHERE user_id = %s", (user_id,))
        wait_caught_up(first)

        # drop-stale never touches an active slot (the running service's), even when it is not the configured one.
        listed = subprocess.run(
            [sys.executable, "-m", "services.cdc", "slots", "drop-stale", "--older-than", "0"],
            env={**target.env(), "CDC_SLOT_NAME": "some_other_slot"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert listed.returncode == 0, listed.stderr
        assert target.slot not in listed.stdout

        assert first.terminate() == 0, first.log()[-3000:]
        assert "received SIGTERM" in first.log()

        # Changes while the service is down are picked up from the slot on the next start.
        later = insert_users(conn, 5)
        for user_id in seeded[:5]:
            conn.execute("UPDATE users SET tier = 'silver' WHERE user_id = %s", (user_id,))
        second = CdcProcess.start(target, "second", REPORT_FILE=str(target.tmp / "second.json"))
        wait_caught_up(second)
        assert second.terminate() == 0, second.log()[-3000:]

    data = [r for r in read_records(target) if r.value is not None]
    ops = Counter(r.op for r in data)
    assert ops == {"r": 10, "c": 15, "u": 15, "d": 5}  # exact: nothing lost, nothing repeated
    assert len({(r.row_key, r.lsn) for r in data}) == len(data)
    assert {r.row_key for r in data if r.op == "c"} == set(added) | set(later)
    second_report = json.loads((target.tmp / "second.json").read_text())
    assert second_report["events_by_table"] == {"users": {"c": 5, "u": 5}}  # no second snapshot
    assert json.loads((target.tmp / "first.json").read_text())["events_by_table"]["users"]["r"] == 10


def test_kill_9_during_a_stream_loses_nothing_and_replays_only_with_the_same_lsn(target: Target) -> None:
    changes: list[tuple[str, str, str]] = []  # (op, user_id, city) in commit order
    stop_writing = threading.Event()

    def write(total: int) -> None:
        with psycopg.connect(target.dsn, autocommit=True) as conn:
            for i in range(total):
                if stop_writing.is_set():
                    return
                (user_id,) = insert_users(conn, 1)
                changes.append(("c", user_id, "London"))
                if i % 2 == 0:
                    city = f"city-{i}"
                    conn.execute("UPDATE users SET city = %s WHERE user_id = %s", (city, user_id))
                    changes.append(("u", user_id, city))
                time.sleep(0.002)

    first = CdcProcess.start(target, "first")
    wait_caught_up(first)
    writer = threading.Thread(target=write, args=(2400,))
    writer.start()
    try:
        while len(changes) < 1200:  # mid-stream
            first.check_alive()
            time.sleep(0.05)
        first.kill()
        killed_at = len(changes)
        second = CdcProcess.start(target, "second")
        writer.join(120)
    finally:
        stop_writing.set()
        writer.join()
    wait_caught_up(second)
    assert second.terminate() == 0, second.log()[-3000:]
    assert killed_at < len(changes) == 3600

    data = [r for r in read_records(target) if r.value is not None]
    assert all(r.lsn == r.envelope["source"]["lsn"] for r in data)  # type: ignore[index]
    arrived = Counter((r.op, r.row_key, r.envelope["after"]["city"]) for r in data)  # type: ignore[index]
    missing = [change for change in changes if change not in arrived]
    assert not missing, f"{len(missing)} changes lost, e.g. {missing[:3]}"
    # Duplicates exist only as replays: same key and LSN, byte-identical envelope apart from processing times.
    by_identity: dict[tuple[str, int], list[Record]] = defaultdict(list)
    for record in data:
        by_identity[(record.row_key, record.lsn)].append(record)
    assert len(by_identity) == len(changes)  # exactly one distinct (key, lsn) per change
    for copies in by_identity.values():
        first_copy = copies[0].envelope
        for copy in copies[1:]:
            assert {k: v for k, v in copy.envelope.items() if not k.startswith("ts_")} == {  # type: ignore[union-attr]
                k: v
                for k, v in first_copy.items()  # type: ignore[union-attr]
                if not k.startswith("ts_")
            }
    for (_table, _key), history in by_key(data).items():  # per key, a replay never reorders: LSNs never go back
        firsts = list(dict.fromkeys(r.lsn for r in history))
        assert firsts == sorted(firsts)
    replayed = len(data) - len(by_identity)
    print(f"kill -9 after {killed_at} of {len(changes)} changes: {len(data)} records, {replayed} replayed")
    assert not [r for r in data if r.op == "r"]  # empty table at start; no snapshot again after the crash


def test_failed_delivery_stops_loudly_and_the_batch_is_replayed(target: Target, stack_state_dir: Path) -> None:
    broker = LocalStack(StackSettings.with_free_ports(state_dir=stack_state_dir), only=["broker"])
    broker.start()
    try:
        create_topics(broker.bootstrap_servers, target.prefix)
        target = Target(target.dsn, broker.bootstrap_servers, target.prefix, target.slot, target.tmp)
        first = CdcProcess.start(target, "first", CDC_FLUSH_TIMEOUT_S="3")
        wait_caught_up(first)
        broker.stop()  # Kafka goes away: the next flush (a heartbeat at the latest) cannot be acknowledged
        with psycopg.connect(target.dsn, autocommit=True) as conn:
            written = insert_users(conn, 5)
        assert first.popen is not None
        assert first.popen.wait(60) == 1
        assert "batch delivery failed, offsets not committed" in first.log()

        broker.start()  # a fresh in-memory broker, a new cluster id: everything produced before is gone
        create_topics(broker.bootstrap_servers, target.prefix)
        second = CdcProcess.start(target, "second")
        wait_caught_up(second)
        assert second.terminate() == 0, second.log()[-3000:]
        # The offsets belong to the old cluster, so CDC starts over with a snapshot: the rows of the failed
        # batch arrive (as snapshot reads) together with everything the new, empty log never received.
        assert "offsets belong to another Kafka cluster" in second.log()
        arrived = {r.row_key for r in read_records(target) if r.op in ("c", "r")}
        assert set(written) <= arrived
    finally:
        broker.stop()


def test_an_engine_that_stops_with_an_error_fails_the_service(target: Target) -> None:
    """Errors only Debezium detects (here an invalid snapshot.mode) reach the completion callback: exit 1."""
    shared = (REPO_ROOT / "deploy/debezium/postgres-connector.properties").read_text()
    broken = target.tmp / "broken.properties"
    broken.write_text(shared.replace("snapshot.mode=initial", "snapshot.mode=sometimes"))
    cdc = CdcProcess.start(target, CDC_CONNECTOR_PROPERTIES=str(broken))
    assert cdc.popen is not None
    assert cdc.popen.wait(60) == 1
    (failure,) = [json.loads(line) for line in cdc.log().splitlines() if '"logger": "cdc"' in line and "error" in line]
    assert failure["msg"] == "failed"
    assert "CdcFailed: Debezium engine stopped:" in failure["exc"] and "snapshot.mode" in failure["exc"], failure


@pytest.mark.parametrize("problem", ["unreachable", "missing_table", "no_replication", "missing_topic"])
def test_preflight_errors_are_one_clear_line_and_exit_1(target: Target, stack: LocalStack, problem: str) -> None:
    env = target.env(HTTP_PORT="0")
    if problem == "unreachable":
        (closed,) = pick_free_ports(1)
        env["POSTGRES_DSN"] = f"postgresql://postgres:hunter2@127.0.0.1:{closed}/shop"
        env["DEPENDENCY_WAIT_S"] = "2"
        expected = f"POSTGRES_DSN=127.0.0.1:{closed} unreachable after 2 s"
    elif problem == "missing_table":
        env["CDC_TABLES"] = "users,public.nope"
        expected = "table public.nope not found in database"
    elif problem == "no_replication":
        role = f"lp_norepl_{uuid.uuid4().hex[:6]}"
        with psycopg.connect(target.dsn, autocommit=True) as conn:
            conn.execute(f"CREATE ROLE {role} LOGIN")
        env["POSTGRES_DSN"] = make_conninfo(target.dsn, user=role)
        expected = f"user '{role}' lacks the REPLICATION attribute"
    else:
        env["CDC_TOPIC_PREFIX"] = f"absent{uuid.uuid4().hex[:6]}"
        expected = "not found: apply the declarations first"
    done = subprocess.run([sys.executable, "-m", "services.cdc"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    errors = [json.loads(line) for line in done.stderr.splitlines() if '"level": "error"' in line]
    assert len(errors) == 1 and expected in errors[0]["msg"], done.stderr
    assert "\n" not in errors[0]["msg"] and "hunter2" not in done.stderr
    assert "JVM" not in done.stderr and "io.debezium" not in done.stderr  # refused before the JVM started


def test_wal_level_replica_is_refused(target: Target, stack_state_dir: Path) -> None:
    own = LocalStack(StackSettings.with_free_ports(state_dir=stack_state_dir), only=["postgres"])
    own.start()
    try:
        with psycopg.connect(own.postgres_dsn, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET wal_level = replica")  # postgresql.auto.conf wins over the stack's conf
        own.stop()
        own.start()
        with OltpWriter.connect(own.postgres_dsn) as writer:
            writer.apply_schema()
        env = target.env(HTTP_PORT="0", POSTGRES_DSN=own.postgres_dsn)
        done = subprocess.run(
            [sys.executable, "-m", "services.cdc"], env=env, capture_output=True, text=True, timeout=60
        )
    finally:
        own.stop()
    assert done.returncode == 1
    assert "wal_level is 'replica', CDC needs 'logical'" in done.stderr


def test_slots_list_and_drop_stale(target: Target) -> None:
    with psycopg.connect(target.dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (f"{target.slot}_stale",))
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (target.slot,))

    def slots(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "services.cdc", "slots", *args],
            env=target.env(),
            capture_output=True,
            text=True,
            timeout=60,
        )

    listed = slots("list")
    assert listed.returncode == 0, listed.stderr
    assert f"{target.slot} (configured)" in listed.stdout and f"{target.slot}_stale" in listed.stdout
    assert slots("drop-stale").stdout.startswith("no stale slot")  # default: inactive for an hour
    dry = slots("drop-stale", "--older-than", "0", "--dry-run")
    assert "would drop 1 slot" in dry.stdout and f"{target.slot}_stale" in dry.stdout
    dropped = slots("drop-stale", "--older-than", "0")
    assert dropped.returncode == 0 and f"dropped {target.slot}_stale" in dropped.stdout
    with psycopg.connect(target.dsn, autocommit=True) as conn:
        remaining = {r[0] for r in conn.execute("SELECT slot_name FROM pg_replication_slots").fetchall()}
    assert target.slot in remaining and f"{target.slot}_stale" not in remaining
