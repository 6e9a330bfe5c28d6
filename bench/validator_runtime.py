"""Validator runtime events/s (pass-through processor) against the bare aiokafka consume-then-produce loop.

All three figures read the same records (generator events, Avro, zstd as the platform's producers write them,
12 partitions) and produce them again, in the same run on the same broker:

- ceiling: aiokafka alone: `getmany`, one record batch per output partition (`send_batch`, CRC-32 key
  partitioning as the runtime), up to two batches awaiting acks, commit every second. No framework, no
  tracing, no metrics.
- runtime: `python -m services.validator.stream_app` with `passthrough` below, measured from its
  `/metrics` (first processed record to the last).
- Faust agent (consume only): the stock Faust path, `async for` over an agent stream that does nothing, the
  upper bound of any agent-based design. It explains why the runtime feeds batches past Faust's streams.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zlib import crc32

from confluent_kafka.admin import AdminClient, NewTopic

from bench.harness import BenchContext, Result, produce_all
from services.contracts.topics import dead_letter_topic
from services.testing.net import free_port
from services.testing.processes import start_module
from services.validator.runtime import InputRecord, Output, StreamRuntimeSettings

PARTITIONS = 12
BATCH_RECORDS = StreamRuntimeSettings.model_fields["batch_max_records"].default  # the runtime's, used by all three
LINGER_MS = 10
MAX_BATCH_BYTES = 512 * 1024
TRACEPARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
ROUNDS = 2
# /metrics is read this often while a worker runs: each read costs the worker's GIL ~1 ms (process stats, every
# metric), so reading every 20 ms took ~5 % of its time; the runs are long enough for 50 ms to blur under 2 %.
POLL_S = 0.05


def passthrough(batch: list[InputRecord]) -> list[Output]:
    """The benchmark's processor: each record to OUTPUT_TOPIC unchanged (trace context from its source)."""
    topic = os.environ["BENCH_OUTPUT_TOPIC"]
    return [Output(topic, record.key, record.value, source=record) for record in batch]


def _create_topics(bootstrap: str, *names: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})  # keep a reference: the futures die with the client
    for future in admin.create_topics([NewTopic(name, PARTITIONS, 1) for name in names]).values():
        future.result(timeout=30)


def _seed(bootstrap: str, topic: str, events: int) -> None:
    """`events` records cycling over 20,000 generator events (Avro, as the generator writes them): a pass-through
    does not look at the payload, and serialising every event would take longer than the benchmark."""
    from services.generator.model import Simulation
    from services.kit.avro import AvroSerializer, SchemaRepository

    serialize = AvroSerializer(SchemaRepository.load()["raw_event"])
    simulation = Simulation(7, 1000, 500)
    now = datetime.now(UTC)
    distinct = [(e.key, serialize(e.to_record())) for e in (simulation.next_event(now) for _ in range(20_000))]
    records = (distinct[i % len(distinct)] for i in range(events))
    produce_all(bootstrap, topic, records, headers=[("traceparent", TRACEPARENT)])


async def _bare_loop(bootstrap: str, source: str, target: str, events: int) -> float:
    """The ceiling: aiokafka consume, produce by record batch per partition, two batches in flight, commits."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    consumer = AIOKafkaConsumer(
        source,
        bootstrap_servers=bootstrap,
        group_id=f"bench-bare-{time.time_ns()}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=BATCH_RECORDS,
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=LINGER_MS, max_batch_size=MAX_BATCH_BYTES
    )
    await consumer.start()
    await producer.start()
    try:
        count = len(await producer.partitions_for(target))
        in_flight: deque[list[asyncio.Future[Any]]] = deque()
        done = 0
        started = 0.0
        last_commit = time.monotonic()
        while done < events:
            fetched = await consumer.getmany(timeout_ms=500, max_records=BATCH_RECORDS)
            if not fetched:
                continue
            if not started:
                started = time.perf_counter()
            builders: dict[int, Any] = {}
            acks = []
            for records in fetched.values():
                for record in records:
                    partition = crc32(record.key) % count
                    builder = builders.get(partition) or builders.setdefault(partition, producer.create_batch())
                    headers = list(record.headers)
                    if builder.append(key=record.key, value=record.value, timestamp=None, headers=headers) is None:
                        acks.append(await producer.send_batch(builder, target, partition=partition))
                        builder = builders[partition] = producer.create_batch()
                        builder.append(key=record.key, value=record.value, timestamp=None, headers=headers)
                    done += 1
            for partition, builder in builders.items():
                acks.append(await producer.send_batch(builder, target, partition=partition))
            in_flight.append(acks)
            while len(in_flight) >= 2 or (done >= events and in_flight):
                await asyncio.gather(*in_flight.popleft())
            if time.monotonic() - last_commit > 1.0:
                await consumer.commit()
                last_commit = time.monotonic()
        elapsed = time.perf_counter() - started
        await consumer.commit()
        return events / elapsed
    finally:
        await consumer.stop()
        await producer.stop()


def _metric(port: int, topic: str) -> float | None:
    try:
        # only the one counter: a full scrape every POLL_S took ~8 % of the worker's time (4-6 ms each)
        url = f"http://127.0.0.1:{port}/metrics?name[]=lp_validator_runtime_records_total"
        with urllib.request.urlopen(url, timeout=2) as response:
            body = response.read().decode()
    except OSError:
        return None
    match = re.search(rf'lp_validator_runtime_records_total\{{topic="{re.escape(topic)}"\}} ([0-9.e+]+)', body)
    return float(match.group(1)) if match else 0.0


def _runtime_rate(env: dict[str, str], source: str, target: str, events: int, work_dir: Path) -> float:
    """Events/s of the runtime process, from its first processed record to its last (start-up excluded)."""
    port = free_port()
    run_env = {
        **os.environ,
        "BATCH_MAX_RECORDS": str(BATCH_RECORDS),
        "PRODUCER_LINGER_MS": str(LINGER_MS),
        "PRODUCER_MAX_BATCH_BYTES": str(MAX_BATCH_BYTES),
        "LOG_LEVEL": "WARNING",
        **env,
        "INPUT_TOPICS": source,
        "OUTPUT_TOPICS": target,
        "CONSUMER_GROUP": f"bench-runtime-{time.time_ns()}",
        "BENCH_OUTPUT_TOPIC": target,
        "HTTP_PORT": str(port),
    }
    command = ["services.validator.stream_app", "--processor", "bench.validator_runtime:passthrough"]
    return worker_rate(command, run_env, port, source, events, work_dir / "validator-runtime-bench.log")


def worker_rate(
    module_args: list[str], env: dict[str, str], port: int, topic: str, events: int, log_path: Path
) -> float:
    """Run `python -m <module_args>` (a streaming-runtime worker) and return its records/s on `topic`, from its
    first processed record to the `events`-th, read from its /metrics (start-up excluded)."""
    process = start_module(*module_args, env=env, log_path=log_path)
    try:
        first: tuple[float, float] | None = None
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{module_args[0]} exited with {process.returncode}: {log_path.read_text()[-3000:]}")
            done = _metric(port, topic)
            now = time.monotonic()
            if done:
                if first is None:
                    first = (now, done)
                if done >= events:
                    return (done - first[1]) / (now - first[0])
            time.sleep(POLL_S)
        raise TimeoutError(f"{module_args[0]} did not process {events} records of {topic} in 900 s")
    finally:
        process.terminate()
        process.wait(timeout=60)


_AGENT_BASELINE = """
import json, os, sys, time
from pathlib import Path
import faust
bootstrap, topic, events, report = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
app = faust.App(f"bench-agent-{time.time_ns()}", env={}, broker=f"kafka://{bootstrap}", store="memory://",
                datadir=str(report.parent / "faust-agent"), web_enabled=False, topic_allow_declare=False,
                topic_disable_leader=True, broker_session_timeout=6, broker_heartbeat_interval=1,
                consumer_auto_offset_reset="earliest", broker_max_poll_records=2000, value_serializer="raw",
                key_serializer="raw")
state = {"done": 0, "started": 0.0}
@app.agent(app.topic(topic, value_serializer="raw", key_serializer="raw"))
async def consume(stream):
    async for _value in stream:
        state["started"] = state["started"] or time.perf_counter()
        state["done"] += 1
        if state["done"] >= events:
            elapsed = time.perf_counter() - state["started"]
            report.write_text(json.dumps({"events_per_s": events / elapsed}))
            os._exit(0)
faust.Worker(app, quiet=True, loglevel="WARNING").execute_from_commandline()
"""


def _agent_rate(bootstrap: str, source: str, events: int, work_dir: Path) -> float:
    report = work_dir / "faust-agent.json"
    subprocess.run(
        [sys.executable, "-c", _AGENT_BASELINE, bootstrap, source, str(events), str(report)],
        cwd=work_dir,
        capture_output=True,
        timeout=600,
    )
    return float(json.loads(report.read_text())["events_per_s"])


def run(ctx: BenchContext) -> list[Result]:
    events = max(50_000, int(200_000 * ctx.scale))
    bootstrap = ctx.env["KAFKA_BOOTSTRAP_SERVERS"]
    stamp = time.time_ns()
    source = f"bench.vr.in.{stamp}"
    _create_topics(bootstrap, source, dead_letter_topic(source))
    _seed(bootstrap, source, events)
    work_dir = Path(tempfile.mkdtemp(prefix="validator-runtime-", dir=ctx.work_dir))
    # Alternate the two and keep the best of each: on a small shared machine a single run is as much a
    # measure of the neighbours as of the code.
    ceilings, runtimes = [], []
    for round_ in range(ROUNDS):
        bare_out, runtime_out = f"bench.vr.bare.{stamp}.{round_}", f"bench.vr.runtime.{stamp}.{round_}"
        _create_topics(bootstrap, bare_out, runtime_out)
        ceilings.append(asyncio.run(_bare_loop(bootstrap, source, bare_out, events)))
        runtimes.append(_runtime_rate(ctx.env, source, runtime_out, events, work_dir))
    ceiling, runtime = max(ceilings), max(runtimes)
    agent_events = max(10_000, events // 10)  # ~4k/s: a tenth of the records is plenty
    agent = _agent_rate(bootstrap, source, agent_events, work_dir)
    ceiling_what = "bare aiokafka consume-then-produce of the same records"
    spread = ", ".join(f"{r:,.0f}/{c:,.0f}" for r, c in zip(runtimes, ceilings, strict=True))
    return [
        Result(
            "validator runtime events/s",
            round(runtime),
            "events/s",
            round(ceiling),
            ceiling_what,
            note=f"{events} events, pass-through processor, 1 process, best of {ROUNDS} (runs: {spread})",
        ),
        Result(
            "Faust agent consume-only events/s",
            round(agent),
            "events/s",
            round(ceiling),
            ceiling_what,
            note=f"{agent_events} events; the stock Faust stream path the runtime bypasses",
        ),
    ]


if __name__ == "__main__":  # this benchmark alone, on a broker of its own: python -m bench.validator_runtime
    from services.stack import LocalStack, StackSettings

    with (
        tempfile.TemporaryDirectory(prefix="lp-bench-") as work,
        LocalStack(StackSettings.with_free_ports(state_dir=Path(work) / "stack"), only=["broker"]) as stack,
    ):
        for result in run(BenchContext(stack.env(), float(os.environ.get("BENCH_SCALE", "1")), Path(work))):
            print(f"{result.name}: {result.value:,.0f} {result.unit} (ceiling {result.ceiling:,.0f}, {result.ratio})")
