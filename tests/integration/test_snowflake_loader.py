"""The Snowflake loader against the real local stack: Iceberg on SeaweedFS S3 (written by the archiver's own
committer) and the fakesnow server, through the real snowflake-connector-python.

Each scenario has its own Iceberg namespace and its own Snowflake database: the session stack is shared.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pytest

from services.archiver.catalog import ensure_table
from services.archiver.committer import TableCommitter
from services.archiver.maintenance import compact
from services.archiver.rows import AvroRowBuilder, RecordColumns
from services.archiver.schemas import arrow_schema, default_tables
from services.kit.avro import AvroSerializer, SchemaRepository
from services.kit.exits import ExitCode
from services.snowflake_loader.loader import InjectedCrash, Loader, migrate
from services.snowflake_loader.settings import LoaderSettings
from services.snowflake_loader.sql import attributes_hash, user_key
from services.stack import LocalStack
from services.stores.iceberg import CatalogSettings, load_table, open_catalog
from services.stores.snowflake import Warehouse, connect
from services.testing.net import free_port, http_status
from services.testing.processes import kill, log_tails, start_module, stop, wait_for
from services.testing.samples import START, processed_events, processed_transactions

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
TABLES = (
    "RAW.USER_EVENTS", "RAW.TRANSACTIONS", "STAGING.EVENTS_CLEANED", "STAGING.TRANSACTION_CHANGES",
    "MARTS.DIM_USERS", "MARTS.USER_SESSIONS", "MARTS.DAILY_METRICS", "MARTS.FACT_TRANSACTIONS",
    "MARTS.FACT_TRANSACTION_STATUS_HISTORY", "CONTROL.LOADS", "CONTROL.PENDING",
)  # fmt: skip
WALL_CLOCK = {"LOADED_AT", "STAGED_AT"}  # when a row was written: the only columns two runs may differ in
PASSWORD = "pw-" + uuid.uuid4().hex  # fakesnow accepts any password: a distinctive one to look for in logs
TIER_USER = "user-tier-change"


class Lake:
    """One Iceberg namespace, filled through the archiver's committer (the path the archiver itself takes)."""

    def __init__(self, stack: LocalStack) -> None:
        self.stack = stack
        self.name = f"sf{uuid.uuid4().hex[:10]}"
        self.env = {
            **stack.env(),
            "ICEBERG_CATALOG": "sql",
            "ICEBERG_SQL_URI": f"sqlite:///{stack.state_dir}/{self.name}-catalog.db",
            "ICEBERG_NAMESPACE": self.name,
        }
        self.settings = CatalogSettings.from_env(self.env)
        self.catalog = open_catalog(self.settings)
        self.repository = SchemaRepository.load()
        for spec in default_tables()[:2]:
            ensure_table(self.catalog, self.settings, spec, self.repository)
        self.next_offset = {"user_events": 0, "transactions": 0}
        self.topic_ids: dict[str, str] = {}  # table -> its topic's Kafka id, when the test gives one

    def recreate(self, name: str, topic_id: str) -> None:
        """The table's topic deleted and created again (or a new local broker): a new id, offsets from 0."""
        self.topic_ids[name] = topic_id
        self.next_offset[name] = 0

    def table(self, name: str) -> Any:
        return load_table(self.catalog, self.settings, name)

    def append(self, name: str, records: list[dict[str, Any]]) -> None:
        """One archiver commit (one snapshot) of `records` at the next offsets of partition 0 of a topic."""
        subject = {"user_events": "processed_event", "transactions": "processed_transaction"}[name]
        serialize = AvroSerializer(self.repository[subject])
        topic = f"{self.name}.{name}"
        committer = TableCommitter(self.table(name), committer_id="test")
        if name in self.topic_ids:
            committer.topic_ids = {topic: self.topic_ids[name]}
        committer.claim([(topic, 0)])
        builder = AvroRowBuilder(self.repository, subject, arrow_schema(committer.table.schema()))
        columns = RecordColumns()
        for record in records:
            columns.append(topic, 0, self.next_offset[name], None, None, serialize(record), None)
            self.next_offset[name] += 1
        rows, rejected = builder.build(columns)
        assert not rejected
        committer.add(rows, columns.consumed())
        assert committer.commit() is not None

    def loader_env(self, database: str, **extra: str) -> dict[str, str]:
        return {
            **self.env,
            "SNOWFLAKE_PASSWORD": PASSWORD,
            "SNOWFLAKE_DATABASE": database,
            "SNOWFLAKE_CREATE_DATABASE": "true",
            "SNOWFLAKE_NETWORK_TIMEOUT_S": "60",
            "LOG_FORMAT": "text",
            **extra,
        }

    def run_once(self, database: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "services.snowflake_loader", "run-once"],
            env={**os.environ, **self.loader_env(database, **extra)},
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            timeout=300,
        )

    def summary(self, database: str, **extra: str) -> dict[str, Any]:
        done = self.run_once(database, **extra)
        assert done.returncode == 0, done.stderr[-4000:]
        return json.loads(done.stdout)["tables"]

    def loader(self, database: str, **extra: str) -> Loader:
        """An in-process loader (for crashes that must roll back rather than kill the process)."""
        env = self.loader_env(database, **extra)
        settings = LoaderSettings(**{k.lower(): v for k, v in env.items() if k.lower() in LoaderSettings.model_fields})
        warehouse = Warehouse(connect(settings))
        migrate(warehouse, settings)
        return Loader(settings, warehouse, self.catalog, crash=_raise_crash)


def _raise_crash(step: str) -> None:
    raise InjectedCrash(ExitCode.INJECTED_CRASH)


def events(count: int, seed: int, start_minutes: int = 0) -> list[dict[str, Any]]:
    start = START + timedelta(minutes=start_minutes)
    return [record for _, record in processed_events(count, seed=seed, start=start)]


def tier_events(tiers: list[tuple[str, str]], start_minutes: int) -> list[dict[str, Any]]:
    """Events of TIER_USER, one a minute, with the given (tier, country) each."""
    base = events(len(tiers), seed=5, start_minutes=start_minutes)
    out = []
    for i, (record, (tier, country)) in enumerate(zip(base, tiers, strict=True)):
        when = START + timedelta(minutes=start_minutes + i)
        out.append(
            {
                **record,
                "event_id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{TIER_USER}/{start_minutes}/{i}")),
                "user_id": TIER_USER,
                "user_tier": tier,
                "user_country": country,
                "event_time": when,
                "event_date": when.date(),
            }
        )
    return out


def warehouse_for(stack: LocalStack, database: str) -> Warehouse:
    import snowflake.connector

    warnings.filterwarnings("ignore", message=".*incompatible version of 'pyarrow'.*")
    kwargs = {**stack.snowflake_connect_kwargs(), "database": database, "network_timeout": 60}
    return Warehouse(snowflake.connector.connect(**kwargs))


def dump(stack: LocalStack, database: str, wall_clock: bool = True) -> dict[str, list[tuple[Any, ...]]]:
    """Every loader table, fully sorted (`wall_clock=False`: without LOADED_AT/STAGED_AT)."""
    warehouse = warehouse_for(stack, database)
    try:
        out = {}
        for table in TABLES:
            schema, name = table.split(".")
            columns = [
                c
                for (c,) in warehouse.query(
                    "SELECT column_name FROM information_schema.columns WHERE table_schema = %(s)s "
                    "AND table_name = %(t)s ORDER BY ordinal_position",
                    {"s": schema, "t": name},
                )
                if wall_clock or c not in WALL_CLOCK
            ]
            listed = ", ".join(columns)
            out[table] = warehouse.query(f"SELECT {listed} FROM {table} ORDER BY {listed}")
        return out
    finally:
        warehouse.close()


def counts(stack: LocalStack, database: str) -> dict[str, int]:
    warehouse = warehouse_for(stack, database)
    try:
        return {table: int(warehouse.scalar(f"SELECT COUNT(*) FROM {table}")) for table in TABLES}
    finally:
        warehouse.close()


# --- a lake loaded once, cleanly: the reference --------------------------------------------------------------------
@pytest.fixture(scope="module")
def lake(stack: LocalStack) -> Lake:
    lake = Lake(stack)
    lake.append("user_events", events(1500, seed=11))
    lake.append("user_events", events(700, seed=12, start_minutes=30) + events(20, seed=11))  # 20 repeated ids
    lake.append("transactions", list(processed_transactions(240)))
    return lake


@pytest.fixture(scope="module")
def clean(lake: Lake) -> Iterator[str]:
    database = f"CLEAN_{lake.name.upper()}"
    tables = lake.summary(database)
    assert tables["user_events"]["status"] == tables["transactions"]["status"] == "loaded"
    yield database


def test_a_load_matches_the_lake_and_the_contract(stack: LocalStack, lake: Lake, clean: str) -> None:
    table = lake.table("user_events").scan().to_arrow()
    ids = table.column("event_id")
    assert len(ids) == 2220 and pc.count_distinct(ids).as_py() == 2200
    rows = counts(stack, clean)
    assert rows["RAW.USER_EVENTS"] == 2220  # RAW keeps every archived row
    assert rows["STAGING.EVENTS_CLEANED"] == 2200  # one row per event_id
    assert rows["RAW.TRANSACTIONS"] == rows["STAGING.TRANSACTION_CHANGES"] == 240
    assert rows["MARTS.FACT_TRANSACTIONS"] == 60 and rows["CONTROL.PENDING"] == 0
    warehouse = warehouse_for(stack, clean)
    try:
        # What reconciliation compares: count and sum(AMOUNT) per (EVENT_DATE, EVENT_TYPE), against the lake.
        got = {
            # fakesnow returns SUM of a NUMBER(18,2) as a float: back to cents
            (str(d), t): (int(n), Decimal(a or 0).quantize(Decimal("0.01")))
            for d, t, n, a in warehouse.query(
                "SELECT EVENT_DATE, EVENT_TYPE, COUNT(*), SUM(AMOUNT) FROM STAGING.EVENTS_CLEANED GROUP BY 1, 2"
            )
        }
        unique = {r["event_id"]: r for r in table.to_pylist()}
        want: dict[tuple[str, str], tuple[int, Decimal]] = {}
        for r in unique.values():
            n, a = want.get((str(r["event_date"]), r["event_type"]), (0, Decimal("0.00")))
            amount = Decimal(str(r["amount"])).quantize(Decimal("0.01")) if r["amount"] is not None else Decimal(0)
            want[(str(r["event_date"]), r["event_type"])] = (n + 1, a + amount)
        assert got == want
        assert (
            warehouse.query("SELECT USER_ID FROM MARTS.DIM_USERS GROUP BY USER_ID HAVING COUNT_IF(IS_CURRENT) <> 1")
            == []
        )
        assert warehouse.scalar("SELECT COUNT(*) FROM MARTS.DIM_USERS WHERE IS_CURRENT AND VALID_TO IS NOT NULL") == 0
        # A transaction's life cycle c -> u(paid) -> u(shipped) -> d, from the CDC changes ordered by LSN.
        facts = warehouse.query(
            "SELECT INITIAL_STATUS, CURRENT_STATUS, IS_DELETED, CHANGE_COUNT, COUNT(*) FROM MARTS.FACT_TRANSACTIONS "
            "GROUP BY 1, 2, 3, 4"
        )
        assert facts == [("created", "shipped", True, 4, 60)]
        history = warehouse.query(
            "SELECT OP, STATUS, PREVIOUS_STATUS, IS_CURRENT, COUNT(*) FROM MARTS.FACT_TRANSACTION_STATUS_HISTORY "
            "GROUP BY 1, 2, 3, 4 ORDER BY 1, 2"
        )
        assert sorted(history) == sorted(
            [
                ("c", "created", None, False, 60),
                ("u", "paid", "created", False, 60),
                ("u", "shipped", "paid", False, 60),
                ("d", "shipped", "shipped", True, 60),
            ]
        )
        daily = warehouse.query("SELECT EVENTS, SESSIONS, SESSION_TO_PURCHASE_RATE FROM MARTS.DAILY_METRICS")
        assert len(daily) == 1 and daily[0][0] == 2200 and 0 < daily[0][2] <= 1
        sessions = warehouse.scalar("SELECT SUM(EVENTS) FROM MARTS.USER_SESSIONS")
        assert sessions == warehouse.scalar("SELECT COUNT(*) FROM STAGING.EVENTS_CLEANED WHERE SESSION_ID IS NOT NULL")
    finally:
        warehouse.close()


def test_running_twice_leaves_identical_tables(stack: LocalStack, lake: Lake, clean: str) -> None:
    before = dump(stack, clean)
    tables = lake.summary(clean)
    assert {t["status"] for t in tables.values()} == {"up-to-date"}
    assert dump(stack, clean) == before


def test_crash_between_copy_and_merge_then_rerun_matches_a_clean_run(stack: LocalStack, lake: Lake, clean: str) -> None:
    database = f"CRASH_{lake.name.upper()}"
    crashed = lake.run_once(database, SNOWFLAKE_LOADER_FAIL_AFTER="copy")
    assert crashed.returncode == 86, crashed.stderr[-3000:]
    rows = counts(stack, database)
    assert rows["RAW.USER_EVENTS"] == 2220 and rows["CONTROL.PENDING"] == 1  # copied, never merged
    assert rows["STAGING.EVENTS_CLEANED"] == rows["CONTROL.LOADS"] == 0
    tables = lake.summary(database)
    assert tables["user_events"]["status"] == tables["transactions"]["status"] == "loaded"
    assert dump(stack, database, wall_clock=False) == dump(stack, clean, wall_clock=False)


def test_crash_inside_the_merge_transaction_rolls_back_and_a_rerun_matches(
    stack: LocalStack, lake: Lake, clean: str
) -> None:
    database = f"MERGECRASH_{lake.name.upper()}"
    loader = lake.loader(database, SNOWFLAKE_LOADER_FAIL_AFTER="merge")
    try:
        with pytest.raises(InjectedCrash):
            loader.load_table("user_events")
        rows = counts(stack, database)
        assert rows["RAW.USER_EVENTS"] == 2220 and rows["CONTROL.PENDING"] == 1
        assert rows["STAGING.EVENTS_CLEANED"] == rows["MARTS.DIM_USERS"] == rows["CONTROL.LOADS"] == 0
    finally:
        loader.warehouse.close()
    tables = lake.summary(database)
    assert tables["user_events"]["status"] == "loaded"
    assert dump(stack, database, wall_clock=False) == dump(stack, clean, wall_clock=False)


def test_secrets_never_reach_the_output(lake: Lake, clean: str) -> None:
    done = lake.run_once(clean, LOG_LEVEL="DEBUG")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "connected to Snowflake" in done.stderr  # it did log, at DEBUG
    assert PASSWORD not in done.stdout + done.stderr


# --- incremental loads, compaction, SCD2 -------------------------------------------------------------------------
def test_new_snapshots_load_incrementally_and_a_tier_change_makes_scd2_rows(stack: LocalStack) -> None:
    lake = Lake(stack)
    database = f"INCR_{lake.name.upper()}"
    first = tier_events([("silver", "DE")] * 3 + [("gold", "DE")] * 3 + [("gold", "FR")] * 2, start_minutes=0)
    lake.append("user_events", events(400, seed=21) + first)
    assert lake.summary(database)["user_events"]["rows"] == 408

    # A compaction adds a snapshot but no rows: nothing is loaded again.
    lake.append("user_events", events(100, seed=22, start_minutes=20))
    assert lake.summary(database)["user_events"]["rows"] == 100
    report = compact(lake.table("user_events"), small_file_bytes=64 * 1024 * 1024)
    assert report.files_rewritten >= 2 and report.snapshot_id is not None
    assert lake.summary(database)["user_events"]["status"] == "up-to-date"

    # A later tier change arrives in a new snapshot, after a crash between COPY and MERGE of it.
    later = tier_events([("platinum", "FR")] * 2, start_minutes=60)
    lake.append("user_events", later)
    crashed = lake.run_once(database, SNOWFLAKE_LOADER_FAIL_AFTER="copy", SNOWFLAKE_LOADER_TABLES="user_events")
    assert crashed.returncode == 86
    lake.append("user_events", events(50, seed=23, start_minutes=90))  # and more arrives before the rerun
    loaded = lake.summary(database)["user_events"]
    assert loaded["status"] == "loaded" and loaded["rows"] == 52 and not loaded["full_read"]

    rows = counts(stack, database)
    assert rows["RAW.USER_EVENTS"] == 408 + 100 + 52  # the crashed batch's rows were replaced, not kept twice
    assert rows["STAGING.EVENTS_CLEANED"] == 560 and rows["CONTROL.PENDING"] == 0 and rows["CONTROL.LOADS"] == 3
    warehouse = warehouse_for(stack, database)
    try:
        versions = warehouse.query(
            "SELECT USER_KEY, USER_TIER, USER_COUNTRY, ATTRIBUTES_HASH, TO_VARCHAR(VALID_FROM), "
            "TO_VARCHAR(VALID_TO), IS_CURRENT FROM MARTS.DIM_USERS WHERE USER_ID = %(u)s ORDER BY VALID_FROM",
            {"u": TIER_USER},
        )
        assert (
            warehouse.query("SELECT USER_ID FROM MARTS.DIM_USERS GROUP BY USER_ID HAVING COUNT_IF(IS_CURRENT) <> 1")
            == []
        )
    finally:
        warehouse.close()
    changes = [first[0], first[3], first[6], later[0]]
    expected = []
    for i, event in enumerate(changes):
        valid_to = changes[i + 1]["event_time"] if i + 1 < len(changes) else None
        expected.append(
            (
                user_key(TIER_USER, event["event_id"]),
                event["user_tier"],
                event["user_country"],
                attributes_hash(event["user_tier"], event["user_country"]),
                event["event_time"].strftime("%Y-%m-%d %H:%M:%S"),
                valid_to.strftime("%Y-%m-%d %H:%M:%S") if valid_to else None,
                valid_to is None,
            )
        )
    assert versions == expected

    # The same lake loaded in one go, into a fresh database, gives the same marts.
    fresh = f"FRESH_{lake.name.upper()}"
    lake.summary(fresh)
    ours, theirs = dump(stack, database, wall_clock=False), dump(stack, fresh, wall_clock=False)
    for table in ("STAGING.EVENTS_CLEANED", "MARTS.DIM_USERS", "MARTS.USER_SESSIONS", "MARTS.DAILY_METRICS"):
        if table == "STAGING.EVENTS_CLEANED":  # BATCH_ID says which batch wrote the row: batches differ here
            strip = [tuple(v for v in row if not str(v).startswith("user_events-")) for row in ours[table]]
            assert strip == [tuple(v for v in row if not str(v).startswith("user_events-")) for row in theirs[table]]
        else:
            assert ours[table] == theirs[table], table


# --- a re-created topic: the same offsets again, for other rows ---------------------------------------------------
def raw_positions(stack: LocalStack, database: str, table: str, key: str) -> list[tuple[Any, ...]]:
    warehouse = warehouse_for(stack, database)
    try:
        return sorted(
            (str(t), int(p), int(o), str(k))
            for t, p, o, k in warehouse.query(f"SELECT KAFKA_TOPIC, KAFKA_PARTITION, KAFKA_OFFSET, {key} FROM {table}")
        )
    finally:
        warehouse.close()


def lake_positions(lake: Lake, name: str, key: str) -> list[tuple[Any, ...]]:
    rows = lake.table(name).scan(selected_fields=("_kafka_topic", "_kafka_partition", "_kafka_offset", key))
    return sorted(
        (r["_kafka_topic"], r["_kafka_partition"], r["_kafka_offset"], str(r[key])) for r in rows.to_arrow().to_pylist()
    )


def test_a_recreated_topic_adds_only_the_rows_raw_lacks_even_across_a_crash(stack: LocalStack) -> None:
    lake = Lake(stack)
    database = f"RECREATE_{lake.name.upper()}"
    lake.recreate("user_events", "incarnation-1")
    lake.append("user_events", events(300, seed=41))
    tables = lake.summary(database, SNOWFLAKE_LOADER_TABLES="user_events")
    assert tables["user_events"]["rows"] == 300 and not tables["user_events"]["rereads"]

    # The old topic's last rows are archived after that load; then the topic is re-created (a new local broker)
    # and its new events are archived at offsets 0.. again, where RAW holds the old topic's rows.
    lake.append("user_events", events(50, seed=42, start_minutes=20))  # offsets 300-349 of incarnation 1
    lake.recreate("user_events", "incarnation-2")
    lake.append("user_events", events(120, seed=43, start_minutes=40))  # offsets 0-119 of incarnation 2
    lake.append("user_events", events(30, seed=44, start_minutes=60))  # offsets 120-149
    # A crash between COPY and MERGE of the re-read batch, then the rerun: the PENDING rows are replaced.
    crashed = lake.run_once(database, SNOWFLAKE_LOADER_FAIL_AFTER="copy", SNOWFLAKE_LOADER_TABLES="user_events")
    assert crashed.returncode == 86, crashed.stderr[-3000:]
    assert counts(stack, database)["CONTROL.PENDING"] == 1
    loaded = lake.summary(database, SNOWFLAKE_LOADER_TABLES="user_events")["user_events"]
    assert loaded["status"] == "loaded" and loaded["rereads"] and not loaded["full_read"]
    assert loaded["rows_read"] == 500 and loaded["rows"] == 50 + 120 + 30  # the 300 loaded before are skipped

    # The transactions' topic too (identity: position and change key), loaded with the events from here on.
    lake.recreate("transactions", "incarnation-1")
    lake.append("transactions", list(processed_transactions(40, seed=45)))
    assert lake.summary(database)["transactions"]["rows"] == 40
    lake.recreate("transactions", "incarnation-2")
    lake.append("transactions", list(processed_transactions(24, seed=46)))
    # Incarnation 2 goes on at offsets 150.. where the lake still holds the old topic's rows 150-349: "at or past
    # the offsets" reads those again, so its batches re-read until its offsets pass 350.
    lake.append("user_events", events(10, seed=47, start_minutes=80))
    tables = lake.summary(database)
    assert tables["transactions"]["rereads"] and tables["transactions"]["rows"] == 24
    assert tables["user_events"]["rereads"] and tables["user_events"]["rows"] == 10
    lake.append("user_events", events(200, seed=48, start_minutes=100))  # offsets 160-359
    loaded = lake.summary(database, SNOWFLAKE_LOADER_TABLES="user_events")["user_events"]
    assert loaded["rereads"] and loaded["rows"] == 200
    lake.append("user_events", events(5, seed=49, start_minutes=120))  # past every old offset: a plain COPY
    loaded = lake.summary(database, SNOWFLAKE_LOADER_TABLES="user_events")["user_events"]
    assert not loaded["rereads"] and loaded["rows_read"] == loaded["rows"] == 5
    assert lake.summary(database)["user_events"]["status"] == "up-to-date"

    rows = counts(stack, database)
    iceberg_events = lake_positions(lake, "user_events", "event_id")
    assert len(iceberg_events) == 715 == len({key for *_, key in iceberg_events})
    assert rows["RAW.USER_EVENTS"] == rows["STAGING.EVENTS_CLEANED"] == 715 and rows["CONTROL.PENDING"] == 0
    assert raw_positions(stack, database, "RAW.USER_EVENTS", "EVENT_ID") == iceberg_events  # each row once
    changes = lake.table("transactions").scan().to_arrow()
    assert changes.num_rows == 64 and rows["RAW.TRANSACTIONS"] == rows["STAGING.TRANSACTION_CHANGES"] == 64
    assert raw_positions(stack, database, "RAW.TRANSACTIONS", "TRANSACTION_ID") == lake_positions(
        lake, "transactions", "transaction_id"
    )
    warehouse = warehouse_for(stack, database)
    try:
        assert warehouse.scalar("SELECT COUNT(DISTINCT EVENT_ID) FROM RAW.USER_EVENTS") == 715
        assert warehouse.scalar("SELECT COUNT(*) FROM CONTROL.INCOMING_USER_EVENTS") == 0  # scratch only
        assert warehouse.scalar("SELECT SUM(ROWS_LOADED) FROM CONTROL.LOADS WHERE TABLE_NAME = 'user_events'") == 715
    finally:
        warehouse.close()


# --- sessions that heal: the warehouse restarts, the warehouse hangs ------------------------------------------------
class OwnWarehouse:
    """A fakesnow server of the test's own, persisting its databases to a folder: restarted or frozen here
    without disturbing the session stack's."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.log = folder / "fakesnow.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = start_module(
            "services.stack._fakesnow_server",
            *("--host", "127.0.0.1", "--port", str(self.port), "--db-path", str(self.folder / "db")),
            env={},
            log_path=self.log,
            append=True,
        )
        wait_for(lambda: tcp_open(self.port), 60, "fakesnow to listen", self.log, process=self.process)

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)  # a frozen server cannot act on SIGTERM
            stop(self.process, timeout=20)

    def env(self) -> dict[str, str]:
        return {"SNOWFLAKE_HOST": "127.0.0.1", "SNOWFLAKE_PORT": str(self.port), "SNOWFLAKE_PROTOCOL": "http"}

    def raw_rows(self, database: str) -> int | None:
        """Rows in RAW.USER_EVENTS (None while the warehouse or the table is not there)."""
        import snowflake.connector

        try:
            conn = snowflake.connector.connect(
                account="test", user="test", password=PASSWORD, host="127.0.0.1", port=self.port,
                protocol="http", database=database, login_timeout=5, network_timeout=5,
            )  # fmt: skip
        except Exception:
            return None
        try:
            return int(Warehouse(conn).scalar("SELECT COUNT(*) FROM RAW.USER_EVENTS"))
        except Exception:
            return None
        finally:
            conn.close()


def tcp_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def own_warehouse(tmp_path: Path) -> Iterator[OwnWarehouse]:
    warehouse = OwnWarehouse(tmp_path)
    warehouse.start()
    yield warehouse
    warehouse.stop()


def start_loader(lake: Lake, warehouse: OwnWarehouse, database: str, log: Path, **extra: str) -> tuple[Any, int]:
    port = free_port()
    env = lake.loader_env(
        database,
        **warehouse.env(),
        HTTP_PORT=str(port),
        SNOWFLAKE_LOADER_INTERVAL_S="1",
        SNOWFLAKE_LOADER_TABLES="user_events",
        SNOWFLAKE_NETWORK_TIMEOUT_S="5",  # a statement to a stopped warehouse fails within about this
        SNOWFLAKE_LOGIN_TIMEOUT_S="5",
        **extra,
    )
    return start_module("services.snowflake_loader", "run", env=env, log_path=log), port


def test_the_loader_reconnects_after_the_warehouse_restarts_and_catches_up_alone(
    stack: LocalStack, own_warehouse: OwnWarehouse, tmp_path: Path
) -> None:
    lake = Lake(stack)
    database = f"HEAL_{lake.name.upper()}"
    lake.append("user_events", events(300, seed=31))
    log = tmp_path / "loader.log"
    loader, port = start_loader(lake, own_warehouse, database, log, HEALTH_PROBE_TIMEOUT_S="2")
    try:
        wait_for(lambda: "loaded batch" in log.read_text(), 180, "the first load", log, process=loader)
        assert own_warehouse.raw_rows(database) == 300
        wait_for(lambda: http_status(port, "/readyz", timeout=10) == 200, 60, "ready", log, process=loader)

        own_warehouse.stop()  # the warehouse goes away; new data arrives meanwhile
        lake.append("user_events", events(200, seed=32, start_minutes=30))
        wait_for(lambda: http_status(port, "/readyz", timeout=10) == 503, 30, "/readyz 503", log, process=loader)
        assert http_status(port, "/healthz", timeout=10) == 200  # down for less than the progress budget
        wait_for(lambda: "reconnect attempt 1 failed" in log.read_text(), 120, "retries", log, process=loader)

        own_warehouse.start()  # same port, same databases; every old session is unknown to it (401)
        wait_for(lambda: own_warehouse.raw_rows(database) == 500, 180, "the catch-up", log, process=loader)
        wait_for(lambda: http_status(port, "/readyz", timeout=10) == 200, 60, "ready again", log, process=loader)
        assert loader.poll() is None  # the same process: no restart
    finally:
        code = stop(loader)
    text = log.read_text()
    assert code == ExitCode.OK, log_tails(log)
    assert "snowflake: reconnected after" in text
    lines = text.splitlines()
    assert any("reconnect attempt 1 failed" in line for line in lines)
    # One traceback per streak of failures at most (the first load that failed); every other failure, each
    # reconnect attempt and the connector's own threads are one line each.
    assert sum(line.endswith(": load failed") for line in lines) <= 1, text[-4000:]
    assert "Exception in thread" not in text
    for i, line in enumerate(lines[:-1]):
        if "reconnect attempt" in line or "load failed again" in line or "does not answer" in line:
            assert lines[i + 1][:4].isdigit(), lines[i : i + 3]  # the next line is the next record


def test_a_hung_warehouse_turns_readyz_503_within_the_probe_timeout_then_healthz_after_the_budget(
    stack: LocalStack, own_warehouse: OwnWarehouse, tmp_path: Path
) -> None:
    lake = Lake(stack)
    database = f"HUNG_{lake.name.upper()}"
    lake.append("user_events", events(50, seed=41))
    log = tmp_path / "loader.log"
    probe_timeout, budget = 2.0, 12.0
    loader, port = start_loader(
        lake,
        own_warehouse,
        database,
        log,
        HEALTH_PROBE_TIMEOUT_S=str(probe_timeout),
        HEALTH_PROGRESS_BUDGET_S=str(budget),
    )
    assert own_warehouse.process is not None
    try:
        wait_for(lambda: own_warehouse.raw_rows(database) == 50, 180, "the first load", log, process=loader)
        wait_for(lambda: http_status(port, "/readyz", timeout=10) == 200, 60, "ready", log, process=loader)
        assert http_status(port, "/healthz", timeout=10) == 200

        own_warehouse.process.send_signal(signal.SIGSTOP)  # accepts connections, answers nothing
        frozen_at = time.monotonic()
        started = time.monotonic()
        assert http_status(port, "/readyz", timeout=10) == 503
        assert time.monotonic() - started < probe_timeout + 1.5  # bounded by the probe timeout, not the network's
        assert http_status(port, "/healthz", timeout=10) == 200  # not yet past the progress budget
        wait_for(lambda: http_status(port, "/healthz", timeout=10) == 503, budget + 30, "/healthz 503", log)
        assert time.monotonic() - frozen_at >= budget - 1
    finally:
        own_warehouse.process.send_signal(signal.SIGCONT)
        kill(loader)
