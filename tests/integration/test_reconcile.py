"""The reconciliation (`python -m services.reconcile`) against the real local stack: chDB, Iceberg on SeaweedFS,
fakesnow.

The same processed events reach the three stores through the real code: produced to a topic of their own, the
ClickHouse sink and the archiver (child processes, as in their own tests) consume it, and the Snowflake loader's
`run-once` loads the lake into the warehouse. The command runs as a child process, as a CronJob would: first
while the sink runs (ClickHouse read through the sink's /query port), then on the chDB folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from pyiceberg.exceptions import NoSuchTableError

from services.kit.config import settings_from
from services.kit.kafka import PRODUCER_DEFAULTS, create_topics
from services.reconcile import runsummary
from services.stack import LocalStack
from services.stores.iceberg import CatalogSettings, load_table, open_catalog
from services.stores.snowflake import SnowflakeSettings, open_warehouse
from services.testing.net import free_port
from services.testing.processes import kill, run_module, start_module, stop, wait_for
from services.testing.samples import encoded_events

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
EVENTS = 600
STEP = timedelta(minutes=6)  # 600 events over 60 hours of event time: three UTC days


def load_warehouse(env: dict[str, str], work_dir: Path) -> dict[str, Any]:
    """`python -m services.snowflake_loader run-once`: the lake's user_events into Snowflake, as `make run` does."""
    done = run_module(
        "services.snowflake_loader",
        "run-once",
        env={
            **env,
            "SNOWFLAKE_CREATE_DATABASE": "true",
            "SNOWFLAKE_LOADER_TABLES": "user_events",
            "SNOWFLAKE_LOADER_WORK_DIR": str(work_dir),
            "SNOWFLAKE_NETWORK_TIMEOUT_S": "60",
        },
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result["tables"]["user_events"]


@dataclass
class Loaded:
    env: dict[str, str]
    records: list[dict[str, Any]]
    sink: subprocess.Popen[bytes]
    logs: list[Path]
    query_port: int

    def reconcile(self, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return run_module("services.reconcile", *args, env={**self.env, **extra}, timeout=120)

    def expected(self) -> dict[tuple[str, str], tuple[int, float]]:
        """(day, event type) -> (events, revenue), from the records produced."""
        out: dict[tuple[str, str], tuple[int, float]] = {}
        for record in self.records:
            key = (record["event_time"].date().isoformat(), record["event_type"])
            events, revenue = out.get(key, (0, 0.0))
            out[key] = (events + 1, revenue + (record["amount"] or 0.0))
        return out

    def stop_sink(self) -> None:
        if self.sink.poll() is None:
            assert stop(self.sink) == 0


@pytest.fixture(scope="module")
def loaded(stack: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loaded]:
    name = f"rc{uuid.uuid4().hex[:10]}"
    topic = f"{name}.events"
    create_topics(
        {"bootstrap.servers": stack.bootstrap_servers},
        {topic: 3, f"{topic}.clickhouse.dlq": 1, f"{topic}.archiver.dlq": 1},
    )
    tmp = tmp_path_factory.mktemp(name)
    query_port = free_port()
    env = {
        **stack.env(),
        "LOG_FORMAT": "text",
        "SNOWFLAKE_DATABASE": name.upper(),
        # ClickHouse (the sink)
        "CLICKHOUSE_CHDB_PATH": str(tmp / "clickhouse"),  # where runsummary.local_env(tmp) looks
        "CLICKHOUSE_SINK_QUERY_PORT": str(query_port),
        "CLICKHOUSE_SINK_EVENTS_TOPIC": topic,
        "CLICKHOUSE_SINK_TRANSACTIONS_TOPIC": "",
        # Iceberg (the archiver)
        "ICEBERG_CATALOG": "sql",
        "ICEBERG_SQL_URI": f"sqlite:///{tmp}/catalog.db",
        "ICEBERG_NAMESPACE": name,
        "ARCHIVER_TABLES": "user_events",
        "ARCHIVER_EVENTS_TOPICS": topic,
        "ARCHIVER_COMMIT_INTERVAL_S": "1",
        "BATCH_MAX_AGE_S": "0.2",
    }
    producer = Producer({**PRODUCER_DEFAULTS, "bootstrap.servers": stack.bootstrap_servers})
    records = []
    for key, payload, record in encoded_events(EVENTS, seed=int(name[2:], 16) % 10_000, step=STEP):
        producer.produce(topic, payload, key=key)
        records.append(record)
    assert producer.flush(60) == 0

    logs = [tmp / "sink.log", tmp / "archiver.log"]
    sink_env = {**env, "CONSUMER_GROUP": f"{name}-sink", "HTTP_PORT": str(free_port())}
    archiver_env = {**env, "CONSUMER_GROUP": f"{name}-archiver", "HTTP_PORT": str(free_port())}
    sink = start_module("services.clickhouse_sink", env=sink_env, log_path=logs[0])
    archiver = start_module("services.archiver", "run", env=archiver_env, log_path=logs[1])
    catalog = CatalogSettings.from_env(env)
    loaded = Loaded(
        {**env, "CLICKHOUSE_SINK_QUERY_URL": f"http://127.0.0.1:{query_port}"}, records, sink, logs, query_port
    )
    try:

        def archived() -> int:
            try:
                table = load_table(open_catalog(catalog), catalog, "user_events")
            except NoSuchTableError:  # the archiver has not created it yet
                return 0
            return len(table.scan(selected_fields=("event_id",)).to_arrow())

        wait_for(lambda: archived() == EVENTS, 120, f"{EVENTS} rows in Iceberg", logs)
        assert stop(archiver) == 0
        wait_for(lambda: clickhouse_events(query_port) == EVENTS, 120, f"{EVENTS} rows in ClickHouse", logs)
        load = load_warehouse(env, tmp / "loader")
        assert (load["status"], load["rows"]) == ("loaded", EVENTS)
        yield loaded
    finally:
        for process in (sink, archiver):
            kill(process)


def clickhouse_events(query_port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{query_port}/query?name=counts", timeout=10) as response:
            rows = json.loads(response.read())["rows"]
    except (OSError, ValueError):
        return 0
    return dict(rows).get("user_events_realtime: distinct event_id", 0)


def test_the_three_stores_agree_on_the_same_events(loaded: Loaded, tmp_path: Path) -> None:
    metrics_file = tmp_path / "reconcile.prom"
    done = loaded.reconcile("--json", "--metrics-file", str(metrics_file))  # ClickHouse via the running sink
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["agrees"] is True and report["consistency"] == 1.0
    assert report["stores"] == ["clickhouse", "iceberg", "snowflake"]
    expected = loaded.expected()
    assert len({day for day, _ in expected}) == 3  # the window really spans several days
    cells = {(c["day"], c["event_type"]): c for c in report["cells"]}
    assert set(cells) == set(expected)
    for key, (events, revenue) in expected.items():
        cell = cells[key]
        assert cell["status"] == "ok", cell
        assert cell["events"] == {"clickhouse": events, "iceberg": events, "snowflake": events}, key
        assert cell["rows"] == cell["events"], key  # exactly one row per event, in every store
        for store in ("clickhouse", "iceberg", "snowflake"):
            assert cell["revenue"][store] == pytest.approx(revenue, abs=0.01), (key, store)
    assert expected[next(k for k in expected if k[1] == "purchase")][1] > 0  # revenue is really compared
    text = metrics_file.read_text()
    assert "lp_reconcile_agrees 1.0" in text
    assert "lp_reconcile_consistency_ratio 1.0" in text
    assert f'lp_reconcile_events{{store="snowflake"}} {float(EVENTS)}' in text
    assert report["totals"]["iceberg"]["rows"] == EVENTS and report["rows_consistency"] == 1.0
    assert report["duplicate_rows"] == {"clickhouse": 0, "iceberg": 0, "snowflake": 0}
    assert f'lp_reconcile_rows{{store="clickhouse"}} {float(EVENTS)}' in text
    assert 'lp_reconcile_duplicate_rows{store="snowflake"} 0.0' in text

    # The table, and the same verdict with ClickHouse read from its folder once the sink is gone.
    loaded.stop_sink()
    table = loaded.reconcile()
    assert table.returncode == 0, table.stdout + table.stderr
    assert "verdict: AGREE: consistency 100.0000%" in table.stdout
    assert table.stdout.count("\n") >= len(expected) + 3

    # What `make run` does at its end: the same command through runsummary, with the stopped sink's query port.
    env = {**loaded.env, **runsummary.local_env(Path(loaded.env["CLICKHOUSE_CHDB_PATH"]).parent, loaded.query_port)}
    env.pop("CLICKHOUSE_SINK_QUERY_URL")
    result = runsummary.run(env, tmp_path / "demo.prom")
    assert result["exit_code"] == 0, result
    assert runsummary.checks(result) == {runsummary.CHECK: True}
    lines = runsummary.summary_lines(result)
    assert (
        lines[0] == f"  reconcile clickhouse  {EVENTS} events, {EVENTS} rows, "
        f"revenue {result['report']['totals']['clickhouse']['revenue']:.2f}"
    )
    assert "verdict: AGREE" in lines[3] and len(lines) == 4


def test_a_planted_discrepancy_is_named_with_its_store_and_exits_1(loaded: Loaded) -> None:
    loaded.stop_sink()  # chDB: one process per folder
    purchases = [r for r in loaded.records if r["event_type"] == "purchase" and r["amount"]]
    gone, altered = purchases[0], purchases[-1]
    gone_day, altered_day = gone["event_time"].date(), altered["event_time"].date()
    assert gone_day != altered_day
    # ClickHouse loses an event (a lightweight DELETE, through the sink's own client on its folder) ...
    script = (
        "import sys; from pathlib import Path; from services.stores.clickhouse import ChdbClient\n"
        "c = ChdbClient(Path(sys.argv[1]))\n"
        "c.execute(f\"ALTER TABLE lambda_pipeline.user_events_realtime DELETE WHERE event_id = toUUID('{sys.argv[2]}') "
        'SETTINGS mutations_sync = 2")\n'
        "c.close()\n"
    )
    deleted = subprocess.run(
        [sys.executable, "-c", script, loaded.env["CLICKHOUSE_CHDB_PATH"], gone["event_id"]],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert deleted.returncode == 0, deleted.stderr
    # ... Snowflake's amount of another purchase is off by 10.00, and it has a day the others never saw.
    with open_warehouse(settings_from(SnowflakeSettings, loaded.env)) as warehouse:
        warehouse.execute(
            "UPDATE STAGING.EVENTS_CLEANED SET AMOUNT = AMOUNT + 10 WHERE EVENT_ID = %(id)s",
            {"id": altered["event_id"]},
        )
        warehouse.execute(
            "INSERT INTO STAGING.EVENTS_CLEANED (EVENT_ID, EVENT_TYPE, EVENT_TIME, EVENT_DATE, USER_ID, AMOUNT, "
            "ARCHIVE_POSITION, BATCH_ID) VALUES (%(id)s, 'login', '2026-12-24 10:00:00', '2026-12-24', 'planted', "
            "NULL, 'planted', 'planted')",
            {"id": str(uuid.uuid4())},
        )

    done = loaded.reconcile("--json")
    assert done.returncode == 1, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["agrees"] is False
    differing = {(c["day"], c["event_type"]): c for c in report["cells"] if c["status"] != "ok"}
    assert set(differing) == {
        (gone_day.isoformat(), "purchase"),
        (altered_day.isoformat(), "purchase"),
        ("2026-12-24", "login"),
    }, differing
    lost = differing[(gone_day.isoformat(), "purchase")]
    assert lost["status"] == "events" and lost["stores"] == ["clickhouse"]
    assert lost["events"]["clickhouse"] == lost["events"]["iceberg"] - 1 == lost["events"]["snowflake"] - 1
    changed = differing[(altered_day.isoformat(), "purchase")]
    assert changed["status"] == "revenue" and changed["stores"] == ["snowflake"]
    assert changed["revenue"]["snowflake"] == pytest.approx(changed["revenue"]["iceberg"] + 10, abs=0.01)
    extra = differing[("2026-12-24", "login")]
    assert extra["status"] == "missing" and extra["stores"] == ["clickhouse", "iceberg"]

    # The table names them too; 1 lost event of 600 is below the 99.9 % minimum on its own.
    table = loaded.reconcile("--differences")
    assert table.returncode == 1
    assert "verdict: DISAGREE" in table.stdout
    assert f"{gone_day}  purchase" in table.stdout and "events clickhouse=" in table.stdout
    assert "missing in clickhouse, iceberg" in table.stdout

    # A window without the planted days agrees again.
    untouched = ({date.fromisoformat(d) for d, _ in loaded.expected()} - {gone_day, altered_day}).pop()
    window = loaded.reconcile("--since", untouched.isoformat(), "--until", untouched.isoformat(), "--json")
    assert window.returncode == 0, window.stdout + window.stderr
    assert {c["day"] for c in json.loads(window.stdout)["cells"]} == {untouched.isoformat()}
    # Two stores: only the cell of the lost event differs (Snowflake's extra day is not compared); with no
    # majority to tell which store is wrong, both are named.
    pair = loaded.reconcile("--stores", "clickhouse,iceberg", "--json")
    assert pair.returncode == 1, pair.stdout + pair.stderr
    cells = json.loads(pair.stdout)["cells"]
    assert [(c["day"], c["event_type"], c["stores"]) for c in cells if c["status"] != "ok"] == [
        (gone_day.isoformat(), "purchase", ["clickhouse", "iceberg"])
    ]


def test_an_unreachable_store_is_named_and_exits_2(loaded: Loaded) -> None:
    done = loaded.reconcile(
        SNOWFLAKE_DATABASE="NO_SUCH_DB", SNOWFLAKE_PORT=str(free_port()), SNOWFLAKE_LOGIN_TIMEOUT_S="3"
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "store snowflake could not be read" in done.stderr
    bad = loaded.reconcile(RECONCILE_REVENUE_TOLERANCE="lots")
    assert bad.returncode == 2 and "RECONCILE_REVENUE_TOLERANCE" in bad.stderr


def test_a_duplicate_row_in_one_store_disagrees_though_the_distinct_events_agree(loaded: Loaded) -> None:
    """One event copied in Snowflake's RAW (what a re-emitted event became there): distinct ids still agree
    everywhere, the rows do not, and that is DISAGREE (exit 1) with the store and the cell named."""
    loaded.stop_sink()
    days = sorted({date.fromisoformat(d) for d, _ in loaded.expected()})
    day = days[len(days) // 2]  # a day the planted discrepancies above left alone
    window = ("--since", day.isoformat(), "--until", day.isoformat())
    before = loaded.reconcile(*window, "--json")
    assert before.returncode == 0, before.stdout + before.stderr  # exact: rows agree as well
    copied = next(r for r in loaded.records if r["event_time"].date() == day)
    with open_warehouse(settings_from(SnowflakeSettings, loaded.env)) as warehouse:
        warehouse.execute(
            "INSERT INTO RAW.USER_EVENTS SELECT * FROM RAW.USER_EVENTS WHERE EVENT_ID = %(id)s",
            {"id": copied["event_id"]},
        )
    done = loaded.reconcile(*window, "--json")
    assert done.returncode == 1, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["agrees"] is False and report["events_consistency"] == 1.0
    assert report["duplicate_rows"] == {"clickhouse": 0, "iceberg": 0, "snowflake": 1}
    (cell,) = [c for c in report["cells"] if c["status"] != "ok"]
    assert (cell["day"], cell["event_type"], cell["status"], cell["stores"]) == (
        day.isoformat(),
        copied["event_type"],
        "duplicates",
        ["snowflake"],
    )
    assert cell["rows"]["snowflake"] == cell["events"]["snowflake"] + 1 == cell["rows"]["iceberg"] + 1
    table = loaded.reconcile(*window)
    assert table.returncode == 1
    assert "verdict: DISAGREE" in table.stdout and "duplicate rows: snowflake 1" in table.stdout
