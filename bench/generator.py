"""Generator events/s against bare confluent-kafka producing the same bytes to the same topic layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime

from bench.harness import BenchContext, Result, produce_all
from services.generator.model import Simulation
from services.kit.avro import AvroSerializer, SchemaRepository
from services.kit.kafka import create_topics


def bare_produce_rate(bootstrap: str, payloads: list[tuple[str | None, bytes]]) -> float:
    """The ceiling: the same client with the same producer settings, no model, no PostgreSQL, no tracing."""
    topic = f"bench.ceiling.{int(time.time() * 1000)}"
    create_topics({"bootstrap.servers": bootstrap}, {topic: 16})
    started = time.perf_counter()
    produce_all(bootstrap, topic, payloads)
    elapsed = time.perf_counter() - started
    return len(payloads) / elapsed


def run(ctx: BenchContext) -> list[Result]:
    events = max(5_000, int(100_000 * ctx.scale))
    bootstrap = ctx.env["KAFKA_BOOTSTRAP_SERVERS"]
    serialize = AvroSerializer(SchemaRepository.load()["raw_event"])
    simulation = Simulation(7, 1000, 500)
    now = datetime.now(UTC)
    payloads = [(e.key, serialize(e.to_record())) for e in (simulation.next_event(now) for _ in range(events))]
    ceiling = bare_produce_rate(bootstrap, payloads)

    topic = f"bench.generator.{int(time.time() * 1000)}"
    create_topics({"bootstrap.servers": bootstrap}, {topic: 16})
    report = ctx.work_dir / "generator-report.json"
    env = {
        **os.environ,
        **ctx.env,
        "EVENTS_TOPIC": topic,
        "EVENTS": str(events),
        "RATE": "0",
        "SEED": "7",
        "BAD_EVENT_SHARE": "0",
        "REPORT_FILE": str(report),
        "HTTP_PORT": "0",
        "LOG_LEVEL": "WARNING",
    }
    subprocess.run([sys.executable, "-m", "services.generator"], env=env, check=True, timeout=600)
    figures = json.loads(report.read_text())
    return [
        Result(
            "generator events/s",
            figures["events_per_s"],
            "events/s",
            round(ceiling),
            "bare confluent-kafka produce of the same Avro bytes",
            note=f"{events} events incl. PostgreSQL writes of purchases and status changes",
        )
    ]
