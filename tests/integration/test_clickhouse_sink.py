"""The ClickHouse sink (`python -m services.clickhouse_sink`) against the real local broker and chDB.

Each test gets its own topics, consumer group and chDB folder, and runs the sink as a child process like a
pod. Rows are counted through the sink's own /query endpoint while it runs, and through the query command
(which then opens the chDB folder itself) after it stopped: chDB allows one process per folder.

- kill -9 mid-load (once deterministically right after an insert, before its Kafka commit; once at a random
  moment), restart: every valid event exactly once in the table AND in every materialized view;
- an outage (ClickHouse refuses every write for a while) under load: paused, retried, same exact count;
- refused records: dead-letter topic with the reason and the original bytes; the live queries.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from services.contracts.deadletter import parse_dead_letter
from services.kit.avro import AvroSerializer, SchemaRepository
from services.kit.kafka import PRODUCER_DEFAULTS, create_topics, scan_topic
from services.testing.net import free_port, http_status, metric_totals
from services.testing.processes import run_module, start_module, stop, wait_for
from services.testing.samples import ProcessedSamples

pytestmark = pytest.mark.integration


@dataclass
class Topics:
    events: str
    transactions: str

    @property
    def dead_letters(self) -> tuple[str, str]:
        return f"{self.events}.clickhouse.dlq", f"{self.transactions}.clickhouse.dlq"


@pytest.fixture
def topics(stack) -> Topics:
    prefix = f"lp-test-{uuid.uuid4().hex[:8]}"
    names = Topics(f"{prefix}.events", f"{prefix}.transactions")
    create_topics(
        {"bootstrap.servers": stack.bootstrap_servers},
        {names.events: 6, names.transactions: 3, names.dead_letters[0]: 2, names.dead_letters[1]: 2},
    )
    return names


@dataclass
class Sink:
    """The sink as a child process; restartable, with its query port for counting."""

    env: dict[str, str]
    log_dir: Path
    process: subprocess.Popen[bytes] | None = None
    runs: list[Path] = field(default_factory=list)

    @property
    def query_port(self) -> int:
        return int(self.env["CLICKHOUSE_SINK_QUERY_PORT"])

    @property
    def http_port(self) -> int:
        return int(self.env["HTTP_PORT"])

    def start(self, wait_ready: bool = True, **extra: str) -> None:
        log_path = self.log_dir / f"sink-{len(self.runs)}.log"
        self.runs.append(log_path)
        self.process = start_module("services.clickhouse_sink", env={**self.env, **extra}, log_path=log_path)
        if wait_ready:
            wait_for(self.ready, 90, "the sink to be ready", log_path)

    @property
    def log(self) -> Path:
        return self.runs[-1]

    def ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"the sink exited with {self.process.returncode}\n{self.log.read_text()[-5000:]}")
        return self.http_status("/readyz") == 200

    def http_status(self, path: str) -> int | None:
        return http_status(self.http_port, path)

    def metric(self, name: str) -> float:
        return metric_totals(self.http_port).get(name, 0.0)

    def counts(self) -> dict[str, int]:
        """Rows per table from the running sink's /query endpoint ({} while it cannot answer)."""
        try:
            url = f"http://127.0.0.1:{self.query_port}/query?name=counts"
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.loads(response.read())
        except (OSError, ValueError):
            return {}
        return {name: int(value) for name, value in body["rows"]}

    def stop(self) -> int:
        assert self.process is not None
        return stop(self.process)

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def wait_exit(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def query_cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_module("services.clickhouse_sink", "query", *args, env=self.env, timeout=120)


@pytest.fixture
def sink(stack, topics: Topics, tmp_path: Path):
    query_port, http_port = free_port(), free_port()
    env = {
        **stack.env(),
        "SERVICE_NAME": "clickhouse-sink-test",
        "CONSUMER_GROUP": f"lp-clickhouse-sink-test-{uuid.uuid4().hex[:8]}",
        "HTTP_PORT": str(http_port),
        "LOG_FORMAT": "text",
        "SHUTDOWN_TIMEOUT_S": "30",
        "BATCH_MAX_AGE_S": "0.5",
        "BACKOFF_MAX_S": "2",
        "CLICKHOUSE_CHDB_PATH": str(tmp_path / "chdb"),
        "CLICKHOUSE_SINK_QUERY_PORT": str(query_port),
        "CLICKHOUSE_SINK_EVENTS_TOPIC": topics.events,
        "CLICKHOUSE_SINK_TRANSACTIONS_TOPIC": topics.transactions,
        "CLICKHOUSE_SINK_REPORT_FILE": str(tmp_path / "report.json"),
        "CLICKHOUSE_SINK_FAULT_FILE": str(tmp_path / "store-down"),
    }
    process = Sink(env, tmp_path)
    yield process
    if process.process is not None and process.process.poll() is None:
        process.stop()


class Load:
    """Processed events (and the purchases' transactions) produced at a steady rate from a thread."""

    def __init__(self, bootstrap: str, topics: Topics, events: int, rate: float, seed: int = 11) -> None:
        schemas = SchemaRepository.load()
        self.event_bytes = AvroSerializer(schemas["processed_event"])
        self.transaction_bytes = AvroSerializer(schemas["processed_transaction"])
        self.producer = Producer({**PRODUCER_DEFAULTS, "bootstrap.servers": bootstrap, "linger.ms": 5})
        self.topics, self.events, self.rate = topics, events, rate
        self.samples = ProcessedSamples(seed)
        self.event_ids: list[str] = []
        self.purchases = 0
        self.transaction_ids: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            started = time.monotonic()
            for index, (event, transaction) in enumerate(self.samples.events_with_transactions(self.events)):
                self.producer.produce(self.topics.events, self.event_bytes(event), key=event["user_id"])
                self.event_ids.append(event["event_id"])
                self.purchases += event["event_type"] == "purchase"
                if transaction is not None:
                    payload = self.transaction_bytes(transaction)
                    self.producer.produce(self.topics.transactions, payload, key=transaction["transaction_id"])
                    self.transaction_ids.append(transaction["transaction_id"])
                ahead = (index + 1) / self.rate - (time.monotonic() - started)
                if ahead > 0:
                    self.producer.poll(0)
                    time.sleep(ahead)
            assert self.producer.flush(60) == 0
        except BaseException as error:  # surfaced by join()
            self.error = error

    def start(self) -> Load:
        self.thread.start()
        return self

    def join(self) -> None:
        self.thread.join(timeout=300)
        assert not self.thread.is_alive(), "the producer thread did not finish"
        if self.error is not None:
            raise self.error


def assert_exact(counts: dict[str, int], load: Load) -> None:
    """Every valid event once in the table and once in every view; every transaction once."""
    events = len(load.event_ids)
    assert len(set(load.event_ids)) == events
    assert counts["user_events_realtime"] == events, counts
    assert counts["user_events_realtime: distinct event_id"] == events, counts
    assert counts["user_events_realtime: duplicate rows"] == 0, counts
    assert counts["user_activity_summary: events"] == events, counts
    assert counts["user_events_realtime: purchases"] == load.purchases, counts
    assert counts["conversion_funnel: events"] == counts["user_events_realtime: funnel events"], counts
    for view in ("orders_per_minute", "category_sales_5m", "product_sales_15m"):
        assert counts[f"{view}: orders"] == load.purchases, (view, counts)
    transactions = len(load.transaction_ids)
    assert counts["transactions_realtime: changes"] == transactions, counts
    assert counts["transactions_realtime: distinct transaction_id"] == transactions, counts
    assert counts["transactions_realtime: current (FINAL, deletes hidden)"] == transactions, counts


def counts_after_stop(sink: Sink) -> dict[str, int]:
    done = sink.query_cli("counts")
    assert done.returncode == 0, done.stdout + done.stderr
    return {name: int(value) for name, value in json.loads(done.stdout).items()}


def test_kill_9_during_load_then_restart_leaves_exactly_one_row_per_event(stack, topics: Topics, sink: Sink) -> None:
    load = Load(stack.bootstrap_servers, topics, events=24_000, rate=2_000).start()

    # 1. Deterministic: the sink SIGKILLs itself right after its 2nd insert (the first flush writes one insert
    #    per topic), before that flush is committed.
    sink.start(wait_ready=False, CLICKHOUSE_SINK_KILL_AFTER_INSERTS="2")
    assert sink.wait_exit(120) == -signal.SIGKILL
    assert "SIGKILL after insert" in sink.log.read_text()

    # 2. Restarted, it must find the batch the store holds but Kafka never saw committed, and replay it as is.
    sink.start()
    wait_for(
        lambda: "replaying them as they were" in sink.log.read_text(), 120, "the uncommitted batch replay", sink.log
    )
    wait_for(lambda: sink.counts().get("user_events_realtime", 0) > 8_000, 120, "rows after the restart", sink.log)

    # 3. kill -9 from outside at a moment of the load nobody chose.
    time.sleep(random.uniform(0.5, 3.0))
    sink.kill9()
    sink.start()
    load.join()
    events, transactions = len(load.event_ids), len(load.transaction_ids)
    wait_for(
        lambda: (
            (c := sink.counts()).get("user_events_realtime") == events
            and c.get("transactions_realtime") == transactions
        ),
        180,
        f"{events} events and {transactions} transactions in ClickHouse",
        sink.log,
    )
    assert_exact(sink.counts(), load)
    assert sink.stop() == 0

    report = json.loads(Path(sink.env["CLICKHOUSE_SINK_REPORT_FILE"]).read_text())
    assert report["uncommitted_at_close"] == 0
    # The report covers the last process only: on a slow machine the load may be over before the last kill, and
    # then that process only replays batches the store already holds (deduplicated: nothing becomes visible).
    if report["rows_written"].get(topics.events, 0):
        assert set(report["event_to_visible_ms"]["user_events_realtime"]) == {"p50", "p95", "p99"}
    assert_exact(counts_after_stop(sink), load)  # read by the query command from the folder itself


def test_outage_pauses_retries_and_ends_with_the_exact_count(stack, topics: Topics, sink: Sink) -> None:
    fault = Path(sink.env["CLICKHOUSE_SINK_FAULT_FILE"])
    sink.start()
    load = Load(stack.bootstrap_servers, topics, events=10_000, rate=1_500, seed=12).start()
    wait_for(lambda: sink.counts().get("user_events_realtime", 0) > 1_000, 90, "the first rows", sink.log)

    fault.touch()  # ClickHouse refuses every write from now on (its tables are detached)
    wait_for(lambda: sink.metric("lp_sink_backpressure_total") >= 3, 60, "backpressure retries", sink.log)
    wait_for(lambda: sink.http_status("/readyz") == 503, 30, "/readyz to report the store", sink.log)
    assert sink.metric("lp_sink_paused_partitions") >= 1
    time.sleep(4)  # a while longer: the load keeps coming, nothing may be dropped
    fault.unlink()

    load.join()
    events = len(load.event_ids)
    wait_for(lambda: sink.counts().get("user_events_realtime") == events, 120, f"{events} events", sink.log)
    wait_for(lambda: sink.http_status("/readyz") == 200, 30, "ready again", sink.log)
    wait_for(
        lambda: sink.counts().get("transactions_realtime") == len(load.transaction_ids), 60, "transactions", sink.log
    )
    assert_exact(sink.counts(), load)
    assert sink.stop() == 0
    report = json.loads(Path(sink.env["CLICKHOUSE_SINK_REPORT_FILE"]).read_text())
    assert report["backpressure_retries"] >= 3
    assert report["rows_rejected"] == {}  # the outage refused writes, not records


def test_refused_records_go_to_the_dead_letter_topic_and_live_queries_answer(stack, topics: Topics, sink: Sink) -> None:
    schemas = SchemaRepository.load()
    event_bytes = AvroSerializer(schemas["processed_event"])
    transaction_bytes = AvroSerializer(schemas["processed_transaction"])
    samples = ProcessedSamples(13)
    pairs = list(samples.events_with_transactions(400))
    good = [event for event, _ in pairs]
    transaction = next(t for _, t in pairs if t is not None)
    purchases = sum(e["event_type"] == "purchase" for e in good)
    refused: dict[bytes, tuple[str, str | None]] = {  # payload -> (error code, field)
        event_bytes({**good[0], "event_id": "not-a-uuid"}): ("STORE_TYPE_MISMATCH", "event_id"),
        event_bytes({**good[1], "event_id": str(uuid.uuid4()), "session_id": "session-7"}): (
            "STORE_TYPE_MISMATCH",
            "session_id",
        ),
        b"not avro at all": ("NOT_AVRO_SINGLE_OBJECT", None),
        event_bytes(good[2])[:-5]: ("CORRUPT_OR_TRUNCATED", None),
        transaction_bytes(transaction): ("INCOMPATIBLE_WRITER_SCHEMA", None),  # valid, of another contract
    }
    traceparent = ("traceparent", b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01")
    producer = Producer({"bootstrap.servers": stack.bootstrap_servers})
    bad_sent: list[bytes] = []
    for index, event in enumerate(good):
        producer.produce(topics.events, event_bytes(event), key=event["user_id"])
        if index % 80 == 3:  # between good records of the same batches
            payload = list(refused)[len(bad_sent) % len(refused)]
            producer.produce(topics.events, payload, key=b"bad", headers=[traceparent])
            bad_sent.append(payload)
    for payload in refused:  # every kind at least once
        producer.produce(topics.events, payload, key=b"bad", headers=[traceparent])
        bad_sent.append(payload)
    producer.produce(topics.transactions, transaction_bytes({**transaction, "transaction_id": "tx-1"}), key=b"tx-1")
    producer.produce(topics.transactions, transaction_bytes(transaction), key=transaction["transaction_id"])
    assert producer.flush(30) == 0

    sink.start()
    wait_for(
        lambda: (c := sink.counts()).get("user_events_realtime") == len(good) and c.get("transactions_realtime") == 1,
        120,
        "the valid records",
        sink.log,
    )
    # The live views, through the running sink (it owns the chDB folder).
    funnel = sink.query_cli("funnel", "--json")
    assert funnel.returncode == 0, funnel.stderr
    steps = {row[0]: row[1] for row in json.loads(funnel.stdout)["rows"]}
    assert steps["purchase"] == purchases
    assert steps["page view"] == sum(e["event_type"] == "page_view" for e in good)
    revenue = sink.query_cli("revenue", "--json")
    assert revenue.returncode == 0, revenue.stderr
    total = json.loads(revenue.stdout)["rows"][-1]
    expected = round(sum(e["amount"] or 0 for e in good if e["event_type"] == "purchase"), 2)
    assert total[0] == "total" and total[1] == purchases and total[3] == pytest.approx(expected, abs=0.01)
    top = sink.query_cli("top-products")
    assert top.returncode == 0 and "Top products per 15 minutes" in top.stdout, top.stderr
    # /metrics (docs/observability.md): dead letters and errors counted once acknowledged, caught up, latency seen
    refused_total = len(bad_sent) + 1  # and the transaction the store refused
    wait_for(lambda: sink.metric("lp_dead_letters_total") == refused_total, 30, "dead letters counted", sink.log)
    assert sink.metric("lp_stage_errors_total") == refused_total
    assert sink.metric("lp_stage_records_in_total") == len(good) + refused_total + 1
    assert sink.metric("lp_stage_records_out_total") == len(good) + 1
    assert sink.metric("lp_kafka_consumer_lag_records") == 0 and sink.metric("lp_kafka_consumer_lag_seconds") == 0
    assert sink.metric("lp_sink_event_to_visible_seconds_count") >= 2  # per batch: its oldest and newest record
    assert sink.stop() == 0

    def dead_letters(topic: str) -> list[Any]:
        found: list[Any] = []
        scan_topic(
            {"bootstrap.servers": stack.bootstrap_servers},
            topic,
            on_message=lambda m: found.append(parse_dead_letter(m.key(), m.value(), m.headers())),
        )
        return found

    letters = dead_letters(topics.dead_letters[0])
    assert sorted(letter.value for letter in letters) == sorted(bad_sent)  # each once, original bytes
    for letter in letters:
        assert (letter.error_code, letter.field) == refused[letter.value]
        assert letter.original_topic == topics.events and letter.trace_id == "a" * 32
    mismatch = next(letter for letter in letters if letter.field == "event_id")
    assert "not-a-uuid" in mismatch.message and str(mismatch.stage) == "store"
    assert {str(letter.stage) for letter in letters if letter.field is None} == {"decode"}

    (tx_letter,) = dead_letters(topics.dead_letters[1])
    assert (tx_letter.error_code, tx_letter.field) == ("STORE_TYPE_MISMATCH", "transaction_id")

    counts = counts_after_stop(sink)  # the query command opens the folder itself now
    assert counts["user_events_realtime"] == len(good) and counts["transactions_realtime"] == 1
