"""The generator service as a process against the real local stack."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import psycopg
import pytest

from services.contracts.headers import INJECTED_FAULT
from services.kit.avro import AvroDeserializer, Decoded, DecodeError, SchemaRepository
from services.kit.kafka import create_topics, scan_topic

pytestmark = pytest.mark.integration


def new_topic(bootstrap: str, partitions: int = 4) -> str:
    name = f"test.events.{uuid.uuid4().hex[:8]}"
    create_topics({"bootstrap.servers": bootstrap}, {name: partitions})
    return name


def generator_env(stack, tmp_path: Path, topic: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        **stack.env(),
        "EVENTS_TOPIC": topic,
        "HTTP_PORT": "0",
        "REPORT_FILE": str(tmp_path / "report.json"),
        "LOG_FORMAT": "text",
        **extra,
    }


def read_topic(bootstrap: str, topic: str) -> list:
    messages: list = []
    scan_topic({"bootstrap.servers": bootstrap}, topic, on_message=messages.append)
    return messages


def test_bounded_run_produces_exactly_and_writes_postgres(stack, tmp_path):
    topic = new_topic(stack.bootstrap_servers)
    env = generator_env(stack, tmp_path, topic, EVENTS="3000", RATE="0", SEED="11", BAD_EVENT_SHARE="0.05")
    done = subprocess.run([sys.executable, "-m", "services.generator"], env=env, capture_output=True, timeout=180)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["events_produced"] == 3000
    assert report["events_delivered"] == 3000

    messages = read_topic(stack.bootstrap_servers, topic)
    assert len(messages) == 3000
    decode = AvroDeserializer(SchemaRepository.load(), "raw_event")
    faults: Counter[str] = Counter()
    purchases: set[str] = set()
    for message in messages:
        headers = dict(message.headers() or [])
        assert "traceparent" in headers  # W3C context travels with every record
        result = decode(message.value())
        if INJECTED_FAULT in headers:
            faults[headers[INJECTED_FAULT].decode()] += 1
            if headers[INJECTED_FAULT] in (b"garbage_bytes", b"wrong_types"):
                assert isinstance(result, DecodeError)
            continue
        assert isinstance(result, Decoded), result
        record = result.record
        assert message.key().decode() == record["user_id"]  # keyed by user: per-user order
        if record["event_type"] == "purchase":
            purchases.add(record["transaction_id"])
    good = report["events_by_kind"]["good"]
    assert sum(faults.values()) == 3000 - good
    assert dict(faults) == {k: v for k, v in report["events_by_kind"].items() if k != "good"}
    assert 0.02 < sum(faults.values()) / 3000 < 0.09  # the configured 5 % share, with sampling noise
    assert purchases, "a 3000-event run has purchases"
    with psycopg.connect(stack.postgres_dsn) as connection:
        found = connection.execute(
            "SELECT count(*) FROM transactions WHERE transaction_id = ANY(%s::uuid[])", (list(purchases),)
        ).fetchone()[0]
        users = connection.execute("SELECT count(*) FROM users").fetchone()[0]
    assert found == len(purchases)
    assert users >= report["users"]


def test_sigterm_flushes_everything_it_counted(stack, tmp_path):
    topic = new_topic(stack.bootstrap_servers)
    env = generator_env(stack, tmp_path, topic, EVENTS="0", RATE="3000", SEED="12")
    process = subprocess.Popen([sys.executable, "-m", "services.generator"], env=env, stderr=subprocess.PIPE)
    try:
        port = None
        deadline = time.monotonic() + 60
        # the health port is chosen by the OS; the service logs it
        while port is None and time.monotonic() < deadline:
            line = process.stderr.readline().decode()
            if "health endpoint on :" in line:
                port = int(line.rsplit(":", 1)[1].split()[0])
        assert port, "the service never said where its health endpoint is"
        ready = False
        while not ready and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
                    ready = response.status == 200
            except OSError:
                time.sleep(0.2)
        assert ready
        time.sleep(2)  # let it produce for a while
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["events_produced"] > 1000
    assert len(read_topic(stack.bootstrap_servers, topic)) == report["events_produced"]


def test_missing_config_names_the_variable(stack, tmp_path):
    env = generator_env(stack, tmp_path, "events.raw")
    env.pop("POSTGRES_DSN")
    env["RATE"] = "fast"
    done = subprocess.run([sys.executable, "-m", "services.generator"], env=env, capture_output=True, timeout=60)
    assert done.returncode == 2
    stderr = done.stderr.decode()
    assert "POSTGRES_DSN" in stderr and "RATE" in stderr


def test_missing_topic_fails_with_a_clear_message(stack, tmp_path):
    env = generator_env(stack, tmp_path, "no.such.topic", EVENTS="10")
    done = subprocess.run([sys.executable, "-m", "services.generator"], env=env, capture_output=True, timeout=60)
    assert done.returncode == 1
    assert "no.such.topic" in done.stderr.decode()
