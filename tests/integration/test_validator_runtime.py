"""The validator's streaming runtime as a process against the real local broker.

The worker runs `python -m services.validator.stream_app --processor tests.integration.test_validator_runtime:tag`:
the processor below copies each record to TEST_OUTPUT_TOPIC with its provenance in a header, raises for values
starting with b"raise" and returns a malformed output for values starting with b"badout". Counting outputs per
input (partition, offset) shows loss (none may be missing) and duplicates (only after the last commit).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from prometheus_client.parser import text_string_to_metric_families

from services.kit.kafka import scan_topic
from services.testing.net import free_port
from services.testing.processes import kill, start_module, wait_for
from services.validator.runtime import InputRecord, Output

pytestmark = pytest.mark.integration

PROCESSOR = "tests.integration.test_validator_runtime:tag"
TRACEPARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
SOURCE_HEADER = "test-source"  # "<partition>:<offset>" of the input an output was made from


# --- the processor the worker imports ------------------------------------------------------------------------------
def tag(batch: list[InputRecord]) -> list[Output]:
    delay = float(os.environ.get("TEST_BATCH_DELAY_S", "0"))
    if delay:
        time.sleep(delay)  # makes a run long enough to interrupt
    topic = os.environ["TEST_OUTPUT_TOPIC"]
    outputs = []
    for record in batch:
        value = record.value or b""
        if value.startswith(b"raise"):
            raise ValueError(f"cannot handle {value[:20]!r}")
        if value.startswith(b"stall-"):
            time.sleep(float(value.removeprefix(b"stall-")))  # a processor stuck on a record: no batch completes
        body: Any = value.decode() if value.startswith(b"badout") else value  # str is not producible
        source = f"{record.partition}:{record.offset}".encode()
        outputs.append(Output(topic, record.key, body, [(SOURCE_HEADER, source)], source=record))
    return outputs


# --- helpers ---------------------------------------------------------------------------------------------------
def create_topics(bootstrap: str, partitions: int = 4) -> tuple[str, str]:
    """A fresh input topic, its .dlq and an output topic."""
    name = f"test.rt.{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})  # keep a reference: the futures die with the client
    topics = [NewTopic(t, partitions, 1) for t in (name, f"{name}.dlq", f"{name}.out")]
    for future in admin.create_topics(topics).values():
        future.result(timeout=30)
    return name, f"{name}.out"


def produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "compression.type": "zstd"})
    for i, value in enumerate(values):
        headers = [("traceparent", TRACEPARENT)] if i % 2 else None
        producer.produce(topic, value, key=f"key-{i % 97}".encode(), headers=headers)
        if i % 10_000 == 0:
            producer.poll(0)
    assert producer.flush(60) == 0


def read(bootstrap: str, topic: str) -> list[Any]:
    messages: list[Any] = []
    scan_topic({"bootstrap.servers": bootstrap}, topic, on_message=messages.append)
    return messages


def read_settled(bootstrap: str, topic: str, quiet_s: float = 1.0, timeout_s: float = 30.0) -> list[Any]:
    """The topic's records once it has stopped growing: after a SIGKILL, produce requests the process had already
    written to its socket still reach the broker and land after the kill, so one read right away can miss them."""
    deadline = time.monotonic() + timeout_s
    records = read(bootstrap, topic)
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        again = read(bootstrap, topic)
        if len(again) == len(records):
            return again
        records = again
    raise AssertionError(f"{topic} kept growing for {timeout_s} s after the writer was killed")


def committed(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    partitions = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).topics[topic].partitions
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        offsets = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
    finally:
        consumer.close()
    return {tp.partition: max(tp.offset, 0) for tp in offsets}


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()
        except OSError:
            return 0, ""

    def processed(self, topic: str) -> float:
        _, body = self.get("/metrics")
        match = re.search(rf'lp_validator_runtime_records_total\{{topic="{re.escape(topic)}"\}} ([0-9.e+]+)', body)
        return float(match.group(1)) if match else 0.0

    def ready(self) -> bool:
        return self.get("/readyz")[0] == 200

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 40) -> int:
        self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text()[-5000:]

    def wait_for(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        """`wait_for` that fails as soon as this worker exits, with its log."""
        wait_for(condition, timeout, what, self.log_path, process=self.process, poll_s=0.1)


@pytest.fixture
def start_worker(stack, tmp_path: Path):
    started: list[Worker] = []

    def start(topic: str, output: str, group: str, **extra: str) -> Worker:
        port = free_port()
        log_path = tmp_path / f"worker-{len(started)}.log"
        env = {
            **stack.env(),
            "INPUT_TOPICS": topic,
            "OUTPUT_TOPICS": output,
            "CONSUMER_GROUP": group,
            "HTTP_PORT": str(port),
            "LOG_FORMAT": "text",
            "TEST_OUTPUT_TOPIC": output,
            "SHUTDOWN_TIMEOUT_S": "30",
            **extra,
        }
        process = start_module("services.validator.stream_app", "--processor", PROCESSOR, env=env, log_path=log_path)
        worker = Worker(process, port, log_path)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        kill(worker.process)


def sources(messages: list[Any]) -> Counter[tuple[int, int]]:
    """How many outputs each input (partition, offset) got."""
    counts: Counter[tuple[int, int]] = Counter()
    for message in messages:
        partition, offset = dict(message.headers())[SOURCE_HEADER].decode().split(":")
        counts[(int(partition), int(offset))] += 1
    return counts


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, from a /metrics body."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def input_positions(bootstrap: str, topic: str) -> set[tuple[int, int]]:
    return {(m.partition(), m.offset()) for m in read(bootstrap, topic)}


# --- tests -----------------------------------------------------------------------------------------------------
def test_every_record_out_once_with_trace_context_then_sigterm_exits_0(stack, start_worker):
    bootstrap = stack.bootstrap_servers
    topic, output = create_topics(bootstrap)
    n = 20_000
    produce(bootstrap, topic, [f"event-{i}".encode() for i in range(n)])
    group = f"g-{uuid.uuid4().hex[:6]}"
    worker = start_worker(topic, output, group)

    # The health endpoint answers from the start; joining the group takes seconds on the local broker.
    worker.wait_for(lambda: worker.get("/readyz")[0] != 0, 30, "the health endpoint")
    status, body = worker.get("/readyz")
    assert status == 503 and "starting" in body
    worker.wait_for(worker.ready, 60, "readiness (partitions assigned)")
    assert worker.get("/healthz")[0] == 200
    worker.wait_for(lambda: sum(committed(bootstrap, group, topic).values()) == n, 60, "all offsets committed")
    assert worker.processed(topic) == n
    assert worker.stop() == 0, worker.log()

    outputs = read(bootstrap, output)
    assert len(outputs) == n  # a clean run produces each output once
    assert set(sources(outputs)) == input_positions(bootstrap, topic)
    by_source = {dict(m.headers())[SOURCE_HEADER]: m for m in outputs}
    for message in read(bootstrap, topic)[:200]:
        out = by_source[f"{message.partition()}:{message.offset()}".encode()]
        assert (out.key(), out.value()) == (message.key(), message.value())
        out_headers = dict(out.headers())
        if message.headers():  # the producer's trace context continues on the output
            assert out_headers["traceparent"] == TRACEPARENT
        else:  # none to continue: the output carries the batch span's context
            assert re.fullmatch(rb"00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]", out_headers["traceparent"])
    assert read(bootstrap, f"{topic}.dlq") == []


def test_processor_errors_go_to_the_dead_letter_topic_with_headers(stack, start_worker):
    bootstrap = stack.bootstrap_servers
    topic, output = create_topics(bootstrap, partitions=2)
    values = [f"event-{i}".encode() for i in range(1000)]
    for i in range(5, 1000, 100):
        values[i] = f"raise-{i}".encode()  # the processor raises for these
    values[42] = b"badout-42"  # the processor returns a str value for this one
    produce(bootstrap, topic, values)
    group = f"g-{uuid.uuid4().hex[:6]}"
    worker = start_worker(topic, output, group)
    worker.wait_for(lambda: sum(committed(bootstrap, group, topic).values()) == 1000, 60, "all committed")
    metrics = samples(worker.get("/metrics")[1])
    assert worker.stop() == 0, worker.log()

    # What an alert or a dashboard reads on /metrics (docs/observability.md), counted per batch.
    dlq = f"{topic}.dlq"
    assert metrics[("lp_dead_letters_total", (("code", "PROCESSOR_EXCEPTION"), ("rule", ""), ("topic", dlq)))] == 10
    assert metrics[("lp_dead_letters_total", (("code", "PROCESSOR_OUTPUT_INVALID"), ("rule", ""), ("topic", dlq)))] == 1
    assert metrics[("lp_validator_verdicts_total", (("verdict", "rejected"),))] == 11
    assert metrics[("lp_validator_verdicts_total", (("verdict", "accepted"),))] == 989
    assert metrics[("lp_validator_data_quality_ratio", ())] == pytest.approx(989 / 1000)
    assert metrics[("lp_stage_records_in_total", (("stage", "validator"),))] == 1000
    assert metrics[("lp_stage_records_out_total", (("stage", "validator"),))] == 989
    assert metrics[("lp_stage_errors_total", (("stage", "validator"),))] == 11
    for partition in (0, 1):  # caught up: nothing behind, so no delay either
        labels = (("consumer_group", group), ("partition", str(partition)), ("topic", topic))
        assert metrics[("lp_kafka_consumer_lag_records", labels)] == 0
        assert metrics[("lp_kafka_consumer_lag_seconds", labels)] == 0

    dead = read(bootstrap, f"{topic}.dlq")
    assert sorted(m.value() for m in dead) == sorted(v for v in values if v.startswith((b"raise", b"badout")))
    assert len(read(bootstrap, output)) == 1000 - len(dead)
    inputs = {(m.partition(), m.offset()): m for m in read(bootstrap, topic)}
    for message in dead:
        headers = dict(message.headers())
        assert headers["lp-dlq-stage"] == b"process"
        assert headers["lp-dlq-original-topic"] == topic.encode()
        original = inputs[(int(headers["lp-dlq-original-partition"]), int(headers["lp-dlq-original-offset"]))]
        assert (original.key(), original.value()) == (message.key(), message.value())
        assert re.fullmatch(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", headers["lp-dlq-time"])
        assert re.fullmatch(rb"[0-9a-f]{32}", headers["lp-dlq-trace-id"])
        if original.headers():
            assert headers["lp-dlq-trace-id"] == TRACEPARENT.split(b"-")[1]
        if message.value().startswith(b"raise"):
            assert headers["lp-dlq-error-code"] == b"PROCESSOR_EXCEPTION"
            assert headers["lp-dlq-message"] == b"ValueError: cannot handle b'" + message.value() + b"'"
        else:
            assert headers["lp-dlq-error-code"] == b"PROCESSOR_OUTPUT_INVALID"
            assert b"str, not bytes" in headers["lp-dlq-message"]


def test_a_stuck_worker_shows_its_lag_in_seconds_growing_then_catching_up(stack, start_worker):
    """What HighIngestionLag reads: the validator stops handling records (its processor blocks) and the lag in
    seconds on /metrics grows with the clock; once the batch goes through, the lag is back to 0."""
    bootstrap = stack.bootstrap_servers
    topic, output = create_topics(bootstrap, partitions=1)
    produce(bootstrap, topic, [f"event-{i}".encode() for i in range(50)])
    group = f"g-{uuid.uuid4().hex[:6]}"
    worker = start_worker(topic, output, group)
    worker.wait_for(lambda: sum(committed(bootstrap, group, topic).values()) == 50, 60, "the first records")
    labels = (("consumer_group", group), ("partition", "0"), ("topic", topic))

    def lag() -> tuple[float, float]:
        metrics = samples(worker.get("/metrics")[1])
        return metrics.get(("lp_kafka_consumer_lag_records", labels), -1), metrics.get(
            ("lp_kafka_consumer_lag_seconds", labels), -1
        )

    assert lag() == (0, 0)
    produce(bootstrap, topic, [b"stall-10"] + [f"late-{i}".encode() for i in range(50)])
    worker.wait_for(lambda: lag()[0] > 0, 10, "lag while the processor is stuck")
    first = lag()
    time.sleep(2)
    records, seconds = lag()
    assert records >= first[0] > 0 and seconds >= first[1] + 1.5, (first, (records, seconds))
    worker.wait_for(lambda: sum(committed(bootstrap, group, topic).values()) == 101, 60, "caught up")
    worker.wait_for(lambda: lag() == (0, 0), 10, "the lag back to 0")
    assert worker.stop() == 0, worker.log()


def test_kill_9_mid_stream_then_restart_loses_nothing_and_repeats_nothing(stack, start_worker):
    bootstrap = stack.bootstrap_servers
    topic, output = create_topics(bootstrap)
    n = 30_000
    produce(bootstrap, topic, [f"event-{i}".encode() for i in range(n)])
    group = f"g-{uuid.uuid4().hex[:6]}"
    slow = {"BATCH_MAX_RECORDS": "500", "TEST_BATCH_DELAY_S": "0.03", "COMMIT_INTERVAL_S": "0.5"}
    first = start_worker(topic, output, group, **slow)
    first.wait_for(lambda: first.processed(topic) >= n / 3, 90, "a third processed")
    first.process.kill()  # SIGKILL: no flush, no commit, no leaving the group
    first.process.wait(timeout=10)
    at_kill = committed(bootstrap, group, topic)
    produced_before_restart = len(read_settled(bootstrap, output))
    assert 0 < sum(at_kill.values()) < produced_before_restart < n  # outputs of uncommitted inputs are out

    second = start_worker(topic, output, group)
    second.wait_for(lambda: sum(committed(bootstrap, group, topic).values()) == n, 120, "all committed after restart")
    assert second.stop() == 0, second.log()

    counts = sources(read(bootstrap, output))
    assert set(counts) == input_positions(bootstrap, topic)  # every input has an output
    assert max(counts.values()) == 1  # and only one: the restart found what was out and did not produce it again
    suppressed = produced_before_restart - sum(at_kill.values())
    assert f"recovered 4 input partitions: {suppressed} outputs of {suppressed} records" in second.log()
    print(
        f"kill -9 after {sum(at_kill.values())} committed and {produced_before_restart} produced: exactly {n} outputs"
    )


def test_kill_9_loop_during_catch_up_at_full_speed_gives_every_output_once(stack, start_worker):
    """The load is in the topic first; the worker is killed five times while it catches up at full speed (commits
    every second lag most then), a fraction of a second after each restart recovered, restarted 1-3 s later."""
    bootstrap = stack.bootstrap_servers
    topic, output = create_topics(bootstrap)
    n = 200_000
    produce(bootstrap, topic, [f"event-{i}".encode() for i in range(n)])
    group = f"g-{uuid.uuid4().hex[:6]}"
    committed_at_kills: list[int] = []
    produced_at_kills: list[int] = []
    for round_ in range(5):
        worker = start_worker(topic, output, group)
        # Killed half a second or so into its catch-up: far ahead of its last commit at full speed.
        worker.wait_for(lambda w=worker: "recovered" in w.log(), 60, f"round {round_}: partitions recovered")
        time.sleep(0.2 + 0.05 * round_)
        worker.process.kill()
        worker.process.wait(timeout=10)
        committed_at_kills.append(sum(committed(bootstrap, group, topic).values()))
        produced_at_kills.append(len(read(bootstrap, output)))
        time.sleep(1 + round_ % 3)
    last = start_worker(topic, output, group)
    last.wait_for(last.ready, 60, "readiness (partitions assigned)")  # a SIGTERM before start-up is not graceful
    last.wait_for(lambda: sum(committed(bootstrap, group, topic).values()) == n, 180, "all committed")
    assert last.stop() == 0, last.log()

    counts = sources(read(bootstrap, output))
    assert set(counts) == input_positions(bootstrap, topic)
    twice = {position: count for position, count in counts.items() if count > 1}
    assert not twice, f"{len(twice)} inputs have several outputs, e.g. {list(twice.items())[:5]}"
    # The kills did fall between an output and its commit, so without recovery these would have been repeated.
    assert any(p > c for p, c in zip(produced_at_kills, committed_at_kills, strict=True)), (
        produced_at_kills,
        committed_at_kills,
    )
    print(f"kills at committed {committed_at_kills}, produced {produced_at_kills}: exactly {n} outputs")


def test_sigterm_mid_stream_finishes_in_flight_and_restart_resumes_without_loss(stack, start_worker):
    bootstrap = stack.bootstrap_servers
    topic, output = create_topics(bootstrap)
    n = 20_000
    produce(bootstrap, topic, [f"event-{i}".encode() for i in range(n)])
    group = f"g-{uuid.uuid4().hex[:6]}"
    slow = {"BATCH_MAX_RECORDS": "500", "TEST_BATCH_DELAY_S": "0.03"}
    first = start_worker(topic, output, group, **slow)
    first.wait_for(lambda: first.processed(topic) >= n / 4, 90, "a quarter processed")
    assert first.stop(signal.SIGTERM) == 0, first.log()
    at_stop = committed(bootstrap, group, topic)
    produced_at_stop = len(read(bootstrap, output))
    # Graceful: every output produced before the stop belongs to a committed input, and vice versa.
    assert produced_at_stop == sum(at_stop.values()) < n

    second = start_worker(topic, output, group, **slow)
    second.wait_for(lambda: sum(committed(bootstrap, group, topic).values()) == n, 120, "all committed after restart")
    assert second.stop() == 0, second.log()
    counts = sources(read(bootstrap, output))
    assert set(counts) == input_positions(bootstrap, topic)
    assert max(counts.values()) == 1  # nothing processed twice across a graceful restart


def test_scaling_out_mid_stream_rebalances_without_loss(stack, start_worker):
    bootstrap = stack.bootstrap_servers
    topic, output = create_topics(bootstrap, partitions=6)
    n = 30_000
    produce(bootstrap, topic, [f"event-{i}".encode() for i in range(n)])
    group = f"g-{uuid.uuid4().hex[:6]}"
    slow = {"BATCH_MAX_RECORDS": "300", "TEST_BATCH_DELAY_S": "0.12"}
    first = start_worker(topic, output, group, **slow)
    first.wait_for(lambda: first.processed(topic) >= n / 5, 90, "a fifth processed")
    second = start_worker(topic, output, group, **slow)  # joins: the first revokes, drains, commits, rejoins
    second.wait_for(lambda: sum(committed(bootstrap, group, topic).values()) == n, 120, "all committed")
    assert second.processed(topic) > 0, "the second worker never got partitions"
    assert first.stop() == 0, first.log()
    assert second.stop() == 0, second.log()
    counts = sources(read(bootstrap, output))
    assert set(counts) == input_positions(bootstrap, topic)
    print(f"rebalance: {sum(counts.values())} outputs for {n} inputs, {sum(c > 1 for c in counts.values())} twice")


def test_missing_topics_fail_start_up_without_creating_them(stack, start_worker):
    bootstrap = stack.bootstrap_servers
    missing = f"test.rt.missing.{uuid.uuid4().hex[:8]}"
    worker = start_worker(missing, f"{missing}.out", "g-missing")
    assert worker.process.wait(timeout=60) == 1
    assert f"input topics missing on the broker: {missing}" in worker.log()
    # The local broker creates any topic a metadata request names; the runtime's check must not.
    assert missing not in AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).topics
