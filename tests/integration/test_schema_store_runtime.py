"""Writer schemas at run time, through the real validator and the real ClickHouse sink (issue 14, item 3).

A rolling upgrade: producers already write a compatible v2 (registered in the `_lp_schemas` store, as the operator
does) while the validator and the sink still run with only the v1 files baked in. Every v2 record is processed,
nothing is dead-lettered. Then the store becomes unreadable (the store's reads go through a proxy the test turns
off) while producers move on to a v3: both services stall and say so on /readyz, dead-letter nothing, and
process every record once the store is back.

A broker of its own: the test registers versions of the platform's subjects in its schema store.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Message, Producer

from services.declarations.apply import apply_declarations
from services.declarations.registry import KafkaSchemaStore
from services.generator.model import Simulation
from services.kit.avro import AvroSerializer, Schema, SchemaRepository
from services.kit.kafka import scan_topic
from services.stack import LocalStack, StackSettings
from services.testing.net import TcpProxy, free_port, http_status, metric_totals
from services.testing.processes import kill, start_module, stop, wait_for
from services.testing.samples import processed_events
from services.validator.cdc import make_envelope

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
TEST_ID = "test-id"
DEAD_LETTER_TOPICS = ("events.raw.dlq", "events.processed.clickhouse.dlq")


@pytest.fixture(scope="module")
def bootstrap() -> Iterator[str]:
    state_dir = Path(tempfile.mkdtemp(prefix="lp-schema-store-"))
    with LocalStack(StackSettings.with_free_ports(state_dir=state_dir), only=["broker"]) as broker_only:
        report = apply_declarations(
            REPO_ROOT / "deploy" / "k8s", broker_only.bootstrap_servers, cap_replication_factor=True
        )
        assert report.ok, report.table()
        yield broker_only.bootstrap_servers


def evolved(schema: Schema, field: str) -> Schema:
    """`schema` plus an optional field: a compatible next version of it."""
    definition = dict(schema.definition)
    definition["fields"] = [*definition["fields"], {"name": field, "type": ["null", "string"], "default": None}]
    return Schema.from_definition(schema.name, definition)


def seed_references(producer: Producer, sim: Simulation) -> None:
    for user in sim.users:
        row = {k: v for k, v in asdict(user).items() if k != "shipping_address"}
        envelope = make_envelope("r", "users", after=row, ts_ms=int(time.time() * 1000))
        key = json.dumps({"user_id": user.user_id})
        producer.produce("cdc.postgres.users", json.dumps(envelope, default=str).encode(), key)
    for product in sim.products:
        envelope = make_envelope("r", "products", after=asdict(product), ts_ms=int(time.time() * 1000))
        key = json.dumps({"product_id": product.product_id})
        producer.produce("cdc.postgres.products", json.dumps(envelope, default=str).encode(), key)
    assert producer.flush(30) == 0


def read(bootstrap: str, topic: str) -> list[Message]:
    found: list[Message] = []
    scan_topic({"bootstrap.servers": bootstrap}, topic, on_message=found.append)
    return found


def ids_of(messages: list[Message]) -> Counter[str]:
    return Counter(dict(m.headers() or []).get(TEST_ID, b"").decode() for m in messages)


def sink_rows(query_port: int) -> int:
    """Rows of user_events_realtime, from the running sink's query port (-1 while it cannot answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{query_port}/query?name=counts", timeout=10) as response:
            return int(dict(json.loads(response.read())["rows"]).get("user_events_realtime", 0))
    except (OSError, ValueError, KeyError):
        return -1


def test_rolling_upgrade_and_a_store_outage_through_the_validator_and_the_sink(bootstrap: str, tmp_path: Path) -> None:
    files = SchemaRepository.load()
    raw_v2, processed_v2 = evolved(files["raw_event"], "campaign"), evolved(files["processed_event"], "campaign")
    raw_v3, processed_v3 = evolved(raw_v2, "channel"), evolved(processed_v2, "channel")
    store = KafkaSchemaStore(bootstrap)
    assert store.register("raw_event", raw_v2.definition).registered  # what the operator does for an EventSchema
    assert store.register("processed_event", processed_v2.definition).registered

    proxy = TcpProxy(bootstrap).start()  # the services read the schema store through it, everything else directly
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 10})
    started = datetime.now(UTC)
    sim = Simulation(int(uuid.uuid4().int % 1_000_000), n_users=40, n_products=30, start_time=started)
    seed_references(producer, sim)

    common = {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "SCHEMA_STORE_BOOTSTRAP_SERVERS": proxy.address,
        "SCHEMA_STORE_TIMEOUT_S": "2",
        "LOG_FORMAT": "text",
        "SHUTDOWN_TIMEOUT_S": "20",
    }
    validator_port, sink_port, query_port = free_port(), free_port(), free_port()
    validator_log, sink_log = tmp_path / "validator.log", tmp_path / "sink.log"
    logs = [validator_log, sink_log]
    validator = start_module(
        "services.validator", env={**common, "HTTP_PORT": str(validator_port)}, log_path=validator_log
    )
    sink = start_module(
        "services.clickhouse_sink",
        env={
            **common,
            "HTTP_PORT": str(sink_port),
            "BATCH_MAX_AGE_S": "0.5",
            "BACKOFF_MAX_S": "2",
            "CLICKHOUSE_CHDB_PATH": str(tmp_path / "chdb"),
            "CLICKHOUSE_SINK_QUERY_PORT": str(query_port),
        },
        log_path=sink_log,
    )
    processes: list[subprocess.Popen[bytes]] = [validator, sink]
    try:
        for port, what in ((validator_port, "the validator"), (sink_port, "the sink")):
            wait_for(lambda p=port: http_status(p, "/readyz") == 200, 120, f"{what} to be ready", logs)

        raw_v1_encode, raw_v2_encode, raw_v3_encode = (AvroSerializer(s) for s in (files["raw_event"], raw_v2, raw_v3))
        processed_v2_encode, processed_v3_encode = AvroSerializer(processed_v2), AvroSerializer(processed_v3)
        expected_raw: set[str] = set()
        direct = 0  # events.processed records written by "upgraded validators" straight to the sink's topic

        def produce_raw(count: int, encode: AvroSerializer, extra: dict[str, Any]) -> None:
            for _ in range(count):
                event = sim.next_event(datetime.now(UTC))
                test_id = uuid.uuid4().hex
                expected_raw.add(test_id)
                value = encode({**event.to_record(), **extra})
                producer.produce("events.raw", value, event.key, headers=[(TEST_ID, test_id.encode())])

        def produce_processed(count: int, encode: AvroSerializer, extra: dict[str, Any], seed: int) -> int:
            for key, record in processed_events(count, seed=seed, start=datetime.now(UTC)):
                producer.produce("events.processed", encode({**record, **extra}), key)
            return count

        def all_processed() -> bool:
            return set(ids_of(read(bootstrap, "events.processed"))) >= expected_raw

        def wait_rows(expected: int, what: str) -> None:
            seen: list[int] = []

            def arrived() -> bool:
                seen.append(sink_rows(query_port))
                return seen[-1] == expected

            try:
                wait_for(arrived, 120, what, logs)
            except AssertionError as error:
                letters = {
                    t: [dict(m.headers() or []).get("lp-dlq-error-code") for m in read(bootstrap, t)]
                    for t in DEAD_LETTER_TOPICS
                }
                raise AssertionError(
                    f"rows: {seen[-5:]}, expected {expected}, dead letters {letters}: {error}"
                ) from None

        def no_dead_letters() -> None:
            for topic in DEAD_LETTER_TOPICS:
                assert read(bootstrap, topic) == [], f"dead letters in {topic}"

        # 1. Rolling upgrade: v2 writers next to v1 writers; the consumers have only the v1 files.
        produce_raw(60, raw_v2_encode, {"campaign": "spring"})
        produce_raw(60, raw_v1_encode, {})
        direct += produce_processed(40, processed_v2_encode, {"campaign": "spring"}, seed=21)
        assert producer.flush(30) == 0
        wait_for(all_processed, 120, "every raw event (v1 and v2) to be processed", logs)
        wait_rows(len(expected_raw) + direct, "every row in ClickHouse")
        no_dead_letters()

        # 2. The store cannot be read while producers move on to v3 (registered meanwhile).
        proxy.stop()
        assert store.register("raw_event", raw_v3.definition).registered
        assert store.register("processed_event", processed_v3.definition).registered
        produce_raw(40, raw_v3_encode, {"campaign": "summer", "channel": "app"})
        direct += produce_processed(30, processed_v3_encode, {"campaign": "summer", "channel": "app"}, seed=22)
        assert producer.flush(30) == 0
        for port, what in ((validator_port, "the validator"), (sink_port, "the sink")):
            wait_for(lambda p=port: http_status(p, "/readyz") == 503, 60, f"{what} to report the store down", logs)
        wait_for(
            lambda: metric_totals(validator_port).get("lp_validator_runtime_batch_retries_total", 0) >= 2,
            60,
            "the validator to retry the batch",
            logs,
        )
        wait_for(
            lambda: metric_totals(sink_port).get("lp_sink_backpressure_total", 0) >= 2, 60, "the sink to retry", logs
        )
        assert not all_processed()  # the v3 events wait
        assert sink_rows(query_port) < len(expected_raw) + direct
        no_dead_letters()
        assert validator.poll() is None and sink.poll() is None

        # 3. The store is back: everything is processed, once, and nothing was dead-lettered.
        proxy.start()
        wait_for(all_processed, 120, "the v3 events to be processed once the store is back", logs)
        wait_rows(len(expected_raw) + direct, "every row in ClickHouse")
        for port, what in ((validator_port, "the validator"), (sink_port, "the sink")):
            wait_for(lambda p=port: http_status(p, "/readyz") == 200, 60, f"{what} to be ready again", logs)
        time.sleep(1)
        processed = ids_of(read(bootstrap, "events.processed"))
        assert {i: n for i, n in processed.items() if i in expected_raw and n != 1} == {}  # each once
        assert sink_rows(query_port) == len(expected_raw) + direct
        no_dead_letters()
        assert "schema-store is back" in validator_log.read_text()
        for process in processes:
            assert stop(process, timeout=40) == 0
    finally:
        proxy.stop()
        for process in processes:
            kill(process)
        print(os.linesep.join(path.read_text(errors="replace")[-3000:] for path in logs if path.exists()))
